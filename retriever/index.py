"""An index folder: passages in a SQLite document store, their vectors in FAISS, their KV in a block store.

The document store is the source of truth and is committed batch by batch: it holds each
passage's text, metadata, KV key and vector. The FAISS file is derived from it, written when the
index is saved, and rebuilt from the document store if a run stopped before saving it (the
document store counts its changes to passages; the FAISS file records the count it matches).
It also records a digest of each document's text once all its passages are committed, so a
re-run over unchanged documents needs no tokenizer or model to know that nothing changed.

    folder/config.json       what built the index (LLM, prompt, embedding model, settings)
    folder/docstore.sqlite   documents and passages (nodes), with their vectors
    folder/vectors.faiss     FAISS ``IndexIDMap2`` over flat inner product or HNSW
    folder/vectors.json      the count of passage changes the FAISS file matches
    folder/kv/               the block store (:mod:`blockrag.kvstore`) unless another is given
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import faiss
import numpy as np

from blockrag.engine import BlockMode
from blockrag.kvstore import KVStore, open_store
from blockrag.kvstore.disk import is_disk_full

from .chunking import DEFAULT_CHUNK_TOKENS, faiss_id, node_from_faiss_id
from blockrag.errors import InvalidArgumentError, IndexFullError, IndexMismatchError, IndexNotFoundError, NodeNotFoundError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
VectorIndexKind = Literal["flat", "hnsw"]
VECTOR_INDEX_KINDS: tuple[VectorIndexKind, ...] = ("flat", "hnsw")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (id TEXT PRIMARY KEY, metadata TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY, doc_id TEXT NOT NULL, position INTEGER NOT NULL, text TEXT NOT NULL,
    tokens INTEGER NOT NULL, kv_key TEXT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS nodes_by_doc ON nodes (doc_id, position);
CREATE INDEX IF NOT EXISTS nodes_by_kv ON nodes (kv_key);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO state VALUES ('vectors', 0);
CREATE TABLE IF NOT EXISTS ingested (doc_id TEXT PRIMARY KEY, digest TEXT NOT NULL);
"""


@dataclass(frozen=True)
class IndexConfig:
    """What built an index. Ingestion and answering must use the same, or the stored KV would not apply."""

    model: str
    """The LLM to load for answering (alias, folder or GGUF file)."""
    fingerprint: str
    """:func:`blockrag.engine.model_fingerprint` of that LLM: the KV keys name it."""
    system_prompt: str | None
    block_mode: BlockMode
    embedding_model: str
    dimension: int
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    vector_index: VectorIndexKind = "flat"
    hnsw_m: int = 32


@dataclass(frozen=True)
class Node:
    """One passage: its text, where it comes from, and the key of its KV block."""

    id: str
    doc_id: str
    position: int
    """Its place among its document's passages, from 0."""
    text: str
    tokens: int
    """Tokens of its KV block in the LLM's tokenizer."""
    kv_key: str
    metadata: dict[str, Any] = field(default_factory=dict)
    """Its document's metadata."""


def read_config(folder: str | os.PathLike) -> IndexConfig:
    """The configuration of the index in ``folder``, without opening it."""
    folder = Path(folder).expanduser()
    try:
        saved = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise IndexNotFoundError(f"there is no index in {folder}; build one with "
                                 f"`blockrag ingest PATH... --index {folder}`.") from None
    if saved.pop("format", None) != FORMAT_VERSION:
        raise IndexMismatchError(f"{folder} holds an index of another format version than {FORMAT_VERSION}; "
                                 "ingest the documents again into a new folder.")
    return IndexConfig(**saved)


