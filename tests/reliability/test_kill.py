"""kill -9 of a real ingestion process at seeded points: nothing committed is lost, a re-run completes."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from reliability_support import check_index, corpus, ingest_tiny, node_keys, write_jsonl

pytestmark = pytest.mark.reliability

CHILD = Path(__file__).with_name("ingest_child.py")


def _child(folder: Path, docs: Path, tokenizer_dir: Path, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHILD), str(folder), str(docs), str(tokenizer_dir), str(kill_at)],
                          capture_output=True, text=True, timeout=300)


def test_kill_9_during_ingestion_loses_nothing_and_the_rerun_completes(tmp_path, engine, tokenizer_dir, figures,
                                                                       long_mode):
    """Protects: a batch's KV is stored before its passages are committed (one SQLite transaction per batch),
    the FAISS file is derived from the document store and rebuilt when stale, files are replaced by atomic
    renames, and a changed document's text digest is dropped before its passages change (so a killed run is
    never taken for a finished one).

    An index of 8 documents is updated to a version where every third document changed and two are new,
    by a separate process killed with SIGKILL at a seeded write event (inside every transaction, save and
    rename, and half-way through entry files). Right after the kill a reader finds every listed passage
    served from an intact block of its own tokens and FAISS agreeing with the document store; a re-run
    completes to exactly the index an uninterrupted run builds.
    """
    trials = 24 if long_mode else 3
    base = tmp_path / "base"
    ingest_tiny(corpus(7, version=1), base, engine)
    docs = write_jsonl(corpus(7, version=2), tmp_path / "v2.jsonl")
    calibration = tmp_path / "calibration"
    shutil.copytree(base, calibration)
    run = _child(calibration, docs, tokenizer_dir, 0)
    assert run.returncode == 0, run.stderr
    events = json.loads(run.stdout.strip().splitlines()[-1])["events"]
    assert events > 30  # kill points in every phase: removals, batches, entry files, digests, save
    expected = node_keys(calibration)
    assert check_index(calibration, engine).problems == []

    rng = random.Random(20)
    failures = []
    for trial in range(trials):
        folder = tmp_path / f"trial-{trial}"
        shutil.copytree(base, folder)
        kill_at = rng.randint(1, events)
        run = _child(folder, docs, tokenizer_dir, kill_at)
        assert run.returncode == -signal.SIGKILL, f"trial {trial} (event {kill_at}) was not killed: {run.stderr}"
        after_kill = check_index(folder, engine)
        ingest_tiny(corpus(7, version=2), folder, engine)
        after_rerun = check_index(folder, engine)
        missing = expected - node_keys(folder)
        problems = after_kill.problems + after_rerun.problems + [f"{len(missing)} passages missing after the re-run"
                                                                 for _ in [missing] if missing]
        figures.fault("kill -9 during ingestion", not problems, after_kill.lost + after_rerun.lost + len(missing))
        if problems or node_keys(folder) != expected:
            failures.append(f"trial {trial}, killed at event {kill_at} of {events}: {problems}")
    assert failures == []
