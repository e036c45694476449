"""Constrained decoding: generation restricted to a JSON schema or a grammar, so that its output always parses.

A :class:`Constraint` says what the output must match. :func:`compile_constraint` compiles it for a
tokenizer once (cached, as is the tokenizer's own conversion), and each request gets a fresh
:class:`ConstraintMatcher`: before each step it masks the logits of every token that would leave the
grammar, and it advances on the token chosen. Only logits are touched, so a constraint works with any
prefill and any decode strategy. Built on llguidance (the ``structured`` extra), whose mask costs a small
fraction of a decode step on a CPU (README, "Structured output and tool calling").

A small model can repeat itself inside a string or a number until its token budget runs out, which would
leave the output cut short. So over the last :func:`closing_reserve` tokens of the budget the matcher
steers to the output's end: where the constraint allows end-of-text or a token made only of closing
characters (``"``, ``]``, ``}``; those starting with a quote first), the choice is among those, so strings
end, arrays and objects close and repetitions stop (the last values may be short). Keys and literals the constraint requires are still generated.
A constraint that admits free text (a grammar with a plain-answer branch) turns this off (``close_early``), as
its text would end at once.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from blockrag.errors import InvalidConstraintError, MissingExtraError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ConstraintKind = Literal["json_schema", "regex", "lark"]
CONSTRAINT_KINDS: tuple[ConstraintKind, ...] = ("json_schema", "regex", "lark")

#: How constrained JSON is laid out: one space after ``,`` and ``:`` (as ``json.dumps`` writes it, the layout
#: models have read most) and no other whitespace, which a small model could otherwise repeat without end.
#: A schema's own ``x-guidance`` settings take precedence.
JSON_LAYOUT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CLOSERS = frozenset('"]}')


def closing_reserve(max_new_tokens: int) -> int:
    """How many tokens before the end of a ``max_new_tokens`` budget a constrained output is steered to close
    (closing a string can take a few required keys and literals more)."""
    return min(32, max_new_tokens // 2)


@dataclass(frozen=True)
class Constraint:
    """What generated text must match: a JSON schema, a regular expression or a Lark grammar.

    Build one with :meth:`json_schema`, :meth:`json_object`, :meth:`regex` or :meth:`lark`. ``source``
    holds the schema as JSON text (so a constraint is hashable and compiled once), the pattern or the grammar.
    ``close_early`` steers the output to its end near the end of the token budget (see the module's doc).
    """

    kind: ConstraintKind
    source: str
    close_early: bool = True

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise InvalidConstraintError(f"constraint kind must be one of {CONSTRAINT_KINDS}, got {self.kind!r}")
        if not isinstance(self.source, str) or not self.source:
            raise InvalidConstraintError(f"a {self.kind} constraint needs its source as non-empty text")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> "Constraint":
        """Output that is one JSON value valid against ``schema`` (a dict or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise InvalidConstraintError(f"the JSON schema is not valid JSON ({exc}); pass a dict or JSON "
                                             "text.") from exc
        if not isinstance(schema, Mapping):
            raise InvalidConstraintError(f"a JSON schema must be a JSON object, got {type(schema).__name__}; "
                                         'pass e.g. {"type": "object", "properties": {...}}.')
        return cls("json_schema", json.dumps(schema, sort_keys=False))

    @classmethod
    def json_object(cls) -> "Constraint":
        """Output that is any one JSON object (OpenAI's JSON mode)."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        """Output that matches the regular expression ``pattern`` as a whole."""
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str, close_early: bool = True) -> "Constraint":
        """Output derived from ``start`` in a Lark grammar (llguidance's dialect: :func:`lark_json` embeds a schema);
        pass ``close_early=False`` where it admits free text."""
        return cls("lark", grammar, close_early)


def lark_json(schema: Mapping[str, Any]) -> str:
    """A Lark grammar's item for one JSON value valid against ``schema``, laid out as :data:`JSON_LAYOUT`."""
    return "%json " + json.dumps({**schema, "x-guidance": {**JSON_LAYOUT, **schema.get("x-guidance", {})}})


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
    except ImportError as exc:
        raise MissingExtraError("constrained decoding", "structured", exc) from exc
    return llguidance


@functools.lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_ids: tuple[int, ...]) -> Any:
    """llguidance's view of ``tokenizer``: built once per tokenizer, as it reads every token's bytes."""
    llguidance = _llguidance()
    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_ids))
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidConstraintError(f"constrained decoding needs a fast (Rust) Hugging Face tokenizer; this one "
                                     f"cannot be read ({exc}). Load the model with its tokenizer.json.") from exc


