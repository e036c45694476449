"""Decode strategies: which cached tokens each new token attends to.

Full decoding attends to the whole cache, through the model's own path. Recycled Attention (Xu, Goyal
and Choi, arXiv 2411.05787) alternates full steps, which also score every cached token, with cheap
steps that attend only to the top-K tokens of the layer's last full step plus the tokens generated
since. StreamingLLM (Xiao et al., arXiv 2309.17453) attends to a few first tokens ("sinks") and a
recent window, with the same budget K: the baseline Recycled Attention is measured against.

The partial strategies run the model with an attention function of their own, which receives
each layer's query, key and value of the new token and attends with the model's original
attention function over the keys it chooses. Keys stay rotated at their original positions, so a
token's true position is passed explicitly. While partial steps run, the model's attention is
routed through a dispatcher registered in transformers' ``AttentionInterface`` (with the original
mask function): the decoding rides in the forward's keyword arguments, and every other forward,
from another thread say, gets the original attention. Their caches live in storage with room for
every token the request may generate: appending writes in place instead of copying the cache at
every step (transformers' ``DynamicCache`` grows by concatenation, a copy of the whole cache).
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

DecodeMode = Literal["full", "recycled", "streaming"]
DECODE_MODES: tuple[DecodeMode, ...] = ("full", "recycled", "streaming")

_ROUTED = "blockrag:"


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
    token brings its neighbours; ``sinks`` is the number of first tokens StreamingLLM keeps.
    """

    mode: DecodeMode = "full"
    recycle_k: int | float = 1 / 8
    stride: int = 10
    dynamic_threshold: float | None = None
    pool_kernel: int = 7
    sinks: int = 4

    def __post_init__(self) -> None:
        if self.mode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {self.mode!r}")
        k = self.recycle_k
        if isinstance(k, bool) or not (isinstance(k, int) and k >= 1 or isinstance(k, float) and 0 < k <= 1):
            raise ValueError(f"recycle_k must be a token count >= 1 (int) or a fraction of the prompt in (0, 1] "
                             f"(float), got {k!r}")
        if self.stride < 1:
            raise ValueError(f"stride must be at least 1, got {self.stride}")
        if self.dynamic_threshold is not None and (self.mode != "recycled" or not -1 <= self.dynamic_threshold <= 1):
            raise ValueError("dynamic_threshold is a cosine similarity in [-1, 1] and applies to decode='recycled' "
                             f"only; got {self.dynamic_threshold!r} with decode={self.mode!r}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be a positive odd number, got {self.pool_kernel}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")

    def budget(self, context: int) -> int:
        """K for a context of ``context`` tokens."""
        return recycle_budget(self.recycle_k, context)


def recycle_budget(recycle_k: int | float, context: int) -> int:
    """K: ``recycle_k`` tokens, or that fraction of a ``context``-token context, rounded up."""
    if isinstance(recycle_k, float):
        return max(1, math.ceil(recycle_k * context))
    return recycle_k


class Decoding(ABC):
    """Runs the decode steps of one request over its prompt's cache."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.device = next(model.parameters()).device

    @abstractmethod
    def step(self, token: int) -> torch.Tensor:
        """Feed ``token`` (the next one of the answer) and return the logits that predict the one after it."""


class FullDecoding(Decoding):
    """Every step attends to the whole cache: the model's own decoding."""

    def __init__(self, model: PreTrainedModel, cache: DynamicCache):
        super().__init__(model)
        self.cache = cache

    def step(self, token: int) -> torch.Tensor:
        ids = torch.tensor([[token]], device=self.device)
        return self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[0, -1]


class _KVBuffer:
    """One layer's keys and values ``[1, kv_heads, tokens, head_dim]`` in storage of fixed capacity."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        _, heads, n, dim = keys.shape
        self._keys = keys.new_empty(1, heads, max(capacity, n), dim)
        self._values = values.new_empty(1, heads, max(capacity, n), dim)
        self.length = 0
        self.replace(keys, values)

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self._values[:, :, : self.length]

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.length = 0
        self.append(keys, values)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = self.length + keys.shape[2]
        self.write(self.length, keys, values)
        self.length = end

    def write(self, at: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = at + keys.shape[2]
        if end > self._keys.shape[2]:
            raise RuntimeError(f"KV buffer of {self._keys.shape[2]} tokens cannot hold token {end}")
        self._keys[:, :, at:end] = keys
        self._values[:, :, at:end] = values

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``positions`` ``[kv_heads, k]`` (per head), as ``[1, kv_heads, k, head_dim]``.

        One ``index_select`` over rows of the flattened storage: several times faster on CPU than
        ``torch.gather`` with an index expanded over the head dimension.
        """
        _, heads, capacity, dim = self._keys.shape
        rows = (positions + torch.arange(heads, device=positions.device)[:, None] * capacity).flatten()
        shape = (1, heads, positions.shape[1], dim)
        return (self._keys.view(-1, dim).index_select(0, rows).view(shape),
                self._values.view(-1, dim).index_select(0, rows).view(shape))


