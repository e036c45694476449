"""``blockrag eval``: answer NQ-open questions in several modes and report accuracy, tokens and TTFT."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

#: the module that runs the evaluation (imported when the command runs: it loads torch)
EVALUATE = "blockrag.retriever.evaluate"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="OUT.json", help="write the result here (and per-question results "
                        "beside it, as OUT.results.jsonl, resumed by a later run)")
    importlib.import_module(EVALUATE).add_arguments(parser)


def run(args: argparse.Namespace) -> int:
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
