"""Blocks: the KV states of a piece of text encoded on its own, and their assembly into one cache.

A block holds keys rotated at the positions it was encoded at (``start`` onwards). Assembly
places blocks one after another and re-rotates each block's keys to where it now sits, so the
final block (the question) attends to everything as if the prompt had been prefilled, except
that passages never attended to each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .rope import rerotation, rotary_module

BlockMode = Literal["naive", "prefix"]
BLOCK_MODES: tuple[BlockMode, ...] = ("naive", "prefix")


@dataclass(frozen=True)
class Block:
    """KV states of one text, shaped ``[layers, kv_heads, tokens, head_dim]``, encoded at ``start``.

    ``context`` names what the block attended to when encoded: ``""`` for nothing (naive mode),
    else :func:`context_id` of the prefix it followed. A block is only valid after that context.
    """

    token_ids: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    start: int
    context: str = ""

    def __post_init__(self) -> None:
        n = self.token_ids.shape[0]
        if self.keys.shape != self.values.shape or self.keys.ndim != 4 or self.keys.shape[2] != n:
            raise ValueError(f"block of {n} tokens has keys {tuple(self.keys.shape)} and values "
                             f"{tuple(self.values.shape)}; expected [layers, kv_heads, {n}, head_dim] for both")

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def context_id(token_ids: Sequence[int] | torch.Tensor) -> str:
    """Identity of a context by its token ids (the model itself is named by its fingerprint)."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64).cpu().numpy().tobytes()
    return hashlib.sha256(ids).hexdigest()[:24]


def block_key(fingerprint: str, context: str, token_ids: Sequence[int] | torch.Tensor) -> str:
    """Content address of a block: the model, what the block attended to, and its own tokens."""
    return f"{fingerprint}-{context or 'naive'}-{context_id(token_ids)}"


class BlockStore(Protocol):
    """Where blocks persist between calls (implemented by :mod:`blockrag.kvstore`)."""

    def get_many(self, keys: Sequence[str]) -> list[Block | None]:
        """The blocks stored under ``keys``; ``None`` where missing or unusable."""
        ...

    def put(self, key: str, block: Block) -> None:
        """Store ``block`` under ``key``."""
        ...


class _KVWritten(Exception):
    """Ends a forward pass once the layers whose KV was asked for have written it."""


class StoppingCache(DynamicCache):
    """A cache that ends the forward pass as soon as layer ``last_layer`` has written its KV.

    Encoding a block needs only the KV: the last layer's attention output, MLP, final norm and
    LM head would be computed for nothing. Use it through :func:`write_kv`.
    """

    def __init__(self, config, last_layer: int):
        super().__init__(config=config)
        self.last_layer = last_layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == self.last_layer:
            raise _KVWritten
        return out


def write_kv(model: PreTrainedModel, cache: StoppingCache, input_ids: torch.Tensor, position_ids: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> None:
    """Append the KV of ``input_ids`` to ``cache`` for layers up to its ``last_layer``, computing nothing after."""
    try:
        model.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                    past_key_values=cache, use_cache=True)
    except _KVWritten:
        return
    raise RuntimeError(f"{type(model).__name__} never wrote KV of layer {cache.last_layer}")


def _batch_cache(model: PreTrainedModel, past: Block | None, batch: int) -> StoppingCache:
    cache = StoppingCache(model.config, model.config.num_hidden_layers - 1)
    if past is not None:
        for i in range(past.keys.shape[0]):
            DynamicCache.update(cache, past.keys[i].unsqueeze(0).expand(batch, -1, -1, -1),
                                past.values[i].unsqueeze(0).expand(batch, -1, -1, -1), i)
    return cache


