"""Four-bit copies of a model's weights for one-token passes, where its weights are four- or eight-bit already.

A decode step reads every weight once for a single token, so its time is mostly that read. The
bundled SmolLM2 ships as a GGUF whose layers are Q4_1: within each group of :data:`GROUP` inputs of a
row, every weight is ``scale * q + minimum`` with ``q`` in 0..15. Such a group re-quantizes to the same
``q`` (its minimum and maximum give the scale back), and a four-bit product reads a quarter of the bytes
of bf16 weights. Its embedding matrix, which is also its LM head, is Q8_0: ``scale * q`` with ``q`` in
-127..127. Such a weight is held as the high and low nibbles of ``q + 128``: by the kernel library with one scale
per group (:func:`~.cpu_kernels.pack_eight_bit`), for torch's four-bit kernel as two four-bit halves side by side
read over the input taken twice; a little over half the bytes of bf16.
The product is the kernel library's (:func:`~.cpu_kernels.four_bit_matvec`) where it runs, else torch's
four-bit CPU kernel, which is vectorized for bf16 activations only (in fp32 and fp16 it runs a scalar
loop, slower than the dense product). Either way a copy reads its input rounded to bf16, whatever the
model's dtype, with its scales in bf16, and hands its output back in the input's dtype: in an fp32
model, the precision of a bf16 model's products, at a quarter of the bytes of its fp32 weights.
The dense weights stay for passes of many tokens, where a weight read serves every token and the
matrix units pay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from blockrag.errors import InvalidArgumentError

from . import cpu_kernels

GROUP = 32
"""Inputs per quantization group: Q4_0's and Q4_1's block size."""

KERNEL_DTYPE = torch.bfloat16
"""The activation dtype of both four-bit products (the only one for which torch's is vectorized): copies hold their
scales in it and read their input rounded to it."""

DecodeWeights = Literal["auto", "dense", "4bit"]
DECODE_WEIGHTS: tuple[str, ...] = get_args(DecodeWeights)
"""What one-token passes read: ``auto``, for a model on CPU, four-bit copies of the weights that are four- or
eight-bit already (the same weights, to the bf16 rounding of their scales; products over bf16-rounded inputs), and
elsewhere the model's own; ``dense``, the model's own; ``4bit``, four-bit copies of every weight that fits the
kernel (lossy where a checkpoint is neither)."""


def check_decode_weights(value: str) -> None:
    """Raise :class:`InvalidArgumentError` unless ``value`` is one of :data:`DECODE_WEIGHTS`."""
    if value not in DECODE_WEIGHTS:
        raise InvalidArgumentError(f"decode_weights must be one of {DECODE_WEIGHTS}, got {value!r}")


class FourBitWeights:
    """A weight ``[out, in]`` whose groups of :data:`GROUP` inputs are each ``(q - 8) * scale + zero`` (``q`` in
    0..15), packed for a product with one vector.

    Where the kernel library runs (:func:`~.cpu_kernels.available`) when the copy is made, it is held in the
    library's layout (:func:`~.cpu_kernels.pack_four_bit`), whose product reads it near memory speed; elsewhere, and
    while the library is off (:func:`~.cpu_kernels.disabled`), in torch's packed layout for its four-bit kernel
    (made from the library's on first use then). Both read the input rounded to :data:`KERNEL_DTYPE`, with the
    scales and zeros rounded to it, sum in fp32 and round the output to it.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None):
        self.rows = q.shape[0]
        self.eight_bit = zero is None
        """Whether the weight is an eight-bit one, ``scale * q`` with ``q`` in -127..127 (:func:`eight_bit_weights`,
        given with no ``zero``): the library holds it so (:func:`~.cpu_kernels.pack_eight_bit`), torch's layout as
        two four-bit halves (:func:`_halves`), whose product takes the input twice."""
        if cpu_kernels.available():
            self._tiles = cpu_kernels.pack_eight_bit(q, scale) if self.eight_bit else \
                cpu_kernels.pack_four_bit(q, scale, zero)
            self._torch_layout = None
        else:
            self._tiles, self._torch_layout = None, _torch_layout(*_four_bit_form(q, scale, zero))

    @property
    def tiles(self) -> torch.Tensor | None:
        """The copy in the kernel library's layout, where it is held so and the library runs (else ``None``): what
        its product reads, for callers that run several of the library's steps in one call."""
        return self._tiles if self._tiles is not None and cpu_kernels.available() else None

    def matvec(self, row: torch.Tensor) -> torch.Tensor:
        """The weight times the vector ``row`` ``[in]``, as ``[out]`` in ``row``'s dtype (computed over ``row``
        rounded to :data:`KERNEL_DTYPE`)."""
        same = row.dtype == KERNEL_DTYPE  # a decode step's every product: no conversions to dispatch
        x = row if same else row.to(KERNEL_DTYPE)
        tiles = self.tiles
        if tiles is not None:
            product = cpu_kernels.eight_bit_matvec if self.eight_bit else cpu_kernels.four_bit_matvec
            out = product(tiles, x.contiguous())
        else:
            if self._torch_layout is None:
                unpacked = (*cpu_kernels.unpack_eight_bit(self._tiles), None) if self.eight_bit else \
                    cpu_kernels.unpack_four_bit(self._tiles)
                self._torch_layout = _torch_layout(*_four_bit_form(*unpacked))
            packed, scales_and_zeros = self._torch_layout
            x = torch.cat((x, x)) if self.eight_bit else x.contiguous()
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.view(1, -1), packed, GROUP, scales_and_zeros).view(-1)
        return out if same else out.to(row.dtype)


