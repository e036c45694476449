"""``blockrag bench NAME``: run one of the benchmarks in :mod:`blockrag.benchmarks`, print its JSON result."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

#: benchmark name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "ttft": ("blockrag.benchmarks.ttft", "time to first token: full prefill against Block-Attention"),
    "decode": ("blockrag.benchmarks.decode", "decode speed and fidelity: Recycled Attention, StreamingLLM, full"),
    "ingest": ("blockrag.benchmarks.ingest", "ingestion: whole pipeline against its model work alone, re-run cost"),
    "store": ("blockrag.benchmarks.store", "block store: bytes per token, load throughput, TTFT from disk"),
    "structured": ("blockrag.benchmarks.structured", "decode speed with and without a JSON-schema constraint"),
    "answer": ("blockrag.benchmarks.answer", "a whole answer: block, full, no passages and llama.cpp side by side"),
    "serve": ("blockrag.benchmarks.serve", "the OpenAI-compatible server: requests/s and TTFT under concurrent clients"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    benches = parser.add_subparsers(dest="bench", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        sub = benches.add_parser(name, help=help_text)
        sub.add_argument("--json", metavar="OUT.json", help="also write the result to this file")
        importlib.import_module(module).add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    result = importlib.import_module(BENCHMARKS[args.bench][0]).run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0
