"""What the benchmarks share: the record of the machine they ran on, and prompts of random tokens."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blockrag.engine import DEFAULT_MODEL
from blockrag.engine.model import package_versions

if TYPE_CHECKING:
    from blockrag.engine import BlockEngine

#: The question of prompts built from random passages (TTFT does not depend on what tokens say).
QUESTION = "Considering every document above, which of them describes the event in the most detail and why?"
#: Random passage tokens are drawn from ids at least this high, past the special and byte tokens.
FIRST_PLAIN_TOKEN = 1000


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model to load (alias, folder or GGUF)")


def machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where a benchmark ran: platform, CPU model and the instruction sets its kernels choose between, CPUs, torch
    threads, GPU and load average, with package versions."""
    device = torch.device(device)
    return {"platform": platform.platform(), "cpu": _cpu(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_average": [round(x, 2) for x in os.getloadavg()], "versions": package_versions()}


def _cpu() -> dict[str, Any]:
    """The CPU's model name and whether it has AVX512-BF16 and AMX, from /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name"), "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags}


def question_tokens(engine: BlockEngine, question: str = QUESTION) -> int:
    """Tokens of the prompt's text after the passages: the question in the engine's template."""
    return len(engine.tokenizer(engine.template().question_text(question))["input_ids"])


def random_tokens(engine: BlockEngine, generator: torch.Generator, count: int, length: int) -> list[list[int]]:
    """``count`` passages of ``length`` random plain tokens each."""
    vocab = min(engine.model.config.vocab_size, len(engine.tokenizer))
    return torch.randint(FIRST_PLAIN_TOKEN, vocab - 1, (count, length), generator=generator).tolist()


def random_texts(engine: BlockEngine, generator: torch.Generator, count: int, length: int) -> list[str]:
    """``count`` passage texts decoded from random plain tokens, each re-tokenizing to at most ``length`` tokens."""
    texts = []
    for ids in random_tokens(engine, generator, count, length):
        text = engine.tokenizer.decode(ids, skip_special_tokens=True)
        while (extra := len(engine.passage_token_ids(text)) - length) > 0:  # decoded text may re-tokenize longer
            ids = ids[:-extra]
            text = engine.tokenizer.decode(ids, skip_special_tokens=True)
        texts.append(text)
    return texts
