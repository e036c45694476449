"""An in-memory LRU tier of decoded blocks, in front of either backend."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from blockrag.errors import InvalidArgumentError
from blockrag.engine import Block

from .base import KVStore, StoreStats

DEFAULT_MEMORY_BYTES = 1 << 30


def block_bytes(block: Block) -> int:
    return block.nbytes + block.token_ids.nbytes


class MemoryTier(KVStore):
    """Keeps the most recently read blocks of ``store`` decoded in memory, within ``max_bytes``.

    It is filled by reads only: a block is then served the same from memory as from the store
    below, which may keep it in bf16 or int8, so the state of the tier never changes an answer.
    """

    def __init__(self, store: KVStore, max_bytes: int = DEFAULT_MEMORY_BYTES):
        if max_bytes < 0:
            raise InvalidArgumentError(f"max_bytes must be >= 0, got {max_bytes}")
        self.store = store
        self.max_bytes = max_bytes
        self._blocks: OrderedDict[str, Block] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = 0
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        return f"memory over {self.store.location}"

    @property
    def fingerprint(self) -> str | None:
        return self.store.fingerprint

    def get_many(self, keys: Sequence[str]) -> list[Block | None]:
        with self._lock:
            found = {key: self._blocks[key] for key in keys if key in self._blocks}
            for key in found:
                self._blocks.move_to_end(key)
            missing = [key for key in dict.fromkeys(keys) if key not in found]
            self._hits += len(found)
            self._misses += len(missing)
        if missing:
            for key, block in zip(missing, self.store.get_many(missing)):
                if block is not None:
                    found[key] = block
                    self._remember(key, block)
        return [found.get(key) for key in keys]

    def _remember(self, key: str, block: Block) -> None:
        size = block_bytes(block)
        if size > self.max_bytes:
            return
        with self._lock:
            self._forget(key)
            self._blocks[key] = block
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._bytes -= block_bytes(self._blocks.popitem(last=False)[1])

    def _forget(self, key: str) -> None:
        block = self._blocks.pop(key, None)
        if block is not None:
            self._bytes -= block_bytes(block)

    def put(self, key: str, block: Block) -> bool:
        stored = self.store.put(key, block)
        with self._lock:
            self._forget(key)  # the next read caches the block as the store keeps it
        return stored

    def contains(self, key: str) -> bool:
        with self._lock:
            if key in self._blocks:
                return True
        return self.store.contains(key)

    def delete(self, key: str) -> bool:
        with self._lock:
            self._forget(key)
        return self.store.delete(key)

    def keys(self) -> Iterator[str]:
        return self.store.keys()

    def stats(self) -> StoreStats:
        with self._lock:
            entries, nbytes = len(self._blocks), self._bytes
        return StoreStats("memory", self.location, entries, nbytes, self.max_bytes, self._hits, self._misses, 0,
                          self.store.stats())

    def close(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._bytes = 0
        self.store.close()
