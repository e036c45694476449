"""The stored form of a block: safetensors bytes whose metadata carries a small JSON header.

An entry is a plain safetensors file (inspect it with ``safetensors.safe_open``): tensors
``token_ids`` (int64), ``keys`` and ``values`` in the store's dtype (for int8 also ``keys_step``,
``keys_low``, ``values_step``, ``values_low``), and ``__metadata__["blockrag"]``, a JSON object with
the format version, model fingerprint, context, start position, dtypes, shape and an XXH3-128
checksum over the header's other fields and every tensor's name, dtype, shape and bytes (it guards
against corruption at an order of magnitude the speed of sha256, which cost more than the rest of a
read; it is no defence against a forger, who could recompute any checksum).
Reading parses JSON and the safetensors layout only (checked whole before any tensor is made), so an
entry from an untrusted source cannot run code. The tensors of a block read are views of the entry's
bytes, not copies: read-only, as blockrag uses every block.

Round-trip bounds per element ``x`` restored as ``x'`` (in the block's own dtype):

- ``fp32``: exact for fp32 blocks.
- ``bf16``: ``|x - x'| <= 2**-8 * |x|`` (round to nearest, 8 significant bits).
- ``int8``: asymmetric 8-bit codes as in KIVI, keys per channel (one step and low per layer, head
  and channel, over the block's tokens) and values per token (per layer, head and token, over
  ``head_dim``): ``|x - x'| <= step / 2``, where ``step`` is the group's ``(max - min) / 255``
  rounded up to the fp16 step stored. For SmolLM2 that is 1 byte per element plus 4 bytes of
  value scales per token, layer and head, plus per-block key scales: about 12 KB per token.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from typing import Literal

import safetensors.torch
import torch
import xxhash

from blockrag.engine import Block, block_key

from blockrag.errors import InvalidArgumentError, CorruptEntryError

#: Version 2 replaced version 1's sha256 checksum by XXH3-128; a version 1 entry reads as corrupt.
FORMAT_VERSION = 2

StoreDtype = Literal["auto", "fp32", "bf16", "int8"]
STORE_DTYPES: tuple[StoreDtype, ...] = ("auto", "fp32", "bf16", "int8")

_FLOAT_ENCODINGS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SOURCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SCALE_DTYPES = (torch.float16, torch.float32)
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                       torch.uint8: "U8"}
_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
_ITEM_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "U8": 1}
#: Below this magnitude a group's low and step fit fp16 (max 65504) with room for rounding up.
_FP16_SAFE = 2.0**15
_HEADER_FIELDS = {"format": int, "fingerprint": str, "context": str, "start": int, "dtype": str,
                  "source_dtype": str, "shape": list, "checksum": str}


def resolve_encoding(dtype: StoreDtype, block_dtype: torch.dtype) -> str:
    """The encoding an entry gets: ``auto`` halves fp32 blocks to bf16 and keeps 16-bit blocks as they are."""
    if dtype not in STORE_DTYPES:
        raise InvalidArgumentError(f"store dtype must be one of {STORE_DTYPES}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    return "fp16" if block_dtype == torch.float16 else "bf16"


def _round(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """``x`` in ``dtype``, rounded towards +inf (``up``) or -inf instead of to nearest."""
    r = x.to(dtype)
    off = r.float() < x if up else r.float() > x
    return torch.where(off, torch.nextafter(r, torch.full_like(r, float("inf") if up else float("-inf"))), r)


def quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 codes, steps and lows with ``x ~= low + code * step``, one (step, low) per slice along ``dim``.

    ``low`` is rounded down and ``step`` up to their stored dtype, so the codes 0..255 cover every value.
    """
    x = x.float()
    scale_dtype = torch.float16 if bool(x.abs().max() < _FP16_SAFE) else torch.float32
    low = _round(x.amin(dim, keepdim=True), scale_dtype, up=False)
    step = _round((x.amax(dim, keepdim=True) - low.float()) / 255, scale_dtype, up=True)
    step = step.clamp_min(torch.finfo(scale_dtype).tiny)  # a constant group still divides safely
    codes = ((x - low.float()) / step.float()).round_().clamp_(0, 255).to(torch.uint8)
    return codes, step, low


def dequantize(codes: torch.Tensor, step: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * step.float() + low.float()).to(dtype)


