"""The forward pass of every supported decoder, over a request's preallocated, position-ordered KV cache.

transformers' own forward builds a 4-D mask and grows a cache object by concatenation on every
call, and under an explicit mask repeats grouped-query KV heads before attention. Here a request
owns one :class:`KVCache` with a slot per position, allocated once with room for the prompt and the
answer: assembled blocks are written into their slots, text is prefilled into its own, and each new
token into the next. A token attends to the slots up to its position, so no mask is needed where
the tokens of a pass are the prompt's first ones (causal) or a single new one, and elsewhere it is a
boolean ``[tokens, positions]`` mask. Grouped query heads are folded into the query length, so
attention reads each KV head once.

The layers' own modules are called as they are (norms, projections with their biases or LoRA
layers, Qwen3's query and key norms, the MLP's activation), so fine-tuning trains through this same
pass; only their order and the attention are written here, and a decode step's plain linear layers
are applied as matrix-vector products (:func:`project`), from four-bit copies where the weights are four- or
eight-bit already (:mod:`.fourbit`), and its RMSNorms as one fused kernel each (:class:`DecodeStep`). This is the one
module of blockrag that knows how transformers lays out its Llama, Mistral, Qwen2 and Qwen3 models, or
touches anything of transformers beyond its public loading API: the releases it is written against are
:data:`SUPPORTED_TRANSFORMERS`, the range ``pyproject.toml`` allows (a test holds the two equal).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from blockrag.errors import InvalidArgumentError, UnsupportedModelError
from . import cpu_kernels
from .fourbit import DecodeWeights, FourBitRows, check_decode_weights, four_bit_weights

if TYPE_CHECKING:  # transformers' model classes load slowly; only their names are needed here
    from transformers import PreTrainedModel


#: The transformers releases whose model layout this module follows: the releases CI tests.
SUPPORTED_TRANSFORMERS = ">=5.24,<5.25"


@contextlib.contextmanager
def loading_quietly() -> Iterator[None]:
    """Hide transformers' own progress bars while a model loads or converts, unless blockrag logs at INFO.

    blockrag's output is quiet by default; ``blockrag --verbose`` (or INFO logging of the
    ``blockrag`` logger) shows them.
    """
    if logging.getLogger("blockrag").isEnabledFor(logging.INFO):
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as transformers_logging

    shown, bar = transformers_logging.is_progress_bar_enabled(), gguf_loading.tqdm
    transformers_logging.disable_progress_bar()
    gguf_loading.tqdm = functools.partial(bar, disable=True)  # GGUF conversion uses tqdm directly
    try:
        yield
    finally:
        gguf_loading.tqdm = bar
        if shown:
            transformers_logging.enable_progress_bar()


def dequantized(model: PreTrainedModel) -> PreTrainedModel:
    """A plain copy of a model loaded from GGUF, without the quantization record that would make it save as GGUF."""
    config = model.config
    config.quantization_config = None
    del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def rotary_module(model: nn.Module) -> nn.Module:
    """The rotary embedding module of a supported causal LM (``model.model.rotary_emb``)."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no rotary embedding module at `model.rotary_emb`; "
            "blockrag supports decoder-only Llama, Mistral, Qwen2 and Qwen3 models."
        )
    return rotary


@dataclass(frozen=True)
class KVShape:
    """What a model's KV cache looks like: layers, KV heads, head size, query heads per KV head, dtype, device."""

    layers: int
    kv_heads: int
    head_dim: int
    group: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, model: PreTrainedModel) -> "KVShape":
        attention = model.model.layers[0].self_attn
        config = model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        param = next(model.parameters())
        return cls(config.num_hidden_layers, kv_heads, attention.head_dim, heads // kv_heads, param.dtype,
                   param.device)


