"""``blockrag finetune``: train a LoRA adapter under the Block-Attention mask on questions of a QA file."""

from __future__ import annotations

import argparse
import importlib

#: the module that builds the examples and trains (imported when the command runs: it loads torch)
FINETUNE = "blockrag.retriever.finetune"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    importlib.import_module(FINETUNE).add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(FINETUNE).finetune_command(args)
