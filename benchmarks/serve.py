"""``blockrag bench serve``: requests per second and TTFT of the server under concurrent clients, block against full.

The bundled corpus is ingested into a temporary index; each request is a chat whose user turn
quotes a question's top retrieved passages (best last), so the server finds them by content.
Clients are threads on loopback, each sending its requests one after another and streaming the
answer; TTFT is measured by the client, from sending the request to the first text it reads.
Both modes go through the same server, one after the other at each concurrency.
"""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from blockrag.errors import BenchmarkError, InvalidArgumentError
from blockrag.engine import DEFAULT_MODEL, PREFILL_MODES, in_prompt_order

SYSTEM_PROMPT = "Answer the question using the documents given by the user. Answer briefly."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model to load (alias, folder or GGUF)")
    parser.add_argument("--concurrency", default="1,4,16", help="concurrent clients, comma separated")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--passages", type=int, default=10, help="retrieved passages quoted in each prompt")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    parser.add_argument("--modes", default="block,full", help="prefill modes to compare, comma separated")
    parser.add_argument("--max-active", type=int, default=4, help="generations the server interleaves")


def _prompts(index, engine, passages: int) -> list[list[dict[str, str]]]:
    """Chat messages for each bundled question over its top retrieved passages, the best last."""
    from blockrag.retriever import Retriever, bundled_questions

    retriever = Retriever(index)
    out = []
    for question in bundled_questions():
        ranked = [hit.text for hit in retriever.retrieve(question.question, passages)]
        documents = "\n\n".join(in_prompt_order(ranked, engine.passage_order))
        out.append([{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": f"Documents:\n\n{documents}\n\nQuestion: {question.question}"}])
    return out


def _request(url: str, body: dict) -> tuple[float, dict]:
    """Send one streamed chat request; its TTFT in seconds and its usage."""
    where = urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=600)
    try:
        sent = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise BenchmarkError(f"the server answered {response.status}: {response.read().decode()}")
        ttft, usage = None, {}
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c["delta"].get("content") for c in chunk.get("choices", ())):
                ttft = time.perf_counter() - sent
            usage = chunk.get("usage") or usage
        return (ttft if ttft is not None else time.perf_counter() - sent), usage
    finally:
        connection.close()


def _load(url: str, model: str, prompts: list, mode: str, clients: int, per_client: int,
          max_tokens: int) -> dict:
    ttfts: list[float] = []
    usages: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(per_client):
            body = {"model": model, "messages": prompts[(c * per_client + r) % len(prompts)], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                    "blockrag": {"mode": mode}}
            try:
                ttft, usage = _request(url, body)
            except BaseException as exc:  # noqa: BLE001 - reported after the run
                with lock:
                    errors.append(exc)
                return
            with lock:
                ttfts.append(ttft)
                usages.append(usage)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise BenchmarkError(f"{len(errors)} requests failed; the first: {errors[0]}") from errors[0]
    return {"concurrency": clients, "mode": mode, "requests": len(ttfts), "wall_s": round(wall, 3),
            "requests_per_s": round(len(ttfts) / wall, 3),
            "ttft_p50_s": round(float(np.percentile(ttfts, 50)), 4),
            "ttft_p95_s": round(float(np.percentile(ttfts, 95)), 4),
            "mean_prompt_tokens": round(float(np.mean([u["prompt_tokens"] for u in usages])), 1),
            "mean_cached_tokens": round(float(np.mean([u["prompt_tokens_details"]["cached_tokens"] for u in usages])),
                                        1)}


def run(args: argparse.Namespace) -> dict:
    modes = args.modes.split(",")
    if not set(modes) <= set(PREFILL_MODES):
        raise InvalidArgumentError(f"--modes takes {', '.join(PREFILL_MODES)}, got {args.modes!r}")
    with tempfile.TemporaryDirectory(prefix="blockrag-bench-serve-") as root:
        return _measure(args, [int(c) for c in args.concurrency.split(",")], modes, Path(root))


def _measure(args: argparse.Namespace, concurrency: list[int], modes: list[str], root: Path) -> dict:
    from blockrag.engine import BlockEngine, load_model
    from blockrag.integrations.runner import node_passages
    from blockrag.retriever import Index, bundled_corpus, ingest, load_engine

    from blockrag.server.app import BlockragServer, ServerSettings
    from blockrag.server.thread import ServerThread

    from .common import machine

    loaded = load_model(args.model)
    ingest(bundled_corpus(), root / "index", engine=BlockEngine(loaded), model=args.model, progress=False)
    index = Index.open(root / "index")
    engine = load_engine(index, loaded=loaded)
    prompts = _prompts(index, engine, args.passages)
    settings = ServerSettings("bench", default_max_tokens=args.max_tokens, max_active=args.max_active,
                              max_queue=max(concurrency))
    server = BlockragServer(engine, settings, passages=node_passages(index))
    results = []
    with ServerThread(server.app) as url:
        for mode in modes:  # warm-up: the first request of each mode pays one-off costs
            _load(url, "bench", prompts, mode, 1, 1, args.max_tokens)
        for clients in concurrency:
            for mode in modes:
                results.append(_load(url, "bench", prompts, mode, clients, args.requests_per_client,
                                     args.max_tokens))
    by = {(r["concurrency"], r["mode"]): r for r in results}
    ratios = {str(c): round(by[c, "block"]["ttft_p95_s"] / by[c, "full"]["ttft_p95_s"], 4)
              for c in concurrency if (c, "block") in by and (c, "full") in by}
    return {
        "benchmark": "serve", "model": args.model, "passages": args.passages, "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client, "max_active": args.max_active,
        "machine": machine(engine.device),
        "block_over_full_ttft_p95": ratios,
        "results": results,
    }
