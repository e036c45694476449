"""The engine's CPU kernel library. For bf16 on CPUs that compute it natively (AVX512-BF16): one new token's
attention over a bf16 KV cache, a decode step's four-bit products and the small operations of its layers around
them, and a block prompt's two kernels, its question's attention over the blocks assembled before it and the
blocks' keys moved into its cache; for fp32 on CPUs with AVX2 and FMA, those two (:func:`block_kernels_run`).

torch's CPU flash kernel gives a one-token query one task per KV head, so on a few cores some sit idle, and it
reads the cache well below memory speed. ``cpu_kernels.cpp`` splits the keys in chunks over the threads and
reads each key once, with bf16 dot products accumulated in fp32 (AVX512-BF16), an fp32 softmax and fp32 sums
of the values, rounded to bf16 once: what the flash kernel computes, to the rounding of the order of its sums.
A full step of Recycled Attention (:func:`attend_and_recycle`) also keeps the scores it computes and chooses the
recycle set from them in the same library, where torch would score every key a second time to rank them.
A layer's norms with the residual sums before them, its rotation and its SiLU activation (:func:`add_rms_norm`,
:func:`rotate`, :func:`silu_mul`) are one call each, where torch dispatches a dozen small operations: on CPU a
good part of a step's time. A decode step reads every weight once; torch's four-bit kernel reads them well below
memory speed, :func:`four_bit_matvec` near it (sixteen rows at a time, each nibble turned into a bf16 dot-product
operand by one logic operation); :func:`mlp_after_attention` runs a layer's calls after its attention as one, and
:func:`decode_layer` a whole layer where its attention reads one run of rows (the cache, a recycle set, a window).
:func:`prefix_attention` runs the many query rows of a block prompt's question over the keys before it (the
prefill's largest part at long contexts), packing each chunk of keys and values once for every row of its head,
where torch's flash kernel multiplies small blocks one at a time; in fp32 it reads the keys in place against the
head's query rows transposed once, so that part runs near the CPU's fp32 arithmetic speed where a model computes in
fp32. :func:`rerotate` moves a block's keys into a request's cache in one pass.

The source is compiled on first use for this machine (``-march=native``) with the C++ compiler torch would use
(``$CXX``, else ``c++``), into ``kernels/`` of :func:`~.model.blockrag_home`, and loaded with ``ctypes``; torch's
own OpenMP runtime runs its threads. :func:`~.model.load_model` builds it when it loads a model on CPU, so the few
seconds this takes once per machine stay out of the first answer's time. Where there is no compiler or
``BLOCKRAG_CPU_KERNELS=0`` is set, nothing here runs; where the CPU lacks AVX512-BF16, none of the bf16 kernels
(:func:`available` is false, the attention functions return ``None`` for bf16, :func:`fuses` is false); where it
lacks AVX2 and FMA, not the fp32 ones (:func:`prefix_attention` returns ``None`` for fp32). Callers then use
torch's operations.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from blockrag.errors import InvalidArgumentError

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_library: ctypes.CDLL | None = None
_features = 0
"""What the library built here runs (``blockrag_features``): :data:`_BF16`, all of the bf16 kernels (AVX512-BF16);
:data:`_F32`, the fp32 ones of a block prompt (AVX2 and FMA)."""
_BF16, _F32 = 1, 2
_loaded = False
_enabled = os.environ.get("BLOCKRAG_CPU_KERNELS", "1") != "0"


def _cpu_description() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _build() -> tuple[ctypes.CDLL | None, int]:
    """The kernel library, compiled once per source, compiler and CPU, and what it runs here; ``(None, 0)`` where it
    cannot be built or runs nothing."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        return None, 0
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + compiler.encode() + " ".join(_FLAGS).encode() + _cpu_description().encode())
    from .model import blockrag_home  # the model module imports this one through the transformer module

    folder = blockrag_home() / "kernels"
    target = folder / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as scratch:
                built = Path(scratch) / target.name
                subprocess.run([compiler, *_FLAGS, "-o", str(built), str(_SOURCE)], check=True,
                               capture_output=True, timeout=300)
                os.replace(built, target)  # atomic: processes building at once each leave a whole library
        except (OSError, subprocess.SubprocessError):
            return None, 0
    try:
        library = ctypes.CDLL(str(target))
    except OSError:  # not loadable here (a library from another system in a shared home, say)
        return None, 0
    features = library.blockrag_features()
    pointer, count, integer, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    if features & _F32:
        library.blockrag_prefix_scratch_f32.restype = count
        library.blockrag_prefix_scratch_f32.argtypes = [count, integer, count, integer, integer]
        library.blockrag_prefix_attention_f32.argtypes = ([pointer] * 3 + [count] * 3 + [integer, count, integer]
                                                          + [real] + [pointer] * 3 + [integer])
        library.blockrag_rerotate_f32.restype = None
        library.blockrag_rerotate_f32.argtypes = [pointer] * 6 + [count] * 4 + [integer]
    if not features & _BF16:
        return (library, features) if features else (None, 0)
    library.blockrag_scratch_floats.restype = count
    library.blockrag_scratch_floats.argtypes = [count] + [integer] * 3
    library.blockrag_decode_attention.argtypes = ([pointer] * 3 + [count] * 3 + [integer] * 3 + [real] + [pointer] * 4
                                                  + [integer])
    library.blockrag_add_rms_norm.restype = library.blockrag_rotate.restype = library.blockrag_silu_mul.restype = None
    library.blockrag_add_rms_norm.argtypes = [pointer] * 3 + [count] * 2 + [real, pointer]
    library.blockrag_rotate.argtypes = [pointer] * 3 + [count] * 2 + [pointer]
    library.blockrag_silu_mul.argtypes = [pointer, count, pointer]
    library.blockrag_recycle_scratch.restype = count
    library.blockrag_recycle_scratch.argtypes = [count, integer, integer]
    library.blockrag_recycle_set.restype = None
    library.blockrag_recycle_set.argtypes = ([pointer] * 2 + [integer] * 2 + [count, integer] + [count] * 4
                                             + [pointer] * 2 + [integer])
    library.blockrag_gather_rows.restype = None
    library.blockrag_gather_rows.argtypes = ([pointer] * 2 + [count] * 2 + [pointer, integer, count, integer]
                                             + [pointer] * 2 + [count] * 2 + [integer])
    library.blockrag_prefix_scratch.restype = count
    library.blockrag_prefix_scratch.argtypes = [count, integer, count, integer, integer]
    library.blockrag_prefix_attention.argtypes = ([pointer] * 3 + [count] * 3 + [integer, count, integer] + [real]
                                                  + [pointer] * 3 + [integer])
    library.blockrag_rerotate.restype = None
    library.blockrag_rerotate.argtypes = [pointer] * 6 + [count] * 4 + [integer]
    library.blockrag_four_bit_matvec.restype = None
    library.blockrag_four_bit_matvec.argtypes = [pointer] + [count] * 2 + [pointer] * 2 + [integer]
    library.blockrag_eight_bit_matvec.restype = None
    library.blockrag_eight_bit_matvec.argtypes = library.blockrag_four_bit_matvec.argtypes
    library.blockrag_project_qkv.restype = None
    library.blockrag_project_qkv.argtypes = ([pointer] * 3 + [real, count] + [pointer] * 3 + [integer] * 3
                                             + [pointer, integer])
    library.blockrag_decode_layer.argtypes = ([pointer] * 3 + [real, count] + [pointer] * 3 + [integer] * 3
                                              + [pointer, integer] + [pointer] * 2 + [count] * 3 + [pointer] * 2 + [count] * 4 + [real]
                                              + [pointer] * 2 + [real, pointer, count] + [pointer] * 3
                                              + [count, integer] + [count] * 3 + [pointer] * 2 + [count] * 2 + [integer])
    library.blockrag_query_similarity.restype = ctypes.c_double
    library.blockrag_query_similarity.argtypes = [pointer, count, count, pointer, pointer]
    library.blockrag_mlp_after_attention.restype = None
    library.blockrag_mlp_after_attention.argtypes = ([pointer] * 3 + [count, pointer, count, real, pointer, count]
                                                     + [pointer, count, pointer, pointer, integer])
    return library, features


