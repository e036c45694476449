"""The ``blockrag`` command: one module of this package per subcommand.

Each command module has ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status) and
imports nothing heavy at module level, so ``blockrag --help`` and a no-op re-ingest stay fast.
Output is quiet by default: library warnings and their progress bars show with ``--verbose``. An
error blockrag raises on purpose (:mod:`blockrag.errors`) ends the command with its message and exit
status 1; a bad argument ends it with the usage and status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from blockrag.errors import BlockragError

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("blockrag.cli.demo", "answer a few questions over bundled passages in block and full mode"),
    "ingest": ("blockrag.cli.ingest", "index documents (.txt, .md, .jsonl) and store their passages' KV"),
    "query": ("blockrag.cli.query", "answer a question over an index, printing passages used and TTFT"),
    "eval": ("blockrag.cli.eval", "answer NQ-open questions in several modes; accuracy, tokens, TTFT"),
    "compare": ("blockrag.cli.compare", "pair two eval runs' answers by question (e.g. bf16 against fp32)"),
    "finetune": ("blockrag.cli.finetune", "train a LoRA adapter under the Block-Attention mask on QA questions"),
    "serve": ("blockrag.cli.serve", "an OpenAI-compatible server answering over cached passage blocks"),
    "bench": ("blockrag.cli.bench", "run a benchmark and print JSON"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockrag", description="Fast RAG answers over cached passage blocks.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show library warnings, logs and loading bars")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, parents=[common])
        importlib.import_module(module).add_arguments(sub)
        sub.set_defaults(command_module=module)
    return parser


def quiet_libraries() -> None:
    """Hide what the libraries print by themselves (deprecation notes, "Loading weights" bars): before they load."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO)
    else:
        quiet_libraries()
    try:
        return int(importlib.import_module(args.command_module).run(args) or 0)
    except BlockragError as exc:  # raised on purpose, with advice: the message, not a traceback
        print(f"blockrag {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