def _grammar(constraint: Constraint) -> str:
    llguidance = _llguidance()
    if constraint.kind == "json_schema":
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(constraint.source, defaults=JSON_LAYOUT)
        except ValueError as exc:
            raise InvalidConstraintError(f"the JSON schema cannot be read: {exc}") from exc
    if constraint.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(constraint.source)
    return llguidance.LLMatcher.grammar_from_lark(constraint.source)


@functools.lru_cache(maxsize=8)
def _closing_tokens(tokenizer: PreTrainedTokenizerBase, vocab_size: int,
                    eos_ids: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The tokens that close, best first (bool masks over ``vocab_size``): end-of-text; made only of
    :data:`CLOSERS` and starting with ``"`` (inside a string, only a closing quote may be one); the other tokens
    made only of closers (``]`` and ``}``, which inside a string are text)."""
    quote, bracket = torch.zeros(vocab_size, dtype=torch.bool), torch.zeros(vocab_size, dtype=torch.bool)
    for i, text in enumerate(tokenizer.batch_decode([[i] for i in range(min(vocab_size, len(tokenizer)))])):
        if text and set(text) <= CLOSERS:
            (quote if text[0] == '"' else bracket)[i] = True
    eos = torch.zeros(vocab_size, dtype=torch.bool)
    eos[list(eos_ids)] = True
    return eos, quote, bracket


class CompiledConstraint:
    """A constraint compiled for one tokenizer; :meth:`matcher` starts a request's matcher from it."""

    def __init__(self, template: Any, tokenizer: PreTrainedTokenizerBase, vocab_size: int,
                 eos_ids: tuple[int, ...]):
        self._template = template
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self.vocab_size = vocab_size

    def matcher(self) -> "ConstraintMatcher":
        return ConstraintMatcher(self._template.deep_copy(), self.vocab_size,
                                 lambda: _closing_tokens(self._tokenizer, self.vocab_size, self._eos_ids))


@functools.lru_cache(maxsize=64)
def _compile(tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_ids: tuple[int, ...],
             constraint: Constraint) -> CompiledConstraint:
    llguidance = _llguidance()
    ll_tokenizer = _ll_tokenizer(tokenizer, vocab_size, eos_ids)
    grammar = _grammar(constraint)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer)
    template = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
    if is_error or template.is_error():
        error = messages[0] if is_error else template.get_error()
        what = {"json_schema": "JSON schema", "regex": "regular expression", "lark": "Lark grammar"}[constraint.kind]
        raise InvalidConstraintError(f"cannot constrain generation to this {what}: {error}. Fix it, or leave out "
                                     "the keywords llguidance does not support (see its JSON schema docs).")
    return CompiledConstraint(template, tokenizer, vocab_size, eos_ids)


def compile_constraint(tokenizer: PreTrainedTokenizerBase, constraint: Constraint, vocab_size: int,
                       eos_ids: Collection[int]) -> CompiledConstraint:
    """``constraint`` compiled for ``tokenizer``, whose model has ``vocab_size`` logits and ends text with
    ``eos_ids`` (allowed exactly where the output may end). Compiled once per arguments; a bad schema or
    grammar raises :class:`InvalidConstraintError` here, before any model work."""
    return _compile(tokenizer, vocab_size, tuple(sorted(eos_ids)), constraint)


class ConstraintMatcher:
    """One request's position in a constraint: masks each step's logits and advances on the chosen token."""

    def __init__(self, matcher: Any, vocab_size: int, closing_tokens: Callable[[], tuple[torch.Tensor, ...]]):
        self._matcher = matcher
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self._closing_tokens = closing_tokens

    def mask(self, logits: torch.Tensor, closing: bool = False) -> torch.Tensor:
        """``logits`` with every token the constraint does not allow next set to ``-inf``; with ``closing``,
        also every token but the closing ones, where the constraint allows any of those."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        keep = torch.from_numpy(np.unpackbits(self._bits.numpy().view(np.uint8), bitorder="little")[
            : logits.shape[-1]].astype(bool))
        if closing:
            keep = next((closers for closers in (keep & tier[: keep.shape[0]] for tier in self._closing_tokens())
                         if closers.any()), keep)
        return logits.masked_fill(~keep.to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        """Move past ``token``; one the mask did not allow raises :class:`InvalidConstraintError`."""
        if not self._matcher.consume_token(token):
            raise InvalidConstraintError(f"token {token} breaks the constraint: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """True once the output is complete: nothing but end-of-text may follow."""
        return self._matcher.is_stopped()
