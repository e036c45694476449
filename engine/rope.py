"""Exact re-positioning of cached keys with the model's own rotary embedding module.

Keys are cached already rotated at the positions they were encoded at. Moving a block means
undoing the rotation of its source positions and applying the one of its target positions;
both come from the model's rotary module, so every rope scaling variant (linear, llama3, yarn,
longrope, ...) is honoured as the model itself would apply it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from blockrag.errors import InvalidArgumentError, UnsupportedModelError

from . import cpu_kernels

log = logging.getLogger(__name__)


def _cos_sin(rotary: nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled fp32 cos and sin, shape [len(positions), rotary_dim]."""
    probe = torch.zeros(1, dtype=torch.float32, device=rotary.inv_freq.device)
    cos, sin = rotary(probe, positions.to(probe.device).view(1, -1))
    # yarn/longrope fold an attention scale into cos and sin; it is already in the cached keys.
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    return cos[0] / scale, sin[0] / scale


Move = Callable[..., torch.Tensor]


def rerotation(source: torch.Tensor, target: torch.Tensor, rotary: nn.Module) -> Move:
    """A function that moves keys rotated at ``source`` positions to ``target`` positions.

    ``source`` and ``target`` are 1-D position tensors with one entry per token; the returned
    function takes keys ``[..., tokens, head_dim]`` (and optionally ``out=``, where to write them),
    rotates them by the angle difference in fp32 and returns them in their own dtype (or ``out``'s),
    rounded once. The angles are computed once for many calls.
    """
    return rerotations(source, target, rotary, [len(source)])[0]


def rerotations(source: torch.Tensor, target: torch.Tensor, rotary: nn.Module, lengths: Sequence[int]) -> list[Move]:
    """:func:`rerotation` of several blocks at once: ``source`` and ``target`` hold their positions back to back,
    ``lengths`` their token counts; the angles of all come from one call of the rotary module per side."""
    if source.shape != target.shape or source.ndim != 1 or sum(lengths) != len(source):
        raise InvalidArgumentError(f"need 1-D source and target positions of one length, {sum(lengths)} in all, got "
                                   f"{tuple(source.shape)} and {tuple(target.shape)}")
    cos_s, sin_s = _cos_sin(rotary, source)
    cos_t, sin_t = _cos_sin(rotary, target)
    # Angle subtraction: R(t) R(-s) = R(t - s), evaluated from each side's own angles.
    cos = cos_t * cos_s + sin_t * sin_s
    sin = sin_t * cos_s - cos_t * sin_s
    half = cos.shape[-1] // 2
    if not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
        raise UnsupportedModelError("this model's rotary embedding gives the two halves of a head different angles; "
                                    "blockrag re-rotates keys whose halves share them (Llama, Mistral, Qwen2, Qwen3).")
    # rotation acts on the pairs (i, i + half) with one angle each
    return [_move(c, s) for c, s in zip(cos[:, :half].split(list(lengths)), sin[:, :half].split(list(lengths)))]


