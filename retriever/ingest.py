"""One pass over the passages that both embeds them into the index and stores their KV blocks.

Work is planned from what the index and the block store already hold, so running it again does
no model work for passages already there, and a run stopped part-way resumes where it stopped.
A batch's KV is stored on a background thread while the model encodes the next batch, and its
passages are committed once their KV is stored.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from blockrag.engine import DEFAULT_MODEL, BlockEngine
from blockrag.kvstore import KVStore, StoreUnavailableError, WrongModelError

from .chunking import split_text
from .chunking import node_id as make_node_id
from .documents import Document
from .embedding import DEFAULT_EMBEDDING_MODEL, Embedder
from blockrag.errors import DocumentFormatError, IndexMismatchError
from .index import Index, IndexConfig, Node, VectorIndexKind, read_config

DEFAULT_BATCH_PASSAGES = 32


@dataclass(frozen=True)
class IngestReport:
    """What one :func:`ingest` call found and did."""

    documents: int
    passages: int
    """Passages the given documents hold now."""
    added: int
    """Passages embedded and added to the index."""
    removed: int
    """Passages of changed documents removed (with their vectors and KV)."""
    encoded: int
    """Passages whose KV the LLM computed; the others' KV was already stored."""
    encoded_tokens: int
    seconds: float
    kv_seconds: float
    """Spent computing KV (storing it overlaps with the next batch's forward)."""
    embed_seconds: float
    write_seconds: float
    """Spent waiting for KV writes to finish and committing passages and vectors."""

    @property
    def model_work(self) -> bool:
        return bool(self.added or self.encoded)

    def __str__(self) -> str:
        return (f"{self.documents} documents, {self.passages} passages: {self.added} added, {self.removed} removed, "
                f"{self.encoded} encoded ({self.encoded_tokens} tokens) in {self.seconds:.1f} s")


class _Models:
    """The LLM and the embedder of one :func:`ingest` call, each loaded only once a passage needs it.

    An unchanged re-run needs neither: documents whose text was fully ingested before are
    recognised by a digest of their text, and passages whose KV is stored need no forward pass.
    """

    def __init__(self, engine: BlockEngine | None, embedder: Embedder | None, model: str,
                 settings: dict[str, object], fingerprint: str | None, folder: Path):
        self._engine, self._embedder = engine, embedder
        self._model, self._settings, self._fingerprint, self._folder = model, settings, fingerprint, folder
        if engine is not None:
            self._check(engine)

    def engine(self) -> BlockEngine:
        if self._engine is None:
            self._engine = BlockEngine.from_pretrained(self._model, **self._settings)
            self._check(self._engine)
        return self._engine

    def embedder(self, name: str) -> Embedder:
        self._embedder = self._embedder or Embedder(name)
        return self._embedder

    @property
    def loaded_engine(self) -> BlockEngine | None:
        return self._engine

    @property
    def loaded_embedder(self) -> Embedder | None:
        return self._embedder

    def _check(self, engine: BlockEngine) -> None:
        if self._fingerprint is not None and engine.fingerprint != self._fingerprint:
            raise IndexMismatchError(
                f"the index in {self._folder} was built with the LLM fingerprint {self._fingerprint}, but "
                f"{self._model!r} loads as {engine.fingerprint}; ingest with the index's model, or into a new folder.")


def _open_or_create(folder: Path, models: _Models, model: str, embedding_model: str | None,
                    chunk_tokens: int | None, vector_index: VectorIndexKind | None,
                    kv_store: KVStore | None) -> Index:
    if not Index.exists(folder):
        engine, embedder = models.engine(), models.embedder(embedding_model or DEFAULT_EMBEDDING_MODEL)
        _check_store(kv_store, engine.fingerprint)
        config = IndexConfig(model=model, fingerprint=engine.fingerprint, system_prompt=engine.system_prompt,
                             block_mode=engine.block_mode, embedding_model=embedder.name,
                             dimension=embedder.dimension, **{k: v for k, v in
                             (("chunk_tokens", chunk_tokens), ("vector_index", vector_index)) if v is not None})
        return Index.create(folder, config, kv_store=kv_store)
    config = read_config(folder)
    engine, embedder = models.loaded_engine, models.loaded_embedder
    asked = {"system_prompt": engine.system_prompt if engine else config.system_prompt,
             "block_mode": engine.block_mode if engine else config.block_mode,
             "embedding_model": embedder.name if embedder else embedding_model,
             "chunk_tokens": chunk_tokens, "vector_index": vector_index}
    differ = [f"{k} {getattr(config, k)!r} (asked: {v!r})" for k, v in asked.items()
              if v is not None and v != getattr(config, k)]
    if differ:
        raise IndexMismatchError(f"the index in {folder} was built with {', '.join(differ)}; ingest with the index's "
                                 "settings (the defaults of `blockrag ingest` reuse them), or into a new folder.")
    _check_store(kv_store, config.fingerprint)
    return Index.open(folder, kv_store=kv_store)