def _torch_layout(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight ``(q - 8) * scale + zero`` packed for torch's four-bit CPU kernel, with its scales and zeros ``[in
    / GROUP, out, 2]`` in :data:`KERNEL_DTYPE`."""
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2), scales_and_zeros


@dataclass(frozen=True, eq=False)
class FourBitRows:
    """A linear layer's rows ``[start, end)`` of a four-bit copy, which it may share with layers that read the same
    input (a decoder layer's query, key and value projections: one product for three, the kernel's rows being
    independent sums)."""

    weights: FourBitWeights
    start: int
    end: int
    version: int
    """The layer's weight's version counter when it was packed: once the weight changes in place, this copy is stale."""

    def matvec(self, row: torch.Tensor) -> torch.Tensor:
        """The layer's weight times the vector ``row`` ``[in]``, as ``[end - start]``: the whole shared product, cut
        (a decode step reads the layers that share a copy in one product instead)."""
        out = self.weights.matvec(row)
        return out if self.start == 0 and self.end == self.weights.rows else out[self.start:self.end]


def fits(weight: torch.Tensor) -> bool:
    """Whether the CPU kernel takes ``weight``: 2-D on CPU, a float dtype, rows a multiple of 16, whole groups."""
    return (weight.ndim == 2 and weight.device.type == "cpu" and weight.is_floating_point()
            and weight.shape[0] % 16 == 0 and weight.shape[1] % GROUP == 0)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q`` (int32, 0..15, ``[out, in]``), ``scale`` and ``minimum`` (fp32, ``[out, in / GROUP]``) of each group,
    from its minimum and maximum (Q4_1's rule)."""
    groups = weight.detach().float().unflatten(1, (-1, GROUP))
    minimum, maximum = groups.amin(-1), groups.amax(-1)
    scale = (maximum - minimum) / 15
    q = torch.round((groups - minimum[..., None]) / torch.where(scale > 0, scale, 1)[..., None]).clamp_(0, 15)
    return q.to(torch.int32).flatten(1), scale, minimum


