"""The store interface, and the checks every backend shares: one model per store, verified entries."""

from __future__ import annotations

import functools
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

from blockrag.engine import Block, block_key
from blockrag.engine.threads import run_torch_on_this_thread_alone

from .entry import STORE_DTYPES, StoreDtype, decode_entry, encode_entry
from blockrag.errors import InvalidArgumentError, CorruptEntryError, StoreUnavailableError, WrongModelError

log = logging.getLogger(__name__)
T = TypeVar("T")

UnavailablePolicy = Literal["raise", "miss"]
#: What a request does while the store's server is unreachable: fail with StoreUnavailableError, or go on
#: without the store (reads miss, writes are skipped), so the engine computes the KV itself.
UNAVAILABLE_POLICIES: tuple[UnavailablePolicy, ...] = ("raise", "miss")


@dataclass(frozen=True)
class StoreStats:
    """What a store holds, and how it served this process since it was opened (hits, misses, corrupt)."""

    backend: str
    location: str
    entries: int
    bytes: int
    limit_bytes: int | None
    hits: int
    misses: int
    corrupt: int
    """Entries found corrupt, foreign or unreadable, and deleted."""
    backing: StoreStats | None = None
    """The stats of the store a memory tier fronts."""


def key_fingerprint(key: str) -> str:
    """The model fingerprint a content-addressed key (:func:`blockrag.engine.block_key`) names."""
    fingerprint, separator, _ = key.partition("-")
    if not fingerprint or not separator:
        raise InvalidArgumentError(f"{key!r} is not a block key; use blockrag.engine.block_key(fingerprint, context, token_ids)")
    return fingerprint


@functools.cache
def _threads_of(pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="blockrag-kvstore",
                              initializer=run_torch_on_this_thread_alone)


def parallel_map(function: Callable[..., T], *iterables: Sequence) -> list[T]:
    """``list(map(function, ...))`` on threads: file reads, hashing and tensor copies release the GIL.

    One pool per process (a pool inherited through fork has no threads behind it), whose threads run torch's
    operations on one thread each (:func:`~blockrag.engine.threads.run_torch_on_this_thread_alone`).
    """
    if len(iterables[0]) < 2:
        return list(map(function, *iterables))
    return list(_threads_of(os.getpid()).map(function, *iterables))


def decoded_or_error(data: bytes | None, key: str) -> Block | CorruptEntryError | None:
    """The block in entry ``data`` stored under ``key``; ``None`` for no entry, the error for an unusable one."""
    if data is None:
        return None
    try:
        return decode_entry(data, key)
    except CorruptEntryError as exc:
        return exc


