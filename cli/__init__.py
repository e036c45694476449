"""The ``blockrag`` command: ``blockrag bench NAME ...`` and the other subcommands of the package.

Each benchmark lives beside the code it measures and exposes ``add_arguments(parser)`` and
``run(args) -> dict``; the result is printed as JSON and written to ``--json`` when given.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

#: benchmark name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "ttft": ("blockrag.engine.bench_ttft", "time to first token: full prefill against Block-Attention"),
    "decode": ("blockrag.engine.bench_decode", "decode speed and fidelity: Recycled Attention, StreamingLLM, full"),
    "ingest": ("blockrag.retriever.bench", "ingestion: whole pipeline against bare model forward, re-run cost"),
    "store": ("blockrag.kvstore.bench", "block store: bytes per token, load throughput, TTFT from disk"),
    "serve": ("blockrag.server.bench", "the OpenAI-compatible server: requests/s and TTFT under concurrent clients"),
    "structured": ("blockrag.engine.bench_structured", "decode speed with and without a JSON-schema constraint"),
}

#: the module behind ``blockrag ingest`` and ``blockrag query``
RETRIEVER_COMMANDS = "blockrag.retriever.commands"
#: the module behind ``blockrag eval``
EVALUATE = "blockrag.retriever.evaluate"
#: the module behind ``blockrag finetune``
FINETUNE = "blockrag.retriever.finetune"
#: the module behind ``blockrag serve``
SERVE = "blockrag.server.commands"


def _bench(args: argparse.Namespace) -> int:
    result = importlib.import_module(BENCHMARKS[args.bench][0]).run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    module = importlib.import_module(EVALUATE)
    try:
        result = module.run(args)
    except KeyboardInterrupt:
        where = module.results_path(args)
        print(f"\nstopped; the answers so far are in {where}: run the same command again to resume"
              if where else "\nstopped (pass --json or --results to keep answers for a later run to resume)",
              file=sys.stderr)
        return 130
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
        print(result["table"])
        print(f"\nwritten to {args.json}")
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from blockrag.engine.prompt import PASSAGE_ORDERS

    parser = argparse.ArgumentParser(prog="blockrag", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="run a benchmark and print JSON")
    benches = bench.add_subparsers(dest="bench", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        sub = benches.add_parser(name, help=help_text)
        sub.add_argument("--json", metavar="OUT.json", help="also write the result to this file")
        importlib.import_module(module).add_arguments(sub)
        sub.set_defaults(handler=_bench)
    demo = commands.add_parser("demo", help="answer a few questions over bundled passages in block and full mode")
    demo.add_argument("--model", default="smollm2-135m")
    demo.set_defaults(handler=lambda args: importlib.import_module("blockrag.cli.demo").run(args))
    ingest = commands.add_parser("ingest", help="index documents (.txt, .md, .jsonl) and store their passages' KV")
    ingest.add_argument("paths", nargs="+", metavar="PATH", help="files, or folders searched recursively")
    ingest.add_argument("--index", required=True, metavar="DIR", help="index folder (created if needed)")
    ingest.add_argument("--model", help="LLM for a new index (default smollm2-135m); an existing index keeps its own")
    ingest.add_argument("--chunk-tokens", type=int, help="passage length in LLM tokens for a new index (default 200)")
    ingest.add_argument("--vector-index", choices=("flat", "hnsw"), help="FAISS index for a new index (default flat)")
    ingest.add_argument("--batch-passages", type=int, default=32, help="passages per committed batch")
    ingest.set_defaults(handler=lambda args: importlib.import_module(RETRIEVER_COMMANDS).ingest_command(args))
    query = commands.add_parser("query", help="answer a question over an index, printing passages used and TTFT")
    query.add_argument("index", metavar="DIR")
    query.add_argument("question")
    query.add_argument("--top-k", type=int, default=5)
    query.add_argument("--mode", choices=("block", "full"), default="block")
    query.add_argument("--order", choices=PASSAGE_ORDERS,
                       help="where the best passage goes in the prompt (default: the model's, best last unless an "
                       "adapter was trained otherwise)")
    query.add_argument("--model", help="where to load the index's LLM from (default: as recorded in the index)")
    query.add_argument("--max-new-tokens", type=int, default=128)
    query.set_defaults(handler=lambda args: importlib.import_module(RETRIEVER_COMMANDS).query_command(args))
    evaluate = commands.add_parser("eval", help="answer NQ-open questions in several modes; accuracy, tokens, TTFT")
    evaluate.add_argument("--json", metavar="OUT.json", help="write the result here (and per-question results "
                          "beside it, as OUT.results.jsonl, resumed by a later run)")
    importlib.import_module(EVALUATE).add_arguments(evaluate)
    evaluate.set_defaults(handler=_evaluate)
    tune = commands.add_parser("finetune", help="train a LoRA adapter under the Block-Attention mask on QA questions")
    importlib.import_module(FINETUNE).add_arguments(tune)
    tune.set_defaults(handler=lambda args: importlib.import_module(FINETUNE).finetune_command(args))
    serve = commands.add_parser("serve", help="an OpenAI-compatible server answering over cached passage blocks")
    importlib.import_module(SERVE).add_arguments(serve)
    serve.set_defaults(handler=lambda args: importlib.import_module(SERVE).serve_command(args))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
