"""Exact re-positioning of cached keys with the model's own rotary embedding module.

Keys are cached already rotated at the positions they were encoded at. Moving a block means
undoing the rotation of its source positions and applying the one of its target positions;
both come from the model's rotary module, so every rope scaling variant (linear, llama3, yarn,
longrope, ...) is honoured as the model itself would apply it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import UnsupportedModelError


def rotary_module(model: nn.Module) -> nn.Module:
    """The rotary embedding module of a supported causal LM (``model.model.rotary_emb``)."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no rotary embedding module at `model.rotary_emb`; "
            "blockrag supports decoder-only Llama, Mistral, Qwen2 and Qwen3 models."
        )
    return rotary


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cos_sin(rotary: nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled fp32 cos and sin, shape [len(positions), rotary_dim]."""
    probe = torch.zeros(1, dtype=torch.float32, device=rotary.inv_freq.device)
    cos, sin = rotary(probe, positions.to(probe.device).view(1, -1))
    # yarn/longrope fold an attention scale into cos and sin; it is already in the cached keys.
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    return cos[0] / scale, sin[0] / scale


def rerotation(source: torch.Tensor, target: torch.Tensor, rotary: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that moves keys rotated at ``source`` positions to ``target`` positions.

    ``source`` and ``target`` are 1-D position tensors with one entry per token; the returned
    function takes keys ``[..., tokens, head_dim]``, rotates them by the angle difference in fp32
    and returns them in their own dtype. The angles are computed once for many calls (one per layer).
    """
    if source.shape != target.shape or source.ndim != 1:
        raise ValueError(f"need 1-D source and target positions of one length, got {tuple(source.shape)} "
                         f"and {tuple(target.shape)}")
    cos_s, sin_s = _cos_sin(rotary, source)
    cos_t, sin_t = _cos_sin(rotary, target)
    # Angle subtraction: R(t) R(-s) = R(t - s), evaluated from each side's own angles.
    cos = cos_t * cos_s + sin_t * sin_s
    sin = sin_t * cos_s - cos_t * sin_s
    dim = cos.shape[-1]

    def move(keys: torch.Tensor) -> torch.Tensor:
        if keys.shape[-2] != source.shape[0]:
            raise ValueError(f"keys hold {keys.shape[-2]} tokens but {source.shape[0]} positions were given")
        rotate = _rotate_fused if keys.is_cuda else _rotate
        rotated = rotate(keys[..., :dim], cos.to(keys.device), sin.to(keys.device))
        return torch.cat((rotated, keys[..., dim:]), dim=-1) if dim < keys.shape[-1] else rotated

    return move


def _rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    k = keys.float()
    return (k * cos + _rotate_half(k) * sin).to(keys.dtype)


# On GPUs the rotation is memory-bound; fused into one kernel it runs about 5x faster (32K tokens of an
# 8B model: 5 ms against 27 ms on an H100). CPUs keep the eager version: compiling there costs more than it saves.
_rotate_fused = torch.compile(_rotate, dynamic=True)


def rerotate(keys: torch.Tensor, source: torch.Tensor, target: torch.Tensor, rotary: nn.Module) -> torch.Tensor:
    """Keys ``[..., tokens, head_dim]`` rotated at ``source`` positions, moved to ``target`` positions."""
    return rerotation(source, target, rotary)(keys)