@torch.inference_mode()
def encode_blocks(
    model: PreTrainedModel,
    token_lists: Sequence[Sequence[int]],
    past: Block | None = None,
    batch_size: int = 8,
) -> list[Block]:
    """Encode each token list as an independent block, optionally after a shared ``past`` block.

    Lists are batched by similar length (see :func:`encode_batch`). The model runs only until the
    last layer's KV is written (no attention output or MLP in that layer, no LM head).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    out: list[Block | None] = [None] * len(token_lists)
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        for i, block in zip(idx, encode_batch(model, [token_lists[i] for i in idx], past)):
            out[i] = block
    return out  # type: ignore[return-value]


def encode_batch(model: PreTrainedModel, token_lists: Sequence[Sequence[int]],
                 past: Block | None = None) -> list[Block]:
    """Encode token lists as independent blocks in one right-padded forward pass, keeping autograd history.

    Under causal attention no real token attends to the padding after it, so padding changes
    nothing. Block fine-tuning calls this with gradients on; :func:`encode_blocks` without.
    """
    lengths = [len(ids) for ids in token_lists]
    if min(lengths) == 0:
        raise ValueError("cannot encode an empty block: every passage needs at least one token")
    device = next(model.parameters()).device
    start = len(past) if past is not None else 0
    context = context_id(past.token_ids) if past is not None else ""
    width = max(lengths)
    ids = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, token_ids in enumerate(token_lists):
        ids[row, : lengths[row]] = torch.as_tensor(list(token_ids), dtype=torch.long)
    cache = _batch_cache(model, past, len(token_lists))
    positions = torch.arange(start, start + width, device=device).unsqueeze(0).expand(len(token_lists), -1)
    write_kv(model, cache, ids.to(device), positions)
    out = []
    for row, n in enumerate(lengths):  # each block's KV copied once, out of the batch's cache
        keys = torch.stack([layer.keys[row, :, start:start + n] for layer in cache.layers])
        values = torch.stack([layer.values[row, :, start:start + n] for layer in cache.layers])
        out.append(Block(ids[row, :n].clone(), keys, values, start, context))
    return out


def assemble(model: PreTrainedModel, blocks: Sequence[Block], starts: Sequence[int] | None = None) -> DynamicCache:
    """One cache holding ``blocks``, each re-rotated to the positions it now occupies.

    ``starts`` gives each block's first position (default: back to back from 0). Positions may
    leave gaps for text prefilled afterwards: attention does not depend on the order of cache entries.
    """
    if not blocks:
        return DynamicCache(config=model.config)
    if starts is None:
        starts = [sum(len(b) for b in blocks[:i]) for i in range(len(blocks))]
    param = next(model.parameters())
    layers, heads, _, dim = blocks[0].keys.shape
    total = sum(len(b) for b in blocks)
    keys = torch.empty(layers, 1, heads, total, dim, dtype=param.dtype, device=param.device)
    values = torch.empty_like(keys)
    offset = 0
    for b in blocks:
        keys[:, 0, :, offset:offset + len(b)] = b.keys
        values[:, 0, :, offset:offset + len(b)] = b.values
        offset += len(b)
    source = torch.cat([torch.arange(b.start, b.start + len(b)) for b in blocks])
    target = torch.cat([torch.arange(s, s + len(b)) for b, s in zip(blocks, starts)])
    if not torch.equal(source, target):
        move = rerotation(source, target, rotary_module(model))
        for i in range(layers):  # one layer at a time bounds the fp32 working memory
            keys[i] = move(keys[i])
    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        layer.lazy_initialization(keys[i], values[i])
        layer.keys, layer.values = keys[i], values[i]
    return cache


def prefill_over_blocks(model: PreTrainedModel, ids: torch.Tensor, cache: DynamicCache, in_block: torch.Tensor,
                        fresh: torch.Tensor, logits_to_keep: int = 1) -> tuple[CausalLMOutputWithPast, torch.Tensor]:
    """Run the tokens of ``ids`` at the ``fresh`` positions over ``cache``, which holds the KV of the
    ``in_block`` positions back to back (as :func:`assemble` leaves it).

    Each fresh token attends by position: to every entry at a position up to its own, wherever it
    sits in the cache, except the entries of fresh block positions, which this pass recomputes.
    Returns the model's output and which cache entries went stale (for :func:`~.recovery.drop_stale`).
    Where no cached entry follows a fresh token and none goes stale, the model's own causal mask is the same.
    """
    every = torch.arange(len(ids), device=ids.device)
    positions, cached = every[fresh], every[in_block]
    stale = fresh[cached]
    mask = None
    if bool(stale.any()) or len(cached) and bool(cached[-1] > positions[0]):
        visible = torch.cat([cached, positions])[None, :] <= positions[:, None]
        visible[:, : len(cached)] &= ~stale
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(visible.shape, dtype=dtype, device=ids.device)
        mask = mask.masked_fill(~visible, torch.finfo(dtype).min)[None, None]
    out = model(input_ids=ids[positions][None], position_ids=positions[None], attention_mask=mask,
                past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep)
    return out, stale