def _runs(feature: int) -> bool:
    """Whether the library runs ``feature`` here (compiling it on the first call) and is not turned off."""
    global _library, _features, _loaded
    if not _loaded:
        (_library, _features), _loaded = _build(), True
    return _enabled and bool(_features & feature)


def available() -> bool:
    """Whether the library's bf16 kernels run here (compiling it on the first call) and are not turned off."""
    return _runs(_BF16)


def block_kernels_run(dtype: torch.dtype) -> bool:
    """Whether the kernels of a block prompt, :func:`prefix_attention` and :func:`rerotate`, compute ``dtype`` here
    (bf16 or fp32) rather than declining it."""
    return _runs(_BF16) if dtype == torch.bfloat16 else dtype == torch.float32 and _runs(_F32)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run torch's own operations instead of the library's inside the block (benchmarks and tests compare the
    two); decode steps built before it are built again (:class:`~.transformer.DecodeStep`)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def applies(dtype: torch.dtype, device: torch.device, head_dim: int, group: int) -> bool:
    """Whether a model's decode steps, of this dtype, device, head size and query heads per KV head, run the kernel."""
    return (dtype == torch.bfloat16 and device.type == "cpu" and head_dim in (16, 32, 64, 128) and 1 <= group <= 8
            and available())


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                     with_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Attention of one token's ``query`` ``[1, heads, 1, d]`` over all of ``keys``/``values`` ``[1, kv_heads, s,
    d]``, and with ``with_lse`` the log-sum-exp of each query head's scaled scores ``[1, kv_heads, group]``.

    ``None`` where the kernel does not apply: not bf16 on CPU, under autograd, a batch, an unsupported head size
    or group, keys or values whose rows are not contiguous or laid out differently, or no kernel here.
    """
    done = _attend(query, keys, values, scaling, with_lse, with_logits=False)
    return None if done is None else done[:2]


def attend_and_recycle(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, k: int,
                       pool_kernel: int, sinks: int, kept: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A full step of Recycled Attention: :func:`decode_attention` of ``query``, and each KV head's recycle set
    ``[kv_heads, k]``, ascending positions, chosen from the scores the kernel computed on the way.

    A position scores the largest log-probability its group's query heads give it, max-pooled over the
    ``pool_kernel`` positions centred on it; the first ``sinks`` positions and those in ``kept`` (``[first,
    end)``) are chosen whatever they score, and the highest-scoring of the rest fill the ``k`` places (among equal
    scores, the earliest). ``None`` where :func:`decode_attention` would be.
    """
    length = keys.shape[2]
    if not 0 < k <= length:
        raise InvalidArgumentError(f"a recycle set of {k} positions out of {length}")
    done = _attend(query, keys, values, scaling, with_lse=True, with_logits=True)
    if done is None:
        return None
    out, lse, logits = done
    kv_heads, group = logits.shape[:2]
    positions = torch.empty(kv_heads, k, dtype=torch.int64)
    scratch = torch.empty(_library.blockrag_recycle_scratch(length, kv_heads, pool_kernel), dtype=torch.float32)
    _library.blockrag_recycle_set(logits.data_ptr(), lse.data_ptr(), kv_heads, group, length, pool_kernel, k, sinks,
                                  kept[0], kept[1], scratch.data_ptr(), positions.data_ptr(), torch.get_num_threads())
    return out, positions