def _check_store(store: KVStore | None, fingerprint: str) -> None:
    """Refuse a store of another model before anything is written."""
    if store is not None and store.fingerprint not in (None, fingerprint):
        raise WrongModelError(
            f"the block store at {store.location} holds blocks of model {store.fingerprint}, not of this index's "
            f"model ({fingerprint}); pass a store of this model, or an empty one.")


def _check_documents(documents: Iterable[Document]) -> list[Document]:
    """``documents`` as a list, once every ID is unique and every text is non-empty text (not binary data).

    Raises :class:`DocumentFormatError` naming the first bad document, before anything is written.
    """
    documents = list(documents)
    seen: set[str] = set()
    for doc in documents:
        if doc.id in seen:
            raise DocumentFormatError(f"document ID {doc.id!r} is given twice; document IDs must be unique.")
        seen.add(doc.id)
        if not isinstance(doc.text, str):
            raise DocumentFormatError(f"document {doc.id!r} has a text of type {type(doc.text).__name__}; "
                                      "pass its text as a str.")
        if not doc.text.strip():
            raise DocumentFormatError(f"document {doc.id!r} holds no text (it is empty or only whitespace); "
                                      "remove it from the input, or give it text.")
        if "\x00" in doc.text:
            raise DocumentFormatError(f"document {doc.id!r} holds NUL characters: it is binary data or UTF-16 text, "
                                      "not UTF-8 text. Leave binary files out of the input, or convert text to UTF-8.")
    return documents


def ingest(
    documents: Iterable[Document],
    index_dir: str | os.PathLike,
    *,
    engine: BlockEngine | None = None,
    embedder: Embedder | None = None,
    model: str | None = None,
    embedding_model: str | None = None,
    chunk_tokens: int | None = None,
    vector_index: VectorIndexKind | None = None,
    batch_passages: int = DEFAULT_BATCH_PASSAGES,
    kv_store: KVStore | None = None,
    progress: bool = True,
) -> IngestReport:
    """Add or replace ``documents`` in the index at ``index_dir`` (created if needed), with their KV.

    A new index records the LLM's name for answering (``model``, default the bundled SmolLM2:
    name it when passing an ``engine`` of another model) and fingerprint, the embedding model,
    ``chunk_tokens`` (200) and ``vector_index`` ("flat" or "hnsw"); later calls reuse them and
    refuse different ones. Re-ingesting a document ID replaces the passages that changed;
    unchanged passages cost nothing, and without ``engine`` or ``embedder`` a model is loaded
    only once a passage needs it. ``kv_store`` replaces the index's own store; ``engine`` stores
    into the index's store for the duration of the call. Bad input raises
    :class:`DocumentFormatError` before anything is written.
    """
    started = time.perf_counter()
    documents = _check_documents(documents)
    folder = Path(index_dir).expanduser()
    existing = read_config(folder) if Index.exists(folder) else None
    model = model or (existing.model if existing else DEFAULT_MODEL)
    settings = {"system_prompt": existing.system_prompt, "block_mode": existing.block_mode} if existing else {}
    models = _Models(engine, embedder, model, settings, existing.fingerprint if existing else None, folder)
    if existing is not None and model != existing.model:
        models.engine()  # another name for the index's model: only its fingerprint can tell
    index = _open_or_create(folder, models, model, embedding_model, chunk_tokens, vector_index, kv_store)
    with index:
        return _ingest(documents, index, models, batch_passages, progress, started)


def _one_openmp_thread() -> None:
    """Keep the writer's tensor ops (the store's dtype conversion) on the writer's own thread.

    OpenMP gives each calling thread a team of its own: at the default size, the writer's team
    would spin on the cores the model's forward is using. torch sets a thread's team size on its first
    parallel call there, to the process's count once ``torch.set_num_threads`` was called: that first call
    (``get_num_threads``) goes before the limit, which it would otherwise undo.
    """
    torch.get_num_threads()
    threadpool_limits(1, user_api="openmp")  # OpenMP limits apply to the calling thread only


@dataclass
class _Commit:
    """A batch whose KV is being stored in the background, and its passages to commit after."""

    puts: list[Future]
    fresh: list[Node]
    vectors: np.ndarray | None
    passages: int

    def finish(self, index: Index) -> float:
        """Wait for the KV writes (raising their error, if any), then commit; seconds spent."""
        started = time.perf_counter()
        if False in [put.result() for put in self.puts]:  # every write waited for, its error raised
            raise StoreUnavailableError(
                f"ingestion could not write KV blocks to {index.kv.location}: its server is unreachable (the store "
                "skips writes under on_unavailable='miss'); the passages were not added. Run again once it is back.")
        if self.fresh:
            index.add(self.fresh, self.vectors)
        return time.perf_counter() - started


