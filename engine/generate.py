"""Answering a prompt of prefix, passages and question, in full or Block-Attention mode.

Full mode prefills every token. Block mode serves the prefix and passages from blocks
(precomputed, or encoded here and reusable), re-positions them, and prefills only the question.
Both decode with the same loop, so their outputs differ only through the prefill.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch

from .blocks import (BLOCK_MODES, Block, BlockMode, BlockStore, PassageContext, StoredPassage, assemble, block_key,
                     encode_blocks, prefill_over_blocks)
from .constrain import Constraint, closing_reserve, compile_constraint
from . import decoding as _decoding
from .decoding import DecodeMode, DecodeOptions, start_decoding
from .fourbit import DecodeWeights
from blockrag.errors import UnknownOptionError, InvalidArgumentError, BlockMismatchError, PromptTooLongError
from .model import DEFAULT_MODEL, LoadedModel, load_model
from .prompt import PASSAGE_SEPARATOR, PassageOrder, PromptTemplate, passage_text, tokenize
from .recovery import Recovery, positions_to_recompute
from .threads import release_openmp_team
from .rope import warm_rotation
from .transformer import KVCache, Positions, empty_cache, forward

log = logging.getLogger(__name__)

_Block = TypeVar("_Block")
PrefillMode = Literal["block", "full"]
PREFILL_MODES: tuple[PrefillMode, ...] = ("block", "full")


@dataclass(frozen=True)
class SamplingOptions:
    """Greedy when ``temperature`` is 0; otherwise temperature, top-k and nucleus sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise InvalidArgumentError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0, got "
                             f"{self.temperature}, {self.top_p}, {self.top_k}")


@dataclass(frozen=True)
class GenerationOptions:
    """Everything a request may set besides its prompt; every public generation method takes these fields.

    ``mode`` is how the prompt is prefilled (blocks, or every token); ``block_mode`` what passage
    blocks are encoded after (``generate`` and ``stream`` only: segment prompts carry their blocks).
    ``decode`` picks what new tokens attend to: ``"auto"`` (Recycled Attention where the prompt is
    long enough for it to pay, :data:`~.decoding.AUTO_RECYCLE_FROM` tokens, full decoding below),
    ``"full"``, ``"recycled"`` or ``"streaming"``, with ``recycle_k``, ``stride`` and
    ``dynamic_threshold`` as :class:`DecodeOptions` describes. In block mode, ``recovery``
    recomputes some passage tokens in context (see :class:`Recovery`). ``ignore_eos`` generates on past
    end-of-sequence tokens, to ``max_new_tokens`` or a stop string (for benchmarks). ``constraint`` restricts the
    output to a JSON schema or grammar (see :class:`~.constrain.Constraint`), whatever the prefill and decoding.
    """

    mode: PrefillMode = "block"
    block_mode: BlockMode | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    decode: DecodeMode | Literal["auto"] = "auto"
    recycle_k: int | float = 1 / 8
    stride: int = 10
    dynamic_threshold: float | None = None
    recovery: Recovery | None = None
    constraint: Constraint | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.mode not in PREFILL_MODES:
            raise InvalidArgumentError(f"mode must be one of {PREFILL_MODES}, got {self.mode!r}")
        if self.block_mode is not None and self.block_mode not in BLOCK_MODES:
            raise InvalidArgumentError(f"block_mode must be one of {BLOCK_MODES}, got {self.block_mode!r}")
        if self.max_new_tokens < 1:
            raise InvalidArgumentError("max_new_tokens must be at least 1")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise InvalidArgumentError("constraint must be a blockrag.engine.Constraint (e.g. "
                                       f"Constraint.json_schema(schema)), got {type(self.constraint).__name__}")
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        self.sampling  # noqa: B018 - validates the sampling and decoding fields now, not mid-request
        self.decoding(_decoding.AUTO_RECYCLE_FROM)

    @classmethod
    def of(cls, options: "GenerationOptions | None", fields: dict) -> "GenerationOptions":
        """``options`` (default: the defaults) with ``fields`` replaced; an unknown field raises ``TypeError``."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UnknownOptionError(f"unknown generation option(s) {sorted(unknown)}; the options are "
                            f"{[f.name for f in dataclasses.fields(cls)]}")
        return dataclasses.replace(options or cls(), **fields)

    @property
    def sampling(self) -> SamplingOptions:
        return SamplingOptions(self.temperature, self.top_p, self.top_k, self.seed)

    def decoding(self, prompt_tokens: int) -> DecodeOptions:
        """The decoding of a prompt of ``prompt_tokens`` tokens (``"auto"`` resolved by its length: recycled from
        :data:`~.decoding.AUTO_RECYCLE_FROM` tokens)."""
        mode = self.decode
        if mode == "auto":
            mode = "recycled" if prompt_tokens >= _decoding.AUTO_RECYCLE_FROM else "full"
        threshold = None if self.decode == "auto" and mode != "recycled" else self.dynamic_threshold
        return DecodeOptions(mode, self.recycle_k, self.stride, threshold)


@dataclass
class GenerationResult:
    """The answer and what it cost."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    block_tokens: int
    """Prompt tokens served from blocks that existed before this call (no model work), less any recomputed."""
    prefilled_tokens: int
    """Prompt tokens that went through the model in this call (question, any passage encoded now, and any
    block token recomputed in context by a :class:`Recovery`)."""
    ttft_s: float
    total_s: float
    decode: DecodeMode = "full"
    """How new tokens attended to the prompt (``"auto"`` resolved)."""
    full_steps: float = 0.0
    """Decode steps that attended to the whole cache (averaged over layers, whose schedules may differ)."""

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class TextStream:
    """Iterates over text deltas as they are generated; ``result`` is set once iteration ends."""

    _events: Iterator[str | GenerationResult]
    result: GenerationResult | None = field(default=None, init=False)

    def __iter__(self) -> Iterator[str]:
        for event in self._events:
            if isinstance(event, GenerationResult):
                self.result = event
            else:
                yield event


