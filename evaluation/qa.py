"""Question answering data in the NQ-open format of "Lost in the Middle" (Liu et al., 2023), and its scoring.

Each line of the (gzipped) JSONL file holds ``question``, ``answers`` and ``ctxs`` whose first
entry is the Wikipedia passage that answers it. The corpus of a file is all its ``ctxs[0]``
passages, so every other question's passage is a real distractor for retrieval. The task's
prompt defaults live here too: ``blockrag eval`` scores and ``blockrag finetune`` trains with them,
so training sees what evaluation asks.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from blockrag.errors import DataFileError, DocumentFormatError, InvalidArgumentError
from blockrag.retriever import Document, Node, Retriever

#: Short answers, taken from the documents: on a few dev questions (gold among 3, full attention) SmolLM2-135M
#: answered more of them right with it than with the engine's default prompt or other wordings tried.
DEFAULT_SYSTEM_PROMPT = "Answer the question with a short phrase from the documents. Do not explain."
#: Passages retrieved per question, in evaluation and in training (train with as many as the model will read).
DEFAULT_TOP_K = 10


@dataclass(frozen=True)
class QAItem:
    """One question with its gold answers and the passage that answers it."""

    index: int
    """Line number in the file, from 0."""
    question: str
    answers: tuple[str, ...]
    gold_id: str
    """Document ID of its passage in :func:`qa_documents`: ``nq-{index}``."""
    gold: str
    """Its passage's text exactly as the corpus document holds it (title, blank line, text)."""


_FORMAT = 'each line must be an object like {"question": ..., "answers": [...], "ctxs": [{"title": ..., "text": ...}]}'


def _rows(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number from 0, parsed object) for every line; ``.gz`` files are decompressed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataFileError(f"{path} does not exist; pass an NQ-open JSONL(.gz) file such as "
                                "../shared/data/nq-open-dev.jsonl.gz.")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DocumentFormatError(f"{path}:{number + 1} is not valid JSON ({exc.msg}); {_FORMAT}.") from None
            ok = (isinstance(row, dict) and isinstance(row.get("question"), str)
                  and isinstance(row.get("answers"), list) and isinstance(row.get("ctxs"), list) and row["ctxs"]
                  and isinstance(row["ctxs"][0], dict)
                  and isinstance(row["ctxs"][0].get("title"), str) and isinstance(row["ctxs"][0].get("text"), str))
            if not ok:
                raise DocumentFormatError(f"{path}:{number + 1} is not an NQ-open question; {_FORMAT}.")
            yield number, row


def _passage(row: dict) -> tuple[str, str]:
    """(title, document text) of a row's gold passage."""
    ctx = row["ctxs"][0]
    return ctx["title"], f"{ctx['title']}\n\n{ctx['text']}"


def qa_documents(path: str | os.PathLike, limit: int | None = None) -> list[Document]:
    """The corpus of an NQ-open file: each line's ``ctxs[0]`` as document ``nq-{line}`` titled by its page."""
    documents = []
    for i, row in _rows(path):
        if limit is not None and i >= limit:
            break
        title, text = _passage(row)
        documents.append(Document(f"nq-{i}", text, {"title": title}))
    return documents


def load_qa(path: str | os.PathLike, limit: int | None = None, start: int = 0) -> list[QAItem]:
    """The questions of an NQ-open file from line ``start`` (from 0), at most ``limit`` of them."""
    if start < 0 or (limit is not None and limit < 0):
        raise InvalidArgumentError(f"start and limit must not be negative, got start={start}, limit={limit}")
    items = []
    for i, row in _rows(path):
        if i < start:
            continue
        if limit is not None and len(items) >= limit:
            break
        items.append(QAItem(i, row["question"], tuple(map(str, row["answers"])), f"nq-{i}", _passage(row)[1]))
    return items


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def best_subspan_match(prediction: str, answers: Sequence[str]) -> bool:
    """Lost in the Middle's ``best_subspan_em``: some normalised gold answer occurs in the normalised prediction.

    It is a plain substring test, as in the paper (so "1" matches "1990"); the evaluation applies
    it to the prediction's first line (see :func:`first_line`).
    """
    predicted = normalize_answer(prediction)
    return any(normalize_answer(answer) in predicted for answer in answers)


def first_line(prediction: str) -> str:
    """What Lost in the Middle scores: the answer up to its first newline, stripped, so that copying the
    passages into the answer earns nothing."""
    return prediction.split("\n")[0].strip()


def retrieved_nodes(retriever: Retriever, question: str, top_k: int) -> list[Node]:
    """The ``top_k`` passages nearest to ``question``, best first, with their document IDs."""
    return [hit.node for hit in retriever.retrieve(question, top_k)]


def retrieved_passages(retriever: Retriever, question: str, top_k: int) -> list[str]:
    """The texts of the ``top_k`` passages nearest to ``question``, best first."""
    return [node.text for node in retrieved_nodes(retriever, question, top_k)]


def oracle_plus_random(items: Sequence[QAItem], item: QAItem, k: int, gold_position: int,
                       rng: random.Random) -> list[str]:
    """``item``'s gold passage at ``gold_position`` (from 0) among ``k - 1`` other passages of ``items`` drawn by
    ``rng``: distinct texts, none equal to the gold one (some NQ questions share a passage).

    With the gold passage always present, accuracy measures reading alone, without retrieval errors.
    """
    if not 0 <= gold_position < k:
        raise InvalidArgumentError(f"the gold position must be in 0..{k - 1} for {k} passages, got {gold_position}")
    pool = list(dict.fromkeys(other.gold for other in items if other.gold != item.gold))
    if len(pool) < k - 1:
        raise InvalidArgumentError(f"{k} passages need {k - 1} distractors, but the file has only {len(pool)} other distinct "
                         "passages; lower --oracle-plus-random.")
    passages = rng.sample(pool, k - 1)
    passages.insert(gold_position, item.gold)
    return passages
