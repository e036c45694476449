"""Content matching: find passages inside a prompt written by a framework and serve them as blocks.

LlamaIndex and LangChain hand the LLM one finished prompt in which the passage boundaries are
gone. A passage is served from its stored block only where its exact text is found in that
prompt, so a stale or wrong hint can never change what the model reads: at worst a passage is
prefilled like any other text. Everything else (template, question, separators, passages with
no stored block) is prefilled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from blockrag.engine import Block, BlockEngine
from blockrag.engine.prompt import PASSAGE_SEPARATOR

ANCHOR_CHARS = 32
"""Passages are searched for by their first this many characters; shorter ones match only as hints."""


@dataclass(frozen=True)
class Passage:
    """A passage's text as it appears in prompts (stripped), and its node or document id when known."""

    text: str
    id: str | None = None

    @classmethod
    def of(cls, text: str, id: str | None = None) -> "Passage":
        return cls(text.strip(), id)


@dataclass(frozen=True)
class Match:
    """A passage found at ``prompt[start:end]``."""

    start: int
    end: int
    passage: Passage


class PassageIndex:
    """Known passages: looked up by id (for explicit hints) and found by exact text in prompts.

    The search does one dictionary lookup per prompt position, keyed by the next ``ANCHOR_CHARS``
    characters, so it costs time linear in the prompt whatever the number of passages.
    """

    def __init__(self, passages: Iterable[Passage] = ()):
        self._by_id: dict[str, Passage] = {}
        self._by_anchor: dict[str, list[Passage]] = {}
        self._texts: set[str] = set()
        self.add(passages)

    def add(self, passages: Iterable[Passage]) -> None:
        for p in passages:
            if not p.text:
                continue
            self._texts.add(p.text)
            if p.id is not None:
                self._by_id[p.id] = p
            if len(p.text) >= ANCHOR_CHARS:
                same = self._by_anchor.setdefault(p.text[:ANCHOR_CHARS], [])
                if all(q.text != p.text for q in same):
                    same.append(p)
                    same.sort(key=lambda q: -len(q.text))  # the longest passage wins where several start alike

    def get(self, ids: Iterable[str]) -> list[Passage | None]:
        return [self._by_id.get(i) for i in ids]

    def __len__(self) -> int:
        """How many distinct passage texts are known."""
        return len(self._texts)

    def find(self, prompt: str, start: int = 0, end: int | None = None) -> list[Match]:
        """Non-overlapping occurrences of known passages inside ``prompt[start:end]``, leftmost first."""
        end = len(prompt) if end is None else end
        found: list[Match] = []
        i = start
        while i + ANCHOR_CHARS <= end:
            hit = next((p for p in self._by_anchor.get(prompt[i:i + ANCHOR_CHARS], ())
                        if i + len(p.text) <= end and prompt.startswith(p.text, i)), None)
            if hit is None:
                i += 1
                continue
            found.append(Match(i, i + len(hit.text), hit))
            i += len(hit.text)
        return found


def locate(prompt: str, hints: Sequence[Passage] = (), index: PassageIndex | None = None) -> list[Match]:
    """Where passages sit in ``prompt``: hinted passages first, then known ones in the gaps between them.

    A passage at the very end of the prompt is left to prefill: generation needs text after the last block.
    """
    spans: list[Match] = []
    for hint in hints:
        if not hint.text:
            continue
        at = prompt.find(hint.text)
        while at >= 0:
            stop = at + len(hint.text)
            if all(stop <= m.start or at >= m.end for m in spans):
                spans.append(Match(at, stop, hint))
            at = prompt.find(hint.text, stop)
    if index is not None:
        spans.sort(key=lambda m: m.start)
        gaps = zip([0] + [m.end for m in spans], [m.start for m in spans] + [len(prompt)])
        spans += [m for lo, hi in list(gaps) for m in index.find(prompt, lo, hi)]
    spans.sort(key=lambda m: m.start)
    return [m for m in spans if m.end < len(prompt)]


@dataclass(frozen=True)
class BlockUse:
    """A passage served from its stored block: its id (when known) and token count."""

    id: str | None
    tokens: int


@dataclass
class PromptPlan:
    """A prompt cut into text to prefill and blocks to serve, in order."""

    segments: list[str | Block]
    blocks: list[BlockUse]

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from stored blocks."""
        return sum(b.tokens for b in self.blocks)


def plan_prompt(engine: BlockEngine, prompt: str, hints: Sequence[Passage] = (),
                index: PassageIndex | None = None) -> PromptPlan:
    """Cut ``prompt`` at the passages found in it whose blocks are stored; the rest stays text to prefill.

    Blocks are keyed by their exact text, which is what ingestion stores for each passage, so a
    passage is served wherever a prompt quotes it, whatever surrounds it. A block ends with the
    blank line that follows its passage in the engine's prompts: where the prompt has that blank line
    after the passage too, the whole block is served; elsewhere its first tokens, the passage's alone.
    """
    matches = locate(prompt, hints, index) if engine.store is not None else []
    texts = list(dict.fromkeys(prompt[m.start:m.end] for m in matches))
    token_ids = [engine.passage_token_ids(t, exact_text=True) for t in texts]
    found = engine.store.get_many(engine.token_block_keys(token_ids)) if texts else []
    # A stored block is used only if it holds exactly these tokens: a wrong entry cannot change the input.
    by_text = {t: b for t, b, ids in zip(texts, found, token_ids) if b is not None and b.token_ids.tolist() == ids}
    separator, separator_tokens = PASSAGE_SEPARATOR, len(engine.separator_ids)
    segments: list[str | Block] = []
    uses: list[BlockUse] = []
    at = 0
    for m in matches:
        block = by_text.get(prompt[m.start:m.end])
        if block is None:
            continue
        end = m.end + len(separator)
        if not (prompt.startswith(separator, m.end) and end < len(prompt)):  # the prompt must go on after a block
            block, end = block.first(len(block) - separator_tokens), m.end
        segments += [prompt[at:m.start], block] if m.start > at else [block]
        uses.append(BlockUse(m.passage.id, len(block)))
        at = end
    segments.append(prompt[at:])
    return PromptPlan(segments, uses)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]) -> str:
    """The model's prompt for chat ``messages`` (dicts of role and content), ready for the assistant's turn.

    Tokenizers without a chat template get ``role: content`` lines and an ``assistant:`` cue.
    """
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True,
                                             tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
