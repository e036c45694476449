"""Splitting documents into passages of a bounded LLM-token length, at sentence boundaries where possible.

Passages are counted in the LLM's tokens because each becomes one KV block: their length is
what the prompt budget and the KV store pay for.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

from blockrag.errors import InvalidArgumentError

if TYPE_CHECKING:  # transformers' model classes load slowly; only their names are needed here
    from transformers import PreTrainedTokenizerBase


DEFAULT_CHUNK_TOKENS = 200

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def node_id(doc_id: str, position: int, text: str) -> str:
    """Stable ID of a passage: its document, its place there and its text.

    15 hex digits (60 bits), so the ID is also a non-negative int64 for FAISS (:func:`faiss_id`).
    """
    return hashlib.sha256(f"{doc_id}\x00{position}\x00{text}".encode()).hexdigest()[:15]


def faiss_id(node: str) -> int:
    return int(node, 16)


def node_from_faiss_id(value: int) -> str:
    return f"{value:015x}"


def _sentences(text: str) -> list[tuple[str, str]]:
    """(separator before it, sentence) pairs: a paragraph break or a space.

    A Markdown heading is joined to the sentence after it, so a passage never ends on one.
    """
    units: list[tuple[str, str]] = []
    heading = ""
    for paragraph in _PARAGRAPH_BREAK.split(text.strip()):
        paragraph = paragraph.strip()
        if paragraph.startswith("#") and "\n" not in paragraph:
            heading += paragraph + "\n\n"
            continue
        for i, sentence in enumerate(s for s in _SENTENCE_END.split(paragraph) if s):
            units.append(("\n\n" if i == 0 else " ", heading + sentence if i == 0 else sentence))
        heading = ""
    if heading:
        units.append(("\n\n", heading.strip()))
    return units


#: Tokens a window must hold beyond those it is read for: tokenization near a window's cut may differ
#: from that of the whole text, but not this many tokens before it.
_WINDOW_MARGIN = 32


def _leading_offsets(tokenizer: PreTrainedTokenizerBase, text: str, count: int) -> list[tuple[int, int]]:
    """Character offsets of the first ``count`` tokens of ``text`` (all of them if it has fewer).

    Tokenizes a window of the text that doubles until it holds ``count`` tokens and a margin, so
    cutting a long text costs time in proportion to its length, not to its length squared.
    """
    window = 8 * (count + _WINDOW_MARGIN)
    while True:
        offsets = tokenizer(text[:window], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if window >= len(text) or len(offsets) >= count + _WINDOW_MARGIN:
            return offsets[:count]
        window *= 2


def _cut(tokenizer: PreTrainedTokenizerBase, sentence: str, max_tokens: int) -> list[str]:
    """A sentence longer than ``max_tokens``, cut at word boundaries into pieces that fit."""
    pieces = []
    while sentence:
        offsets = _leading_offsets(tokenizer, sentence, max_tokens + 1)
        if len(offsets) <= max_tokens:
            pieces.append(sentence)
            break
        end = offsets[max_tokens][0]
        space = sentence.rfind(" ", 0, end)
        end = space if space > 0 else end
        pieces.append(sentence[:end].strip())
        sentence = sentence[end:].strip()
    return pieces


def split_text(text: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[str]:
    """Pack whole sentences greedily into passages of at most about ``max_tokens`` tokens.

    Sentence token counts are summed (a join may shift a token or two); only a sentence longer
    than ``max_tokens`` on its own is cut, at a word boundary.
    """
    if max_tokens < 8:
        raise InvalidArgumentError(f"passages need at least 8 tokens, got max_tokens={max_tokens}")
    units = _sentences(text)
    if not units:
        return []
    counts = [len(ids) for ids in tokenizer([s for _, s in units], add_special_tokens=False)["input_ids"]]
    passages: list[str] = []
    current, used = "", 0
    for (separator, sentence), count in zip(units, counts):
        pieces = [sentence] if count <= max_tokens else _cut(tokenizer, sentence, max_tokens)
        for piece in pieces:
            n = count if len(pieces) == 1 else len(tokenizer(piece, add_special_tokens=False)["input_ids"])
            if current and used + n + 1 > max_tokens:
                passages.append(current)
                current, used = "", 0
            current = f"{current}{separator}{piece}" if current else piece
            used += n + (1 if used else 0)
            separator = " "
    if current:
        passages.append(current)
    return passages
