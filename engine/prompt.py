"""The token layout of a RAG prompt: prefix, passage blocks, question.

The chat template is rendered once around a sentinel and split there, so the prefix (system
turn and the opening of the user turn) and the question (end of the user turn and the opening
of the assistant turn) carry the template's exact text, while every passage is tokenized on
its own, as Block-Attention requires.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from blockrag.errors import InvalidArgumentError

if TYPE_CHECKING:  # transformers' model classes load slowly; only their names are needed here
    from transformers import PreTrainedTokenizerBase


DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question using the documents given by the user. "
    "Answer briefly."
)
_SENTINEL = "\x00BLOCKRAG-PASSAGES\x00"
PASSAGE_SEPARATOR = "\n\n"

PassageOrder = Literal["best-last", "best-first"]
PASSAGE_ORDERS: tuple[PassageOrder, ...] = ("best-last", "best-first")
#: Blocks answer best when the best passage sits next to the question (measured on NQ: benchmarks/RESULTS.md).
DEFAULT_PASSAGE_ORDER: PassageOrder = "best-last"
_T = TypeVar("_T")


@dataclass(frozen=True)
class PromptTemplate:
    """Texts that surround the passages: everything before them and the question's text after them."""

    head: str
    before_question: str
    after_question: str

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, system: str | None = None) -> "PromptTemplate":
        """Split the tokenizer's chat template around the user's documents.

        Tokenizers without a chat template get a plain ``system / documents / Question: / Answer:`` layout.
        """
        system = DEFAULT_SYSTEM_PROMPT if system is None else system
        question_slot = "\x00BLOCKRAG-QUESTION\x00"
        if tokenizer.chat_template:
            messages = [{"role": "user", "content": _SENTINEL + question_slot}]
            if system:
                messages.insert(0, {"role": "system", "content": system})
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = (system + "\n\n" if system else "") + _SENTINEL + "Question: " + question_slot + "\nAnswer:"
        head, rest = text.split(_SENTINEL)
        before, after = rest.split(question_slot)
        return cls(head=head, before_question=before, after_question=after)

    def question_text(self, question: str) -> str:
        return self.before_question + question + self.after_question


def in_prompt_order(ranked: Sequence[_T], order: PassageOrder = DEFAULT_PASSAGE_ORDER) -> list[_T]:
    """Passages ranked best first, in the order a prompt places them: ``"best-last"`` puts the best next to the
    question."""
    if order not in PASSAGE_ORDERS:
        raise InvalidArgumentError(f"order must be one of {PASSAGE_ORDERS}, got {order!r}")
    return list(reversed(ranked)) if order == "best-last" else list(ranked)


def passage_text(passage: str) -> str:
    """A passage's text as prompts quote it: stripped.

    Its block encodes this text followed by :data:`PASSAGE_SEPARATOR`, each tokenized on its own (see
    ``BlockEngine.passage_token_ids``): the blank line after a passage is part of its block, so that only
    the question is prefilled. A prompt that quotes the passage without the blank line after it is served
    the block's first tokens, which never saw the blank line (:meth:`Block.first`).
    """
    return passage.strip()


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of one piece of the prompt, with no special tokens added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
