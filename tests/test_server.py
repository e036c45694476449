"""``blockrag serve`` on loopback: the real openai, LlamaIndex and LangChain clients against live servers over a tiny
random-weight model (the model's quality does not matter here), OpenAI-shaped errors, a bounded load test, the
correctness gate, and two replicas over one real redis-server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason='needs pip install "blockrag[serve]"')
openai = pytest.importorskip("openai", reason="needs the openai client (the dev extra)")
import httpx  # noqa: E402

from blockrag.engine import BlockEngine, LoadedModel, model_fingerprint  # noqa: E402
from blockrag.integrations import GenerationOptions, PromptRunner  # noqa: E402
from blockrag.integrations.gate import GateSampler, compare_first_token  # noqa: E402
from blockrag.integrations.matching import render_chat  # noqa: E402
from blockrag.kvstore import open_store  # noqa: E402
from blockrag.server import BlockragServer, ServerSettings, ServerThread  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

pytestmark = pytest.mark.timeout(300)
MODEL = "tiny"
HERON = ("The glass-winged heron nests only in the salt marshes of the Orrin delta. Its eggs are pale green and "
         "hatch after 26 days.")
LANTERN = ("Fennick's lantern festival is held on the first new moon of autumn, when paper boats carry candles down "
           "the river Sallow to the sea.")
SHORT = "Tesk has two moons."  # shorter than the content-matching anchor: found only by its id
OPTIONS = dict(max_tokens=8, temperature=0)


def quoting(*passages: str, question: str = "What do the documents say?") -> list[dict]:
    documents = "\n\n".join(passages)
    return [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"Documents:\n\n{documents}\n\nQuestion: {question}"}]


@pytest.fixture(scope="module")
def loaded(smollm) -> LoadedModel:
    model = tiny_model("llama")
    return LoadedModel(model, smollm.tokenizer, model_fingerprint(model, smollm.tokenizer))


@pytest.fixture(scope="module")
def served(loaded, tmp_path_factory):
    """A live server over a tiny model and a disk store, with HERON, LANTERN and SHORT ingested through it."""
    engine = BlockEngine(loaded, store=open_store(tmp_path_factory.mktemp("kv")))
    server = BlockragServer(engine, ServerSettings(MODEL))
    with ServerThread(server.app) as url:
        ingested = httpx.post(f"{url}/v1/blockrag/passages", json={"passages": [HERON, LANTERN, SHORT]}, timeout=60)
        assert ingested.status_code == 200, ingested.text
        keys = {text: row["id"] for text, row in zip((HERON, LANTERN, SHORT), ingested.json()["data"])}
        yield server, url, keys


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served[1]}/v1", api_key="unused", max_retries=0, timeout=120)


def in_process(server: BlockragServer, prompt: str, max_tokens: int = 8, **options) -> str:
    """The greedy answer of the engine itself, with the server's known passages."""
    runner = PromptRunner(server.engine, server.runner.passages)
    return runner.complete(prompt, options=GenerationOptions(max_new_tokens=max_tokens, **options)).text


def chat_prompt(server: BlockragServer, messages: list[dict]) -> str:
    return render_chat(server.engine.tokenizer, messages)


