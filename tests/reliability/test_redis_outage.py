"""A real redis-server stopped, hung and restarted under a store and an engine that use it."""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest

from blockrag.engine import BlockEngine
from blockrag.kvstore import StoreUnavailableError, open_store

pytestmark = pytest.mark.reliability

PASSAGES = ["The Pellam lighthouse was lit in 1911 by the harbour board.",
            "Its keeper, Ada Strand, kept the lamp for forty years.",
            "The tower is granite, painted white with one red band."]
LATE = ["A ferry has crossed to Tesk every morning since the bridge fell."]  # first asked during an outage


class RedisServer:
    """A private redis-server on 127.0.0.1 that persists to an append-only file, so a restart keeps entries."""

    def __init__(self, folder):
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not on PATH (Debian package redis-server; .ci/run installs it)")
        pytest.importorskip("redis", reason="redis-py is not installed: pip install 'blockrag[redis]'")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.command = [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "yes",
                        "--appendfsync", "always", "--dir", str(folder)]
        self.folder = folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail("redis-server did not start")
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(timeout=20)
        self.process = None

    def hang(self, hung: bool) -> None:
        self.process.send_signal(signal.SIGSTOP if hung else signal.SIGCONT)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def _answer(engine: BlockEngine, passages: list[str]) -> str:
    return engine.generate(None, passages, "Who kept the lamp?", max_new_tokens=8).text


@pytest.mark.parametrize("fault", ["stopped", "hung"])
def test_raise_policy_gives_store_unavailable_and_service_resumes(redis_server, engine, figures, fault):
    """Protects: the Redis backend maps connection errors and timeouts to ``StoreUnavailableError`` (the
    default policy) instead of crashing or hanging the caller, and reconnects once the server is back, with
    every entry stored before the outage still served."""
    store = open_store(redis_server.url, memory_bytes=0, namespace=f"t-{uuid.uuid4().hex[:8]}", dtype="fp32",
                       socket_timeout=0.5)
    served = BlockEngine(engine.loaded, store=store)
    before = _answer(served, PASSAGES)
    stored = sorted(store.keys())
    assert len(stored) == len(PASSAGES)  # the passages' blocks (the prefix block is not stored)
    redis_server.stop() if fault == "stopped" else redis_server.hang(True)
    with pytest.raises(StoreUnavailableError, match="cannot reach the Redis server .* Start it"):
        _answer(served, PASSAGES)
    with pytest.raises(StoreUnavailableError):
        store.get(stored[0])
    redis_server.start() if fault == "stopped" else redis_server.hang(False)
    blocks, reused = served.blocks(PASSAGES)
    assert reused == sum(len(b) for b in blocks)  # every block read back from the store
    assert _answer(served, PASSAGES) == before
    lost = len(set(stored) - set(store.keys()))
    figures.fault(f"Redis {fault} and back (policy raise)", lost == 0, lost)
    assert lost == 0
    store.close()


@pytest.mark.parametrize("fault", ["stopped", "hung"])
def test_miss_policy_answers_without_the_store_and_resumes(redis_server, engine, figures, fault, caplog):
    """Protects: ``on_unavailable="miss"`` turns an unreachable server into misses and skipped writes, so
    requests are answered without stored blocks (the same answer) instead of failing, the outage is logged
    once, and reads and writes resume when the server returns."""
    store = open_store(redis_server.url, memory_bytes=0, namespace=f"t-{uuid.uuid4().hex[:8]}", dtype="fp32",
                       socket_timeout=0.5, on_unavailable="miss")
    served = BlockEngine(engine.loaded, store=store)
    before, late = _answer(served, PASSAGES), _answer(BlockEngine(engine.loaded), LATE)
    redis_server.stop() if fault == "stopped" else redis_server.hang(True)
    with caplog.at_level(logging.WARNING, logger="blockrag.kvstore"):
        during = [_answer(served, PASSAGES), _answer(served, LATE), _answer(served, PASSAGES)]
        keys = served.block_keys(PASSAGES)
        assert store.get_many(keys) == [None] * len(keys)  # what the LlamaIndex and LangChain adapters see
    assert during == [before, late, before]
    outages = [r for r in caplog.records if "serving without stored blocks" in r.getMessage()]
    assert len(outages) == 1 and "cannot reach the Redis server" in outages[0].getMessage()
    redis_server.start() if fault == "stopped" else redis_server.hang(False)
    blocks, reused = served.blocks(PASSAGES)
    assert reused == sum(len(b) for b in blocks)
    assert served.blocks(LATE)[1] == 0  # skipped during the outage: encoded and stored now
    assert served.blocks(LATE)[1] == len(served.blocks(LATE)[0][0])
    assert _answer(served, PASSAGES) == before
    figures.fault(f"Redis {fault} and back (policy miss)", True, 0)
    store.close()
