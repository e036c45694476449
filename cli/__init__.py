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
}


def _bench(args: argparse.Namespace) -> int:
    result = importlib.import_module(BENCHMARKS[args.bench][0]).run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
