"""blockrag's block store: passage KV computed once, at ingestion, and served to any later process or machine.

``open_store("path/to/folder")`` (diskcache) or ``open_store("redis://host:6379/0")`` gives a
:class:`KVStore` behind an LRU memory tier; pass it to ``BlockEngine(..., store=store)``.
"""

from __future__ import annotations

import os

from .base import UNAVAILABLE_POLICIES, EntryStore, KVStore, StoreStats, UnavailablePolicy, key_fingerprint
from .disk import DEFAULT_SIZE_LIMIT, DiskKVStore
from .entry import FORMAT_VERSION, STORE_DTYPES, StoreDtype, decode_entry, encode_entry
from blockrag.errors import CorruptEntryError, StoreError, StoreFullError, StoreUnavailableError, WrongModelError
from .memory import DEFAULT_MEMORY_BYTES, MemoryTier
from .redis_store import RedisKVStore

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_store(path_or_url: str | os.PathLike, *, memory_bytes: int = DEFAULT_MEMORY_BYTES, **options) -> KVStore:
    """The store at a folder, or on the Redis server of a ``redis://``, ``rediss://`` or ``unix://`` URL.

    ``options`` go to :class:`DiskKVStore` or :class:`RedisKVStore` (``dtype``, ``fingerprint``,
    ``size_limit``, ``namespace``, ``on_unavailable`` for Redis, ...). Reads are cached decoded in a :class:`MemoryTier` of
    ``memory_bytes`` (0: none).
    """
    location = os.fspath(path_or_url)
    store: KVStore = RedisKVStore(location, **options) if location.startswith(REDIS_SCHEMES) else \
        DiskKVStore(location, **options)
    return MemoryTier(store, memory_bytes) if memory_bytes else store


__all__ = [
    "DEFAULT_MEMORY_BYTES", "DEFAULT_SIZE_LIMIT", "FORMAT_VERSION", "STORE_DTYPES", "UNAVAILABLE_POLICIES",
    "CorruptEntryError", "DiskKVStore", "EntryStore", "KVStore", "MemoryTier", "RedisKVStore", "StoreDtype",
    "StoreError", "StoreFullError", "StoreStats", "StoreUnavailableError", "UnavailablePolicy", "WrongModelError",
    "decode_entry", "encode_entry", "key_fingerprint", "open_store",
]
