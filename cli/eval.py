"""``blockrag eval``: answer NQ-open questions in several modes and report accuracy, tokens and TTFT.

The run itself is :func:`blockrag.evaluation.run_evaluation`; this module reads its settings from
the command line, keeps per-question results beside ``--json`` so a later run resumes, and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blockrag.engine import DECODE_WEIGHTS, DEFAULT_MODEL, PASSAGE_ORDERS
from blockrag.evaluation.modes import DEFAULT_MODES, MODE_HELP
from blockrag.evaluation.qa import DEFAULT_SYSTEM_PROMPT, DEFAULT_TOP_K
from blockrag.evaluation.run import DEFAULT_MAX_NEW_TOKENS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="QA.jsonl.gz", help="NQ-open questions (see ../shared/data/README.md)")
    parser.add_argument("--json", metavar="OUT.json", help="write the result here (and per-question results "
                        "beside it, as OUT.results.jsonl, resumed by a later run)")
    parser.add_argument("--index", metavar="DIR", help="index over the file's passages (built here if missing); "
                        "needed unless --oracle-plus-random")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="passages retrieved per question")
    parser.add_argument("--order", choices=PASSAGE_ORDERS,
                        help="where the retrieved passages' best goes in the prompt (default: the model's: last, "
                        "next to the question, unless --adapter was trained otherwise)")
    parser.add_argument("--modes", default=DEFAULT_MODES, help=f"comma separated; {MODE_HELP}")
    parser.add_argument("--limit", type=int, help="evaluate at most N questions")
    parser.add_argument("--start", type=int, default=0, help="first question's line (from 0)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the oracle passages and gold positions")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT)
    parser.add_argument("--oracle-plus-random", type=int, metavar="K",
                        help="instead of retrieving, give the gold passage among K-1 random ones of the file")
    parser.add_argument("--gold-position", type=int, metavar="P",
                        help="with --oracle-plus-random: the gold passage's place, from 0 (default: random per "
                        "question, seeded)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--adapter", metavar="PATH", help="LoRA adapter folder merged into the model (the rows of "
                        "the file it was trained on are refused)")
    parser.add_argument("--device", help="cuda where available, else cpu (default)")
    parser.add_argument("--dtype", default="auto",
                        help="float32, bfloat16 or auto (bf16 where the device computes it natively, else fp32)")
    parser.add_argument("--decode-weights", default="auto", choices=DECODE_WEIGHTS,
                        help="what decode steps read: auto (four-bit copies on CPU of weights that are four-bit "
                        "already, as the bundled model's), dense, or 4bit (lossy where the weights are not four-bit)")
    parser.add_argument("--results", metavar="RESULTS.jsonl",
                        help="per-question results, resumed if present (default: beside --json as .results.jsonl)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def results_path(args: argparse.Namespace) -> Path | None:
    """Where per-question results go: ``--results``, else beside ``--json`` (``OUT.results.jsonl``)."""
    if args.results:
        return Path(args.results)
    return Path(args.json).with_suffix(".results.jsonl") if args.json else None


def run(args: argparse.Namespace) -> int:
    import torch

    from blockrag.evaluation import EvalConfig, parse_modes, run_evaluation

    where = results_path(args)
    config = EvalConfig(
        args.data, index=args.index, top_k=args.top_k, order=args.order, modes=tuple(parse_modes(args.modes)),
        limit=args.limit, start=args.start, seed=args.seed, max_new_tokens=args.max_new_tokens,
        system_prompt=args.system_prompt, oracle_plus_random=args.oracle_plus_random,
        gold_position=args.gold_position, model=args.model, adapter=args.adapter,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype=args.dtype,
        decode_weights=args.decode_weights, results=where,
        progress=not args.no_progress)
    try:
        result = run_evaluation(config)
    except KeyboardInterrupt:
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
