"""Decode strategies: which cached tokens each new token attends to.

Full decoding attends to the whole cache, through the model's own path. Recycled Attention (Xu, Goyal
and Choi, arXiv 2411.05787) alternates full steps, which also score every cached token, with cheap
steps that attend only to the top-K tokens of the layer's last full step plus the tokens generated
since. StreamingLLM (Xiao et al., arXiv 2309.17453) attends to a few first tokens ("sinks") and a
recent window, with the same budget K: the baseline Recycled Attention is measured against.

Every strategy decodes over the request's position-ordered cache (:class:`~.transformer.KVCache`),
whose slot ``p`` holds position ``p`` whatever prefill filled it (blocks, text, recomputed tokens):
windows and neighbourhoods are by position. Each step runs the engine's own forward pass with the
strategy's attention: full decoding attends to every slot; the partial strategies store the new
token's KV in the cache too and attend over the keys they choose. Where that is one run of rows known
before the layer runs (the whole cache, a recycle set between full steps, a window), the strategy says so
(:class:`~.transformer.KVTarget`) and the kernel library runs the layer in one call. The dynamic schedule
compares queries before the rotary embedding, so a query's position alone never counts as drift.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from blockrag.errors import CacheFullError, InvalidArgumentError
from . import cpu_kernels
from .transformer import (CacheAttention, DecodeStep, KVCache, KVTarget, Positions, attend, attend_with_lse,
                          flash_returns_lse, forward)

if TYPE_CHECKING:  # transformers' model classes load slowly; only their names are needed here
    from transformers import PreTrainedModel

DecodeMode = Literal["full", "recycled", "streaming"]
DECODE_MODES: tuple[DecodeMode, ...] = ("full", "recycled", "streaming")
#: Prompt length from which ``decode="auto"`` decodes with Recycled Attention: where ``blockrag bench decode`` measured
#: it faster than full decoding at its default budget and stride, with torch's attention kernel (fp32 without
#: AVX-512) and with the engine's bf16 kernel library alike (benchmarks/RESULTS.md).
AUTO_RECYCLE_FROM = 4096


@dataclass(frozen=True)
class DecodeOptions:
    """How new tokens attend to the cache.

    ``recycle_k`` is the budget K of the partial strategies: a token count (int) or a fraction of
    the context (float; the paper uses 1/8), taken at each full step of Recycled Attention and of
    the prompt for StreamingLLM. ``stride`` is the number of steps between full steps
    of Recycled Attention, or, when ``dynamic_threshold`` is set, between query checks: a layer
    then runs a full step when the cosine similarity of its query (mean over heads) to the query
    of its last full step falls below the threshold. Scores are max-pooled over ``pool_kernel``
    neighbouring tokens before the top-K (as the paper's code does, after SnapKV), so that a chosen
    token brings its neighbours. ``sinks`` is the number of first tokens StreamingLLM keeps; Recycled
    Attention's recycle set holds them too, with the prompt's last ``prompt_tail`` positions (a RAG
    prompt's question), whatever their scores: within K, taken from the top-K's share.
    """

    mode: DecodeMode = "full"
    recycle_k: int | float = 1 / 8
    stride: int = 10
    dynamic_threshold: float | None = None
    pool_kernel: int = 7
    sinks: int = 4
    prompt_tail: int = 64

    def __post_init__(self) -> None:
        if self.mode not in DECODE_MODES:
            raise InvalidArgumentError(f"decode must be one of {DECODE_MODES}, got {self.mode!r}")
        k = self.recycle_k
        if isinstance(k, bool) or not (isinstance(k, int) and k >= 1 or isinstance(k, float) and 0 < k <= 1):
            raise InvalidArgumentError(f"recycle_k must be a token count >= 1 (int) or a fraction of the prompt in (0, 1] "
                             f"(float), got {k!r}")
        if self.stride < 1:
            raise InvalidArgumentError(f"stride must be at least 1, got {self.stride}")
        if self.dynamic_threshold is not None and (self.mode != "recycled" or not -1 <= self.dynamic_threshold <= 1):
            raise InvalidArgumentError("dynamic_threshold is a cosine similarity in [-1, 1] and applies to decode='recycled' "
                             f"only; got {self.dynamic_threshold!r} with decode={self.mode!r}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise InvalidArgumentError(f"pool_kernel must be a positive odd number, got {self.pool_kernel}")
        if self.sinks < 0 or self.prompt_tail < 0:
            raise InvalidArgumentError(f"sinks and prompt_tail must be >= 0, got {self.sinks} and {self.prompt_tail}")

    def budget(self, context: int) -> int:
        """K for a context of ``context`` tokens."""
        return recycle_budget(self.recycle_k, context)


def recycle_budget(recycle_k: int | float, context: int) -> int:
    """K: ``recycle_k`` tokens, or that fraction of a ``context``-token context, rounded up."""
    if isinstance(recycle_k, float):
        return max(1, math.ceil(recycle_k * context))
    return recycle_k


class Decoding(ABC):
    """Runs the decode steps of one request over its prompt's cache, which has room for every new token."""

    def __init__(self, model: PreTrainedModel, cache: KVCache):
        self.model = model
        self.cache = cache
        self.device = next(model.parameters()).device
        self.one_token = DecodeStep.of(model)
        self.cache_rows = [cpu_kernels.KVRows(k, v) if cpu_kernels.KVRows.fit(k, v) else None
                           for k, v in zip(cache.keys, cache.values)]
        """The cache's layers as the kernel library addresses them (:class:`~.transformer.KVTarget`)."""
        self.steps = 0
        self.full_layer_steps = 0
        """Layer-steps that attended to the whole cache."""

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Feed ``token`` (the next one of the answer) and return the logits that predict the one after it."""
        if self.cache.length >= self.cache.capacity:
            raise CacheFullError(f"the cache of {self.cache.capacity} positions cannot hold another token")
        positions = Positions.span(self.cache.length, 1, self.device)
        ids = torch.tensor([[token]], device=self.device)
        attention = self.attention(positions)
        if self.one_token is not None:
            logits = self.one_token(self.cache, ids, positions, attention)
        else:
            logits = forward(self.model, self.cache, ids, positions, attention=attention)[0, -1]
        self.steps += 1
        return logits

    @abstractmethod
    def attention(self, positions: Positions):
        """The :class:`~.transformer.Attention` of the step at ``positions``."""


class FullDecoding(Decoding):
    """Every step attends to the whole cache."""

    def attention(self, positions: Positions):
        self.full_layer_steps += len(self.cache.keys)
        return CacheAttention(self.cache, positions, self.cache_rows)


class _KVBuffer:
    """One layer's chosen keys and values ``[1, kv_heads, tokens, head_dim]`` in storage of fixed capacity."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        _, heads, n, dim = keys.shape
        self._keys = keys.new_empty(1, heads, max(capacity, n), dim)
        self._values = values.new_empty(1, heads, max(capacity, n), dim)
        self.rows = cpu_kernels.KVRows(self._keys, self._values) if cpu_kernels.KVRows.fit(self._keys, self._values) \
            else None
        """The storage as the kernel library addresses it (:class:`~.transformer.KVTarget`), where it can."""
        self.length = 0
        self.replace(keys, values)

    @property
    def keys(self) -> torch.Tensor:
        return self._keys.narrow(2, 0, self.length)

    @property
    def values(self) -> torch.Tensor:
        return self._values.narrow(2, 0, self.length)

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.length = 0
        self.append(keys, values)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.write(self.extend(keys.shape[2]), keys, values)

    def extend(self, n: int) -> int:
        """Count ``n`` more rows, which the caller writes (or the kernel library, through :attr:`rows`), and return
        the first's index."""
        at = self.length
        self._check_room(at + n)
        self.length = at + n
        return at

    def reserve(self, n: int) -> None:
        """Hold ``n`` rows from the first, which the caller writes (a recycle set chosen by the kernel library)."""
        self._check_room(n)
        self.length = n

    def write(self, at: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[2]
        self._check_room(at + n)
        self._keys.narrow(2, at, n).copy_(keys)
        self._values.narrow(2, at, n).copy_(values)

    def select(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Hold only the keys and values ``[1, kv_heads, slots, head_dim]`` at each head's ``positions``
        ``[kv_heads, k]``, in that order.

        Each head's rows are selected straight into this buffer's storage, from wherever ``keys`` lies (a cache
        layer's view, say): nothing else of them is copied, and nothing is allocated.
        """
        count = positions.shape[1]
        self.reserve(count)
        if cpu_kernels.gather_rows(keys, values, positions, self._keys, self._values):
            return
        for head in range(positions.shape[0]):
            torch.index_select(keys[0, head], 0, positions[head], out=self._keys[0, head, :count])
            torch.index_select(values[0, head], 0, positions[head], out=self._values[0, head, :count])

    def _check_room(self, end: int) -> None:
        if end > self._keys.shape[2]:
            raise CacheFullError(f"KV buffer of {self._keys.shape[2]} tokens cannot hold token {end}")


class PartialDecoding(Decoding):
    """Decoding whose layers choose what each new token attends to.

    Subclasses implement :meth:`attend`, called in every layer with the new token's query, key and
    value (rotated) and its query before rotation; the token's KV is already in the cache.
    """

    def __init__(self, model: PreTrainedModel, cache: KVCache):
        super().__init__(model, cache)
        if cache.keys[0].shape[0] != 1:
            raise InvalidArgumentError("partial decoding needs the prefilled cache of one prompt (batch size 1)")

    def attention(self, positions: Positions):
        return _PartialAttention(self, positions)

    @abstractmethod
    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               raw_query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attend with the new token's ``query`` in ``layer`` over the keys this strategy chooses."""

    @abstractmethod
    def layer_target(self, layer: int, into: cpu_kernels.KVRows,
                     at: int) -> KVTarget | Callable[[torch.Tensor], KVTarget] | None:
        """This step's attention in ``layer`` as one run of rows, the new token's KV going to row ``at`` of ``into``
        (the cache) and where :meth:`attend` would put it, counted in as :meth:`attend` counts it; or a function of
        the query before rotation that gives it (:meth:`~.transformer.Attention.target`); ``None`` where the
        strategy's memory is not the library's to address: :meth:`attend` is called."""


class _PartialAttention:
    """A partial decoding's attention in one step: the new token's KV into the cache, then the strategy's."""

    def __init__(self, decoding: PartialDecoding, positions: Positions):
        self.decoding = decoding
        self.positions = positions

    def __call__(self, layer, query, key, value, raw_query, scaling):
        self.decoding.cache.write(layer, self.positions, key, value)
        return self.decoding.attend(layer, query, key, value, raw_query, scaling)

    def target(self, layer: int) -> KVTarget | Callable[[torch.Tensor], KVTarget] | None:
        into = self.decoding.cache_rows[layer]
        return None if into is None else self.decoding.layer_target(layer, into, self.positions.first)


class FixedStride:
    """A full step every ``stride`` steps, the first step included."""

    def __init__(self, stride: int):
        self.stride = stride

    def full_step(self, layer: int, step: int, query: torch.Tensor) -> bool:
        return self.known(layer, step)

    def known(self, layer: int, step: int) -> bool | None:
        """:meth:`full_step`, known before the query."""
        return step % self.stride == 0


class QuerySimilarity:
    """Every ``every`` steps, a full step in each layer whose query drifted from its last full step's.

    A query is summarised by its mean over heads (``query`` is ``[1, heads, 1, head_dim]``, before
    the rotary embedding, so that moving one position on is no drift); drift is a cosine similarity
    below ``threshold``. The first step is full.
    """

    def __init__(self, threshold: float, every: int):
        self.threshold = threshold
        self.every = every
        self.anchors: dict[int, torch.Tensor] = {}

    @staticmethod
    def summary(query: torch.Tensor, anchor: torch.Tensor | None) -> tuple[torch.Tensor, float | None]:
        """``query``'s mean over heads in fp32, and its cosine similarity to ``anchor`` (a summary) where given: in
        one call of the kernel library where it runs (a bf16 query on CPU, whose layers check every few steps)."""
        if query.is_contiguous() and cpu_kernels.fuses(query.dtype, query.device):
            return cpu_kernels.query_similarity(query, anchor)
        mean = query[0, :, -1].float().mean(0)
        return mean, None if anchor is None else float(F.cosine_similarity(mean, anchor, dim=0))

    def full_step(self, layer: int, step: int, query: torch.Tensor) -> bool:
        anchor = self.anchors.get(layer)
        if anchor is not None and step % self.every:
            return False
        mean, similarity = self.summary(query, anchor)
        full = similarity is None or similarity < self.threshold
        if full:
            self.anchors[layer] = mean
        return full

    def known(self, layer: int, step: int) -> bool | None:
        """:meth:`full_step` where it does not depend on the query (a step between checks: partial), else ``None``."""
        return False if layer in self.anchors and step % self.every else None


Schedule = FixedStride | QuerySimilarity


class _RecycledLayer:
    """The recycle set of one layer's last full step, plus the tokens since."""

    def __init__(self, keys: torch.Tensor, recycle_k: int | float, pool_kernel: int, max_new_tokens: int,
                 sinks: int, prompt_tail: int):
        self.prompt = keys.shape[2]
        most = self.prompt + max_new_tokens
        self.recycle_k = recycle_k
        self.pool_kernel = pool_kernel
        self.sinks, self.prompt_tail = sinks, prompt_tail
        self.recycled = _KVBuffer(keys[:, :, :0], keys[:, :, :0],
                                  min(recycle_budget(recycle_k, most), most) + max_new_tokens)
        self.selected: torch.Tensor | None = None
        """Positions ``[kv_heads, k]`` of the recycle set, ascending."""

    def scores(self, query: torch.Tensor, keys: torch.Tensor, scaling: float,
               lse: torch.Tensor | None = None) -> torch.Tensor:
        """``[kv_heads, positions]``: how much ``query`` attends to each position, max over each KV head's query
        heads, then max-pooled over neighbouring positions.

        Where the engine's kernel does not run (:func:`~.cpu_kernels.attend_and_recycle` scores on the way),
        computed again beside the attention itself, which torch's fused kernels run without returning them: as
        log-probabilities where the kernel gave the log-sum-exps ``lse`` ``[kv_heads, group]`` of the scores
        (no softmax over them then), else as probabilities. Both rank positions alike.
        """
        heads, _, dim = keys[0].shape
        q = query[0, :, -1].reshape(heads, -1, dim)
        # keys times queries ([heads, positions, group]): faster on CPU than queries times keys, for a few queries
        logits = torch.matmul(keys[0], q.transpose(1, 2)).float() * scaling
        probs = torch.softmax(logits, dim=1) if lse is None else logits.sub_(lse[:, None, :].float())
        probs = probs.amax(2)
        if self.pool_kernel == 1:
            return probs
        return F.max_pool1d(probs, self.pool_kernel, stride=1, padding=self.pool_kernel // 2)

    def choice(self, n: int) -> tuple[int, int, tuple[int, int]]:
        """A full step's K over ``n`` positions, its sinks and its kept range ``[first, end)`` (the prompt's tail)."""
        k = min(recycle_budget(self.recycle_k, n), n)
        sinks = min(self.sinks, k)
        tail = min(self.prompt_tail, k - sinks)
        return k, sinks, (self.prompt - tail, self.prompt)

    def attend(self, cache_layer: Callable[[], tuple[torch.Tensor, torch.Tensor]], query: torch.Tensor,
               key: torch.Tensor, value: torch.Tensor, full_step: bool, scaling: float) -> torch.Tensor:
        """This step's attention in the layer; ``cache_layer`` gives the layer's whole cache, read in full steps."""
        if full_step:
            keys, values = cache_layer()
            k, sinks, kept = self.choice(keys.shape[2])
            chosen = cpu_kernels.attend_and_recycle(query, keys, values, scaling, k, self.pool_kernel, sinks, kept)
            if chosen is not None:  # the kernel scores and chooses on the way
                out, self.selected = chosen
            else:
                if flash_returns_lse(query):  # CPU: the flash kernel's log-sum-exps save a softmax over the scores
                    out, lse = attend_with_lse(query, keys, values, scaling)
                    scores = self.scores(query, keys, scaling, lse[0])
                else:
                    out, scores = attend(query, keys, values, scaling), self.scores(query, keys, scaling)
                scores[:, :sinks] = math.inf  # kept whatever they score, as many as K holds
                scores[:, kept[0]:kept[1]] = math.inf
                self.selected = torch.topk(scores, k, dim=-1, sorted=False).indices.sort(dim=-1).values
            self.recycled.select(keys, values, self.selected)
            return out
        self.recycled.append(key, value)
        return attend(query, self.recycled.keys, self.recycled.values, scaling)

    def target(self, into: cpu_kernels.KVRows, at: int, full_step: bool) -> KVTarget:
        """This step's :class:`~.transformer.KVTarget` in the layer (:meth:`PartialDecoding.layer_target`), where
        its recycle set is the library's to address: in a full step the cache up to the new token and a recycle
        set chosen there, else the recycle set and the tokens since, the new token's counted in."""
        rows = self.recycled.rows
        if full_step:
            k, sinks, kept = self.choice(at + 1)
            self.recycled.reserve(k)
            self.selected = torch.empty(rows.kv_heads, k, dtype=torch.int64)
            return KVTarget(into, at, None, 0, at + 1,
                            cpu_kernels.RecycleChoice(self.selected, k, self.pool_kernel, sinks, kept, rows))
        also_at = self.recycled.extend(1)
        return KVTarget(into, at, rows, also_at, also_at + 1)


class RecycledDecoding(PartialDecoding):
    """Recycled Attention: full steps as ``schedule`` says, partial steps over the recycle set in between.

    New tokens always enter the cache, so a full step sees everything. The recycle set is chosen
    per layer and per KV head; grouped query heads are combined by max. It always holds the first
    ``sinks`` positions and the prompt's last ``prompt_tail``, which in a RAG prompt hold the question
    (a window sliding with the answer did not do as well): on long RAG prompts that raised top-1
    agreement with full decoding (benchmarks/RESULTS.md).
    """

    def __init__(self, model: PreTrainedModel, cache: KVCache, recycle_k: int | float, schedule: Schedule,
                 max_new_tokens: int, pool_kernel: int, sinks: int, prompt_tail: int):
        super().__init__(model, cache)
        self.schedule = schedule
        keys, _ = cache.layer(0)
        self.layers = [_RecycledLayer(keys, recycle_k, pool_kernel, max_new_tokens, sinks, prompt_tail)
                       for _ in cache.keys]

    def attend(self, layer, query, key, value, raw_query, scaling):
        full = self.schedule.full_step(layer, self.steps, raw_query)
        self.full_layer_steps += full
        return self.layers[layer].attend(lambda: self.cache.layer(layer, self.cache.length + 1), query, key, value,
                                         full, scaling)

    def layer_target(self, layer, into, at):
        if self.layers[layer].recycled.rows is None:
            return None
        full = self.schedule.known(layer, self.steps)
        if full is None:
            return lambda query: self._target(layer, into, at, self.schedule.full_step(layer, self.steps, query))
        return self._target(layer, into, at, full)

    def _target(self, layer: int, into: cpu_kernels.KVRows, at: int, full: bool) -> KVTarget:
        self.full_layer_steps += full
        return self.layers[layer].target(into, at, full)


class _StreamingLayer:
    """Attention sinks and a window of the most recent positions, ``budget`` in all, as a ring after the sinks."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, budget: int, sinks: int):
        n = keys.shape[2]
        keep = torch.arange(n, device=keys.device)
        if n > budget:
            keep = torch.cat([keep[:sinks], keep[n - (budget - sinks):]])
        self.window = _KVBuffer(keys[:, :, keep], values[:, :, keep], budget)
        self.budget = budget
        self.sinks = sinks
        self.oldest = sinks

    def slot(self) -> int:
        """The window's row for the new token: the next while it has room, then the oldest after the sinks
        (attention does not depend on the order of keys: the oldest is overwritten in place)."""
        if self.window.length < self.budget:
            return self.window.extend(1)
        at = self.oldest
        self.oldest = self.sinks + (self.oldest + 1 - self.sinks) % (self.budget - self.sinks)
        return at

    def attend(self, query, key, value, scaling):
        self.window.write(self.slot(), key, value)
        return attend(query, self.window.keys, self.window.values, scaling)


class StreamingDecoding(PartialDecoding):
    """StreamingLLM: every step attends to the first ``sinks`` positions and the most recent ones, ``budget`` in all."""

    def __init__(self, model: PreTrainedModel, cache: KVCache, budget: int, sinks: int = 4):
        if budget <= sinks:
            raise InvalidArgumentError(f"streaming needs a budget (recycle_k) above its {sinks} sink tokens, got {budget}")
        super().__init__(model, cache)
        self.layers = [_StreamingLayer(*cache.layer(i), budget, sinks) for i in range(len(cache.keys))]

    def attend(self, layer, query, key, value, raw_query, scaling):
        return self.layers[layer].attend(query, key, value, scaling)

    def layer_target(self, layer, into, at):
        window = self.layers[layer].window
        if window.rows is None:
            return None
        slot = self.layers[layer].slot()  # before the length is read: a token while the window fills counts in it
        return KVTarget(into, at, window.rows, slot, window.length)


def start_decoding(model: PreTrainedModel, cache: KVCache, options: DecodeOptions,
                   max_new_tokens: int) -> Decoding:
    """The decoding ``options`` ask for, over a prompt's prefilled ``cache``, for up to ``max_new_tokens`` steps.

    New tokens' KV goes into ``cache``'s free slots; it needs room for them.
    """
    if cache.capacity < cache.length + max_new_tokens:
        raise InvalidArgumentError(f"the cache has room for {cache.capacity - cache.length} new tokens, not {max_new_tokens}")
    if options.mode == "full":
        return FullDecoding(model, cache)
    if options.mode == "streaming":
        return StreamingDecoding(model, cache, options.budget(cache.length), options.sinks)
    schedule = FixedStride(options.stride) if options.dynamic_threshold is None else \
        QuerySimilarity(options.dynamic_threshold, options.stride)
    return RecycledDecoding(model, cache, options.recycle_k, schedule, max_new_tokens, options.pool_kernel,
                            options.sinks, options.prompt_tail)
