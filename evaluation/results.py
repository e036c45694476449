"""The resumable results file of an evaluation: one JSON line per (question, mode) answer, after its settings.

Each answer is appended and flushed as soon as it is scored, so a stopped run resumes without
redoing finished pairs; a run with other settings (anything that changes an answer or its cost)
is refused rather than mixed in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from blockrag.engine import GenerationResult
from blockrag.errors import DataFileError, EvaluationError

from .modes import EvalMode
from .qa import best_subspan_match, first_line
from .questions import EvalQuestion

#: Settings a results file must share with a run that resumes it: anything that changes an answer or its cost.
RESUME_KEYS = ("data_sha256", "passages", "top_k", "passage_order", "oracle_plus_random", "gold_position", "seed",
               "max_new_tokens", "system_prompt", "fingerprint", "block_mode", "embedding_model", "index_passages",
               "device", "four_bit_projections")


class ResultsFile:
    """Per-(question, mode) records in JSONL after a first line of settings; appended to and flushed one by one."""

    def __init__(self, path: str | os.PathLike | None, settings: dict[str, Any]):
        self.path = Path(path) if path is not None else None
        self.done: dict[tuple[int, str], dict[str, Any]] = {}
        if self.path is None:
            return
        if self.path.exists() and self.path.stat().st_size:
            self._read(settings)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"settings": settings}) + "\n")

    def _read(self, settings: dict[str, Any]) -> None:
        assert self.path is not None
        saved, done, complete = _parse(self.path)
        differ = [f"{key} {saved.get(key)!r} (now {settings.get(key)!r})" for key in RESUME_KEYS
                  if saved.get(key) != settings.get(key)]
        if differ:
            raise EvaluationError(f"{self.path} holds results of a run with other settings: {'; '.join(differ)}. "
                                  "Pass another --results file (or --json), or delete it to start over.")
        if complete != self.path.stat().st_size:
            with self.path.open("r+b") as f:
                f.truncate(complete)
        self.done = done

    def add(self, record: dict[str, Any]) -> None:
        self.done[record["question"], record["mode"]] = record
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _parse(path: Path) -> tuple[dict[str, Any], dict[tuple[int, str], dict[str, Any]], int]:
    """A results file's settings, its answers by (question, mode), and the length in bytes of its complete lines."""
    raw = path.read_bytes()
    complete = raw[:raw.rfind(b"\n") + 1]  # a run stopped mid-write leaves a partial last line: dropped
    try:
        rows = [json.loads(line) for line in complete.decode("utf-8").splitlines()]
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EvaluationError(f"{path} is not a results file of `blockrag eval` (a line is not JSON); "
                              "pass another --results file or delete it to start over.") from None
    if not rows or "settings" not in rows[0]:
        raise EvaluationError(f"{path} does not start with the settings line of `blockrag eval`; pass "
                              "another --results file or delete it to start over.")
    return rows[0]["settings"], {(row["question"], row["mode"]): row for row in rows[1:]}, len(complete)


def read_results(path: str | os.PathLike) -> tuple[dict[str, Any], dict[tuple[int, str], dict[str, Any]]]:
    """A results file's settings and its answers by (question, mode), as :class:`ResultsFile` keeps them."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"no results file at {path}; `blockrag eval --json OUT.json` writes OUT.results.jsonl")
    settings, done, _ = _parse(path)
    return settings, done


def answer_record(question: EvalQuestion, mode: EvalMode, result: GenerationResult) -> dict[str, Any]:
    """One answer as the results file keeps it: scored (first line, best subspan), with its costs and passages."""
    return {"question": question.item.index, "mode": mode.name,
            "correct": best_subspan_match(first_line(result.text), question.item.answers),
            "prediction": result.text, "prompt_tokens": result.prompt_tokens, "block_tokens": result.block_tokens,
            "ttft_s": result.ttft_s, "answer_tokens": result.completion_tokens, "finish_reason": result.finish_reason,
            "passages": list(question.passage_ids), "gold_rank": question.gold_rank}