def _layout(header: dict) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
    """Name -> (shape, allowed dtypes) of the tensors an entry with this header must hold."""
    layers, heads, tokens, head_dim = header["shape"]
    shape = (layers, heads, tokens, head_dim)
    if header["dtype"] != "int8":
        kv = (shape, (_FLOAT_ENCODINGS[header["dtype"]],))
        return {"token_ids": ((tokens,), (torch.int64,)), "keys": kv, "values": kv}
    per_channel, per_token = (layers, heads, 1, head_dim), (layers, heads, tokens, 1)
    return {"token_ids": ((tokens,), (torch.int64,)), "keys": (shape, (torch.uint8,)),
            "values": (shape, (torch.uint8,)), "keys_step": (per_channel, _SCALE_DTYPES),
            "keys_low": (per_channel, _SCALE_DTYPES), "values_step": (per_token, _SCALE_DTYPES),
            "values_low": (per_token, _SCALE_DTYPES)}


def _checksum(header: dict, tensors: dict[str, torch.Tensor]) -> str:
    fields = {k: v for k, v in header.items() if k != "checksum"}
    h = xxhash.xxh3_128(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy())  # the stored bytes, without a copy
    return "xxh3_128:" + h.hexdigest()


def encode_entry(block: Block, fingerprint: str, dtype: StoreDtype = "auto") -> bytes:
    """The entry bytes of ``block`` computed by the model ``fingerprint``, stored in ``dtype``."""
    source = str(block.keys.dtype).removeprefix("torch.")
    if source not in _SOURCE_DTYPES or block.values.dtype != block.keys.dtype:
        raise InvalidArgumentError(f"blocks are stored from float32, bfloat16 or float16 KV, got keys {block.keys.dtype} "
                         f"and values {block.values.dtype}")
    encoding = resolve_encoding(dtype, block.keys.dtype)
    keys, values = block.keys.detach().cpu(), block.values.detach().cpu()
    tensors = {"token_ids": block.token_ids.detach().cpu().to(torch.int64).contiguous()}
    if encoding == "int8":
        for name, x, dim in (("keys", keys, 2), ("values", values, 3)):  # KIVI: keys per channel, values per token
            tensors[name], tensors[f"{name}_step"], tensors[f"{name}_low"] = quantize(x, dim)
    else:
        tensors["keys"] = keys.to(_FLOAT_ENCODINGS[encoding]).contiguous()
        tensors["values"] = values.to(_FLOAT_ENCODINGS[encoding]).contiguous()
    header = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "context": block.context, "start": block.start,
              "dtype": encoding, "source_dtype": source, "shape": list(block.keys.shape)}
    header["checksum"] = _checksum(header, tensors)
    return _safetensors_bytes(tensors, {"blockrag": json.dumps(header)})


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """``safetensors.torch.save`` in one copy of the tensor bytes (ingestion writes gigabytes of entries).

    The layout: little-endian u64 header length, JSON header padded with spaces to 8 bytes, then
    each tensor's bytes back to back in the order of the header's offsets.
    """
    described: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        described[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                           "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(described, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return b"".join([len(head).to_bytes(8, "little"), head,
                     *(tensors[name].contiguous().view(-1).view(torch.uint8).numpy() for name in sorted(tensors))])


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _split(data: bytes) -> tuple[dict, dict]:
    """The safetensors description of an entry's tensors and its blockrag header, both size-checked.

    Nothing is allocated from the header's numbers: its length, each tensor's offsets and its
    shape times its dtype's size must all agree with the bytes actually there.
    """
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if not 0 < size <= len(data) - 8:
        raise CorruptEntryError(f"truncated entry ({len(data)} bytes)")
    try:
        described = json.loads(data[8:8 + size])
        header = json.loads(described.pop("__metadata__")["blockrag"])
        spans = sorted((t["data_offsets"][0], t["data_offsets"][1], name) for name, t in described.items())
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CorruptEntryError(f"not a blockrag entry: no readable header ({exc})") from None
    offset = 0
    for begin, end, name in spans:  # back to back from 0, covering the payload exactly
        if begin != offset or not _is_count(end) or end < begin:
            raise CorruptEntryError(f"tensor {name!r} has offsets [{begin}, {end}], expected to start at {offset}")
        offset = end
    if 8 + size + offset != len(data):
        raise CorruptEntryError(f"truncated or extended entry: {len(data)} bytes, its header describes "
                                f"{8 + size + offset}")
    return described, header


def read_header(data: bytes | bytearray) -> dict:
    """The JSON header of an entry, checked for its fields and against the payload's size and layout."""
    return _checked(data)[1]


