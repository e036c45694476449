"""The guard against scoring an adapter on the questions it was trained on.

An adapter records the sha256 of the QA file it was trained on and the rows it used (see
:mod:`blockrag.engine.adapter`). An evaluation of that adapter over the same file (the same bytes,
wherever it now lies) refuses to score any of those rows: an answer learnt in training says
nothing of how the model reads passages.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from blockrag.engine.adapter import TrainingRows, adapter_training_rows
from blockrag.errors import TrainedRowsError

from .qa import load_qa

log = logging.getLogger(__name__)

#: How many of the overlapping rows a refusal names.
SHOWN_ROWS = 5


def longest_untrained_run(trained: set[int], rows: int) -> tuple[int, int] | None:
    """``(start, count)`` of the longest run of consecutive rows among ``0 .. rows - 1`` not in ``trained``."""
    best: tuple[int, int] | None = None
    start = None
    for row in range(rows + 1):
        if row < rows and row not in trained:
            start = row if start is None else start
            continue
        if start is not None and (best is None or row - start > best[1]):
            best = (start, row - start)
        start = None
    return best


def check_untrained(adapter: str | os.PathLike, data: str | os.PathLike, data_sha256: str,
                    rows: Sequence[int]) -> list[TrainingRows] | None:
    """The adapter's training rows, once none of ``rows`` of ``data`` (sha256 ``data_sha256``) is among them.

    Raises :class:`TrainedRowsError` naming the overlap and rows to evaluate instead. Returns None
    (and logs a warning) for an adapter that does not record its training rows: nothing to check.
    """
    trained_on = adapter_training_rows(adapter)
    if trained_on is None:
        log.warning("the adapter in %s does not record the rows it was trained on: cannot check that this "
                    "evaluation scores none of them", adapter)
        return None
    trained = {row for entry in trained_on if entry.sha256 == data_sha256 for row in entry.rows}
    overlap = sorted(trained.intersection(rows))
    if not overlap:
        return trained_on
    shown = ", ".join(map(str, overlap[:SHOWN_ROWS])) + (", ..." if len(overlap) > SHOWN_ROWS else "")
    run = longest_untrained_run(trained, len(load_qa(data)))
    instead = (f"evaluate rows it was not trained on, e.g. --start {run[0]} --limit {run[1]} (rows {run[0]}-"
               f"{run[0] + run[1] - 1}, the longest run of untrained rows in the file)" if run is not None else
               "every row of the file was trained on: evaluate the adapter on another QA file")
    raise TrainedRowsError(
        f"the adapter in {adapter} was trained on {len(overlap)} of the {len(rows)} questions this evaluation "
        f"would score (rows {shown} of {Path(data).name}), whose answers it may have learnt; {instead}.")