def _new_vectors(config: IndexConfig) -> faiss.Index:
    if config.vector_index == "hnsw":
        base = faiss.IndexHNSWFlat(config.dimension, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        base = faiss.IndexFlatIP(config.dimension)
    return faiss.IndexIDMap2(base)


def _replace(path: Path, write) -> None:
    """Write through ``write(temporary path)`` and rename over ``path``: readers never see half a file."""
    draft = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        write(str(draft))
        os.replace(draft, path)
    finally:
        draft.unlink(missing_ok=True)  # a draft cut short (a full disk) takes no space


@contextmanager
def _disk_space(folder: Path) -> Iterator[None]:
    """A full disk as :class:`IndexFullError`; SQLite rolls the transaction back, so nothing committed is lost."""
    try:
        yield
    except (OSError, sqlite3.OperationalError, RuntimeError) as exc:
        if not is_disk_full(exc):
            raise
        raise IndexFullError(f"the disk holding the index {folder} is full ({exc}). Nothing already committed was "
                             "lost: free disk space and run the same ingestion again, it resumes where it stopped."
                             ) from exc


F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    """Mark an :class:`Index` method that reads the document store or FAISS: one thread at a time (frameworks
    retrieve from threads of their own)."""
    @functools.wraps(method)
    def locked(self: Index, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked  # type: ignore[return-value]


def _writes(method: F) -> F:
    """Mark an :class:`Index` method that writes to the folder: one thread at a time, and a full disk raises
    :class:`IndexFullError`."""
    @functools.wraps(method)
    def checked(self: Index, *args, **kwargs):
        with self._lock, _disk_space(self.folder):
            return method(self, *args, **kwargs)
    return checked  # type: ignore[return-value]


class Index:
    """An index folder opened for reading and writing (see the module docstring for its layout).

    Any number of processes may read an index; one at a time may write to it (ingest, delete). In a
    process, any thread may use it: its reads and writes take turns.
    """

    def __init__(self, folder: Path, config: IndexConfig, kv_store: KVStore | None):
        self.folder = folder
        self.config = config
        self._lock = threading.RLock()
        # The store first: a store of another model is refused before the document store is touched.
        self._owns_kv = kv_store is None
        self.kv: KVStore = open_store(folder / "kv", fingerprint=config.fingerprint) if kv_store is None else kv_store
        with _disk_space(folder):
            self._db = sqlite3.connect(folder / "docstore.sqlite", check_same_thread=False)  # used under _lock
            self._db.execute("PRAGMA journal_mode=WAL")  # serving processes read while ingestion writes
            self._db.executescript(_SCHEMA)
        self._unsaved = False
        self._vectors = self._load_vectors()

    @classmethod
    def create(cls, folder: str | os.PathLike, config: IndexConfig, *, kv_store: KVStore | None = None) -> Index:
        """A new, empty index in ``folder`` (created if needed)."""
        folder = Path(folder).expanduser()
        if (folder / "config.json").exists():
            raise IndexMismatchError(f"{folder} already holds an index; open it with Index.open, or choose an "
                                     "empty folder.")
        if config.vector_index not in VECTOR_INDEX_KINDS:
            raise InvalidArgumentError(f"vector_index must be one of {VECTOR_INDEX_KINDS}, got {config.vector_index!r}")
        folder.mkdir(parents=True, exist_ok=True)
        index = cls(folder, config, kv_store)
        text = json.dumps({"format": FORMAT_VERSION, **asdict(config)}, indent=2)
        with _disk_space(folder):
            _replace(folder / "config.json", lambda p: Path(p).write_text(text + "\n"))  # last: it makes the index
        return index

    @classmethod
    def open(cls, folder: str | os.PathLike, *, kv_store: KVStore | None = None) -> Index:
        """The index in ``folder``; ``kv_store`` replaces its own block store folder (e.g. a shared Redis)."""
        folder = Path(folder).expanduser()
        return cls(folder, read_config(folder), kv_store)

    @staticmethod
    def exists(folder: str | os.PathLike) -> bool:
        return (Path(folder).expanduser() / "config.json").is_file()

    # --- reading

    @_locked
    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM nodes").fetchone()[0]

    def node(self, node_id: str) -> Node:
        """The passage with this ID; :class:`NodeNotFoundError` if it is not (or no longer) indexed."""
        found = self.nodes([node_id])
        if not found:
            raise NodeNotFoundError(f"no passage with node ID {node_id!r} in the index at {self.folder}.")
        return found[0]

    @_locked
    def nodes(self, node_ids: Sequence[str]) -> list[Node]:
        """The passages with these IDs that are indexed, in the order asked."""
        rows = {}
        for lo in range(0, len(node_ids), 500):
            chunk = list(node_ids[lo:lo + 500])
            rows.update((r[0], r) for r in self._db.execute(
                "SELECT n.id, n.doc_id, n.position, n.text, n.tokens, n.kv_key, d.metadata FROM nodes n "
                f"JOIN documents d ON d.id = n.doc_id WHERE n.id IN ({','.join('?' * len(chunk))})", chunk))
        return [Node(*rows[i][:6], json.loads(rows[i][6])) for i in node_ids if i in rows]

    @_locked
    def document_ids(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT id FROM documents ORDER BY id")]

    @_locked
    def text_digests(self, doc_ids: Sequence[str]) -> dict[str, str]:
        """Document ID -> digest of the text whose passages are all committed, for those ingested whole since
        their passages last changed (see :meth:`record_digests`)."""
        out: dict[str, str] = {}
        for lo in range(0, len(doc_ids), 500):
            chunk = list(doc_ids[lo:lo + 500])
            out.update(self._db.execute(
                f"SELECT doc_id, digest FROM ingested WHERE doc_id IN ({','.join('?' * len(chunk))})", chunk))
        return out

    @_locked
    def document_nodes(self, doc_id: str) -> list[Node]:
        """A document's passages in order."""
        ids = [r[0] for r in self._db.execute("SELECT id FROM nodes WHERE doc_id = ? ORDER BY position", (doc_id,))]
        return self.nodes(ids)

    @_locked
    def search(self, vectors: np.ndarray, top_k: int) -> list[list[tuple[str, float]]]:
        """For each query vector, up to ``top_k`` (node ID, inner product) pairs, best first."""
        if top_k < 1:
            raise InvalidArgumentError(f"top_k must be at least 1, got {top_k}")
        if self.config.vector_index == "hnsw":
            faiss.downcast_index(self._vectors.index).hnsw.efSearch = max(64, top_k)
        scores, ids = self._vectors.search(np.ascontiguousarray(vectors, dtype=np.float32), top_k)
        return [[(node_from_faiss_id(int(i)), float(s)) for s, i in zip(row_s, row_i) if i >= 0]
                for row_s, row_i in zip(scores, ids)]

    @property
    def vector_count(self) -> int:
        return int(self._vectors.ntotal)

    # --- writing

    @_writes
    def set_documents(self, documents: Iterable[tuple[str, dict[str, Any]]], unfinished: Sequence[str] = ()) -> None:
        """Record documents (ID and metadata) in one transaction; their passages are added by :meth:`add`.

        ``unfinished`` documents lose their text digest in the same transaction: their passages are about
        to change, and a run stopped before :meth:`record_digests` must not pass them for ingested.
        """
        with self._db:
            self._db.executemany("INSERT INTO documents VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET "
                                 "metadata = excluded.metadata", [(d, json.dumps(m)) for d, m in documents])
            self._forget_digests(unfinished)

    @_writes
    def record_digests(self, digests: Iterable[tuple[str, str]]) -> None:
        """Record (document ID, text digest) pairs of documents whose passages are now all committed with their KV."""
        with self._db:
            self._db.executemany("INSERT INTO ingested VALUES (?, ?) ON CONFLICT(doc_id) DO UPDATE SET "
                                 "digest = excluded.digest", list(digests))

    @_writes
    def add(self, nodes: Sequence[Node], vectors: np.ndarray) -> None:
        """Add passages whose KV is already stored, with their vectors, in one committed transaction."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(nodes), self.config.dimension):
            raise InvalidArgumentError(f"expected {len(nodes)} vectors of dimension {self.config.dimension}, "
                             f"got {vectors.shape}")
        with self._db:
            self._db.executemany("INSERT INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 [(n.id, n.doc_id, n.position, n.text, n.tokens, n.kv_key, v.tobytes())
                                  for n, v in zip(nodes, vectors)])
            self._bump()
        self._vectors.add_with_ids(vectors, np.array([faiss_id(n.id) for n in nodes], dtype=np.int64))
        self._unsaved = True

    @_writes
    def remove_nodes(self, node_ids: Collection[str], keep_kv: Collection[str] = ()) -> int:
        """Remove passages, their vectors and the KV no remaining passage (nor ``keep_kv``) uses."""
        if not node_ids:
            return 0
        ids = list(node_ids)
        removed = self.nodes(ids)
        keys = {n.kv_key for n in removed}
        with self._db:
            for lo in range(0, len(ids), 500):
                chunk = ids[lo:lo + 500]
                self._db.execute(f"DELETE FROM nodes WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            self._forget_digests(sorted({n.doc_id for n in removed}))  # their documents are no longer whole
            self._bump()
        if self.config.vector_index == "flat":
            self._vectors.remove_ids(np.array([faiss_id(i) for i in ids], dtype=np.int64))
        else:  # HNSW graphs cannot drop points: rebuild from the document store
            self._vectors = self._rebuild_vectors()
        self._unsaved = True
        unused = keys - set(keep_kv) - {k for k in keys if self._db.execute(
            "SELECT 1 FROM nodes WHERE kv_key = ? LIMIT 1", (k,)).fetchone()}
        for key in unused:
            self.kv.delete(key)
        return len(ids)

    @_writes
    def delete_document(self, doc_id: str) -> int:
        """Remove a document with its passages, vectors and KV; returns how many passages went."""
        removed = self.remove_nodes([n.id for n in self.document_nodes(doc_id)])
        with self._db:
            self._db.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
            self._forget_digests([doc_id])
        self.save()
        return removed

    @_writes
    def save(self) -> None:
        """Write the FAISS index (atomically) if it changed since it was last written."""
        if not self._unsaved:
            return
        _replace(self.folder / "vectors.faiss", lambda p: faiss.write_index(self._vectors, p))
        state = json.dumps({"generation": self._generation()})
        _replace(self.folder / "vectors.json", lambda p: Path(p).write_text(state))
        self._unsaved = False

    @_locked
    def close(self) -> None:
        try:
            self.save()
        finally:
            self._db.close()
            if self._owns_kv:
                self.kv.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- internals

    def _forget_digests(self, doc_ids: Sequence[str]) -> None:
        """Inside a transaction: the documents' passages change, so their text digests no longer hold."""
        for lo in range(0, len(doc_ids), 500):
            chunk = list(doc_ids[lo:lo + 500])
            self._db.execute(f"DELETE FROM ingested WHERE doc_id IN ({','.join('?' * len(chunk))})", chunk)

    def _bump(self) -> None:
        """Count a change to the passages, in the transaction that makes it."""
        self._db.execute("UPDATE state SET value = value + 1 WHERE name = 'vectors'")

    def _generation(self) -> int:
        return self._db.execute("SELECT value FROM state WHERE name = 'vectors'").fetchone()[0]

    def _load_vectors(self) -> faiss.Index:
        path, state = self.folder / "vectors.faiss", self.folder / "vectors.json"
        try:
            saved = json.loads(state.read_text())["generation"]
        except (FileNotFoundError, ValueError, KeyError):
            saved = None
        if saved == self._generation() and path.is_file():
            return faiss.read_index(str(path))
        if len(self):
            log.warning("rebuilding the vector index of %s from its document store (the last run stopped "
                        "before saving it)", self.folder)
        return self._rebuild_vectors()

    def _rebuild_vectors(self) -> faiss.Index:
        vectors = _new_vectors(self.config)
        rows = self._db.execute("SELECT id, vector FROM nodes")
        while batch := rows.fetchmany(4096):
            ids = np.array([faiss_id(r[0]) for r in batch], dtype=np.int64)
            vectors.add_with_ids(np.stack([np.frombuffer(r[1], dtype=np.float32) for r in batch]), ids)
        return vectors