@dataclass
class Prefill:
    """A prefilled prompt: its cache (with room for the answer), the last position's logits, and token counts.

    ``served`` prompt tokens came from blocks that existed before the call; ``prefilled`` went
    through the model in it.
    ``recomputed`` counts the tokens of each block (in prompt order) that a :class:`Recovery` recomputed.
    """

    cache: KVCache
    logits: torch.Tensor
    served: int
    prefilled: int
    recomputed: tuple[int, ...] = ()

    @property
    def prompt_tokens(self) -> int:
        return self.served + self.prefilled


class _Sampler:
    def __init__(self, options: SamplingOptions, device: torch.device):
        self.options = options
        self.generator = None
        if options.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(options.seed if options.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> int:
        o = self.options
        if o.temperature == 0:  # widened to fp32 at least (exactly): CPU's argmax is slower over bf16 than the cast
            return int(torch.argmax(logits.to(torch.promote_types(logits.dtype, torch.float32))))
        logits = logits.float() / o.temperature
        if o.top_k:
            kth = torch.topk(logits, min(o.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if o.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cumulative - torch.softmax(sorted_logits, -1) >= o.top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=self.generator))


def _finished(stream: TextStream) -> GenerationResult:
    for _ in stream:
        pass
    assert stream.result is not None
    return stream.result


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that may still become a stop string or a multi-byte character."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def prompt_layout(head: str | Block, passages: Sequence[str | _Block], question: str) -> list[str | _Block]:
    """The engine's prompt as segments: head, each passage followed by a blank line, then the question.

    A passage given as text is followed by the blank line as text; any other item stands for the
    passage's block, which holds its blank line (as :meth:`BlockEngine.passage_token_ids` encodes it).
    """
    segments: list[str | _Block] = [head]
    for p in passages:
        segments += [p, PASSAGE_SEPARATOR] if isinstance(p, str) else [p]
    return [*segments, question]


class BlockEngine:
    """A loaded model with the prompt layout, head blocks and block store it answers with.

    Its settings (``system_prompt``, ``block_mode``, ``store``) are fixed at construction, so one
    engine can serve several threads at once: a caller that needs others makes a second engine
    over the same :class:`LoadedModel` (``engine.with_store(store)``, or ``BlockEngine(engine.loaded, ...)``).
    """

    def __init__(self, loaded: LoadedModel, *, system_prompt: str | None = None, block_mode: BlockMode = "prefix",
                 batch_size: int = 8, store: BlockStore | None = None):
        if block_mode not in BLOCK_MODES:
            raise InvalidArgumentError(f"block_mode must be one of {BLOCK_MODES}, got {block_mode!r}")
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self._block_mode: BlockMode = block_mode
        self.batch_size = batch_size
        self._system_prompt = system_prompt
        self._store = store
        self.device = next(self.model.parameters()).device
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        config_eos = self.model.generation_config.eos_token_id
        eos = config_eos if isinstance(config_eos, list) else [config_eos]
        self.eos_ids = {int(i) for i in [*eos, self.tokenizer.eos_token_id] if i is not None}
        self._heads: OrderedDict[str | None, Block] = OrderedDict()
        self._templates: dict[str | None, PromptTemplate] = {}
        self._lock = threading.RLock()
        warm_rotation(next(self.model.parameters()).dtype, self.device)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, *, dtype: str | torch.dtype | None = None,
                        device: str = "cpu", decode_weights: DecodeWeights = "auto", **kwargs) -> "BlockEngine":
        """An engine over :func:`~.model.load_model`'s model (``dtype``, ``device``, ``decode_weights``); ``kwargs`` go
        to the constructor."""
        return cls(load_model(name_or_path, dtype=dtype, device=device, decode_weights=decode_weights), **kwargs)

    @property
    def system_prompt(self) -> str | None:
        """The system prompt of requests that give none (None: blockrag's default)."""
        return self._system_prompt

    @property
    def block_mode(self) -> BlockMode:
        """What passage blocks are encoded after, for requests that do not say."""
        return self._block_mode

    @property
    def store(self) -> BlockStore | None:
        """Where blocks are looked up and kept between calls (None: encoded per call)."""
        return self._store

    def with_store(self, store: BlockStore | None) -> "BlockEngine":
        """An engine over the same loaded model and settings that keeps its blocks in ``store``."""
        return BlockEngine(self.loaded, system_prompt=self._system_prompt, block_mode=self._block_mode,
                           batch_size=self.batch_size, store=store)

    @property
    def passage_order(self) -> PassageOrder:
        """Where prompts should put the best passage for this model (an adapter's training order)."""
        return self.loaded.passage_order

    @property
    def fingerprint(self) -> str:
        return self.loaded.fingerprint

    @property
    def vocab_size(self) -> int:
        """Rows of the model's logits (its output embedding's, which may exceed the tokenizer's vocabulary)."""
        return self.model.get_output_embeddings().weight.shape[0]

    def template(self, system_prompt: str | None = None) -> PromptTemplate:
        """The prompt's text around the passages for ``system_prompt`` (None: the engine's), rendered once each."""
        system = self.system_prompt if system_prompt is None else system_prompt
        if system not in self._templates:
            self._templates[system] = PromptTemplate.from_tokenizer(self.tokenizer, system)
        return self._templates[system]

    def head_block(self, system_prompt: str | None = None) -> Block:
        """The KV of the prompt's head (system turn and user-turn opening), computed once per system prompt."""
        with self._lock:  # frameworks call one engine from several threads
            if system_prompt in self._heads:
                self._heads.move_to_end(system_prompt)
                return self._heads[system_prompt]
            ids = tokenize(self.tokenizer, self.template(system_prompt).head)
            block = encode_blocks(self.model, [ids])[0]
            self._heads[system_prompt] = block
            while len(self._heads) > 16:
                self._heads.popitem(last=False)
            return block

    def passage_context(self, system_prompt: str | None = None,
                        block_mode: BlockMode | None = None) -> PassageContext:
        """What passage blocks are encoded after: the head block in ``prefix`` block mode, nothing in ``naive``."""
        mode = block_mode or self.block_mode
        if mode not in BLOCK_MODES:
            raise InvalidArgumentError(f"block_mode must be one of {BLOCK_MODES}, got {mode!r}")
        return PassageContext(self.head_block(system_prompt) if mode == "prefix" else None)

    @functools.cached_property
    def separator_ids(self) -> list[int]:
        """Token ids of the blank line that follows every passage in the engine's prompts, and ends its block."""
        return tokenize(self.tokenizer, PASSAGE_SEPARATOR)

    def passage_token_ids(self, passage: str, exact_text: bool = False) -> list[int]:
        """Token ids of a passage's block: the passage tokenized on its own, then :attr:`separator_ids`.

        By default the passage as the engine's own prompt quotes it (stripped); with ``exact_text``
        the text exactly as given.
        """
        return tokenize(self.tokenizer, passage if exact_text else passage_text(passage)) + self.separator_ids

    def encode(self, passages: Sequence[str], *, system_prompt: str | None = None,
               block_mode: BlockMode | None = None, exact_text: bool = False) -> list[Block]:
        """Encode passages into blocks (batched) for later :meth:`generate` calls with the same system prompt and
        block mode."""
        past = self.passage_context(system_prompt, block_mode).block
        return encode_blocks(self.model, [self.passage_token_ids(p, exact_text) for p in passages], past,
                             self.batch_size)

    def token_block_keys(self, token_lists: Sequence[Sequence[int]], *, system_prompt: str | None = None,
                         block_mode: BlockMode | None = None) -> list[str]:
        """The store keys of blocks of these token lists, encoded after ``system_prompt``'s head in ``block_mode``."""
        context = self.passage_context(system_prompt, block_mode)
        return [block_key(self.fingerprint, context.id, ids) for ids in token_lists]

    def block_keys(self, passages: Sequence[str], *, system_prompt: str | None = None,
                   block_mode: BlockMode | None = None, exact_text: bool = False) -> list[str]:
        """The store keys :meth:`blocks` uses for ``passages`` (to find or delete their stored KV)."""
        return self.token_block_keys([self.passage_token_ids(p, exact_text) for p in passages],
                                     system_prompt=system_prompt, block_mode=block_mode)

    def blocks(self, passages: Sequence[str | Block | StoredPassage], *, system_prompt: str | None = None,
               block_mode: BlockMode | None = None, exact_text: bool = False) -> tuple[list[Block], int]:
        """Blocks for ``passages``: given ones as they are, then the store's, then encoded now (and stored).

        Returns the blocks and how many of their tokens needed no model work in this call.
        """
        out, reused = self._blocks(passages, self.passage_context(system_prompt, block_mode), exact_text)
        return out, sum(len(b) for b, r in zip(out, reused) if r)

    def _blocks(self, passages: Sequence[str | Block | StoredPassage], context: PassageContext,
                exact_text: bool) -> tuple[list[Block], list[bool]]:
        """:meth:`blocks`, telling for each block whether it existed before this call (given or stored).

        A :class:`StoredPassage` is looked up by its key as it is, and served only if the entry holds
        its text's tokens.
        """
        start = len(context.block) if context.block is not None else 0
        out: list[Block | None] = [p if isinstance(p, Block) else None for p in passages]
        todo = [i for i, p in enumerate(passages) if not isinstance(p, Block)]
        texts = {i: passages[i].text if isinstance(passages[i], StoredPassage) else passages[i] for i in todo}
        ids = {i: self.passage_token_ids(texts[i], exact_text) for i in todo}  # type: ignore[arg-type]
        keys = {i: block_key(self.fingerprint, context.id, ids[i]) for i in todo}
        if self.store is not None and todo:
            asked = [passages[i].key if isinstance(passages[i], StoredPassage) else keys[i]  # type: ignore[union-attr]
                     for i in todo]
            for i, key, found in zip(todo, asked, self.store.get_many(asked)):
                # A store entry is served only if it really holds these tokens, encoded where they follow this context.
                if found is not None and found.context == context.id and found.start == start and \
                        found.token_ids.tolist() == ids[i]:
                    out[i] = found
                elif found is not None:
                    log.warning("store entry %s holds other tokens, context or start; recomputing it", key)
        reused = [b is not None for b in out]
        missing = [i for i in todo if out[i] is None]
        for i, block in zip(missing, encode_blocks(self.model, [ids[i] for i in missing], context.block,
                                                   self.batch_size)):
            out[i] = block
            if self.store is not None:
                self.store.put(keys[i], block)
        for b in out:
            if b.context != context.id:  # type: ignore[union-attr]
                raise BlockMismatchError(
                    "a passage block was encoded after another system prompt or block mode than this request uses; "
                    "re-encode it with `engine.encode(passages, system_prompt=..., block_mode=...)` matching the "
                    "request.")
        return out, reused  # type: ignore[return-value]

    def generate(self, system_prompt: str | None, passages: Sequence[str | Block | StoredPassage], question: str,
                 options: GenerationOptions | None = None, **fields) -> GenerationResult:
        """Answer ``question`` over ``passages`` after ``system_prompt`` (None: the engine's default).

        Passages may be texts, precomputed blocks from :meth:`encode`, or :class:`StoredPassage` (a
        text with its known store key), placed in the order given: for retrieval results,
        ``in_prompt_order(ranked, engine.passage_order)`` puts the best next to the question, where
        blocks answer best (see ``DEFAULT_PASSAGE_ORDER``). ``options`` and keyword ``fields`` (which
        replace options' fields) are those of :class:`GenerationOptions`.
        """
        return _finished(self.stream(system_prompt, passages, question, options, **fields))

    def stream(self, system_prompt: str | None, passages: Sequence[str | Block | StoredPassage], question: str,
               options: GenerationOptions | None = None, **fields) -> TextStream:
        """Like :meth:`generate`, yielding text deltas; the stream's ``result`` holds the counts afterwards."""
        o = GenerationOptions.of(options, fields)
        return TextStream(self._run(lambda: self.prefill(system_prompt, passages, question, o), o))

    def generate_segments(self, segments: Sequence[str | Block], options: GenerationOptions | None = None,
                          **fields) -> GenerationResult:
        """Continue a prompt given as raw text pieces and blocks, in order (no chat template is added).

        Text is prefilled normally, attending to everything before it; blocks are served as they are,
        but for the tokens a ``recovery`` recomputes in context (every block not at the prompt's start
        is eligible). This is how a prompt written by a framework is answered with the blocks found
        inside it. The prompt must end with text. Options as :meth:`generate` takes them, but for
        ``block_mode``: the blocks are given.
        """
        return _finished(self.stream_segments(segments, options, **fields))

    def stream_segments(self, segments: Sequence[str | Block], options: GenerationOptions | None = None,
                        **fields) -> TextStream:
        """Like :meth:`generate_segments`, yielding text deltas."""
        o = GenerationOptions.of(options, fields)
        return TextStream(self._run(lambda: self.prefill_segments(segments, o), o))

    def prefill(self, system_prompt: str | None, passages: Sequence[str | Block | StoredPassage], question: str,
                options: GenerationOptions | None = None, **fields) -> Prefill:
        """Prefill the prompt :meth:`generate` answers, without decoding: its cache, with room for
        ``max_new_tokens`` more, and the first token's logits (for benchmarks, checks, custom decoding)."""
        o = GenerationOptions.of(options, fields)
        template = self.template(system_prompt)
        question_text = template.question_text(question)
        if o.mode == "full":
            texts = [p.text if isinstance(p, StoredPassage) else p for p in passages]
            texts = [p if isinstance(p, Block) else passage_text(p) for p in texts]
            return self._prefill(prompt_layout(template.head, texts, question_text), o)
        fresh_head = system_prompt not in self._heads
        head = self.head_block(system_prompt)
        context = self.passage_context(system_prompt, o.block_mode)
        blocks, reused = self._blocks(passages, context, False)
        done = self._prefill(prompt_layout(head, blocks, question_text), o)
        # Served: the tokens of blocks that existed before this call, less those recomputed in context.
        served = sum(len(b) - r for b, r, old in zip([head, *blocks], done.recomputed, [not fresh_head, *reused])
                     if old)
        return Prefill(done.cache, done.logits, served, done.prompt_tokens - served, done.recomputed)

    def prefill_segments(self, segments: Sequence[str | Block], options: GenerationOptions | None = None,
                         **fields) -> Prefill:
        """Prefill the prompt :meth:`generate_segments` answers, without decoding (as :meth:`prefill`)."""
        o = GenerationOptions.of(options, fields)
        if o.block_mode is not None:
            raise InvalidArgumentError("block_mode does not apply to segment prompts: their blocks are given; "
                                       "encode them with `engine.encode(..., block_mode=...)` instead")
        return self._prefill(segments, o)

    def _prefill(self, segments: Sequence[str | Block], options: GenerationOptions) -> Prefill:
        """Prefill text segments over the blocks before them; in full mode, every token.

        The cache has a slot for every position of the prompt and ``max_new_tokens`` more. In block
        mode, the block tokens ``recovery`` picks are recomputed in the same forward pass as the text:
        every token of it attends by position to the slots up to its own, which then hold the
        recomputed KV.
        """
        pieces = [s if isinstance(s, Block) else torch.tensor(tokenize(self.tokenizer, s), dtype=torch.long)
                  for s in segments]
        if not pieces or isinstance(pieces[-1], Block) or len(pieces[-1]) == 0:
            raise InvalidArgumentError("a prompt must end with a text segment of at least one token")
        lengths = [len(p) for p in pieces]
        total = sum(lengths)
        self._check_length(total)
        capacity = min(total + options.max_new_tokens, self.max_positions)
        ids = torch.cat([p.token_ids if isinstance(p, Block) else p for p in pieces]).to(self.device)
        memory = self.loaded.cache_memory
        if options.mode == "full":
            cache = empty_cache(self.model, capacity, memory=memory)
            logits = forward(self.model, cache, ids[None], Positions.span(0, total, self.device))
            return Prefill(cache, logits[0, -1], 0, total)
        starts = [sum(lengths[:i]) for i in range(len(pieces))]
        blocks = [(p, s) for p, s in zip(pieces, starts) if isinstance(p, Block)]
        cache = assemble(self.model, [b for b, _ in blocks], [s for _, s in blocks], capacity, memory)
        in_block = torch.cat([torch.full((len(p),), isinstance(p, Block)) for p in pieces]).to(self.device)
        fresh = ~in_block  # the positions this forward pass computes: the text, and block tokens recomputed
        if options.recovery is not None:
            fresh[positions_to_recompute(self.model, options.recovery, cache, ids,
                                         [(s, len(b)) for b, s in blocks])] = True
        logits = prefill_over_blocks(self.model, ids, cache, fresh)
        recomputed = tuple(int((fresh[s:s + len(b)]).sum()) for b, s in blocks)
        served = int(in_block.sum()) - sum(recomputed)
        return Prefill(cache, logits[-1], served, total - served, recomputed)

    def _check_length(self, tokens: int) -> None:
        if tokens >= self.max_positions:
            raise PromptTooLongError(f"the prompt has {tokens} tokens but the model's context is "
                                     f"{self.max_positions}; pass fewer or shorter passages.")

    @torch.inference_mode()
    def _run(self, prefill: Callable[[], Prefill], options: GenerationOptions) -> Iterator[str | GenerationResult]:
        max_new_tokens, stops = options.max_new_tokens, options.stop
        started = time.perf_counter()
        # A bad schema fails here, before any model work.
        matcher = None if options.constraint is None else compile_constraint(
            self.tokenizer, options.constraint, self.vocab_size,
            self.eos_ids).matcher()
        done = prefill()
        cache, logits, served, prefilled = done.cache, done.logits, done.served, done.prefilled
        sampler = _Sampler(options.sampling, self.device)
        generated: list[int] = []
        close_from = max_new_tokens - closing_reserve(max_new_tokens) if options.constraint is not None and \
            options.constraint.close_early else max_new_tokens

        def sample(logits: torch.Tensor) -> int:
            return sampler(logits if matcher is None else matcher.mask(logits, len(generated) >= close_from))

        token = sample(logits)
        ttft = time.perf_counter() - started
        decoding = options.decoding(cache.length)
        decoder = start_decoding(self.model, cache, decoding, min(max_new_tokens, cache.capacity - cache.length))
        del cache, done
        try:
            text = emitted = ""
            finish: Literal["stop", "length"] = "length"
            prompt_tokens = served + prefilled
            while True:
                if token in self.eos_ids and not options.ignore_eos:
                    finish = "stop"
                    break
                generated.append(token)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
                visible = text[: len(text) - _held_back(text, stops)]
                if len(visible) > len(emitted) and visible.startswith(emitted):
                    yield visible[len(emitted):]
                    emitted = visible
                if matcher is not None:
                    matcher.advance(token)
                    if matcher.finished:  # the output is complete: only end-of-text could follow
                        finish = "stop"
                        break
                if len(generated) >= max_new_tokens or prompt_tokens + len(generated) >= self.max_positions:
                    break
                token = sample(decoder.step(token))
            if len(text) > len(emitted) and text.startswith(emitted):
                yield text[len(emitted):]
            result = GenerationResult(text, generated, finish, prompt_tokens, served, prefilled, ttft,
                                      time.perf_counter() - started, decoding.mode,
                                      decoder.full_layer_steps / len(decoder.cache.keys))
        finally:  # the cache's memory serves the next request, also when the caller stops reading early
            self.loaded.cache_memory.give_back(decoder.cache)
            if self.device.type == "cpu":  # the next request may run on another thread: one OpenMP team at a time
                release_openmp_team()
        yield result
