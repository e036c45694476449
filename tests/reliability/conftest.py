"""Fixtures of the reliability suite (``pytest -m reliability``).

``BLOCKRAG_RELIABILITY_LONG=1`` runs the long mode (more kill trials, corruptions and threads), and
``BLOCKRAG_RELIABILITY_JSON=PATH`` writes the figures of the session there: faults injected by kind,
survived and entries lost, and bad inputs tried and handled (refused with their error and nothing
written, or for valid if hostile input such as a 100,000-token document, ingested correctly).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from reliability_support import tiny_engine

LONG = os.environ.get("BLOCKRAG_RELIABILITY_LONG", "") not in ("", "0")


class Figures:
    """Counts of what the suite injected and how it came out, for benchmarks/RESULTS.md."""

    def __init__(self):
        self.faults: dict[str, dict[str, int]] = defaultdict(lambda: {"injected": 0, "survived": 0,
                                                                      "entries_lost": 0})
        self.bad_inputs: dict[str, dict[str, int]] = defaultdict(lambda: {"tried": 0, "handled": 0})

    def fault(self, kind: str, survived: bool, lost: int = 0) -> None:
        self.faults[kind]["injected"] += 1
        self.faults[kind]["survived"] += survived
        self.faults[kind]["entries_lost"] += lost

    def bad_input(self, kind: str, handled: bool) -> None:
        self.bad_inputs[kind]["tried"] += 1
        self.bad_inputs[kind]["handled"] += handled

    def write(self, path: Path) -> None:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
        path.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "commit": commit, "long_mode": LONG,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "faults": dict(self.faults), "bad_inputs": dict(self.bad_inputs)}, indent=2) + "\n")


@pytest.fixture(scope="session")
def figures():
    recorder = Figures()
    yield recorder
    if os.environ.get("BLOCKRAG_RELIABILITY_JSON"):
        recorder.write(Path(os.environ["BLOCKRAG_RELIABILITY_JSON"]))


@pytest.fixture(scope="session")
def long_mode() -> bool:
    return LONG


@pytest.fixture(scope="session")
def tokenizer_dir(smollm, tmp_path_factory) -> Path:
    """The bundled model's tokenizer saved on its own, for child processes to load in a fraction of a second."""
    folder = tmp_path_factory.mktemp("tokenizer")
    smollm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def engine(tokenizer_dir):
    return tiny_engine(tokenizer_dir)
