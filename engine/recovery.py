"""Training-free accuracy recovery for Block-Attention: recompute some block tokens in context.

A passage block was encoded without the passages before it, so its KV deviates from what full
attention over the prompt computes. Two remedies recompute the KV of a few block tokens with
attention to everything before them, in the same forward pass that prefills the prompt's text:

- CacheBlend (Yao et al., "CacheBlend: Fast Large Language Model Serving for RAG with Cached
  Knowledge Fusion"): the block tokens whose KV deviates most from full attention at an early layer.
- EPIC (Hu et al., "EPIC: Efficient Position-Independent Context Caching for Serving Large Language
  Models"): the first tokens of each block, which the block's own tokens used as attention sinks.

Every block but one at position 0 is eligible: nothing precedes such a block (the head block of
``BlockEngine.generate``, or a segment prompt's leading block), so its KV is already in context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from blockrag.errors import InvalidArgumentError
from .transformer import KVCache, Positions, empty_cache, forward

if TYPE_CHECKING:  # transformers' model classes load slowly; only their names are needed here
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Recovery:
    """Which block tokens to recompute in context at assembly; the default recomputes none.

    ``recompute`` is the fraction of all eligible block tokens recomputed because their KV at layer
    ``check_layer`` deviates most from full attention's (rounded to the nearest token count);
    finding them costs a full-attention forward of the whole prompt through that layer.
    ``sink_tokens`` more are the first tokens of each eligible block. Both add to the prefill's work.
    ``check_layer`` is checked against the model when it is used (``recompute > 0``).
    """

    recompute: float = 0.0
    check_layer: int = 1
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.recompute <= 1:
            raise InvalidArgumentError(f"recompute is a fraction of the passage tokens in [0, 1], got {self.recompute!r}")
        if self.check_layer < 1:
            raise InvalidArgumentError(f"check_layer must be at least 1, got {self.check_layer!r}: layer 0's keys and values "
                             "do not depend on the context, so they cannot show which tokens deviate")
        if self.sink_tokens < 0:
            raise InvalidArgumentError(f"sink_tokens must be >= 0, got {self.sink_tokens!r}")


def deviation(model: PreTrainedModel, cache: KVCache, input_ids: torch.Tensor, positions: torch.Tensor,
              layer: int) -> torch.Tensor:
    """How far the KV at ``layer`` in ``cache``'s slots ``positions`` is from full attention's, one score each.

    The score is the squared L2 distance of the key plus that of the value, summed over KV heads,
    in fp32. ``input_ids`` are the whole prompt's tokens. Both keys are rotated at the same
    position, so the distance measures the missing context only.
    """
    full = empty_cache(model, len(input_ids))
    forward(model, full, input_ids[None], Positions.span(0, len(input_ids), input_ids.device), through_layer=layer)
    pairs = ((cache.keys[layer], full.keys[layer]), (cache.values[layer], full.values[layer]))
    return sum(((a[0][:, positions].float() - b[0][:, positions].float()) ** 2).sum((0, 2)) for a, b in pairs)


def positions_to_recompute(model: PreTrainedModel, recovery: Recovery, cache: KVCache,
                           input_ids: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The prompt positions of the block tokens whose KV ``recovery`` recomputes, ascending.

    ``cache`` holds block ``i`` in the slots of positions ``spans[i] = (start, length)``;
    ``input_ids`` are the whole prompt's tokens. The tokens are the first ``sink_tokens`` of every
    eligible block, and the ``recompute`` fraction of eligible tokens of largest :func:`deviation`.
    """
    layers = model.config.num_hidden_layers
    if recovery.recompute > 0 and recovery.check_layer >= layers:
        raise InvalidArgumentError(f"check_layer={recovery.check_layer} but the model has layers 0 to {layers - 1}; "
                         "pick an early one (CacheBlend uses 1)")
    device = input_ids.device
    if not spans:
        return torch.zeros(0, dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(s, s + n, device=device) for s, n in spans])
    offsets = torch.cat([torch.arange(n, device=device) for _, n in spans])
    eligible = positions > offsets  # the block does not start at position 0
    stale = eligible & (offsets < recovery.sink_tokens)
    count = round(recovery.recompute * int(eligible.sum()))
    if count:
        score = deviation(model, cache, input_ids, positions, recovery.check_layer)
        stale[score.masked_fill(~eligible, float("-inf")).topk(count).indices] = True
    return positions[stale]
