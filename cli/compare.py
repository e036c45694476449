"""``blockrag compare``: pair two ``blockrag eval`` runs' answers by question, mode by mode (exact McNemar)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("first", metavar="FIRST.results.jsonl", help="one run's per-question results")
    parser.add_argument("second", metavar="SECOND.results.jsonl", help="the other run's, of the same questions")
    parser.add_argument("--json", metavar="OUT.json", help="also write the comparison here")


def run(args: argparse.Namespace) -> int:
    from blockrag.evaluation import compare_runs, comparison_table, read_results

    comparison = compare_runs(read_results(args.first), read_results(args.second))
    comparison = {"first": str(args.first), "second": str(args.second), **comparison}
    if args.json:
        Path(args.json).write_text(json.dumps(comparison, indent=2) + "\n")
    print(comparison_table(comparison))
    return 0
