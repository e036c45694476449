"""Training examples from a QA file: each question over the passages its index retrieves for it.

An example is the question's ``top_k`` retrieved passages, placed in the prompt by an order (the
adapter records it, and its model then answers in that order), and its first gold answer as the
target. The gold passage is always among them: if retrieval missed it, it replaces the last
retrieved passage, at a seeded random position, so the model learns to read the answer from a
passage rather than to guess. :func:`example_source` names their rows, which the adapter records.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

from blockrag.engine.prompt import DEFAULT_PASSAGE_ORDER, PassageOrder, in_prompt_order
from blockrag.errors import IndexMismatchError
from blockrag.evaluation.qa import QAItem, best_subspan_match, retrieved_passages
from blockrag.retriever import Retriever

from .trainer import ExampleSource, TrainingExample


def training_example(retriever: Retriever, item: QAItem, top_k: int, rng: random.Random,
                     order: PassageOrder = DEFAULT_PASSAGE_ORDER) -> TrainingExample:
    """``item``'s question over its ``top_k`` retrieved passages, the gold passage among them, and its first answer.

    The gold passage is the index's passage of ``item``'s document that holds an answer (its first
    passage if none does). The passages are placed in the prompt by ``order``.
    """
    passages = retrieved_passages(retriever, item.question, top_k)
    gold = [node.text for node in retriever.index.document_nodes(item.gold_id)]
    if not gold:
        raise IndexMismatchError(f"the index in {retriever.index.folder} does not hold document {item.gold_id!r}; "
                                 "fine-tune over the index `blockrag eval` built for this QA file.")
    if not set(passages) & set(gold):
        passages = passages[:top_k - 1]
        passages.insert(rng.randrange(len(passages) + 1),
                        next((text for text in gold if best_subspan_match(text, item.answers)), gold[0]))
    return TrainingExample(tuple(in_prompt_order(passages, order)), item.question, item.answers[0])


def training_examples(retriever: Retriever, items: Sequence[QAItem], top_k: int, seed: int,
                      order: PassageOrder = DEFAULT_PASSAGE_ORDER) -> list[TrainingExample]:
    """One :func:`training_example` per item, the gold passages' positions drawn from one generator seeded ``seed``."""
    rng = random.Random(seed)
    return [training_example(retriever, item, top_k, rng, order) for item in items]


def example_source(path: str | os.PathLike, items: Sequence[QAItem]) -> ExampleSource:
    """The rows of ``path`` that examples built from ``items`` (in that order) come from, for ``finetune(source=)``."""
    return ExampleSource(path, tuple(item.index for item in items))
