"""The default backend: a folder managed by diskcache (a SQLite index and one file per entry)."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import diskcache
from diskcache.core import MODE_BINARY, MODE_RAW

from .base import EntryStore, StoreStats, decoded_or_error, parallel_map
from .entry import FORMAT_VERSION, StoreDtype
from blockrag.engine import Block
from blockrag.errors import CorruptEntryError, InvalidArgumentError, StoreError, StoreFullError

DEFAULT_SIZE_LIMIT = 8 << 30
#: Names the model a store folder serves; written once, atomically, by the first writer.
MODEL_FILE = "blockrag-store.json"


class SafeDisk(diskcache.Disk):
    """diskcache serialization that never pickles: keys are str, values bytes.

    diskcache unpickles rows it finds marked as pickled; a store folder from elsewhere could
    hold such rows. Here they read as an empty (invalid) entry, and keys stay bytes.
    """

    def put(self, key):
        if type(key) is not str:
            raise InvalidArgumentError(f"block store keys are str, got {type(key).__name__}")
        return super().put(key)

    def get(self, key, raw):
        return super().get(key, raw) if raw else bytes(key)

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if type(value) is not bytes:
            raise InvalidArgumentError(f"block store values are bytes, got {type(value).__name__}")
        return super().store(value, read, key=key)

    def fetch(self, mode, filename, value, read):
        if mode == MODE_BINARY or (mode == MODE_RAW and isinstance(value, bytes)):
            return super().fetch(mode, filename, value, read)
        return b""

    def _write(self, full_path, iterator, mode, encoding=None):
        if isinstance(iterator, io.BytesIO):  # diskcache would write its bytes line by line
            iterator = [iterator.getvalue()]  # the stored bytes object itself, not a copy
        try:
            return super()._write(full_path, iterator, mode, encoding)
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(full_path)  # a file cut short by a full disk is no entry
            raise


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says a disk or quota is full: an OSError, SQLite's SQLITE_FULL, or a C++ library's
    RuntimeError quoting the system's message (as FAISS reports failed writes)."""
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, RuntimeError) and any(os.strerror(code) in str(exc) for code in (errno.ENOSPC, errno.EDQUOT))


class DiskKVStore(EntryStore):
    """Blocks in a folder, shared safely by any number of processes on one machine.

    An entry is written to its own file and then indexed in one SQLite transaction, so readers
    see whole entries only. Past ``size_limit`` bytes diskcache culls entries by
    ``eviction_policy``; the default, least recently stored, keeps reads free of locks so serving
    never waits on ingestion (``"least-recently-used"`` tracks reads at the cost of a write each).
    """

    backend = "disk"

    def __init__(self, path: str | os.PathLike, *, dtype: StoreDtype = "auto", fingerprint: str | None = None,
                 size_limit: int = DEFAULT_SIZE_LIMIT, eviction_policy: str = "least-recently-stored",
                 timeout: float = 60.0):
        self.path = Path(path).expanduser()
        if fingerprint is not None:  # refuse another model's folder before diskcache touches it
            self._model = self._read_model()
            self._check_model(fingerprint)
        self._cache = diskcache.Cache(str(self.path), disk=SafeDisk, size_limit=size_limit,
                                      eviction_policy=eviction_policy, timeout=timeout)
        super().__init__(dtype=dtype, fingerprint=fingerprint)

    @property
    def location(self) -> str:
        return str(self.path)

    def _read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return parallel_map(self._cache.get, keys)

    def _read_decoded(self, keys: Sequence[str]) -> list[Block | CorruptEntryError | None]:
        # Each entry decoded by the thread that read it, while its bytes are still in the CPU's cache.
        return parallel_map(lambda key: decoded_or_error(self._cache.get(key), key), keys)

    def _write(self, key: str, data: bytes) -> None:
        try:
            self._cache.set(key, data, retry=True)
        except (OSError, sqlite3.OperationalError) as exc:
            if not is_disk_full(exc):
                raise
            raise StoreFullError(
                f"the disk holding the block store {self.path} is full ({exc}); the block was not stored and "
                f"no stored block was lost. Free disk space, or open the store with a size_limit below the free "
                f"space (now {self._cache.size_limit} bytes) so that older entries are evicted instead.") from exc

    def _read_model(self) -> str | None:
        marker = self.path / MODEL_FILE
        try:
            fingerprint = json.loads(marker.read_text())["fingerprint"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{marker} is not a blockrag store marker ({exc}); if {self.path} is a block store, "
                             "delete that file and the store will be claimed again by the next model writing to it"
                             ) from None
        if not isinstance(fingerprint, str):
            raise StoreError(f"{marker} names no model fingerprint; delete it to let the next model claim the store")
        return fingerprint

    def _bind_model(self, fingerprint: str) -> str:
        marker = self.path / MODEL_FILE
        draft = self.path / f".{MODEL_FILE}.{uuid.uuid4().hex}"
        draft.write_text(json.dumps({"format": FORMAT_VERSION, "fingerprint": fingerprint}))
        try:
            os.link(draft, marker)  # atomic and exclusive: of two processes binding at once, one wins
        except FileExistsError:
            pass
        finally:
            draft.unlink()
        return self._read_model() or fingerprint

    def contains(self, key: str) -> bool:
        return key in self._cache

    def delete(self, key: str) -> bool:
        return self._cache.delete(key, retry=True)

    def keys(self) -> Iterator[str]:
        return (key for key in self._cache if isinstance(key, str))

    def stats(self) -> StoreStats:
        return self._stats(len(self._cache), self._cache.volume(), self._cache.size_limit)

    def close(self) -> None:
        self._cache.close()