def dequantize(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """The fp32 weights ``scale * q + minimum`` of :func:`quantize`'s output."""
    return (q.unflatten(1, (-1, GROUP)) * scale[..., None] + minimum[..., None]).flatten(1)


def is_four_bit(weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> bool:
    """Whether ``weight`` is its groups' ``scale * q + minimum`` to the rounding of its dtype.

    A four-bit weight rounded to the dtype moves by at most half a unit in the last place, and so do the
    minimum and maximum its scale comes from; their sum stays within ``2 * eps * max |w|`` of the group
    (``eps`` the dtype's). A weight that was never four-bit misses its grid by up to half a step, a thirtieth
    of the group's range: well past that bound in a trained layer, whose groups straddle zero.
    """
    groups = weight.detach().float().unflatten(1, (-1, GROUP))
    error = (dequantize(q, scale, minimum).unflatten(1, (-1, GROUP)) - groups).abs().amax(-1)
    return bool((error <= 2 * torch.finfo(weight.dtype).eps * groups.abs().amax(-1)).all())


def quantize_eight_bit(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` (int32, -127..127, ``[out, in]``) and ``scale`` (fp32, ``[out, in / GROUP]``) of each group, from its
    largest magnitude (Q8_0's rule)."""
    groups = weight.detach().float().unflatten(1, (-1, GROUP))
    scale = groups.abs().amax(-1) / 127
    q = torch.round(groups / torch.where(scale > 0, scale, 1)[..., None]).clamp_(-127, 127)
    return q.to(torch.int32).flatten(1), scale


def dequantize_eight_bit(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weights ``scale * q`` of :func:`quantize_eight_bit`'s output."""
    return (q.unflatten(1, (-1, GROUP)) * scale[..., None]).flatten(1)


def is_eight_bit(weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether ``weight`` is its groups' ``scale * q`` to the rounding of its dtype.

    A weight ``q * s`` rounded to the dtype moves by at most half a unit in the last place (``eps / 2`` of it),
    and so does the group's largest, which gives ``scale`` back: ``q`` comes back, or a neighbour where the two
    roundings add up to half a step, and ``scale * q`` stays within ``eps * |w|`` of each weight. A weight that was
    never eight-bit misses its grid by up to half a step whatever its size, so its small weights fail the bound.
    """
    eps, weight = torch.finfo(weight.dtype).eps, weight.detach().float()
    return bool(((dequantize_eight_bit(q, scale) - weight).abs() <= 2 * eps * weight.abs()).all())


def _halves(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weights ``scale * q`` (:func:`quantize_eight_bit`) as two four-bit halves' ``q``, ``scale`` and ``zero``:
    with ``q + 128 = 16 * high + low``, a weight is ``16 * scale * (high - 8) + scale * low``, the high half's scale
    ``16 * scale`` with zero 0 and the low half's ``scale`` with zero ``8 * scale``. Both are the scale times a power
    of two, as exact in :data:`KERNEL_DTYPE` as the scale is."""
    biased = q + 128
    return (torch.cat((biased // 16, biased % 16), dim=1), torch.cat((16 * scale, scale), dim=1),
            torch.cat((torch.zeros_like(scale), 8 * scale), dim=1))


def _four_bit_form(q: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A :class:`FourBitWeights`' weight as torch's four-bit kernel takes it: as given, or an eight-bit one (no
    ``zero``) as its two halves."""
    return _halves(q, scale) if zero is None else (q, scale, zero)


def eight_bit_weights(q: torch.Tensor, scale: torch.Tensor) -> FourBitWeights:
    """The weights ``scale * q`` (:func:`quantize_eight_bit`) as a copy."""
    return FourBitWeights(q, scale, None)


def four_bit_weights(weight: torch.Tensor, *, exact_only: bool) -> FourBitWeights | None:
    """A copy of ``weight`` for the four-bit kernel: exact where it is four-bit already, or eight-bit (as two
    halves); otherwise, unless ``exact_only``, quantized to four bits. ``None`` where the kernel cannot take it
    (or, with ``exact_only``, where it is neither)."""
    if not fits(weight):
        return None
    q, scale, minimum = quantize(weight)
    if not is_four_bit(weight, q, scale, minimum):
        q8, scale8 = quantize_eight_bit(weight)
        if is_eight_bit(weight, q8, scale8):
            return eight_bit_weights(q8, scale8)
        if exact_only:
            return None
    return FourBitWeights(q, scale, minimum + 8 * scale)