def metric(url: str, name: str, **labels: str) -> float:
    """A sample's value in the server's /metrics (0 when the series does not exist yet)."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(condition, timeout_s: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- the openai client ---------------------------------------------------------------------------------------------

def test_models_and_health(served, client):
    server, url, _ = served
    assert [m.id for m in client.models.list()] == [MODEL]
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["passages"] == 3 and health["fingerprint"] == server.engine.fingerprint


def test_chat_serves_quoted_passages_from_blocks_with_the_engines_greedy_answer(served, client):
    server, _, keys = served
    messages = quoting(HERON, LANTERN)
    response = client.chat.completions.create(model=MODEL, messages=messages, **OPTIONS)
    stored = [server.engine.store.get(keys[p]) for p in (HERON, LANTERN)]
    assert response.usage.prompt_tokens_details.cached_tokens == sum(map(len, stored)) > 0
    assert response.model_extra["blockrag"]["reused_ids"] == [keys[HERON], keys[LANTERN]]
    assert response.model_extra["blockrag"]["mode"] == "block"
    assert response.choices[0].message.content == in_process(server, chat_prompt(server, messages))
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 8


def test_a_prompt_quoting_no_passage_has_no_cached_tokens(served, client):
    server, _, _ = served
    messages = [{"role": "user", "content": "Say something about rivers."}]
    response = client.chat.completions.create(model=MODEL, messages=messages, **OPTIONS)
    assert response.usage.prompt_tokens_details.cached_tokens == 0
    assert response.model_extra["blockrag"]["reused_ids"] == []
    assert response.choices[0].message.content == in_process(server, chat_prompt(server, messages))


def test_the_decode_option_reaches_the_engine(served, client):
    messages = quoting(HERON)
    response = client.chat.completions.create(model=MODEL, messages=messages, **OPTIONS,
                                              extra_body={"blockrag": {"decode": "streaming"}})
    assert response.model_extra["blockrag"]["decode"] == {"mode": "streaming", "full_steps": 0}
    default = client.chat.completions.create(model=MODEL, messages=messages, **OPTIONS)
    assert default.model_extra["blockrag"]["decode"]["mode"] == "full"  # auto, on a short prompt


def test_completion_continues_the_prompt_as_it_is(served, client):
    server, _, keys = served
    prompt = f"Notes.\n{LANTERN}\nIn short:"
    response = client.completions.create(model=MODEL, prompt=prompt, **OPTIONS)
    assert response.object == "text_completion"
    # not followed by a blank line here, so the block's first tokens (the passage without its separator) serve it
    assert response.usage.prompt_tokens_details.cached_tokens == \
        len(server.engine.store.get(keys[LANTERN])) - len(server.engine.separator_ids)
    assert response.choices[0].text == in_process(server, prompt)


def test_streaming_gives_the_same_text_and_usage_last(served, client):
    messages = quoting(HERON, question="When do the eggs hatch?")
    whole = client.chat.completions.create(model=MODEL, messages=messages, **OPTIONS)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **OPTIONS))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    closing = chunks[-2]
    assert closing.choices[0].finish_reason == whole.choices[0].finish_reason
    assert closing.model_extra["blockrag"]["reused_ids"] == whole.model_extra["blockrag"]["reused_ids"]
    completion = list(client.completions.create(model=MODEL, prompt=f"{HERON}\nSo", stream=True, **OPTIONS))
    plain = client.completions.create(model=MODEL, prompt=f"{HERON}\nSo", **OPTIONS)
    assert "".join(c.choices[0].text for c in completion) == plain.choices[0].text
    assert all(c.usage is None for c in completion)  # no usage chunk unless asked for


def test_block_ids_serve_a_passage_content_matching_cannot_find(served, client):
    server, _, keys = served
    messages = [{"role": "user", "content": f"{SHORT} How many moons?"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, **OPTIONS)
    hinted = client.chat.completions.create(model=MODEL, messages=messages, **OPTIONS,
                                            extra_body={"blockrag": {"block_ids": [keys[SHORT], keys[HERON]]}})
    assert plain.usage.prompt_tokens_details.cached_tokens == 0
    assert hinted.usage.prompt_tokens_details.cached_tokens == \
        len(server.engine.store.get(keys[SHORT])) - len(server.engine.separator_ids)  # no blank line after it here
    assert hinted.model_extra["blockrag"]["reused_ids"] == [keys[SHORT]]
    assert hinted.model_extra["blockrag"]["unused_block_ids"] == [keys[HERON]]  # known, but not in this prompt


def test_full_mode_prefills_everything(served, client):
    server, _, _ = served
    messages = quoting(HERON, LANTERN)
    response = client.chat.completions.create(model=MODEL, messages=messages, **OPTIONS,
                                              extra_body={"blockrag": {"mode": "full"}})
    assert response.usage.prompt_tokens_details.cached_tokens == 0
    assert response.model_extra["blockrag"]["mode"] == "full"
    assert response.choices[0].message.content == in_process(server, chat_prompt(server, messages), mode="full")


# -- errors --------------------------------------------------------------------------------------------------------

def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    (b'{"model": "tiny", "messages": [', 400, None, "invalid_json"),
    (b'["a list"]', 400, None, "invalid_json"),
    (b"[" * 100000, 400, None, "invalid_json"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 1, "seed": 2**64}, 400, "seed",
     "invalid_value"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens",
     "invalid_value"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens", "invalid_value"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages",
     "context_length_exceeded"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "blockrag": {"block_ids": ["nope"]}}, 400,
     "blockrag.block_ids", "unknown_block_id"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "messages[0].content[0]",
     "unsupported_content_type"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", "invalid_value"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "blockrag": {"decoder": "recycled"}}, 400,
     "blockrag.decoder", "unknown_option"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "blockrag": {"decode": "sparse"}}, 400,
     "blockrag.decode", "invalid_value"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "best_guess": True}, 400, "best_guess",
     "unsupported_parameter"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
     400, None, "invalid_value"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "hi"}]}, 400, "messages.0.role", "invalid_value"),
    ({"model": MODEL, "messages": []}, 400, "messages", "invalid_value"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature",
     "invalid_value"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": 7}, 400, "stop", "invalid_value"),
])
def test_bad_chat_requests_get_openai_shaped_errors(served, body, status, param, code):
    url = served[1]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    error = error_of(httpx.post(f"{url}/v1/chat/completions", content=content,
                                headers={"Content-Type": "application/json"}, timeout=60), status)
    assert error["param"] == param or param is None
    assert error["code"] == code or code is None
    assert error["type"] == "invalid_request_error"


def test_bad_completion_requests_and_routes(served):
    url = served[1]
    assert error_of(httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3]}), 400)["param"] \
        == "prompt"
    assert error_of(httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "echo": True}),
                    400)["param"] == "echo"
    assert error_of(httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": ""}), 400)["param"] == "prompt"
    assert error_of(httpx.get(f"{url}/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(httpx.get(f"{url}/v1/chat/completions"), 405)["code"] == "not_found"
    assert error_of(httpx.post(f"{url}/v1/blockrag/passages", json={"passages": ["  "]}), 400)["param"] == "passages"


def test_the_openai_client_raises_its_own_error_classes(served, client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    prompt = "word " * 600
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=MODEL, prompt=prompt)
    assert long.value.code == "context_length_exceeded" and long.value.param == "prompt"
    tokens = len(served[0].engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert f"context is 512 tokens, but the prompt has {tokens} tokens" in long.value.message


# -- the frameworks' OpenAI classes --------------------------------------------------------------------------------

def test_llamaindex_openailike_as_a_query_engines_llm(served):
    pytest.importorskip("llama_index.llms.openai_like", reason="needs llama-index-llms-openai-like (the dev extra)")
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.llms.openai_like import OpenAILike
    from llamaindex_events import ChatEnds

    from blockrag.integrations.llamaindex import SentenceTransformerEmbedding

    server, url, keys = served

    # LlamaIndex sizes its prompts for a real model's context; these two passages fit the tiny model's too.
    llm = OpenAILike(model=MODEL, api_base=f"{url}/v1", api_key="unused", is_chat_model=True, context_window=4096,
                     max_tokens=8, temperature=0.0, max_retries=0)
    index = VectorStoreIndex.from_documents([Document(text=HERON), Document(text=LANTERN)],
                                            embed_model=SentenceTransformerEmbedding())
    handler = ChatEnds(responses=[])
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(handler)
    try:
        response = index.as_query_engine(llm=llm, similarity_top_k=2).query("When do heron eggs hatch?")
    finally:
        dispatcher.event_handlers.remove(handler)
    assert isinstance(response.response, str) and len(response.source_nodes) == 2
    raw = handler.responses[-1].raw
    served_ids = raw.model_extra["blockrag"]["reused_ids"]  # raw: the openai client's ChatCompletion
    by_text = {HERON: keys[HERON], LANTERN: keys[LANTERN]}
    assert served_ids == [by_text[n.node.get_content()] for n in response.source_nodes]  # found by content, in order
    assert raw.usage.prompt_tokens_details.cached_tokens > 0


def test_langchain_chatopenai_in_an_lcel_chain(served):
    pytest.importorskip("langchain_openai", reason="needs langchain-openai (the dev extra)")
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnableLambda, RunnablePassthrough
    from langchain_openai import ChatOpenAI

    server, url, _ = served
    llm = ChatOpenAI(model=MODEL, base_url=f"{url}/v1", api_key="unused", temperature=0, max_tokens=8,
                     max_retries=0)
    template = ChatPromptTemplate.from_messages(
        [("system", "Answer briefly."), ("human", "Documents:\n\n{context}\n\nQuestion: {question}")])
    chain = {"context": RunnableLambda(lambda _: f"{LANTERN}\n\n{HERON}"),
             "question": RunnablePassthrough()} | template | llm
    answer = chain.invoke("When is the festival?")
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"Documents:\n\n{LANTERN}\n\n{HERON}\n\nQuestion: When is the festival?"}]
    assert answer.content == in_process(server, chat_prompt(server, messages))
    assert answer.usage_metadata["input_token_details"]["cache_read"] > 0
    streamed = "".join(chunk.content for chunk in chain.stream("When is the festival?"))
    assert streamed == answer.content


# -- concurrency ---------------------------------------------------------------------------------------------------

def test_sixteen_concurrent_clients_each_get_the_sequential_answer(served, client):
    server, _, keys = served
    requests = [quoting(HERON, question=f"Question {i}?") if i % 2 else quoting(LANTERN, HERON, question=f"Q{i}?")
                for i in range(8)]
    expected = [in_process(server, chat_prompt(server, m)) for m in requests]
    before = metric(served[1], "blockrag_requests_total", endpoint="chat", status="200")

    def one_client(c: int) -> list[tuple[int, str]]:
        out = []
        for r in range(4):
            which = (c + r) % len(requests)
            if (c + r) % 2:
                text = client.chat.completions.create(model=MODEL, messages=requests[which],
                                                      **OPTIONS).choices[0].message.content
            else:
                stream = client.chat.completions.create(model=MODEL, messages=requests[which], stream=True, **OPTIONS)
                text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            out.append((which, text))
        return out

    with ThreadPoolExecutor(16) as pool:
        answers = [a for per_client in pool.map(one_client, range(16)) for a in per_client]
    assert len(answers) == 64
    assert [text for _, text in answers] == [expected[which] for which, _ in answers]
    assert metric(served[1], "blockrag_requests_total", endpoint="chat", status="200") == before + 64


def test_a_full_queue_answers_503_and_a_gone_client_stops_its_generation(loaded, tmp_path):
    engine = BlockEngine(loaded, store=open_store(tmp_path / "kv"))
    pulled, closed, exhausted = [], threading.Event(), threading.Event()
    stream_segments = engine.stream_segments

    def counting(*args, **kwargs):  # the engine's own stream, recording how it ended
        stream = stream_segments(*args, **kwargs)
        events = stream._events

        def counted():
            try:
                for event in events:
                    pulled.append(event)
                    yield event
                exhausted.set()
            finally:
                closed.set()

        stream._events = counted()
        return stream

    engine.stream_segments = counting
    server = BlockragServer(engine, ServerSettings(MODEL, max_active=1, max_queue=0, retry_after_s=3))
    with ServerThread(server.app) as url:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 400,
                "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{url}/v1/chat/completions", json=body) as first:
                assert first.status_code == 200
                lines = first.iter_lines()
                assert next(lines).startswith("data: ")  # the generation is running: the one place is taken
                busy = http.post(f"{url}/v1/chat/completions", json={**body, "stream": False})
                assert error_of(busy, 503)["code"] == "queue_full"
                assert busy.headers["Retry-After"] == "3"
            # the client closed its stream after the first chunk
            wait_for(closed.is_set, what="the generation to stop")
            assert not exhausted.is_set() and len(pulled) < 400  # closed early, not run to its end
            wait_for(lambda: metric(url, "blockrag_stopped_generations_total") == 1, what="the stop to be counted")
            assert metric(url, "blockrag_requests_total", endpoint="chat", status="499") == 1
            wait_for(lambda: metric(url, "blockrag_generations_active") == 0, what="the engine to be free")
            after = http.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4})
            assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] <= 4


# -- the correctness gate ------------------------------------------------------------------------------------------

def gate_checks(url: str) -> float:
    return sum(metric(url, "blockrag_gate_checks_total", first_token=k) for k in ("agree", "disagree"))


def test_the_gate_compares_first_tokens_off_the_request_and_exports_them(served, client):
    server, url, _ = served
    messages = quoting(HERON, LANTERN, question="Gate?")
    before, kl_before = gate_checks(url), metric(url, "blockrag_gate_kl_divergence_nats_sum")
    client.chat.completions.create(model=MODEL, messages=messages, **OPTIONS)  # the server's fraction is 0
    client.chat.completions.create(model=MODEL, messages=messages, **OPTIONS, extra_body={"blockrag": {"gate": True}})
    wait_for(lambda: gate_checks(url) == before + 1, what="the gate's check")
    time.sleep(0.2)
    assert gate_checks(url) == before + 1  # only the request that asked for it
    expected = compare_first_token(server.engine, server.runner.plan(chat_prompt(server, messages)).segments)
    assert metric(url, "blockrag_gate_kl_divergence_nats_sum") - kl_before == pytest.approx(expected.kl, abs=1e-6)
    agree = "agree" if expected.agree else "disagree"
    assert metric(url, "blockrag_gate_checks_total", first_token=agree) >= 1
    assert expected.kl > 0  # block mode is an approximation: the distributions differ
    assert error_of(httpx.post(f"{url}/v1/chat/completions", json={
        "model": MODEL, "messages": messages, "blockrag": {"mode": "full", "gate": True}}), 400)["param"] == \
        "blockrag.gate"


def test_the_gate_samples_its_fraction_reproducibly():
    assert not any(GateSampler(0.0).should_check() for _ in range(100))
    assert all(GateSampler(1.0).should_check() for _ in range(100))
    first, second = GateSampler(0.25, seed=3), GateSampler(0.25, seed=3)
    picks = [first.should_check() for _ in range(400)]
    assert picks == [second.should_check() for _ in range(400)]
    assert 60 < sum(picks) < 140
    with pytest.raises(ValueError, match="between 0 and 1"):
        GateSampler(1.5)


def test_the_gate_finds_no_difference_where_block_mode_is_full_attention(served):
    server = served[0]
    result = compare_first_token(server.engine, ["A prompt with no passage blocks at all."])
    assert result.agree and result.kl == pytest.approx(0.0, abs=1e-6)


# -- replicas over one Redis store ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_replicas_over_one_redis_store_serve_each_others_blocks(loaded, redis_server, tmp_path):
    folder = tmp_path / "tiny-model"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    store = redis_server.rsplit("/", 1)[0] + "/7"  # a database of its own on the session's server
    ports = [free_port(), free_port()]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = [open(tmp_path / f"replica{i}.log", "wb") for i in range(2)]
    replicas = [subprocess.Popen([sys.executable, "-m", "blockrag.cli", "serve", "--model", str(folder),
                                  "--served-model-name", MODEL, "--store", store, "--port", str(port),
                                  "--scan-interval", "0.2"], stdout=log, stderr=subprocess.STDOUT, env=env)
                for port, log in zip(ports, logs)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for replica, url, i in zip(replicas, urls, range(2)):
            def up(url=url, replica=replica, i=i) -> bool:
                assert replica.poll() is None, (tmp_path / f"replica{i}.log").read_text()
                try:
                    return httpx.get(f"{url}/health", timeout=2).status_code == 200
                except httpx.TransportError:
                    return False
            wait_for(up, timeout_s=180, what=f"replica {i} to start")
        a, b = (openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) for url in urls)
        ingested = httpx.post(f"{urls[0]}/v1/blockrag/passages", json={"passages": [HERON]}, timeout=60).json()
        key, tokens = ingested["data"][0]["id"], ingested["data"][0]["tokens"]
        messages = quoting(HERON, question="When do the eggs hatch?")
        by_id = b.chat.completions.create(model=MODEL, messages=messages, **OPTIONS,
                                          extra_body={"blockrag": {"block_ids": [key]}})
        assert by_id.usage.prompt_tokens_details.cached_tokens == tokens
        assert by_id.model_extra["blockrag"]["reused_ids"] == [key]
        wait_for(lambda: httpx.get(f"{urls[1]}/health").json()["passages"] >= 1, what="replica B's store scan")
        by_content = b.chat.completions.create(model=MODEL, messages=messages, **OPTIONS)
        assert by_content.usage.prompt_tokens_details.cached_tokens == tokens
        from_a = a.chat.completions.create(model=MODEL, messages=messages, **OPTIONS)
        assert from_a.choices[0].message.content == by_content.choices[0].message.content
        replicas[0].terminate()
        replicas[0].wait(timeout=30)
        again = b.chat.completions.create(model=MODEL, messages=messages, **OPTIONS)  # undisturbed by A stopping
        assert again.choices[0].message.content == by_content.choices[0].message.content
        assert again.usage.prompt_tokens_details.cached_tokens == tokens
    finally:
        for replica in replicas:
            replica.terminate()
            try:
                replica.wait(timeout=30)
            except subprocess.TimeoutExpired:
                replica.kill()
        for log in logs:
            log.close()