PREFIX_ROWS = 2048
"""The most query rows per KV head (query heads of a group times tokens) :func:`prefix_attention` takes: its
per-thread scores grow with them."""


def prefix_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     scaling: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention of each KV head's query rows ``query`` ``[1, kv_heads, rows, d]`` over all of ``keys``/``values``
    ``[1, kv_heads, s, d]``, unmasked, and each row's log-sum-exp of its scaled scores ``[1, kv_heads, rows]``: a
    question's tokens over the blocks before them, as torch's CPU flash kernel computes it. In bf16: bf16 dot
    products summed in fp32, an fp32 softmax whose probabilities are rounded to bf16 for their products with the
    values, each chunk of keys packed once for every row of its head. In fp32: fp32 throughout, keys read in place.

    ``None`` where it does not apply: neither bf16 nor fp32 (all three alike) on CPU, under autograd, a batch, a
    head size other than 32, 64 or 128 (bf16) or 16, 32, 64 or 128 (fp32), more than :data:`PREFIX_ROWS` rows, keys
    or values laid out differently, rows of bf16 keys not starting at even elements (read in pairs), or the
    library does not compute the dtype here (:func:`block_kernels_run`).
    """
    b, kv_heads, rows, d = query.shape
    length = keys.shape[2]
    dtype = query.dtype
    bf16 = dtype == torch.bfloat16
    if not (keys.dtype == values.dtype == dtype and query.device.type == "cpu" and b == 1
            and d in ((32, 64, 128) if bf16 else (16, 32, 64, 128)) and 0 < rows <= PREFIX_ROWS and length > 0
            and keys.shape[1] == kv_heads and not torch.is_grad_enabled() and keys.stride() == values.stride()
            and keys.stride(3) == 1 and keys.stride(2) >= d
            and (not bf16 or keys.stride(2) % 2 == keys.stride(1) % 2 == keys.data_ptr() % 4 == 0)
            and block_kernels_run(dtype)):
        return None
    query = query.contiguous()
    out = torch.empty_like(query)
    lse = torch.empty(1, kv_heads, rows, dtype=torch.float32)
    threads = torch.get_num_threads()
    scratch_floats, attend = ((_library.blockrag_prefix_scratch, _library.blockrag_prefix_attention) if bf16 else
                              (_library.blockrag_prefix_scratch_f32, _library.blockrag_prefix_attention_f32))
    scratch = torch.empty(scratch_floats(length, kv_heads, rows, d, threads), dtype=torch.float32)
    attend(query.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.stride(1), keys.stride(2), length, kv_heads,
           rows, d, scaling, out.data_ptr(), lse.data_ptr(), scratch.data_ptr(), threads)
    return out, lse


def gather_rows(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, to_keys: torch.Tensor,
                to_values: torch.Tensor) -> bool:
    """Copy each KV head's rows of ``keys``/``values`` ``[1, kv_heads, s, d]`` at its ``positions`` ``[kv_heads,
    k]`` (int64), in that order, into its first ``k`` rows of ``to_keys``/``to_values``, on torch's threads: a
    recycle set into its buffer. ``False``, copying nothing, where that is not bf16 rows laid out alike on a CPU
    where the library runs (or ``positions`` not contiguous int64), for the caller to copy them itself."""
    kv_heads, k = positions.shape
    if not (keys.dtype == values.dtype == to_keys.dtype == to_values.dtype == torch.bfloat16 and keys.shape[0] == 1
            and keys.device.type == "cpu"
            and positions.dtype == torch.int64 and positions.is_contiguous() and keys.stride() == values.stride()
            and to_keys.stride() == to_values.stride() and keys.stride(3) == to_keys.stride(3) == 1
            and to_keys.shape[2] >= k and available()):
        return False
    _library.blockrag_gather_rows(keys.data_ptr(), values.data_ptr(), keys.stride(1), keys.stride(2),
                                  positions.data_ptr(), kv_heads, k, keys.shape[3], to_keys.data_ptr(),
                                  to_values.data_ptr(), to_keys.stride(1), to_keys.stride(2), torch.get_num_threads())
    return True


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, with_lse: bool,
            with_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """The kernel's output, log-sum-exps ``[1, kv_heads, group]`` and scaled scores ``[kv_heads, group, s]`` (each
    where asked for), or ``None`` where it does not apply (:func:`decode_attention`)."""
    b, heads, n, d = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    if not (query.dtype == keys.dtype == values.dtype == torch.bfloat16 and b == 1 and n == 1 and length > 0
            and not torch.is_grad_enabled() and keys.stride() == values.stride() and keys.stride(3) == 1
            and keys.stride(2) >= d and applies(query.dtype, query.device, d, group)):
        return None
    query = query.contiguous()
    out = torch.empty_like(query)
    lse = torch.empty(1, kv_heads, group, dtype=torch.float32) if with_lse else None
    logits = torch.empty(kv_heads, group, length, dtype=torch.float32) if with_logits else None
    scratch = torch.empty(_library.blockrag_scratch_floats(length, kv_heads, group, d), dtype=torch.float32)
    status = _library.blockrag_decode_attention(
        query.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.stride(1), keys.stride(2), length, kv_heads, group,
        d, scaling, out.data_ptr(), lse.data_ptr() if lse is not None else None,
        logits.data_ptr() if logits is not None else None, scratch.data_ptr(), torch.get_num_threads())
    if status:
        return None
    return out, lse, logits


def fuses(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a decode step of this dtype and device runs its small operations here: :func:`add_rms_norm`,
    :func:`rotate` and :func:`silu_mul`, each one call in place of several of torch's."""
    return dtype == torch.bfloat16 and device.type == "cpu" and available()