@dataclass
class _Plan:
    """What a call must do, found without writing anything (and without a model for unchanged documents)."""

    wanted: list[Node]
    """Every passage the documents hold now."""
    new_ids: set[str]
    stale: list[str]
    changed: list[tuple[str, str]]
    """(document ID, text digest) of the documents whose passages are (re)computed."""


def _text_digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _plan(documents: list[Document], index: Index, models: _Models) -> _Plan:
    digests = index.text_digests([d.id for d in documents])
    stale: list[str] = []
    wanted: list[Node] = []
    changed: list[tuple[str, str]] = []
    new: list[tuple[Document, int, str, str]] = []
    for doc in documents:
        held = {n.id: n for n in index.document_nodes(doc.id)}
        digest = _text_digest(doc.text)
        if digests.get(doc.id) == digest:  # ingested whole from this very text: its passages are those held
            wanted.extend(held.values())
            continue
        changed.append((doc.id, digest))
        engine = models.engine()
        texts = split_text(doc.text, engine.tokenizer, index.config.chunk_tokens)
        ids = [make_node_id(doc.id, i, t) for i, t in enumerate(texts)]
        stale.extend(set(held) - set(ids))
        wanted.extend(held[nid] for nid in ids if nid in held)
        new.extend((doc, position, nid, text) for position, (nid, text) in enumerate(zip(ids, texts))
                   if nid not in held)
    if new:
        engine = models.engine()
        keys = engine.block_keys([text for *_, text in new])  # encodes the prefix block if not cached
        wanted.extend(Node(nid, doc.id, position, text, len(engine.passage_token_ids(text)), key, doc.metadata)
                      for (doc, position, nid, text), key in zip(new, keys))
    return _Plan(wanted, {nid for _, _, nid, _ in new}, stale, changed)


def _ingest(documents: list[Document], index: Index, models: _Models, batch_passages: int, progress: bool,
            started: float) -> IngestReport:
    plan = _plan(documents, index, models)
    wanted, new_ids = plan.wanted, plan.new_ids
    index.set_documents(((d.id, d.metadata) for d in documents), unfinished=[d for d, _ in plan.changed])
    removed = index.remove_nodes(plan.stale, keep_kv={n.kv_key for n in wanted})

    missing_kv = {n.kv_key for n in wanted if not index.kv.contains(n.kv_key)}
    todo = sorted((n for n in wanted if n.id in new_ids or n.kv_key in missing_kv), key=lambda n: n.tokens)
    encoded = encoded_tokens = 0
    kv_s = embed_s = write_s = 0.0
    writing: _Commit | None = None
    with tqdm(total=len(todo), desc="ingesting", unit="passage", disable=not progress or not todo) as bar, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="blockrag-ingest",
                               initializer=_one_openmp_thread) as writer:
        try:
            for lo in range(0, len(todo), batch_passages):
                batch = todo[lo:lo + batch_passages]
                t0 = time.perf_counter()
                to_encode = list({n.kv_key: n for n in batch if n.kv_key in missing_kv}.values())
                blocks = models.engine().encode([n.text for n in to_encode]) if to_encode else []
                missing_kv -= {n.kv_key for n in to_encode}
                encoded += len(to_encode)
                encoded_tokens += sum(n.tokens for n in to_encode)
                t1 = time.perf_counter()
                fresh = [n for n in batch if n.id in new_ids]
                vectors = models.embedder(index.config.embedding_model).embed([n.text for n in fresh]) \
                    if fresh else None
                t2 = time.perf_counter()
                if writing is not None:
                    done, writing = writing, None
                    write_s += done.finish(index)
                    bar.update(done.passages)
                # This batch's KV is written while the next batch's forward runs; its passages are
                # committed only once their KV is stored, so an index never lists a passage it cannot serve.
                writing = _Commit([writer.submit(index.kv.put, n.kv_key, b) for n, b in zip(to_encode, blocks)],
                                  fresh, vectors, len(batch))
                kv_s, embed_s = kv_s + t1 - t0, embed_s + t2 - t1
        finally:  # a batch already encoded is stored and committed even when a later one fails
            if writing is not None:
                write_s += writing.finish(index)
                bar.update(writing.passages)
    t0 = time.perf_counter()
    index.record_digests(plan.changed)  # every passage of these documents is now committed with its KV
    index.save()
    write_s += time.perf_counter() - t0
    return IngestReport(len(documents), len(wanted), len(new_ids), removed, encoded, encoded_tokens,
                        time.perf_counter() - started, kv_s, embed_s, write_s)
