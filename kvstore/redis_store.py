"""The shared backend: a Redis server that several serving machines read and write."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .base import EntryStore, StoreStats, UnavailablePolicy
from .entry import StoreDtype
from blockrag.errors import InvalidArgumentError, MissingExtraError, StoreFullError, StoreUnavailableError

DEFAULT_URL = "redis://127.0.0.1:6379/0"


class RedisKVStore(EntryStore):
    """Blocks on a Redis server, under ``{namespace}:block:{key}``; the model it serves under ``{namespace}:model``.

    Redis bounds the size itself (``maxmemory``): with an evicting policy old entries make room;
    with ``noeviction`` a full server gives :class:`StoreFullError`. An evicting policy may also
    drop the model record, after which the next model to write claims the namespace again.

    While the server is down or hung (each call waits up to ``socket_timeout``), reads and writes
    raise :class:`StoreUnavailableError`, or with ``on_unavailable="miss"`` report misses and skip
    the write, so the engine computes the blocks itself; the client reconnects once the server is
    back. Opening the store needs the server.
    """

    backend = "redis"

    def __init__(self, url: str = DEFAULT_URL, *, namespace: str = "blockrag", dtype: StoreDtype = "auto",
                 fingerprint: str | None = None, socket_timeout: float = 30.0,
                 on_unavailable: UnavailablePolicy = "raise"):
        try:
            import redis
        except ImportError as exc:
            raise MissingExtraError("the Redis store", "redis", exc) from exc
        if not re.fullmatch(r"[\w.-]+", namespace):
            raise InvalidArgumentError(f"namespace must be letters, digits, '_', '.' or '-', got {namespace!r}")
        self._redis = redis
        self._client = redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)
        kwargs = self._client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        self._location = f"redis {where} db {kwargs.get('db', 0)} namespace {namespace}"
        self._prefix = f"{namespace}:block:"
        self._model_key = f"{namespace}:model"
        with self._errors():
            self._client.ping()
        super().__init__(dtype=dtype, fingerprint=fingerprint, on_unavailable=on_unavailable)

    @property
    def location(self) -> str:
        return self._location

    @contextmanager
    def _errors(self):
        """Redis failures as the store's own errors."""
        exceptions = self._redis.exceptions
        try:
            yield
        except exceptions.OutOfMemoryError as exc:
            raise StoreFullError(
                f"the Redis server of the block store ({self._location}) is full ({exc}); the block was not "
                "stored and no stored block was lost. Raise its maxmemory, or set an evicting maxmemory-policy "
                "such as allkeys-lru so that old entries make room.") from exc
        except (exceptions.ConnectionError, exceptions.TimeoutError) as exc:
            raise StoreUnavailableError(f"cannot reach the Redis server of the block store ({self._location}): "
                                        f"{exc}. Start it, or check the URL.") from exc

    def _read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        with self._errors():
            return self._client.mget([self._prefix + key for key in keys])

    def _write(self, key: str, data: bytes) -> None:
        with self._errors():
            self._client.set(self._prefix + key, data)

    def _read_model(self) -> str | None:
        with self._errors():
            value = self._client.get(self._model_key)
        return value.decode() if value is not None else None

    def _bind_model(self, fingerprint: str) -> str:
        with self._errors():
            self._client.set(self._model_key, fingerprint, nx=True)
        return self._read_model() or fingerprint

    def contains(self, key: str) -> bool:
        with self._errors():
            return bool(self._client.exists(self._prefix + key))

    def delete(self, key: str) -> bool:
        with self._errors():
            return bool(self._client.delete(self._prefix + key))

    def keys(self) -> Iterator[str]:
        with self._errors():
            for name in self._client.scan_iter(match=self._prefix + "*", count=1000):
                yield name.decode()[len(self._prefix):]

    def stats(self) -> StoreStats:
        """Counts entries and their bytes with one scan of the namespace."""
        names = list(self.keys())
        with self._errors():
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.strlen(self._prefix + name)
            sizes = pipe.execute() if names else []
            limit = int(self._client.info("memory").get("maxmemory", 0))
        return self._stats(len(names), sum(sizes), limit or None)

    def close(self) -> None:
        self._client.close()