class KVCache:
    """Keys and values of one prompt and its answer, one slot per position, in every layer.

    Each layer holds ``[batch, kv_heads, capacity, head_dim]`` tensors; ``length`` is the number of
    positions, from 0, that hold KV. Without autograd the layers are views of one tensor, so that a
    block is written into every layer at once; with it they are separate tensors, so that writing one
    layer's slots leaves alone what autograd saved of another's.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int = 0,
                 stacked: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.keys = keys
        self.values = values
        self.length = length
        self.stacked = stacked
        """``[layers, batch, kv_heads, capacity, head_dim]`` keys and values the layers are views of, if any."""
        self.memory: torch.Tensor | None = None
        """The flat tensor ``stacked`` is carved from (from its start; it may be larger), which
        :meth:`CacheMemory.give_back` takes back whole."""

    @classmethod
    def empty(cls, shape: KVShape, capacity: int, batch: int = 1, memory: "CacheMemory | None" = None) -> "KVCache":
        """A cache with room for ``capacity`` positions and none filled, carved from ``memory`` where given."""
        size = (batch, shape.kv_heads, capacity, shape.head_dim)
        if torch.is_grad_enabled():
            new = [torch.empty(size, dtype=shape.dtype, device=shape.device) for _ in range(2 * shape.layers)]
            return cls(new[: shape.layers], new[shape.layers:])
        half = shape.layers * math.prod(size)
        whole = memory.take(2 * half, shape.dtype, shape.device) if memory is not None else \
            torch.empty(2 * half, dtype=shape.dtype, device=shape.device)
        keys, values = whole[:half].view(shape.layers, *size), whole[half:2 * half].view(shape.layers, *size)
        cache = cls(list(keys), list(values), stacked=(keys, values))
        cache.memory = whole
        return cache

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def clone(self) -> "KVCache":
        """A copy that decodes independently of this cache."""
        if self.stacked is not None:
            keys, values = (t.clone() for t in self.stacked)
            return KVCache(list(keys), list(values), self.length, (keys, values))
        return KVCache([k.clone() for k in self.keys], [v.clone() for v in self.values], self.length)

    def layer(self, i: int, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layer ``i`` at positions ``[0, end)`` (default: the filled ones), as views."""
        end = self.length if end is None else end
        return self.keys[i].narrow(2, 0, end), self.values[i].narrow(2, 0, end)

    def write(self, layer: int, positions: "Positions", keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put the KV of the tokens at ``positions`` into their slots of ``layer``."""
        if positions.end > self.capacity:
            raise InvalidArgumentError(f"the cache has room for {self.capacity} positions, not position {positions.end - 1}")
        if positions.contiguous:
            n = positions.end - positions.first
            self.keys[layer].narrow(2, positions.first, n).copy_(keys)
            self.values[layer].narrow(2, positions.first, n).copy_(values)
        else:
            self.keys[layer].index_copy_(2, positions.ids, keys)
            self.values[layer].index_copy_(2, positions.ids, values)

    def write_block(self, first: int, keys: torch.Tensor, values: torch.Tensor,
                    move: Callable[..., torch.Tensor] | None = None) -> None:
        """Put a block's KV ``[layers, kv_heads, tokens, head_dim]`` into batch row 0 from slot ``first``,
        its keys through ``move(keys, out=slots)`` where given (a re-rotation)."""
        end = first + keys.shape[2]
        if end > self.capacity:
            raise InvalidArgumentError(f"a block reaches position {end - 1} but the cache has room for {self.capacity}")
        if self.stacked is not None:
            pairs = [(self.stacked[0][:, 0, :, first:end], self.stacked[1][:, 0, :, first:end], keys, values)]
        else:
            pairs = [(k[0, :, first:end], v[0, :, first:end], keys[i], values[i])
                     for i, (k, v) in enumerate(zip(self.keys, self.values))]
        for to_keys, to_values, block_keys, block_values in pairs:
            if move is None:
                to_keys.copy_(block_keys)
            else:
                move(block_keys, out=to_keys)
            to_values.copy_(block_values)


class CacheMemory:
    """The memory of finished requests' caches, kept to carve the next requests' caches from.

    A long prompt's cache is hundreds of MB. Fresh from the allocator, every page of it faults on
    first touch and returns to the system when freed, which costs more than copying the blocks into
    it; an engine keeps the memory of its last ``keep`` finished caches (CPU only: torch's GPU
    allocator already keeps its memory) and hands it to the next ones. Thread-safe.
    """

    def __init__(self, keep: int = 1):
        self.keep = keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat tensor of at least ``numel`` elements, to carve a cache from its start: the smallest kept one that
        fits, whole (so that a short request hands back all the memory a long one left), else a new one."""
        with self._lock:
            fits = [i for i, t in enumerate(self._free) if t.numel() >= numel and t.dtype == dtype and t.device == device]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(numel, dtype=dtype, device=device)

    def give_back(self, cache: KVCache) -> None:
        """Keep ``cache``'s memory for later caches; ``cache`` must not be used afterwards."""
        whole, cache.memory, cache.stacked = cache.memory, None, None
        cache.keys, cache.values = [], []
        if whole is None or whole.device.type != "cpu":
            return
        with self._lock:
            self._free.append(whole)
            self._free.sort(key=lambda t: -t.numel())
            del self._free[self.keep:]


class Positions:
    """The positions of the tokens of one forward pass (ascending), and what attention needs to know of them.

    A token attends to every slot up to its own position. Where that is a plain rule, no mask is
    made: a single token attends to ``[0, end)``, the prompt's first tokens causally, and a run of
    tokens right after filled slots (the question after assembled blocks) to all of those and
    causally among themselves (:attr:`suffix`; on CPU without autograd, else under its mask). Otherwise the
    tokens are cut into a few runs
    (:attr:`runs`), each attending only to the slots up to its last token's position under a mask
    made once per pass: tokens recomputed early in a long prompt then skip the keys after them.
    """

    MAX_RUNS = 2

    def __init__(self, ids: torch.Tensor):
        if ids.ndim != 1 or len(ids) == 0:
            raise InvalidArgumentError(f"need a non-empty 1-D tensor of positions, got shape {tuple(ids.shape)}")
        self.ids = ids
        self.first, self.end, n = int(ids[0]), int(ids[-1]) + 1, len(ids)
        self.contiguous = self.end - self.first == n
        self.causal = self.contiguous and self.first == 0 and n > 1
        self.suffix = self.contiguous and self.first > 0 and n > 1
        self.masked = n > 1 and not self.contiguous
        self._masks: dict[int, list[torch.Tensor]] = {}
        bounds = [round(i * n / self.MAX_RUNS) for i in range(self.MAX_RUNS + 1)] if self.masked else [0, n]
        cuts = sorted(set(bounds))
        self.runs = [(lo, hi, int(ids[hi - 1]) + 1) for lo, hi in zip(cuts, cuts[1:])]
        """``(first token, end token, end slot)`` of each run of tokens."""

    @classmethod
    def span(cls, first: int, count: int, device: torch.device | str = "cpu") -> "Positions":
        return cls(torch.arange(first, first + count, device=device))

    def masks(self, group: int) -> list[torch.Tensor]:
        """Each run's boolean mask (True: attended) ``[group x run tokens, run end slot]``, queries folded ``group``
        to a KV head."""
        if group not in self._masks:
            self._masks[group] = [
                (torch.arange(end, device=self.ids.device)[None, :] <= self.ids[lo:hi, None]).repeat(group, 1)
                for lo, hi, end in self.runs]
        return self._masks[group]


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
           mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Attention of ``query`` ``[b, heads, n, d]`` over grouped ``keys``/``values`` ``[b, kv_heads, s, d]``.

    Unless causal, the query heads of a group are folded into the query length, so every KV head is read
    once and no repeated copy is made: the kernel's grouped-query path reads a KV head once per query head,
    which makes a decode step's attention several times slower on CPU. ``mask`` is boolean (True:
    attended), ``[group x n, s]`` as :meth:`Positions.masks` makes it. One token's unmasked attention in bf16 on
    CPU runs :func:`~.cpu_kernels.decode_attention` where it applies.
    """
    if mask is None and not causal and (kernel := cpu_kernels.decode_attention(query, keys, values, scaling)) is not None:
        return kernel[0]
    b, heads, n, d = query.shape
    kv_heads = keys.shape[1]
    if causal:  # a long run of queries, whose blocks share each KV block the kernel reads
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scaling,
                                              enable_gqa=heads != kv_heads)
    folded = query.reshape(b, kv_heads, heads // kv_heads * n, d)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scaling)
    return out.view(b, heads, n, d)


def flash_returns_lse(query: torch.Tensor) -> bool:
    """Whether the attention of ``query`` can take the log-sum-exps of CPU's flash kernel (:func:`attend_suffix`,
    :func:`attend_with_lse`): on CPU, without autograd."""
    return query.device.type == "cpu" and not torch.is_grad_enabled()


def attend_suffix(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: int,
                  scaling: float) -> torch.Tensor:
    """Attention of the ``n`` tokens at slots ``[first, first + n)`` over ``keys``/``values`` ``[b, kv_heads,
    first + n, d]``: every slot before them, and causally each other.

    The two parts run unmasked and their softmaxes are merged by their log-sum-exps (in fp32, then rounded once
    more): the long part with the query heads of a group folded into the query length, so it reads each KV head
    once under no mask, in the kernel library's :func:`~.cpu_kernels.prefix_attention` where it applies (bf16 on
    CPUs with AVX512-BF16), else in CPU's flash kernel; the tokens' own part causally in CPU's flash kernel. CPU
    only, without autograd (:func:`flash_returns_lse`); elsewhere the run attends under its mask like any other.
    """
    b, heads, n, d = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    folded, keys_before, values_before = query.reshape(b, kv_heads, group * n, d), keys[:, :, :first], values[:, :, :first]
    done = cpu_kernels.prefix_attention(folded, keys_before, values_before, scaling)
    before, lse_before = done if done is not None else flash(folded, keys_before, values_before, scale=scaling)[:2]
    own_keys, own_values = (t[:, :, first:].repeat_interleave(group, 1) for t in (keys, values))
    own, lse_own = flash(query, own_keys, own_values, is_causal=True, scale=scaling)
    lse_before = lse_before.reshape(b, heads, n, 1)
    lse = torch.logaddexp(lse_before, lse_own[..., None])
    out = before.reshape(b, heads, n, d).float() * (lse_before - lse).exp() + own.float() * (lse_own[..., None] - lse).exp()
    return out.to(query.dtype)


def attend_with_lse(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend` of one token's ``query`` ``[b, heads, 1, d]`` over all of ``keys``/``values`` (the very
    kernel call it makes, so the same output), and the log-sum-exp of each query head's scaled scores
    ``[b, kv_heads, group]``. CPU only, without autograd (:func:`flash_returns_lse`).
    """
    if (kernel := cpu_kernels.decode_attention(query, keys, values, scaling, with_lse=True)) is not None:
        return kernel
    b, heads, _, d = query.shape
    kv_heads = keys.shape[1]
    folded = query.reshape(b, kv_heads, heads // kv_heads, d)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(folded, keys, values, scale=scaling)
    return out.view(b, heads, 1, d), lse


class KVTarget(NamedTuple):
    """Where a decode step's new KV goes in one layer and what its query attends to, for the kernel library to run
    the layer in one call (:func:`~.cpu_kernels.decode_layer`): row ``at`` of ``into`` (the cache) and, where given,
    row ``also_at`` of ``also`` (a recycle set, a window); the first ``length`` rows of the last of them; with
    ``choice``, a recycle set chosen from the attention's scores (a full step of Recycled Attention)."""

    into: cpu_kernels.KVRows
    at: int
    also: cpu_kernels.KVRows | None
    also_at: int
    length: int
    choice: cpu_kernels.RecycleChoice | None = None


class Attention(Protocol):
    """What a layer's new tokens attend to: given their rotated query, key and value (and the query before
    rotation, for schedules that compare queries), store the KV and return the attention output."""

    def __call__(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 raw_query: torch.Tensor, scaling: float) -> torch.Tensor: ...

    def target(self, layer: int) -> KVTarget | Callable[[torch.Tensor], KVTarget] | None:
        """For a decode step, the layer's attention as one run of rows (it then does all the attention's work
        here, the store included, and is not called for the layer); or, where the query decides which, a function
        of the query before rotation (``[1, heads, 1, d]``) that gives it; or ``None``: it is called."""


class CacheAttention:
    """Every token attends to the cache's slots up to its position: the prefill's and full decoding's attention.

    ``rows`` (full decoding's) are the cache's layers as the kernel library addresses them, ``None`` where it cannot:
    with them a decode step's layer is one call of the library (:meth:`target`)."""

    def __init__(self, cache: KVCache, positions: Positions, rows: list[cpu_kernels.KVRows | None] | None = None):
        self.cache = cache
        self.positions = positions
        self.rows = rows

    def target(self, layer: int) -> KVTarget | None:
        rows = None if self.rows is None else self.rows[layer]
        p = self.positions
        if rows is None or p.end - p.first != 1:
            return None
        return KVTarget(rows, p.first, None, 0, p.end)

    def __call__(self, layer, query, key, value, raw_query, scaling):
        p = self.positions
        self.cache.write(layer, p, key, value)
        keys, values = self.cache.layer(layer, p.end)
        if p.suffix and flash_returns_lse(query):
            return attend_suffix(query, keys, values, p.first, scaling)
        if not (p.masked or p.suffix):
            return attend(query, keys, values, scaling, causal=p.causal)
        masks = p.masks(query.shape[1] // keys.shape[1])
        return torch.cat([attend(query[:, :, lo:hi], keys[:, :, :end], values[:, :, :end], scaling, mask)
                          for (lo, hi, end), mask in zip(p.runs, masks)], dim=2)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated, as :func:`_rotate` takes it."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x`` rotated to its positions: ``x * cos + rotate_half(x) * sin``, computed as ``x * cos + roll(x) *
    signed_sin`` (:func:`_signed_sin`), which moves rotate_half's negation onto sin: the same products, as a sign
    is exact, in fewer operations."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def rope_angles(rotary: nn.Module, probe: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``positions`` ``[tokens, rotary_dim]`` as the model's ``rotary`` module
    (:func:`rotary_module`) rotates them (rope scaling, and the attention factor yarn and longrope fold in,
    included), in the dtype and on the device of ``probe``, a one-element tensor."""
    cos, sin = rotary(probe, positions[None])
    return cos[0], sin[0]


def _probe(model: PreTrainedModel) -> torch.Tensor:
    """A one-element tensor of the model's dtype, on its device: what :func:`rope_angles` takes them from."""
    param = next(model.parameters())
    return torch.zeros(1, dtype=param.dtype, device=param.device)


def forward(model: PreTrainedModel, cache: KVCache, input_ids: torch.Tensor, positions: Positions, *,
            attention: Attention | None = None, logits: int = 1, through_layer: int | None = None,
            ) -> torch.Tensor | None:
    """Run ``input_ids`` ``[batch, tokens]`` at ``positions`` over ``cache``; return the logits of the last
    ``logits`` tokens ``[batch, logits, vocab]``.

    ``attention`` decides what the tokens attend to (default: the cache, by position, storing their
    KV in it). With ``through_layer``, only layers up to that one run and nothing is returned: the
    KV of those layers is what a caller wants.
    """
    if input_ids.shape[1] != len(positions.ids):
        raise InvalidArgumentError(f"{input_ids.shape[1]} tokens but {len(positions.ids)} positions")
    attention = attention or CacheAttention(cache, positions)
    body = model.model
    cos, sin = rope_angles(rotary_module(model), _probe(model), positions.ids)
    cos, signed_sin = cos[None, None], _signed_sin(sin)[None, None]
    hidden = body.embed_tokens(input_ids)
    batch, n = input_ids.shape
    last = len(body.layers) - 1 if through_layer is None else through_layer
    for i, layer in enumerate(body.layers[: last + 1]):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (batch, n, -1, attn.head_dim)
        q, k, v = (project(p, x).view(shape) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        if hasattr(attn, "q_norm"):  # Qwen3 normalises each head's query and key before rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        rq, rk = _rotate(q, cos, signed_sin), _rotate(k, cos, signed_sin)
        if through_layer is not None and i == last:
            cache.write(i, positions, rk, v)
            break
        out = attention(i, rq, rk, v, q, attn.scaling)
        hidden = hidden + project(attn.o_proj, out.transpose(1, 2).reshape(batch, n, -1))
        mlp, x = layer.mlp, layer.post_attention_layernorm(hidden)  # every supported family's MLP, step by step
        hidden = hidden + project(mlp.down_proj, mlp.act_fn(project(mlp.gate_proj, x)) * project(mlp.up_proj, x))
    cache.length = max(cache.length, positions.end)
    if through_layer is not None:
        return None
    return project(model.lm_head, body.norm(hidden[:, -logits:]))


FOUR_BIT = "blockrag_four_bit"
"""The attribute of a projection (:func:`decode_projections`) that holds its :class:`~.fourbit.FourBitRows`, where
it has them."""


def projection_groups(model: PreTrainedModel) -> list[tuple[nn.Module, ...]]:
    """The projections a one-token pass reads, grouped by their input: in every decoder layer query, key and value;
    output; gate and up; down; then the LM head."""
    return [group for layer in model.model.layers
            for group in ((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                          (layer.self_attn.o_proj,), (layer.mlp.gate_proj, layer.mlp.up_proj), (layer.mlp.down_proj,))
            ] + [(model.lm_head,)]


def decode_projections(model: PreTrainedModel) -> list[nn.Module]:
    """The query, key, value, output, gate, up and down projections of every decoder layer, and the LM head."""
    return [p for group in projection_groups(model) for p in group]


def use_four_bit(model: PreTrainedModel, decode_weights: DecodeWeights) -> int:
    """Give the projections of ``model`` (:func:`decode_projections`) four-bit copies for one-token passes as
    ``decode_weights`` says (:data:`~.fourbit.DECODE_WEIGHTS`), dropping any they had; return how many have one.

    Projections that read the same input share one copy of their weights stacked by rows where all of them
    can have one, so that a decode step reads them in one product.
    """
    check_decode_weights(decode_weights)
    param = next(model.parameters())
    if decode_weights == "4bit" and param.device.type != "cpu":
        raise InvalidArgumentError(f"decode_weights='4bit' runs on CPU only, not {param.device}; "
                                   "use 'auto' or 'dense'.")
    for projection in decode_projections(model):
        setattr(projection, FOUR_BIT, None)
    if decode_weights == "dense" or (decode_weights == "auto" and param.device.type != "cpu"):
        return 0
    for group in projection_groups(model):
        plain = [p for p in group if type(p) is nn.Linear]
        shared = len(plain) == len(group) > 1 and _pack(plain, decode_weights)
        if not shared:
            for projection in plain:
                _pack([projection], decode_weights)
    return sum(getattr(p, FOUR_BIT) is not None for p in decode_projections(model))


def _pack(projections: list[nn.Linear], decode_weights: DecodeWeights) -> bool:
    """Give ``projections`` one four-bit copy of their weights stacked by rows, if it can be made; say whether it
    was."""
    weights = [p.weight for p in projections]
    copy = four_bit_weights(torch.cat(weights) if len(weights) > 1 else weights[0], exact_only=decode_weights == "auto")
    if copy is None:
        return False
    start = 0
    for projection, weight in zip(projections, weights):
        setattr(projection, FOUR_BIT, FourBitRows(copy, start, start + weight.shape[0], weight._version))
        start += weight.shape[0]
    return True


@contextlib.contextmanager
def dense_weights(model: PreTrainedModel) -> Iterator[None]:
    """Within this block, one-token passes of ``model`` read its dense weights: its four-bit copies are set aside
    (a benchmark's baseline, side by side with them; not for a model that serves other threads meanwhile)."""
    projections = decode_projections(model)
    copies = [getattr(p, FOUR_BIT, None) for p in projections]
    for p in projections:
        setattr(p, FOUR_BIT, None)
    try:
        yield
    finally:
        for p, copy in zip(projections, copies):
            setattr(p, FOUR_BIT, copy)


def _matvec(layer: nn.Linear, four_bit_allowed: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``layer`` applied to a vector ``[in]``: from its four-bit copy where it has a current one and
    ``four_bit_allowed``, else as a product with its dense weight: in bf16 as a one-row matrix product,
    whose kernel reads bf16 weights faster than the matrix-vector kernel does; in fp32 on CPU on several threads
    as one block of rows per thread (:func:`_matvec_in_parts`) where their count divides the rows; otherwise as the
    matrix-vector product, which reads fp32 weights faster than the one-row matrix product does."""
    four_bit: FourBitRows | None = getattr(layer, FOUR_BIT, None)
    if four_bit is not None and four_bit.version == layer.weight._version and four_bit_allowed:
        if layer.bias is None:
            return four_bit.matvec
        matvec, bias = four_bit.matvec, layer.bias
        return lambda row: matvec(row) + bias
    weight, bias = layer.weight, layer.bias
    if weight.dtype == torch.bfloat16:
        return lambda row: F.linear(row[None], weight, bias)[0]
    parts = torch.get_num_threads()
    if weight.dtype == torch.float32 and weight.device.type == "cpu" and parts > 1 and weight.shape[0] % parts == 0:
        return _matvec_in_parts(weight, bias, parts)
    if bias is None:
        return functools.partial(torch.mv, weight)
    return functools.partial(torch.addmv, bias, weight)


def _matvec_in_parts(weight: torch.Tensor, bias: torch.Tensor | None,
                     parts: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``weight @ row (+ bias)`` as ``parts`` products of a block of rows each, one per thread.

    On CPU the fp32 matrix-vector kernel reads the weight on one thread whatever torch's thread count, so a decode
    step read its weights at one core's bandwidth; a batched one-row product of the row blocks shares them out. Each
    output is a dot product of the same terms (a test holds it within fp32's reordering bound of the other kernel's).
    """
    blocks = weight.view(parts, weight.shape[0] // parts, weight.shape[1]).transpose(1, 2)
    if bias is None:
        return lambda row: torch.bmm(row.expand(parts, 1, -1), blocks).view(-1)
    biases = bias.view(parts, 1, -1)
    return lambda row: torch.baddbmm(biases, row.expand(parts, 1, -1), blocks).view(-1)


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; for one token through a plain linear layer, as :func:`_matvec` computes it, so that a
    one-token :func:`forward` equals a :class:`DecodeStep` to the bit.

    A projection with a four-bit copy (:func:`use_four_bit`) reads that, while its weight is unchanged since
    and without autograd (the kernel has no derivative). Any other layer (a LoRA layer, say) is called as
    it is.
    """
    if x.shape[0] * x.shape[1] != 1 or type(layer) is not nn.Linear:
        return layer(x)
    return _matvec(layer, not torch.is_grad_enabled())(x.reshape(-1)).view(1, 1, -1)


def _stacked(group: tuple[nn.Linear, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The projections of ``group`` (:func:`projection_groups`) applied to one vector, their outputs stacked: as one
    product where they share a current four-bit copy, else one by one."""
    copies = [getattr(p, FOUR_BIT, None) for p in group]
    first = copies[0]
    shared = first is not None and all(
        c is not None and c.weights is first.weights and c.version == p.weight._version for c, p in zip(copies, group))
    biases = [p.bias for p in group]
    if not shared or any((b is None) != (biases[0] is None) for b in biases):
        matvecs = [_matvec(p, True) for p in group]
        return lambda row: torch.cat([matvec(row) for matvec in matvecs])
    product = first.weights.matvec
    if biases[0] is None:
        return product
    bias = torch.cat(biases)
    return lambda row: product(row) + bias


_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
"""The supported families' RMSNorm classes, which all compute ``weight * (x * rsqrt(mean(x²) + eps))`` in fp32."""


def _fusable_norm(norm: nn.Module, fused: bool) -> bool:
    """Whether ``norm`` runs as :func:`~.cpu_kernels.add_rms_norm` in a fused step: a supported RMSNorm whose weight
    is of the step's dtype."""
    return fused and type(norm).__name__ in _RMS_NORMS and norm.weight.dtype == torch.bfloat16


def _rms_norm(norm: nn.Module, fused: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``norm`` as one call: the kernel library's (:func:`_fusable_norm`), else the fused RMSNorm kernel times its
    weight, equal to the module to the bit (a decode step is tested equal to :func:`forward`, which calls the
    module), instead of the module's six. Any other norm is the module itself."""
    if type(norm).__name__ not in _RMS_NORMS:
        return norm
    weight, shape, eps = norm.weight, [norm.weight.shape[0]], norm.variance_epsilon
    if _fusable_norm(norm, fused):
        return lambda x: cpu_kernels.add_rms_norm(x, None, weight, eps)
    return lambda x: torch.rms_norm(x, shape, None, eps) * weight


def _add_norm(norm: nn.Module, fused: bool) -> Callable[[torch.Tensor, torch.Tensor | None],
                                                        tuple[torch.Tensor, torch.Tensor]]:
    """The residual sum ``hidden + delta`` (``hidden`` where ``delta`` is ``None``) and ``norm`` of it: in a fused
    step one call of the kernel library, which adds in place into ``hidden`` (a step's own tensor)."""
    if _fusable_norm(norm, fused):
        weight, eps = norm.weight, norm.variance_epsilon
        return lambda hidden, delta: (hidden, cpu_kernels.add_rms_norm(hidden, delta, weight, eps))
    normed = _rms_norm(norm, fused)

    def add_norm(hidden: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden if delta is None else hidden + delta
        return hidden, normed(hidden)
    return add_norm


def _is_silu(act: nn.Module) -> bool:
    """Whether ``act`` is transformers' or torch's SiLU, which the kernel library's :func:`~.cpu_kernels.silu_mul`
    computes."""
    return type(act).__name__ in ("SiLUActivation", "SiLU")


def _gated(act: nn.Module, fused: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``act(gate) * up`` of the gate and up products stacked ``[2n]``: one call of the kernel library for SiLU in a
    fused step."""
    if fused and _is_silu(act):
        return cpu_kernels.silu_mul

    def gated(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.view(2, -1)
        return act(gate) * up
    return gated


def _library_tiles(group: tuple[nn.Module, ...]) -> torch.Tensor | None:
    """The four-bit copy that the projections of ``group`` read as one product, in the kernel library's layout:
    where they are plain linear layers without biases whose current copy is one and the same, not eight-bit, held
    in that layout, their rows in order and all of its rows (``None`` otherwise)."""
    copies = [getattr(p, FOUR_BIT, None) for p in group]
    if any(type(p) is not nn.Linear or p.bias is not None or c is None or c.version != p.weight._version
           for p, c in zip(group, copies)):
        return None
    weights = copies[0].weights
    starts = [0] + [c.end for c in copies]
    if (weights.eight_bit or weights.tiles is None or starts[-1] != weights.rows
            or any(c.weights is not weights or c.start != start for c, start in zip(copies, starts))):
        return None
    return weights.tiles


def _after_attention(layer: nn.Module, fused: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """A decoder layer's output product, residual sum and norm, gate and up products, SiLU and down product as one
    call of the kernel library (:func:`~.cpu_kernels.mlp_after_attention`), taking the residual stream (added to in
    place) and the attention's output and giving the down product: in a fused step whose output, gate and up, and
    down projections each read one copy of :func:`_library_tiles`, its norm fusable and its activation SiLU.
    ``None`` otherwise: the step calls them one by one."""
    tiles = _after_attention_tiles(layer, fused)
    if tiles is None:
        return None
    o, gate_up, down = tiles
    weight, eps = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
    return lambda hidden, attended: cpu_kernels.mlp_after_attention(attended, hidden, o, weight, eps, gate_up, down)


def _after_attention_tiles(layer: nn.Module, fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The output, gate-and-up and down copies (:func:`_library_tiles`) that :func:`_after_attention` reads, where
    its conditions hold (``None`` otherwise)."""
    attn, mlp = layer.self_attn, layer.mlp
    if not (_fusable_norm(layer.post_attention_layernorm, fused) and _is_silu(mlp.act_fn)):
        return None
    tiles = tuple(_library_tiles(g) for g in ((attn.o_proj,), (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)))
    return None if any(t is None for t in tiles) else tiles


def _whole_layer(layer: nn.Module, fused: bool, heads: int, kv_heads: int) -> cpu_kernels.LayerWeights | None:
    """A decoder layer's weights as :func:`~.cpu_kernels.decode_layer` runs the whole layer in one call: where its
    work after attention is one call (:func:`_after_attention`), its query, key and value read one copy of
    :func:`_library_tiles`, its input norm is fusable, it does not normalise queries and keys per head, and the
    library's attention takes its head size and group. ``None`` otherwise."""
    attn, norm = layer.self_attn, layer.input_layernorm
    after = _after_attention_tiles(layer, fused)
    if (after is None or not _fusable_norm(norm, fused) or getattr(attn, "q_norm", None) is not None
            or not cpu_kernels.applies(norm.weight.dtype, norm.weight.device, attn.head_dim, heads // kv_heads)):
        return None
    qkv = _library_tiles((attn.q_proj, attn.k_proj, attn.v_proj))
    if qkv is None:
        return None
    (o, gate_up, down), post = after, layer.post_attention_layernorm
    return cpu_kernels.LayerWeights(norm.weight, norm.variance_epsilon, qkv, heads, kv_heads, attn.head_dim,
                                    attn.scaling, o, post.weight, post.variance_epsilon, gate_up, down)


@dataclass(frozen=True)
class _StepLayer:
    """What a decode step runs in one decoder layer, looked up once: its norms with the residual sums before them
    (:func:`_add_norm`), its projections as matrix-vector products (:func:`_matvec`, :func:`_stacked`), its gated
    activation (:func:`_gated`) and its attention's scaling."""

    input_norm: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]
    qkv: Callable[[torch.Tensor], torch.Tensor]
    q_norm: Callable[[torch.Tensor], torch.Tensor] | None
    k_norm: Callable[[torch.Tensor], torch.Tensor] | None
    o: Callable[[torch.Tensor], torch.Tensor]
    post_norm: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]
    gate_up: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor], torch.Tensor]
    gated: Callable[[torch.Tensor], torch.Tensor]
    after_attention: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    """:func:`_after_attention`: ``o``, ``post_norm``, ``gate_up``, ``gated`` and ``down`` in one call, where it can."""
    whole: cpu_kernels.LayerWeights | None
    """:func:`_whole_layer`: the whole layer in one call, where it can and the step's attention gives a target."""
    scaling: float


class DecodeStep:
    """A decode step of one model: one new token, batch 1, without autograd, through every layer.

    It computes what :func:`forward` computes for a single token, with what each layer needs looked up once per
    model rather than on every step: a step is hundreds of small operations, and on CPU their dispatch is a good
    part of its time. In fp32, and wherever the kernel library does not run, it is equal to :func:`forward` to the
    bit. In bf16 on a CPU where :func:`~.cpu_kernels.fuses` holds, each layer's norms with their residual sums, its
    rotation and its activation are one call each of the kernel library, which rounds each result as torch does
    (the exponential inside SiLU aside), and with four-bit copies its work after attention is one call
    (:func:`_after_attention`), or the whole layer is, where the attention gives a :class:`KVTarget`
    (:func:`_whole_layer`): the same calls in the same order, without returning to Python. Get it with :meth:`of`, which builds it again when the model's projections,
    their weights or their four-bit copies changed, or the kernel library was turned off or on.
    """

    def __init__(self, model: PreTrainedModel):
        # Parts of the model only, not the model: the step is kept in a mapping held weakly by the model.
        self.signature = self._signature(model)
        body = model.model
        param = next(model.parameters())
        fused = cpu_kernels.fuses(param.dtype, param.device)
        self.rotary, self.probe, self.embed = rotary_module(model), _probe(model), body.embed_tokens
        self.rotate = cpu_kernels.rotate if fused else _rotate
        self.heads, self.kv_heads = model.config.num_attention_heads, KVShape.of(model).kv_heads
        self.layers = []
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            q_norm, k_norm = (_rms_norm(n, fused) if n is not None else None
                              for n in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)))
            self.layers.append(_StepLayer(
                _add_norm(layer.input_layernorm, fused), _stacked((attn.q_proj, attn.k_proj, attn.v_proj)),
                q_norm, k_norm, _matvec(attn.o_proj, True), _add_norm(layer.post_attention_layernorm, fused),
                _stacked((mlp.gate_proj, mlp.up_proj)), _matvec(mlp.down_proj, True), _gated(mlp.act_fn, fused),
                _after_attention(layer, fused), _whole_layer(layer, fused, self.heads, self.kv_heads),
                attn.scaling))
        self.head_dim = body.layers[0].self_attn.head_dim
        self.norm, self.head = _add_norm(body.norm, fused), _matvec(model.lm_head, True)

    @staticmethod
    def _signature(model: PreTrainedModel) -> tuple:
        """What the step depends on: the model's dtype and device, torch's thread count (:func:`_matvec_in_parts`),
        whether the kernel library runs, every projection, its weight's version (inference tensors have none) and
        its four-bit copy."""
        param = next(model.parameters())
        return (param.dtype, param.device, torch.get_num_threads(), cpu_kernels.fuses(param.dtype, param.device), *(
            (id(p), None if p.weight.is_inference() else p.weight._version, id(getattr(p, FOUR_BIT, None)))
            for p in decode_projections(model)))

    @classmethod
    def of(cls, model: PreTrainedModel) -> DecodeStep | None:
        """The decode step of ``model``, or ``None`` where a projection is not a plain linear layer (a LoRA layer,
        say): :func:`forward` runs those as they are."""
        if any(type(p) is not nn.Linear for p in decode_projections(model)):
            return None
        step = _DECODE_STEPS.get(model)
        if step is None or step.signature != cls._signature(model):
            step = _DECODE_STEPS[model] = cls(model)
        return step

    def __call__(self, cache: KVCache, token: torch.Tensor, positions: Positions, attention: Attention) -> torch.Tensor:
        """The logits ``[vocab]`` after the token ``token`` ``[1, 1]`` at ``positions`` (one) over ``cache``;
        ``attention`` as in :func:`forward`, which stores the token's KV."""
        cos, sin = rope_angles(self.rotary, self.probe, positions.ids)
        signed_sin, rotate = _signed_sin(sin), self.rotate
        hidden, delta = self.embed(token).view(-1), None  # a new tensor, the step's own
        heads, qk = self.heads, self.heads + self.kv_heads
        angles, projection, deltas = (cos.data_ptr(), signed_sin.data_ptr()), None, ()
        for i, layer in enumerate(self.layers):
            target = None if layer.whole is None else attention.target(i)
            if target is not None:  # hidden += delta in place, and the layer's down product into the other delta
                if projection is None:
                    projection = torch.empty(layer.whole.projection_size, dtype=hidden.dtype)
                    deltas = (torch.empty_like(hidden), torch.empty_like(hidden))  # the step's own, taking turns
                projected = not isinstance(target, KVTarget)
                if projected:  # the query decides
                    target = target(cpu_kernels.project_qkv(hidden, delta, layer.whole, angles, projection))
                last, delta = None if projected else delta, deltas[i % 2]
                cpu_kernels.decode_layer(hidden, last, layer.whole, angles, projection, projected, *target, delta)
                continue
            hidden, x = layer.input_norm(hidden, delta)
            qkv = layer.qkv(x).view(1, -1, 1, self.head_dim)  # heads by rows, q k v
            if layer.q_norm is None:  # query and key rotated as one
                q, rotated = qkv[:, :heads], rotate(qkv[:, :qk], cos, signed_sin)
                rq, rk = rotated[:, :heads], rotated[:, heads:]
            else:
                q, k = layer.q_norm(qkv[:, :heads]), layer.k_norm(qkv[:, heads:qk])
                rq, rk = rotate(q, cos, signed_sin), rotate(k, cos, signed_sin)
            out = attention(i, rq, rk, qkv[:, qk:], q, layer.scaling)
            if layer.after_attention is not None:  # hidden += the output product, in place
                delta = layer.after_attention(hidden, out.reshape(-1))
            else:
                hidden, x = layer.post_norm(hidden, layer.o(out.reshape(-1)))
                delta = layer.down(layer.gated(layer.gate_up(x)))
        cache.length = max(cache.length, positions.end)
        return self.head(self.norm(hidden, delta)[1])


_DECODE_STEPS: weakref.WeakKeyDictionary[nn.Module, DecodeStep] = weakref.WeakKeyDictionary()
"""Each model's :class:`DecodeStep`, kept while the model lives."""


def empty_cache(model: PreTrainedModel, capacity: int, batch: int = 1, memory: CacheMemory | None = None) -> KVCache:
    """A cache for ``model`` with room for ``capacity`` positions (carved from ``memory`` where given)."""
    return KVCache.empty(KVShape.of(model), capacity, batch, memory)