def _cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    if not layers or layers[0][0].shape[0] != 1:
        raise ValueError("partial decoding needs the prefilled cache of one prompt (batch size 1)")
    return layers


def _dispatch(original: Callable, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, blockrag_decoding: "PartialDecoding | None" = None, **kwargs):
    """A partial step's attention goes to its decoding; any other forward's to the original function."""
    if blockrag_decoding is None:
        return original(module, query, key, value, attention_mask, **kwargs)
    return blockrag_decoding.attend(module, query, key, value, **kwargs)


def _original_attention(name: str) -> Callable:
    return ALL_ATTENTION_FUNCTIONS.get_interface(name.removeprefix(_ROUTED), eager_attention_forward)


_route_lock = threading.Lock()
_route_users: dict[int, int] = {}  # id(config) -> partial steps running on that model


@contextmanager
def _routed(config) -> Iterator[None]:
    """Route the model's attention through :func:`_dispatch` while any of its partial steps runs."""
    with _route_lock:
        users = _route_users.get(id(config), 0)
        if users == 0:
            original = config._attn_implementation
            routed = _ROUTED + original
            if routed not in ALL_ATTENTION_FUNCTIONS:
                AttentionInterface.register(routed, partial(_dispatch, _original_attention(original)))
                if original in ALL_MASK_ATTENTION_FUNCTIONS:
                    AttentionMaskInterface.register(routed, ALL_MASK_ATTENTION_FUNCTIONS[original])
            config._attn_implementation = routed
        _route_users[id(config)] = users + 1
    try:
        yield
    finally:
        with _route_lock:
            _route_users[id(config)] -= 1
            if _route_users[id(config)] == 0:
                del _route_users[id(config)]
                config._attn_implementation = config._attn_implementation.removeprefix(_ROUTED)