# The three functions below take contiguous bf16 CPU tensors (where fuses() holds) and check nothing: they run
# in every layer of every decode step, whose caller made sure of that once per model.

def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Each row of ``hidden`` (rows of ``weight``'s size) RMS-normalised and times ``weight``, after ``hidden +=
    delta`` in place where ``delta`` is given: torch's ``hidden + delta``, then ``torch.rms_norm(hidden, ...) *
    weight``, in one pass, each result rounded to bf16 as torch rounds it."""
    out = torch.empty_like(hidden)
    n = weight.shape[0]
    _library.blockrag_add_rms_norm(hidden.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                                   hidden.numel() // n, n, eps, out.data_ptr())
    return out


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Each row of ``x`` ``[..., d]`` rotated by one position's ``cos`` and ``signed_sin`` ``[d]``: what
    :func:`~.transformer._rotate` computes, operation by operation."""
    out = torch.empty_like(x)
    d = x.shape[-1]
    _library.blockrag_rotate(x.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), x.numel() // d, d, out.data_ptr())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` ``[2n]``, gate then up: silu in fp32, rounded to bf16 before the product
    as torch rounds it (its exponential within about 1e-7 of torch's, so the two differ where that moves a rounding)."""
    n = gate_up.shape[0] // 2
    out = torch.empty(n, dtype=gate_up.dtype)
    _library.blockrag_silu_mul(gate_up.data_ptr(), n, out.data_ptr())
    return out


FOUR_BIT_TILE = 16
"""Rows of a four-bit weight per tile of :func:`pack_four_bit`'s layout: a weight's rows must be a multiple of it."""
FOUR_BIT_GROUP = 32
"""Inputs per quantization group of :func:`pack_four_bit`'s layout: a weight's inputs must be a multiple of it."""
_NIBBLES = torch.tensor([1, 16, 256, 4096], dtype=torch.int32)


def query_similarity(query: torch.Tensor, anchor: torch.Tensor | None) -> tuple[torch.Tensor, float | None]:
    """The mean over heads of ``query`` (contiguous bf16 ``[1, heads, 1, d]``) in fp32 ``[d]``, as torch's
    ``query[0, :, -1].float().mean(0)`` gives it, and its cosine similarity to ``anchor`` (fp32 ``[d]``) where given:
    what the dynamic schedule of Recycled Attention checks in a layer, in one call where torch makes several."""
    heads, d = query.shape[1], query.shape[3]
    mean = torch.empty(d, dtype=torch.float32)
    similarity = _library.blockrag_query_similarity(query.data_ptr(), heads, d,
                                                    None if anchor is None else anchor.data_ptr(), mean.data_ptr())
    return mean, None if anchor is None else similarity


def _nibble_planes(q: torch.Tensor) -> torch.Tensor:
    """``q`` (int, ``[rows, inputs]`` in 0..15) as the library's words of nibbles: int16 ``[rows / 16, groups, 128]``,
    per tile of 16 rows and group nibble ``j`` of lane ``2r + e`` of word ``c`` holding row ``r``'s input ``8c + 2j
    + e``."""
    rows, inputs = q.shape
    tiles, groups = rows // FOUR_BIT_TILE, inputs // FOUR_BIT_GROUP
    nibbles = q.to(torch.int32).view(tiles, FOUR_BIT_TILE, groups, 4, 4, 2).permute(0, 2, 3, 1, 5, 4)
    words = (nibbles * _NIBBLES).sum(-1)
    return torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16).reshape(tiles, groups, 128)


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """``q`` (int32 ``[rows, inputs]``) of :func:`_nibble_planes`'s words ``[tiles, groups, 128]``."""
    count, groups = words.shape[:2]
    nibbles = (words.to(torch.int32).view(count, groups, 4, FOUR_BIT_TILE, 2, 1) & 0xFFFF) // _NIBBLES % 16
    return nibbles.permute(0, 3, 1, 2, 5, 4).reshape(count * FOUR_BIT_TILE, groups * FOUR_BIT_GROUP)


def _per_tile(values: torch.Tensor) -> torch.Tensor:
    """Per-row, per-group ``values`` ``[rows, groups]`` in bf16 as int16 ``[tiles, groups, 16]``."""
    rows, groups = values.shape
    return values.to(torch.bfloat16).view(torch.int16).view(rows // FOUR_BIT_TILE, FOUR_BIT_TILE, groups).transpose(1, 2)


def _per_row(values: torch.Tensor) -> torch.Tensor:
    """:func:`_per_tile`'s ``[tiles, groups, 16]`` back as bf16 ``[rows, groups]``."""
    count, groups = values.shape[:2]
    return values.contiguous().view(torch.bfloat16).transpose(1, 2).reshape(count * FOUR_BIT_TILE, groups)


def pack_four_bit(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The weight ``(q - 8) * scale + zero`` (``q`` int ``[rows, inputs]`` in 0..15, ``scale`` and ``zero`` ``[rows,
    inputs / 32]``, one per group of 32 inputs of a row: torch's four-bit form, whose zero is small beside the
    group's minimum and so loses less to its rounding) in the layout :func:`four_bit_matvec` reads: int16 ``[rows
    / 16, groups, 160]``, per tile of 16 rows and group its four-bit values (:func:`_nibble_planes`), then the rows'
    scales and zeros rounded to bf16."""
    return torch.cat((_nibble_planes(q), _per_tile(scale), _per_tile(zero)), -1).contiguous()


def unpack_four_bit(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q`` (int32), ``scale`` and ``zero`` (bf16) of a weight in :func:`pack_four_bit`'s layout."""
    return _nibbles(tiles[..., :128]), _per_row(tiles[..., 128:144]), _per_row(tiles[..., 144:])


def pack_eight_bit(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weight ``scale * q`` (``q`` int ``[rows, inputs]`` in -127..127, ``scale`` ``[rows, inputs / 32]``: Q8_0's
    form) in the layout :func:`eight_bit_matvec` reads: int16 ``[rows / 16, groups, 272]``, per tile of 16 rows and
    group the high and the low nibbles of ``q + 128`` (:func:`_nibble_planes`), then the rows' scales in bf16."""
    biased = q.to(torch.int32) + 128
    return torch.cat((_nibble_planes(biased // 16), _nibble_planes(biased % 16), _per_tile(scale)), -1).contiguous()


def unpack_eight_bit(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` (int32) and ``scale`` (bf16) of a weight in :func:`pack_eight_bit`'s layout."""
    return 16 * _nibbles(tiles[..., :128]) + _nibbles(tiles[..., 128:256]) - 128, _per_row(tiles[..., 256:])


def four_bit_matvec(tiles: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The weight ``tiles`` (:func:`pack_four_bit`) times ``row`` (contiguous bf16 ``[inputs]``), ``[rows]`` in bf16:
    each group's products summed in fp32, scaled and offset in fp32, the output rounded once (where
    :func:`available`)."""
    return _nibble_matvec(_library.blockrag_four_bit_matvec, tiles, row)


def eight_bit_matvec(tiles: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The weight ``tiles`` (:func:`pack_eight_bit`) times ``row`` (contiguous bf16 ``[inputs]``), ``[rows]`` in
    bf16: each group's products summed in fp32, scaled in fp32, the output rounded once (where :func:`available`)."""
    return _nibble_matvec(_library.blockrag_eight_bit_matvec, tiles, row)


def _nibble_matvec(product, tiles: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    out = torch.empty(tiles.shape[0] * FOUR_BIT_TILE, dtype=torch.bfloat16)
    product(tiles.data_ptr(), tiles.shape[0], tiles.shape[1], row.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


def rerotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> bool:
    """Write ``keys`` ``[..., tokens, d]`` (at most four dimensions) rotated by ``cos`` and ``sin`` (fp32 ``[tokens,
    d / 2]``, one angle per pair ``(i, i + d / 2)``) into ``out`` in one pass on torch's threads: blocks moved into a
    request's cache. bf16 keys are rotated in fp32 and rounded to bf16 once; fp32 keys as torch's eager operations
    round them, to the bit. ``False``, writing nothing, where that is not bf16 or fp32 keys and output of one dtype
    on a CPU where the library computes it (:func:`block_kernels_run`), with rows contiguous, without autograd."""
    if not (keys.dtype == out.dtype and keys.device.type == "cpu" and keys.shape == out.shape
            and 3 <= keys.dim() <= 4 and keys.stride(-1) == out.stride(-1) == 1 and keys.shape[-1] % 2 == 0
            and cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
            and cos.shape == sin.shape == (keys.shape[-2], keys.shape[-1] // 2)
            and not (torch.is_grad_enabled() and keys.requires_grad) and block_kernels_run(keys.dtype)):
        return False
    if keys.dim() == 3:
        keys, out = keys[None], out[None]
    strides = torch.tensor([*keys.stride()[:3], *out.stride()[:3]], dtype=torch.int64)
    move = _library.blockrag_rerotate if keys.dtype == torch.bfloat16 else _library.blockrag_rerotate_f32
    move(keys.data_ptr(), strides.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), strides.data_ptr() + 24,
         *keys.shape, torch.get_num_threads())
    return True


def mlp_after_attention(attended: torch.Tensor, hidden: torch.Tensor, o_tiles: torch.Tensor, norm: torch.Tensor,
                        eps: float, gate_up_tiles: torch.Tensor, down_tiles: torch.Tensor) -> torch.Tensor:
    """A decoder layer's work after its attention in one call, for a decode step: the output product of
    ``attended`` (the attention's output, ``[heads x head_dim]``), ``hidden += `` it in place and its RMS norm times
    ``norm``, the gate and up products (``gate_up_tiles``, gate rows then up rows), the SiLU gate and the down
    product, returned: :func:`four_bit_matvec`, :func:`add_rms_norm`, :func:`four_bit_matvec`, :func:`silu_mul` and
    :func:`four_bit_matvec` in that order, without returning to Python between them (contiguous bf16 tensors, the
    weights in :func:`pack_four_bit`'s layout; nothing is checked)."""
    n, width = hidden.shape[-1], gate_up_tiles.shape[0] * FOUR_BIT_TILE // 2
    delta = torch.empty(n, dtype=torch.bfloat16)
    scratch = torch.empty(2 * n + 3 * width, dtype=torch.bfloat16)
    _library.blockrag_mlp_after_attention(attended.data_ptr(), hidden.data_ptr(), o_tiles.data_ptr(), o_tiles.shape[1],
                                          norm.data_ptr(), n, eps, gate_up_tiles.data_ptr(), width,
                                          down_tiles.data_ptr(), down_tiles.shape[1], delta.data_ptr(),
                                          scratch.data_ptr(), torch.get_num_threads())
    return delta


class KVRows:
    """One layer's keys and values ``[1, kv_heads, rows, d]`` (bf16, laid out alike, rows contiguous) as
    :func:`decode_layer` addresses them: where each begins, and the elements between heads and between rows. It
    holds the tensors, so that the addresses stay theirs."""

    __slots__ = ("tensors", "keys", "values", "head_stride", "row", "kv_heads")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.tensors = (keys, values)
        self.keys, self.values = keys.data_ptr(), values.data_ptr()
        self.head_stride, self.row, self.kv_heads = keys.stride(1), keys.stride(2), keys.shape[1]

    @staticmethod
    def fit(keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Whether :func:`decode_layer` can write into and read ``keys`` and ``values``."""
        return (keys.dtype == values.dtype == torch.bfloat16 and keys.device.type == "cpu" and keys.dim() == 4
                and keys.shape == values.shape and keys.shape[0] == 1 and keys.stride() == values.stride()
                and keys.stride(3) == 1 and keys.stride(2) >= keys.shape[3])


class LayerWeights:
    """A decoder layer's weights as :func:`decode_layer` reads them: its input norm's weight and epsilon, its query,
    key and value product (:func:`pack_four_bit`'s layout, query rows then key rows then value rows), its heads,
    KV heads, head size and attention scaling, then what :func:`mlp_after_attention` reads. It holds the tensors,
    so that their addresses stay theirs, and the thread count the calls run on."""

    __slots__ = ("tensors", "args", "projection_size", "query")

    def __init__(self, norm: torch.Tensor, eps: float, qkv_tiles: torch.Tensor, heads: int, kv_heads: int,
                 head_dim: int, scaling: float, o_tiles: torch.Tensor, post_norm: torch.Tensor, post_eps: float,
                 gate_up_tiles: torch.Tensor, down_tiles: torch.Tensor):
        self.tensors = (norm, qkv_tiles, o_tiles, post_norm, gate_up_tiles, down_tiles)
        width, n = gate_up_tiles.shape[0] * FOUR_BIT_TILE // 2, norm.shape[0]
        self.args = (norm.data_ptr(), eps, n, qkv_tiles.data_ptr(), heads, kv_heads, head_dim,
                     scaling, o_tiles.data_ptr(), post_norm.data_ptr(), post_eps, gate_up_tiles.data_ptr(), width,
                     down_tiles.data_ptr(), torch.get_num_threads())
        self.projection_size = n + (2 * heads + 3 * kv_heads) * head_dim
        """bf16 elements of :func:`project_qkv`'s output: the norm, the product, the rotated query and key."""
        self.query = (n, heads, head_dim)
        """Where the product's query lies in that output, and its heads and head size."""

class RecycleChoice(NamedTuple):
    """A full step's recycle set as :func:`decode_layer` chooses it from the scores of its attention, by the rule of
    :func:`attend_and_recycle` (``k`` positions per KV head, scores pooled over ``pool``, the first ``sinks`` and
    those in ``kept`` always in): written ascending into ``positions`` ``[kv_heads, k]`` (contiguous int64), their
    rows copied into the first ``k`` rows of ``rows``."""

    positions: torch.Tensor
    k: int
    pool: int
    sinks: int
    kept: tuple[int, int]
    rows: KVRows


def project_qkv(hidden: torch.Tensor, delta: torch.Tensor | None, layer: LayerWeights, angles: tuple[int, int],
                projection: torch.Tensor) -> torch.Tensor:
    """The first part of :func:`decode_layer`, for a step whose query decides where it attends: ``hidden += delta``
    in place (where given), its RMS norm, the query, key and value product and the rotation of query and key into
    ``projection`` (bf16 ``[layer.projection_size]``). Returns the query before rotation, ``[1, heads, 1, d]``."""
    in_norm, in_eps, n, qkv, heads, kv_heads, dim = layer.args[:7]
    _library.blockrag_project_qkv(hidden.data_ptr(), None if delta is None else delta.data_ptr(), in_norm, in_eps, n,
                                  qkv, *angles, heads, kv_heads, dim, projection.data_ptr(), layer.args[-1])
    first, heads, dim = layer.query
    return projection[first:first + heads * dim].view(1, heads, 1, dim)


def decode_layer(hidden: torch.Tensor, delta: torch.Tensor | None, layer: LayerWeights, angles: tuple[int, int],
                 projection: torch.Tensor, projected: bool, into: KVRows, at: int, also: KVRows | None, also_at: int,
                 length: int, choice: RecycleChoice | None, delta_out: torch.Tensor) -> None:
    """A decoder layer of a decode step in one call, where its attention reads one run of rows: :func:`project_qkv`
    into ``projection`` with the position's ``angles`` (the addresses of its bf16 cos and signed sin) unless
    ``projected``, the new key and value written at row ``at`` of ``into`` and, where given, at row ``also_at`` of
    ``also``, the query's attention over the first ``length`` rows of the last of them written (and with
    ``choice``, a recycle set chosen from its scores), and :func:`mlp_after_attention` into ``delta_out``: what
    :func:`add_rms_norm`, :func:`four_bit_matvec`, :func:`rotate`, the copies, :func:`decode_attention`
    (:func:`attend_and_recycle` and :func:`gather_rows`) and :func:`mlp_after_attention` compute in that order
    (contiguous bf16 ``hidden``, ``delta`` and ``delta_out``; nothing is checked)."""
    second = (None, None, 0, 0, 0) if also is None else (also.keys, also.values, also.head_stride, also.row, also_at)
    chosen = (None, 0, 1, 0, 0, 0, None, None, 0, 0) if choice is None else (
        choice.positions.data_ptr(), choice.k, choice.pool, choice.sinks, *choice.kept, choice.rows.keys,
        choice.rows.values, choice.rows.head_stride, choice.rows.row)
    in_norm, in_eps, n, qkv, heads, kv_heads, dim, scaling, o, post_norm, post_eps, gate_up, m, down, threads = \
        layer.args
    _library.blockrag_decode_layer(hidden.data_ptr(), None if delta is None else delta.data_ptr(), in_norm, in_eps,
                                   n, qkv, *angles, heads, kv_heads, dim, projection.data_ptr(), projected, into.keys,
                                   into.values, into.head_stride, into.row, at, *second, length, scaling, o,
                                   post_norm, post_eps, gate_up, m, down, delta_out.data_ptr(), *chosen, threads)
