"""One pass over the passages that both embeds them into the index and stores their KV blocks.

Work is planned from what the index and the block store already hold, so running it again does
no model work for passages already there, and a run stopped part-way resumes where it stopped.
A batch's KV is stored on a background thread while the model encodes the next batch, and its
passages are committed once their KV is stored.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from blockrag.engine import DEFAULT_MODEL, BlockEngine
from blockrag.kvstore import KVStore

from .chunking import split_text
from .chunking import node_id as make_node_id
from .documents import Document
from .embedding import DEFAULT_EMBEDDING_MODEL, Embedder
from .errors import DocumentFormatError, IndexMismatchError
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


def _open_or_create(folder: Path, engine: BlockEngine, model: str, embedder: Embedder | None,
                    embedding_model: str | None, chunk_tokens: int | None, vector_index: VectorIndexKind | None,
                    kv_store: KVStore | None) -> tuple[Index, Embedder | None]:
    if not Index.exists(folder):
        embedder = embedder or Embedder(embedding_model or DEFAULT_EMBEDDING_MODEL)
        config = IndexConfig(model=model, fingerprint=engine.fingerprint, system_prompt=engine.system_prompt,
                             block_mode=engine.block_mode, embedding_model=embedder.name,
                             dimension=embedder.dimension, **{k: v for k, v in
                             (("chunk_tokens", chunk_tokens), ("vector_index", vector_index)) if v is not None})
        return Index.create(folder, config, kv_store=kv_store), embedder
    config = read_config(folder)
    asked = {"fingerprint": engine.fingerprint, "system_prompt": engine.system_prompt,
             "block_mode": engine.block_mode, "embedding_model": embedder.name if embedder else embedding_model,
             "chunk_tokens": chunk_tokens, "vector_index": vector_index}
    differ = [f"{k} {getattr(config, k)!r} (asked: {v!r})" for k, v in asked.items()
              if v is not None and v != getattr(config, k)]
    if differ:
        raise IndexMismatchError(f"the index in {folder} was built with {', '.join(differ)}; ingest with the index's "
                                 "settings (the defaults of `blockrag ingest` reuse them), or into a new folder.")
    return Index.open(folder, kv_store=kv_store), embedder


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
    unchanged passages cost nothing. ``kv_store`` replaces the index's own store; ``engine``
    stores into the index's store for the duration of the call.
    """
    started = time.perf_counter()
    documents = list(documents)
    seen: set[str] = set()
    for doc in documents:
        if doc.id in seen:
            raise DocumentFormatError(f"document ID {doc.id!r} is given twice; document IDs must be unique.")
        seen.add(doc.id)
    folder = Path(index_dir).expanduser()
    existing = read_config(folder) if Index.exists(folder) else None
    model = model or (existing.model if existing else DEFAULT_MODEL)
    if engine is None:
        settings = {"system_prompt": existing.system_prompt, "block_mode": existing.block_mode} if existing else {}
        engine = BlockEngine.from_pretrained(model, **settings)
    index, embedder = _open_or_create(folder, engine, model, embedder, embedding_model, chunk_tokens, vector_index,
                                      kv_store)
    with index, _storing_into(engine, index.kv):
        return _ingest(documents, index, engine, embedder, batch_passages, progress, started)


@contextmanager
def _storing_into(engine: BlockEngine, store: KVStore) -> Iterator[None]:
    """Point ``engine.blocks`` at the index's store for the call; the engine keeps its cached prefix blocks."""
    previous, engine.store = engine.store, store
    try:
        yield
    finally:
        engine.store = previous


def _one_openmp_thread() -> None:
    """Keep the writer's tensor ops (the store's dtype conversion) on the writer's own thread.

    OpenMP gives each calling thread a team of its own: at the default size, the writer's team
    would spin on the cores the model's forward is using.
    """
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
        for put in self.puts:
            put.result()
        if self.fresh:
            index.add(self.fresh, self.vectors)
        return time.perf_counter() - started


def _ingest(documents: list[Document], index: Index, engine: BlockEngine, embedder: Embedder | None,
            batch_passages: int, progress: bool, started: float) -> IngestReport:
    stale: list[str] = []
    wanted: list[Node] = []
    new: list[tuple[Document, int, str, str]] = []
    for doc in documents:
        held = {n.id: n for n in index.document_nodes(doc.id)}
        texts = split_text(doc.text, engine.tokenizer, index.config.chunk_tokens)
        ids = [make_node_id(doc.id, i, t) for i, t in enumerate(texts)]
        stale.extend(set(held) - set(ids))
        wanted.extend(held[nid] for nid in ids if nid in held)
        new.extend((doc, position, nid, text) for position, (nid, text) in enumerate(zip(ids, texts))
                   if nid not in held)
    keys = engine.block_keys([text for *_, text in new]) if new else []  # encodes the prefix block if not cached
    wanted.extend(Node(nid, doc.id, position, text, len(engine.passage_token_ids(text)), key, doc.metadata)
                  for (doc, position, nid, text), key in zip(new, keys))
    new_ids = {nid for _, _, nid, _ in new}
    index.set_documents((d.id, d.metadata) for d in documents)
    removed = index.remove_nodes(stale, keep_kv={n.kv_key for n in wanted})

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
                blocks = engine.encode([n.text for n in to_encode])
                missing_kv -= {n.kv_key for n in to_encode}
                encoded += len(to_encode)
                encoded_tokens += sum(n.tokens for n in to_encode)
                t1 = time.perf_counter()
                fresh = [n for n in batch if n.id in new_ids]
                if fresh:
                    embedder = embedder or Embedder(index.config.embedding_model)
                    vectors = embedder.embed([n.text for n in fresh])
                t2 = time.perf_counter()
                if writing is not None:
                    done, writing = writing, None
                    write_s += done.finish(index)
                    bar.update(done.passages)
                # This batch's KV is written while the next batch's forward runs; its passages are
                # committed only once their KV is stored, so an index never lists a passage it cannot serve.
                writing = _Commit([writer.submit(index.kv.put, n.kv_key, b) for n, b in zip(to_encode, blocks)],
                                  fresh, vectors if fresh else None, len(batch))
                kv_s, embed_s = kv_s + t1 - t0, embed_s + t2 - t1
        finally:  # a batch already encoded is stored and committed even when a later one fails
            if writing is not None:
                write_s += writing.finish(index)
                bar.update(writing.passages)
    t0 = time.perf_counter()
    index.save()
    write_s += time.perf_counter() - t0
    return IngestReport(len(documents), len(wanted), len(new_ids), removed, encoded, encoded_tokens,
                        time.perf_counter() - started, kv_s, embed_s, write_s)