def _move(cos: torch.Tensor, sin: torch.Tensor) -> Move:
    """The move of keys by the angles ``cos``/``sin`` ``[tokens, rotary_dim / 2]`` (see :func:`rerotation`)."""
    dim = 2 * cos.shape[-1]
    cos, sin = cos.contiguous(), sin.contiguous()  # as the kernel library reads them

    def move(keys: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if keys.shape[-2] != cos.shape[0]:
            raise InvalidArgumentError(f"keys hold {keys.shape[-2]} tokens but {cos.shape[0]} positions were given")
        if out is None:
            out = torch.empty_like(keys)
        c, s = cos.to(keys.device), sin.to(keys.device)
        if dim < keys.shape[-1]:
            out[..., dim:] = keys[..., dim:]
        if torch.is_grad_enabled() and keys.requires_grad:  # training: differentiable, and never compiled
            out[..., :dim] = _rotated(keys[..., :dim], c, s)
        elif cpu_kernels.rerotate(keys[..., :dim], c, s, out[..., :dim]):  # on CPU: the kernel library's pass
            return out
        elif out.is_inference():  # a request's cache: the compiled pass, with tensors of the kinds it was warmed for
            with torch.inference_mode():
                _rotate_into(out[..., :dim], keys[..., :dim], c.clone(), s.clone())
        else:
            _rotate_into_eager(out[..., :dim], keys[..., :dim], c, s)
        return out

    return move


def _rotated(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Keys' halves ``(k0, k1)`` rotated by the angles of ``cos``/``sin`` (one per pair): ``(k0 cos - k1 sin, k1 cos +
    k0 sin)`` in fp32, the same operations as transformers' ``k * cos + rotate_half(k) * sin``."""
    k = keys.float().unflatten(-1, (2, -1))
    k0, k1 = k[..., 0, :], k[..., 1, :]
    return torch.stack((k0 * cos - k1 * sin, k1 * cos + k0 * sin), -2).flatten(-2)


def _rotate_into_eager(out: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    out.copy_(_rotated(keys, cos, sin))


# Eager, the rotation makes several fp32 copies of every key; compiled, it is one pass that reads a
# block's keys and writes the rotated ones into the cache (the same values). :func:`warm_rotation`
# compiles it ahead of the first request, for keys encoded in the process (inference tensors) and
# keys read from a store; torch caches the compiled code on disk between processes. Keys on a CPU where the
# kernel library computes their dtype take neither: its pass (cpu_kernels.rerotate) reads each key once.
_rotate_into: Callable[..., None] = _rotate_into_eager
_compiled: Callable[..., None] | None = None
_warmed: set[tuple[torch.dtype, str, int]] = set()  # compiled code is guarded on torch's thread count too


def warm_rotation(dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
    """Compile the re-rotation for keys of ``dtype`` now, not inside a request; stay eager if it cannot be. Nothing
    to compile on a CPU where the kernel library moves keys of ``dtype`` (:func:`~.cpu_kernels.rerotate`)."""
    global _rotate_into, _compiled
    kind = (dtype, str(device), torch.get_num_threads())
    if kind in _warmed or torch.device(device).type == "cpu" and cpu_kernels.block_kernels_run(dtype):
        return
    if _compiled is None:  # made here, not at import: importing the compiler is slow
        _compiled = torch.compile(_rotate_into_eager, dynamic=True)
    try:
        # Sizes all distinct, so that the compiled code assumes no two of them equal.
        layers, heads, tokens, dim = 2, 3, 5, 14  # the angles are [tokens, dim / 2]: 7, also distinct
        with torch.inference_mode(False):  # a block read from a store, even where the caller is in inference mode
            stored = torch.zeros(layers, heads, tokens, dim, dtype=dtype, device=device)
        with torch.inference_mode():  # as requests run: a block written into a cache's slots, as assembly does
            encoded = torch.zeros_like(stored)  # a block encoded in this process
            slots = torch.zeros(layers, 1, heads, 11, dim, dtype=dtype, device=device)[:, 0, :, 6:6 + tokens]
            angles = torch.ones(tokens, dim // 2, device=device), torch.zeros(tokens, dim // 2, device=device)
            for keys in (encoded, stored):
                _compiled(slots, keys, *angles)
    except Exception as exc:  # no C++ compiler, say: correct, only slower
        log.warning("could not compile the key re-rotation (%s: %s); it stays eager", type(exc).__name__, exc)
        return
    _warmed.add(kind)
    _rotate_into = _compiled


def rerotate(keys: torch.Tensor, source: torch.Tensor, target: torch.Tensor, rotary: nn.Module) -> torch.Tensor:
    """Keys ``[..., tokens, head_dim]`` rotated at ``source`` positions, moved to ``target`` positions."""
    return rerotation(source, target, rotary)(keys)
