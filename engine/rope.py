"""Exact re-positioning of cached keys with the model's own rotary embedding module.

Keys are cached already rotated at the positions they were encoded at. Moving a block means
undoing the rotation of its source positions and applying the one of its target positions;
both come from the model's rotary module, so every rope scaling variant (linear, llama3, yarn,
longrope, ...) is honoured as the model itself would apply it.
"""

from __future__ import annotations

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


def rerotate(keys: torch.Tensor, source: torch.Tensor, target: torch.Tensor, rotary: nn.Module) -> torch.Tensor:
    """Move keys rotated at ``source`` positions to ``target`` positions.

    ``keys`` is ``[..., tokens, head_dim]``; ``source`` and ``target`` are 1-D position tensors
    with one entry per token. The rotation by the angle difference is computed in fp32 and the
    result cast back to the keys' dtype.
    """
    if source.shape != target.shape or source.shape[0] != keys.shape[-2]:
        raise ValueError(f"need one source and one target position per token, got {tuple(source.shape)}, "
                         f"{tuple(target.shape)} for {keys.shape[-2]} tokens")
    if torch.equal(source, target):
        return keys
    cos_s, sin_s = _cos_sin(rotary, source)
    cos_t, sin_t = _cos_sin(rotary, target)
    # Angle subtraction: R(t) R(-s) = R(t - s), evaluated from each side's own angles.
    cos = (cos_t * cos_s + sin_t * sin_s).to(keys.device)
    sin = (sin_t * cos_s - cos_t * sin_s).to(keys.device)
    dim = cos.shape[-1]
    k = keys.float()
    rotated, passthrough = k[..., :dim], k[..., dim:]
    rotated = rotated * cos + _rotate_half(rotated) * sin
    return torch.cat((rotated, passthrough), dim=-1).to(keys.dtype)
