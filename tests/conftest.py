import asyncio
import shutil
import socket
import subprocess
import threading
import time

import pytest

from blockrag.engine import BlockEngine, LoadedModel, load_model, model_fingerprint
from tiny_models import tiny_model


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """The bundled SmolLM2-135M, loaded once per session."""
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm_dense() -> LoadedModel:
    """The bundled SmolLM2-135M in fp32, decoding from its dense weights as transformers' own ``generate`` does.

    fp32, as greedy choices are compared with transformers': its kernels and ours sum in different orders,
    and in bf16 some steps' top two logits lie two rounding steps apart, so that either may win.
    """
    return load_model("smollm2-135m", dtype="float32", decode_weights="dense")


@pytest.fixture(scope="session")
def smollm_fp32() -> LoadedModel:
    """The bundled SmolLM2-135M in fp32, for tests whose reference is fp32 KV."""
    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(scope="module")
def tiny_engine(smollm) -> BlockEngine:
    """A tiny random Llama with the bundled model's tokenizer, for exactness through the public API."""
    model = tiny_model("llama")
    return BlockEngine(LoadedModel(model, smollm.tokenizer, model_fingerprint(model, smollm.tokenizer)))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """URL of a real redis-server on loopback, private to this test session, persisting nothing."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not on PATH (Debian package redis-server); the Redis backend is untested")
    redis = pytest.importorskip("redis", reason="redis-py is not installed: pip install 'blockrag[redis]'")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    log = open(folder / "redis.log", "wb")
    server = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                               "--dir", str(folder)], stdout=log, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                log.close()
                pytest.fail(f"redis-server did not start: {(folder / 'redis.log').read_text()}")
            time.sleep(0.05)
    client.close()
    yield url
    server.terminate()
    server.wait(timeout=10)
    log.close()


@pytest.fixture
def loop_gate(monkeypatch):
    """``gate(runner)`` makes a PromptRunner's generation wait until a coroutine on the event loop has run, and
    returns ``await run(coroutine)``, which awaits the adapter's call with that coroutine scheduled beside it.

    An async call that blocked the loop would never let the coroutine run: the generation fails after 30 s.
    """
    def gate(runner):
        opened = threading.Event()
        stream = runner.stream

        def gated(*args, **kwargs):
            assert opened.wait(30), "the event loop was blocked"  # opened only by a coroutine on the loop
            yield from stream(*args, **kwargs)

        monkeypatch.setattr(runner, "stream", gated)

        async def open_gate():
            opened.set()

        async def run(call):
            opened.clear()
            opener = asyncio.create_task(open_gate())
            result = await call
            await opener
            return result

        return run

    return gate