class PartialDecoding(Decoding):
    """Decoding whose layers choose what each new token attends to.

    Subclasses implement :meth:`attend`, called in every layer with the new token's query, key
    and value; ``self.attention`` is the model's own attention function, to run over the chosen
    keys.
    """

    def __init__(self, model: PreTrainedModel, cache: DynamicCache):
        super().__init__(model)
        self.position = cache.get_seq_length()
        self.steps = 0
        self.attention = _original_attention(model.config._attn_implementation)

    def step(self, token: int) -> torch.Tensor:
        with _routed(self.model.config):
            out = self.model(input_ids=torch.tensor([[token]], device=self.device),
                             position_ids=torch.tensor([[self.position]], device=self.device),
                             use_cache=False, logits_to_keep=1, blockrag_decoding=self)
        self.position += 1
        self.steps += 1
        return out.logits[0, -1]

    @abstractmethod
    def attend(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cache ``key`` and ``value`` of the new token in layer ``module.layer_idx`` and attend with ``query``."""


class FixedStride:
    """A full step every ``stride`` steps, the first step included."""

    def __init__(self, stride: int):
        self.stride = stride

    def full_step(self, layer: int, step: int, query: torch.Tensor) -> bool:
        return step % self.stride == 0


class QuerySimilarity:
    """Every ``every`` steps, a full step in each layer whose query drifted from its last full step's.

    A query is summarised by its mean over heads (``query`` is ``[1, heads, 1, head_dim]``, after
    the rotary embedding); drift is a cosine similarity below ``threshold``. The first step is full.
    """

    def __init__(self, threshold: float, every: int):
        self.threshold = threshold
        self.every = every
        self.anchors: dict[int, torch.Tensor] = {}

    def similarity(self, layer: int, query: torch.Tensor) -> float:
        """Cosine similarity of ``query`` to the query of ``layer``'s last full step."""
        return float(F.cosine_similarity(query[0, :, -1].float().mean(0), self.anchors[layer], dim=0))

    def full_step(self, layer: int, step: int, query: torch.Tensor) -> bool:
        full = layer not in self.anchors or step % self.every == 0 and self.similarity(layer, query) < self.threshold
        if full:
            self.anchors[layer] = query[0, :, -1].float().mean(0)
        return full


Schedule = FixedStride | QuerySimilarity


class _RecycledLayer:
    """The full cache of one layer, and the recycle set of its last full step plus the tokens since."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, recycle_k: int | float, pool_kernel: int,
                 max_new_tokens: int):
        most = keys.shape[2] + max_new_tokens
        self.full = _KVBuffer(keys, values, most)
        self.recycle_k = recycle_k
        self.pool_kernel = pool_kernel
        self.recycled = _KVBuffer(keys[:, :, :0], values[:, :, :0],
                                  min(recycle_budget(recycle_k, most), most) + max_new_tokens)
        self.selected: torch.Tensor | None = None
        """Positions ``[kv_heads, k]`` in the full cache of the recycle set, ascending."""

    def scores(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """``[kv_heads, tokens]``: attention probabilities of ``query`` over the full cache, max over
        each KV head's query heads, then max-pooled over neighbouring tokens.

        Computed again beside the attention itself, which fused kernels run without returning them.
        """
        keys = self.full.keys[0]
        heads, _, dim = keys.shape
        q = query[0, :, -1].reshape(heads, -1, dim)
        probs = torch.softmax(torch.matmul(q, keys.transpose(1, 2)).float() * scaling, dim=-1).amax(1)
        if self.pool_kernel == 1:
            return probs
        return F.max_pool1d(probs, self.pool_kernel, stride=1, padding=self.pool_kernel // 2)

    def recycle(self, query: torch.Tensor, scaling: float) -> None:
        """Make the top-K tokens of ``query``'s scores the recycle set, kept in position order."""
        scores = self.scores(query, scaling)
        k = min(recycle_budget(self.recycle_k, scores.shape[1]), scores.shape[1])
        self.selected = torch.topk(scores, k, dim=-1, sorted=False).indices.sort(dim=-1).values
        self.recycled.replace(*self.full.gather(self.selected))

    def attend(self, attention, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               full_step: bool, **kwargs):
        self.full.append(key, value)
        if full_step:
            out = attention(module, query, self.full.keys, self.full.values, None, **kwargs)
            self.recycle(query, module.scaling)
            return out
        self.recycled.append(key, value)
        return attention(module, query, self.recycled.keys, self.recycled.values, None, **kwargs)


class RecycledDecoding(PartialDecoding):
    """Recycled Attention: full steps as ``schedule`` says, partial steps over the recycle set in between.

    New tokens always enter the full cache, so a full step sees everything. The recycle set is
    chosen per layer and per KV head; grouped query heads are combined by max.
    """

    def __init__(self, model: PreTrainedModel, cache: DynamicCache, recycle_k: int | float, schedule: Schedule,
                 max_new_tokens: int, pool_kernel: int = 7):
        super().__init__(model, cache)
        self.schedule = schedule
        self.layers = [_RecycledLayer(k, v, recycle_k, pool_kernel, max_new_tokens) for k, v in _cache_layers(cache)]
        self.full_steps = 0
        """Layer-steps that attended to the whole cache."""

    def attend(self, module, query, key, value, **kwargs):
        full = self.schedule.full_step(module.layer_idx, self.steps, query)
        self.full_steps += full
        return self.layers[module.layer_idx].attend(self.attention, module, query, key, value, full, **kwargs)


class _StreamingLayer:
    """Attention sinks and a window of the most recent tokens, ``budget`` in all, as a ring after the sinks."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, budget: int, sinks: int):
        n = keys.shape[2]
        keep = torch.arange(n, device=keys.device)
        if n > budget:
            keep = torch.cat([keep[:sinks], keep[n - (budget - sinks):]])
        self.window = _KVBuffer(keys[:, :, keep], values[:, :, keep], budget)
        self.budget = budget
        self.sinks = sinks
        self.oldest = sinks

    def attend(self, attention, module, query, key, value, **kwargs):
        if self.window.length < self.budget:
            self.window.append(key, value)
        else:  # attention does not depend on the order of keys: overwrite the oldest in place
            self.window.write(self.oldest, key, value)
            self.oldest = self.sinks + (self.oldest + 1 - self.sinks) % (self.budget - self.sinks)
        return attention(module, query, self.window.keys, self.window.values, None, **kwargs)


class StreamingDecoding(PartialDecoding):
    """StreamingLLM: every step attends to the first ``sinks`` tokens and the most recent ones, ``budget`` in all."""

    def __init__(self, model: PreTrainedModel, cache: DynamicCache, budget: int, sinks: int = 4):
        if budget <= sinks:
            raise ValueError(f"streaming needs a budget (recycle_k) above its {sinks} sink tokens, got {budget}")
        super().__init__(model, cache)
        self.layers = [_StreamingLayer(k, v, budget, sinks) for k, v in _cache_layers(cache)]

    def attend(self, module, query, key, value, **kwargs):
        return self.layers[module.layer_idx].attend(self.attention, module, query, key, value, **kwargs)


def start_decoding(model: PreTrainedModel, cache: DynamicCache, options: DecodeOptions,
                   max_new_tokens: int) -> Decoding:
    """The decoding ``options`` ask for, over a prompt's prefilled ``cache``, for up to ``max_new_tokens`` steps.

    Partial strategies copy the cache into storage of their own and leave ``cache`` unchanged.
    """
    if options.mode == "full":
        return FullDecoding(model, cache)
    if options.mode == "streaming":
        return StreamingDecoding(model, cache, options.budget(cache.get_seq_length()), options.sinks)
    schedule = FixedStride(options.stride) if options.dynamic_threshold is None else \
        QuerySimilarity(options.dynamic_threshold, options.stride)
    return RecycledDecoding(model, cache, options.recycle_k, schedule, max_new_tokens, options.pool_kernel)