class KVStore(ABC):
    """Blocks under content-addressed keys, for one model; implements the engine's ``BlockStore``.

    Keys are :func:`blockrag.engine.block_key` addresses: model fingerprint, prefix context and
    the block's token ids, so a block is only ever found by the request it answers.
    """

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the entries live, for messages (never includes credentials)."""

    @property
    @abstractmethod
    def fingerprint(self) -> str | None:
        """The model this store serves; ``None`` until a model claims the empty store."""

    @abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[Block | None]:
        """The blocks under ``keys``; ``None`` where missing or unusable (the caller recomputes those)."""

    @abstractmethod
    def put(self, key: str, block: Block) -> bool:
        """Store ``block`` under ``key``, which must be its own block key; whether it was stored.

        ``False`` only while the server is unreachable under ``on_unavailable="miss"``.
        """

    @abstractmethod
    def contains(self, key: str) -> bool:
        """Whether an entry is stored under ``key`` (not yet verified: :meth:`get` may still find it corrupt)."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the entry under ``key``; whether there was one."""

    @abstractmethod
    def keys(self) -> Iterator[str]:
        """Every stored key, in no particular order."""

    @abstractmethod
    def stats(self) -> StoreStats:
        ...

    @abstractmethod
    def close(self) -> None:
        ...

    def get(self, key: str) -> Block | None:
        return self.get_many([key])[0]

    def __contains__(self, key: str) -> bool:
        return self.contains(key)

    def __iter__(self) -> Iterator[str]:
        return self.keys()

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class EntryStore(KVStore):
    """A store of encoded entries (:mod:`.entry`) as bytes; backends supply the byte operations.

    Here live the rules every backend follows: an entry is served only if it decodes, passes its
    checksum and matches its key; anything else is logged, deleted and reported missing. A store
    is claimed by the first model that writes to it (or opens it with ``fingerprint=``) and
    refuses any other model with :class:`WrongModelError`.

    ``on_unavailable`` says what reads and writes do while the store's server cannot be reached
    (see :data:`UNAVAILABLE_POLICIES`): ``"raise"`` (default) raises :class:`StoreUnavailableError`;
    ``"miss"`` reports misses and skips writes, so answers are computed without stored blocks
    until the server returns. Listing, deleting and ingestion always raise: they need the store.
    """

    backend: ClassVar[str]

    def __init__(self, *, dtype: StoreDtype = "auto", fingerprint: str | None = None,
                 on_unavailable: UnavailablePolicy = "raise"):
        if dtype not in STORE_DTYPES:
            raise InvalidArgumentError(f"store dtype must be one of {STORE_DTYPES}, got {dtype!r}")
        if on_unavailable not in UNAVAILABLE_POLICIES:
            raise InvalidArgumentError(f"on_unavailable must be one of {UNAVAILABLE_POLICIES}, got {on_unavailable!r}")
        self.dtype: StoreDtype = dtype
        self.on_unavailable: UnavailablePolicy = on_unavailable
        self._down = False
        self._hits = self._misses = self._corrupt = 0
        self._model = self._read_model()
        if fingerprint is not None:
            self._claim(fingerprint)

    @property
    def fingerprint(self) -> str | None:
        return self._model

    def _claim(self, fingerprint: str) -> None:
        if self._model is None:
            self._model = self._bind_model(fingerprint)
        self._check_model(fingerprint)

    def _check_model(self, fingerprint: str) -> None:
        if self._model is not None and self._model != fingerprint:
            raise WrongModelError(
                f"the block store at {self.location} holds blocks of model {self._model}, not of this model "
                f"({fingerprint}). A store serves one model: open another store for this one (another folder "
                "or Redis namespace), or delete this store to start over.")

    def _unreachable(self, exc: StoreUnavailableError) -> None:
        """Apply the ``on_unavailable`` policy: raise, or log the outage once and go on without the store."""
        if self.on_unavailable == "raise":
            raise exc
        if not self._down:
            log.warning("%s; serving without stored blocks until it is back (on_unavailable='miss')", exc)
        self._down = True

    def _reachable(self) -> None:
        if self._down:
            log.warning("the block store %s is reachable again", self.location)
        self._down = False

    def get_many(self, keys: Sequence[str]) -> list[Block | None]:
        for key in keys:
            self._check_model(key_fingerprint(key))
        try:
            results = self._read_decoded(keys)
        except StoreUnavailableError as exc:
            self._unreachable(exc)
            self._misses += len(keys)
            return [None] * len(keys)
        self._reachable()
        out: list[Block | None] = []
        for key, result in zip(keys, results):
            block = result if isinstance(result, Block) else None
            if isinstance(result, CorruptEntryError):
                log.warning("deleted unusable block entry %s from %s: %s", key, self.location, result)
                try:
                    self.delete(key)
                except StoreUnavailableError as exc:
                    self._unreachable(exc)  # refused either way; deleted on a later read
                self._corrupt += 1
            self._hits += block is not None
            self._misses += block is None
            out.append(block)
        return out

    def put(self, key: str, block: Block) -> bool:
        fingerprint = key_fingerprint(key)
        if block_key(fingerprint, block.context, block.token_ids) != key:
            raise InvalidArgumentError(f"{key!r} is not this block's key; store it under "
                             "blockrag.engine.block_key(fingerprint, block.context, block.token_ids)")
        try:
            self._claim(fingerprint)
            self._write(key, encode_entry(block, fingerprint, self.dtype))
        except StoreUnavailableError as exc:
            self._unreachable(exc)
            return False
        self._reachable()
        return True

    def _stats(self, entries: int, nbytes: int, limit: int | None) -> StoreStats:
        return StoreStats(self.backend, self.location, entries, nbytes, limit, self._hits, self._misses,
                          self._corrupt)

    @abstractmethod
    def _read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The raw entries under ``keys``, ``None`` where absent."""

    def _read_decoded(self, keys: Sequence[str]) -> list[Block | CorruptEntryError | None]:
        """The entries under ``keys`` decoded (``None`` where absent; the error where unusable), on threads."""
        return parallel_map(decoded_or_error, self._read_many(keys), keys)

    @abstractmethod
    def _write(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically: readers see the old entry or the new one, never a mix."""

    @abstractmethod
    def _read_model(self) -> str | None:
        """The fingerprint this store is bound to, ``None`` if unbound."""

    @abstractmethod
    def _bind_model(self, fingerprint: str) -> str:
        """Bind the store to ``fingerprint`` unless already bound (atomically); return the binding."""
