"""The questions of an evaluation with the passages every mode answers them over: retrieved, or oracle."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from blockrag.engine.prompt import DEFAULT_PASSAGE_ORDER, PassageOrder, in_prompt_order
from blockrag.retriever import Retriever

from .qa import QAItem, oracle_plus_random, retrieved_nodes


@dataclass(frozen=True)
class EvalQuestion:
    """A question with the passages every mode answers it over."""

    item: QAItem
    passages: tuple[str, ...]
    passage_ids: tuple[str, ...]
    """Document ID of each passage."""

    @property
    def gold_rank(self) -> int | None:
        """Where the gold passage sits among the passages in the prompt (from 0), None if it was not retrieved."""
        return self.passage_ids.index(self.item.gold_id) if self.item.gold_id in self.passage_ids else None


def retrieved_questions(items: Sequence[QAItem], retriever: Retriever, top_k: int,
                        order: PassageOrder = DEFAULT_PASSAGE_ORDER) -> list[EvalQuestion]:
    """Each question with its ``top_k`` passages from the index, placed in the prompt by ``order``."""
    out = []
    for item in items:
        nodes = in_prompt_order(retrieved_nodes(retriever, item.question, top_k), order)
        out.append(EvalQuestion(item, tuple(n.text for n in nodes), tuple(n.doc_id for n in nodes)))
    return out


def oracle_questions(items: Sequence[QAItem], corpus: Sequence[QAItem], k: int, gold_position: int | None,
                     seed: int) -> list[EvalQuestion]:
    """Each question with its gold passage among ``k - 1`` random ones of ``corpus``, at ``gold_position`` or at a
    random one; each question draws from its own generator, so it gets the same passages in any subset."""
    ids = {}
    for other in corpus:
        ids.setdefault(other.gold, other.gold_id)
    out = []
    for item in items:
        rng = random.Random(f"{seed}:{item.index}")
        position = rng.randrange(k) if gold_position is None else gold_position
        passages = oracle_plus_random(corpus, item, k, position, rng)
        out.append(EvalQuestion(item, tuple(passages), tuple(item.gold_id if i == position else ids[p]
                                                              for i, p in enumerate(passages))))
    return out
