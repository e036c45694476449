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

    Lists are batched by similar length and right-padded: under causal attention no real token
    attends to the padding after it, so padding changes nothing. The model runs only until the last
    layer's KV is written (no attention output or MLP in that layer, no LM head).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    device = next(model.parameters()).device
    start = len(past) if past is not None else 0
    context = context_id(past.token_ids) if past is not None else ""
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    out: list[Block | None] = [None] * len(token_lists)
    pad_id = 0
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        lengths = [len(token_lists[i]) for i in idx]
        if min(lengths) == 0:
            raise ValueError("cannot encode an empty block: every passage needs at least one token")
        width = max(lengths)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : lengths[row]] = torch.as_tensor(list(token_lists[i]), dtype=torch.long)
        cache = _batch_cache(model, past, len(idx))
        positions = torch.arange(start, start + width, device=device).unsqueeze(0).expand(len(idx), -1)
        write_kv(model, cache, ids.to(device), positions)
        for row, i in enumerate(idx):  # each block's KV copied once, out of the batch's cache
            n = lengths[row]
            keys = torch.stack([layer.keys[row, :, start:start + n] for layer in cache.layers])
            values = torch.stack([layer.values[row, :, start:start + n] for layer in cache.layers])
            out[i] = Block(ids[row, :n].clone(), keys, values, start, context)
    return out  # type: ignore[return-value]


SegmentKind = Literal["block", "text"]


def block_attention_mask(segments: Sequence[tuple[int, SegmentKind]], dtype: torch.dtype = torch.float32,
                         context: int = 0) -> torch.Tensor:
    """The Block-Attention mask over one contiguous sequence, as an additive ``[1, 1, T, T]`` tensor.

    ``"block"`` segments attend causally to themselves and to the first ``context`` tokens only (0 for
    naive blocks, the prompt head's length for prefix blocks); ``"text"`` segments attend causally
    to everything before them. At contiguous positions this is exactly what assembled naive blocks
    compute (prefix blocks: see :mod:`blockrag.engine.finetune`); exactness tests and block
    fine-tuning share this one definition.
    """
    total = sum(n for n, _ in segments)
    allowed = torch.zeros(total, total, dtype=torch.bool)
    pos = 0
    for n, kind in segments:
        if kind not in ("block", "text"):
            raise ValueError(f"segment kind must be 'block' or 'text', got {kind!r}")
        rows = slice(pos, pos + n)
        allowed[rows, (pos if kind == "block" else 0): pos + n] = True
        if kind == "block":
            allowed[rows, :context] = True
        pos += n
    allowed &= torch.ones(total, total, dtype=torch.bool).tril()
    return torch.zeros(total, total, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


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