def _checked(data: bytes | bytearray) -> tuple[dict, dict]:
    """The safetensors description of an entry's tensors and its header, both checked (as :func:`read_header`)."""
    described, header = _split(data)
    if not isinstance(header, dict) or any(not isinstance(header.get(k), t) for k, t in _HEADER_FIELDS.items()):
        raise CorruptEntryError("not a blockrag entry: its header lacks fields")
    if header["format"] != FORMAT_VERSION:
        raise CorruptEntryError(f"entry format {header['format']}, this blockrag reads format {FORMAT_VERSION}")
    valid_shape = len(header["shape"]) == 4 and all(_is_count(n) and n > 0 for n in header["shape"])
    if not valid_shape or header["dtype"] not in (*_FLOAT_ENCODINGS, "int8") or \
            header["source_dtype"] not in _SOURCE_DTYPES:
        raise CorruptEntryError(f"unknown dtype or shape in header: {header['dtype']}, {header['source_dtype']}, "
                                f"{header['shape']}")
    if not _is_count(header["start"]) or header["start"] < 0:
        raise CorruptEntryError(f"invalid start position in header: {header['start']!r}")
    layout = _layout(header)
    found = {name: (t.get("dtype"), t.get("shape"), t["data_offsets"]) for name, t in described.items()}
    expected = {name: ({_SAFETENSORS_DTYPES[d] for d in dtypes}, list(shape)) for name, (shape, dtypes) in layout.items()}
    if found.keys() != expected.keys() or any(
            found[n][0] not in dtypes or found[n][1] != shape or
            found[n][2][1] - found[n][2][0] != math.prod(shape) * _ITEM_BYTES[found[n][0]]
            for n, (dtypes, shape) in expected.items()):
        raise CorruptEntryError(f"tensors {found} do not match the header's {header['dtype']} layout "
                                f"{header['shape']}")
    return described, header


def _tensors(data: bytes | bytearray, described: dict) -> dict[str, torch.Tensor]:
    """The entry's tensors as views of ``data`` (their layout checked by :func:`_checked`).

    Views of ``bytes`` are read-only: torch warns that it cannot enforce that, and blockrag never
    writes a block's tensors. A view whose offset is not a multiple of its element size is copied
    out (only small tensors can be).
    """
    if sys.byteorder != "little":  # safetensors stores little-endian
        return safetensors.torch.load(bytes(data))
    base = 8 + int.from_bytes(data[:8], "little")
    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        for name, t in described.items():
            dtype, offset = _TORCH_DTYPES[t["dtype"]], base + t["data_offsets"][0]
            view = torch.frombuffer(data, dtype=dtype, count=math.prod(t["shape"]), offset=offset).view(t["shape"])
            out[name] = view if offset % view.element_size() == 0 else view.clone()
    return out


def _finite(tensors: dict[str, torch.Tensor], encoding: str) -> bool:
    """Whether the stored floats hold no NaN or infinity (int8 codes are finite; their scales may not be)."""
    names = ("keys", "values") if encoding != "int8" else ("keys_step", "keys_low", "values_step", "values_low")
    # The extremes are NaN where any value is, and infinite where one is: one reduction, not a mask of every value.
    return all(bool(torch.isfinite(torch.stack(torch.aminmax(tensors[name]))).all()) for name in names)


def decode_entry(data: bytes | bytearray, key: str) -> Block:
    """The block stored in ``data`` under ``key``.

    Raises :class:`CorruptEntryError` unless the header, every tensor's shape, dtype and size, the
    checksum, the values (no NaN or infinity, which a checksum recomputed by a faulty writer would
    not catch) and the key (recomputed from the header and token ids) all check out.
    """
    described, header = _checked(data)
    tensors = _tensors(data, described)
    if _checksum(header, tensors) != header["checksum"]:
        raise CorruptEntryError("checksum mismatch: the entry's bytes changed after it was written")
    if not _finite(tensors, header["dtype"]):
        raise CorruptEntryError("the entry holds NaN or infinite values")
    target = _SOURCE_DTYPES[header["source_dtype"]]
    if header["dtype"] == "int8":
        keys, values = (dequantize(tensors[n], tensors[f"{n}_step"], tensors[f"{n}_low"], target)
                        for n in ("keys", "values"))
    else:
        keys, values = tensors["keys"].to(target), tensors["values"].to(target)
    block = Block(tensors["token_ids"], keys, values, header["start"], header["context"])
    stored_key = block_key(header["fingerprint"], block.context, block.token_ids)
    if stored_key != key:
        raise CorruptEntryError(f"foreign entry: it holds the block {stored_key}")
    return block
