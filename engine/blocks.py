"""Blocks: the KV states of a piece of text encoded on its own, and their assembly into one cache.

A block holds keys rotated at the positions it was encoded at (``start`` onwards). Assembly
writes each block into the cache slots of the positions it now occupies, its keys re-rotated
there, so the text prefilled afterwards (the question) attends to everything as if the prompt
had been prefilled, except that passages never attended to each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal, Protocol

import torch

from blockrag.errors import InvalidArgumentError
from .rope import rerotations
from .transformer import CacheMemory, KVCache, Positions, empty_cache, forward, rotary_module

if TYPE_CHECKING:  # transformers' model classes load slowly; only their names are needed here
    from transformers import PreTrainedModel

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
            raise InvalidArgumentError(f"block of {n} tokens has keys {tuple(self.keys.shape)} and values "
                             f"{tuple(self.values.shape)}; expected [layers, kv_heads, {n}, head_dim] for both")

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def first(self, n: int) -> "Block":
        """The block of its first ``n`` tokens (views): under causal attention they never saw the tokens after."""
        if not 0 < n <= len(self):
            raise InvalidArgumentError(f"a block of {len(self)} tokens has no first {n} tokens to serve")
        return Block(self.token_ids[:n], self.keys[:, :, :n], self.values[:, :, :n], self.start, self.context)


def context_id(token_ids: Sequence[int] | torch.Tensor) -> str:
    """Identity of a context by its token ids (the model itself is named by its fingerprint)."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64).cpu().numpy().tobytes()
    return hashlib.sha256(ids).hexdigest()[:24]


@dataclass(frozen=True)
class PassageContext:
    """What passage blocks are encoded after: the prompt's head block (``prefix`` block mode) or nothing (``naive``)."""

    block: Block | None

    @cached_property
    def id(self) -> str:
        """The :func:`context_id` its blocks record (``""`` for nothing)."""
        return context_id(self.block.token_ids) if self.block is not None else ""


@dataclass(frozen=True)
class StoredPassage:
    """A passage's text with the store key its block was stored under at ingestion: looked up by that key."""

    text: str
    key: str


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
        raise InvalidArgumentError("batch_size must be at least 1")
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
        raise InvalidArgumentError("cannot encode an empty block: every passage needs at least one token")
    device = next(model.parameters()).device
    start = len(past) if past is not None else 0
    context = context_id(past.token_ids) if past is not None else ""
    width = max(lengths)
    ids = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, token_ids in enumerate(token_lists):
        ids[row, : lengths[row]] = torch.as_tensor(list(token_ids), dtype=torch.long)
    cache = empty_cache(model, start + width, batch=len(token_lists))
    if past is not None:
        for i in range(len(cache.keys)):
            cache.keys[i][:, :, :start] = past.keys[i]
            cache.values[i][:, :, :start] = past.values[i]
    forward(model, cache, ids.to(device), Positions.span(start, width, device), through_layer=len(cache.keys) - 1)
    out = []
    for row, n in enumerate(lengths):  # each block's KV copied once, out of the batch's cache
        keys = torch.stack([k[row, :, start:start + n] for k in cache.keys])
        values = torch.stack([v[row, :, start:start + n] for v in cache.values])
        out.append(Block(ids[row, :n].clone(), keys, values, start, context))
    return out


def assemble(model: PreTrainedModel, blocks: Sequence[Block], starts: Sequence[int] | None = None,
             capacity: int | None = None, memory: CacheMemory | None = None) -> KVCache:
    """A cache holding ``blocks``, each in the slots of the positions it now occupies, its keys re-rotated there.

    ``starts`` gives each block's first position (default: back to back from 0); the slots between
    them are left for text prefilled afterwards. ``capacity`` (default: up to the last block's end)
    leaves room for that text and the answer. The cache is carved from ``memory`` where given.
    """
    if starts is None:
        starts = [sum(len(b) for b in blocks[:i]) for i in range(len(blocks))]
    end = max((s + len(b) for b, s in zip(blocks, starts)), default=0)
    cache = empty_cache(model, capacity if capacity is not None else end, memory=memory)
    if end > cache.capacity:
        raise InvalidArgumentError(f"blocks reach position {end - 1} but the cache has room for {cache.capacity}")
    moving = [(b, s) for b, s in zip(blocks, starts) if b.start != s]
    moves = iter(rerotations(torch.cat([torch.arange(b.start, b.start + len(b)) for b, _ in moving]),
                             torch.cat([torch.arange(s, s + len(b)) for b, s in moving]), rotary_module(model),
                             [len(b) for b, _ in moving]) if moving else [])
    for b, s in zip(blocks, starts):
        cache.write_block(s, b.keys, b.values, None if b.start == s else next(moves))
    return cache


def prefill_over_blocks(model: PreTrainedModel, ids: torch.Tensor, cache: KVCache, fresh: torch.Tensor,
                        logits: int = 1) -> torch.Tensor:
    """Run the tokens of ``ids`` at the ``fresh`` positions over ``cache``, which holds the KV of the
    other positions in their slots (as :func:`assemble` leaves it); return the last ``logits`` rows' logits.

    Each fresh token attends to every slot up to its own position. A fresh position that held a
    block's KV (recomputed in context) gets the new KV in its slot, which the tokens after it then see.
    """
    positions = Positions(torch.arange(len(ids), device=ids.device)[fresh])
    return forward(model, cache, ids[positions.ids][None], positions, logits=logits)[0]
