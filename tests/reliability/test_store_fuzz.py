"""Seeded corruption of stored entries: none served, none crashes, none allocates what a forged header claims."""

from __future__ import annotations

import json
import logging
import math
import random
import resource

import pytest
import torch

from blockrag.engine import Block, block_key
from blockrag.kvstore import DiskKVStore, encode_entry
from blockrag.kvstore.entry import _checksum, _safetensors_bytes

pytestmark = pytest.mark.reliability

MODEL = "0123456789abcdef01234567"
OTHER_MODEL = "fedcba9876543210fedcba98"
CONTEXT = "89abcdef0123456789abcdef"
HUGE = (2**62, 2**40, 2**31 + 7, 1 << 28)
NEGATIVE = (-1, -(2**40), 0)


def _block(seed: int) -> Block:
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(2, 2, 12, 16, generator=g), torch.randn(2, 2, 12, 16, generator=g)
    return Block(torch.randint(0, 49152, (12,), generator=g), keys, values, 9, CONTEXT)


def _parts(entry: bytes) -> tuple[dict, bytes]:
    size = int.from_bytes(entry[:8], "little")
    return json.loads(entry[8:8 + size]), entry[8 + size:]


def _join(described: dict, payload: bytes) -> bytes:
    head = json.dumps(described, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + payload


def _tensors(entry: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    import safetensors.torch
    described, _ = _parts(entry)
    return json.loads(described["__metadata__"]["blockrag"]), dict(safetensors.torch.load(entry))


def _forged(header: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """An entry whose checksum is recomputed over the edits: what a faulty or hostile writer makes."""
    header = dict(header)
    header["checksum"] = _checksum(header, tensors)
    return _safetensors_bytes(tensors, {"blockrag": json.dumps(header)})


def flip_bytes(rng, entry, block):
    data = bytearray(entry)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    return bytes(data)


def truncate(rng, entry, block):
    return entry[:rng.randrange(len(entry))]


def extend(rng, entry, block):
    return entry + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))


def header_length(rng, entry, block):
    return rng.choice((*HUGE, 0, len(entry), len(entry) - 7)).to_bytes(8, "little") + entry[8:]


def tensor_shape(rng, entry, block):
    described, payload = _parts(entry)
    name = rng.choice([n for n in described if n != "__metadata__"])
    shape = described[name]["shape"]
    shape[rng.randrange(len(shape))] = rng.choice((*HUGE, *NEGATIVE))
    if rng.random() < 0.5:  # offsets made to agree with the forged shape, claiming gigabytes
        start = described[name]["data_offsets"][0]
        described[name]["data_offsets"][1] = start + max(1, math.prod(shape)) * 4
    return _join(described, payload)


def tensor_dtype(rng, entry, block):
    described, payload = _parts(entry)
    name = rng.choice([n for n in described if n != "__metadata__"])
    described[name]["dtype"] = rng.choice([d for d in ("F64", "F32", "F16", "BF16", "I64", "U8", "I8", "BOOL", "X9")
                                           if d != described[name]["dtype"]])
    return _join(described, payload)


def tensor_offsets(rng, entry, block):
    described, payload = _parts(entry)
    name = rng.choice([n for n in described if n != "__metadata__"])
    offsets = described[name]["data_offsets"]
    offsets[rng.randrange(2)] = rng.choice((*HUGE, *NEGATIVE, offsets[0] + 1))
    return _join(described, payload)


def _header_edit(rng, header, checksum_recomputed: bool):
    """One field of the blockrag header edited. Under a recomputed checksum only edits a reader can tell from
    the bytes: a different valid ``start`` is not one (the key does not name it; the engine would have to
    compare it with its prefix length)."""
    field = rng.choice(("shape", "dtype", "source_dtype", "start", "format", "fingerprint", "context"))
    if field == "shape":
        shape = list(header["shape"])
        shape[rng.randrange(4)] = rng.choice((*HUGE, *NEGATIVE, 3, True, 2.5, "4"))
        header["shape"] = rng.choice((shape, shape[:3], shape + [1]))
    elif field in ("dtype", "source_dtype"):
        header[field] = rng.choice(("int4", "fp64", "float64", "", None, "bf16" if header[field] != "bf16" else "fp32"))
    elif field == "start":
        header["start"] = rng.choice((-1, -(2**40), 2.0, "9", None, *(() if checksum_recomputed else (10,))))
    elif field == "format":
        header["format"] = rng.choice((0, 2, 99, "1"))
    elif field == "fingerprint":
        header["fingerprint"] = rng.choice((OTHER_MODEL, "", MODEL[:-1]))
    else:
        header["context"] = rng.choice(("", "naive", CONTEXT[::-1]))
    return header


def header_stale_checksum(rng, entry, block):
    header, tensors = _tensors(entry)
    edited = _header_edit(rng, header, checksum_recomputed=False)
    return _safetensors_bytes(tensors, {"blockrag": json.dumps(edited)})


def header_forged_checksum(rng, entry, block):
    header, tensors = _tensors(entry)
    return _forged(_header_edit(rng, header, checksum_recomputed=True), tensors)


def nan_or_inf(rng, entry, block):
    header, tensors = _tensors(entry)
    names = ["keys", "values"] if header["dtype"] != "int8" else ["keys_step", "keys_low", "values_step", "values_low"]
    name = rng.choice(names)
    flat = tensors[name].clone().view(-1)
    for _ in range(rng.randint(1, 3)):
        flat[rng.randrange(flat.numel())] = rng.choice((float("nan"), float("inf"), float("-inf")))
    tensors[name] = flat.view(tensors[name].shape)
    return _forged(header, tensors)


def another_model(rng, entry, block):
    return encode_entry(block, OTHER_MODEL, rng.choice(("fp32", "bf16", "int8")))


def another_block(rng, entry, block):
    return encode_entry(_block(rng.randrange(10**6) + 1000), MODEL, rng.choice(("fp32", "bf16", "int8")))


CORRUPTIONS = [flip_bytes, truncate, extend, header_length, tensor_shape, tensor_dtype, tensor_offsets,
               header_stale_checksum, header_forged_checksum, nan_or_inf, another_model, another_block]


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_seeded_corruptions_are_never_served_never_crash_and_allocate_nothing_forged(tmp_path, figures, long_mode,
                                                                                    caplog):
    """Protects: :func:`blockrag.kvstore.entry.read_header` checks the header length, every tensor's offsets
    and shape times dtype size against the entry's bytes before anything is loaded; ``decode_entry`` checks the
    checksum, refuses NaN and infinity (which a recomputed checksum would not catch), and the key.

    At least 1,000 seeded corruptions (10,000 in the long mode) of fp32, bf16 and int8 entries, written into a
    real disk store and read back as serving reads them: every one is refused (a miss) and deleted, no read
    raises, the peak memory of the process grows by less than 64 MB although forged headers claim up to 2**62
    bytes, and the intact entry written back afterwards is served again.
    """
    count = 10_000 if long_mode else 1_000
    caplog.set_level(logging.ERROR, logger="blockrag.kvstore")  # a warning per deleted entry, kept by pytest
    rng = random.Random(1_000)
    store = DiskKVStore(tmp_path / "store", dtype="fp32", fingerprint=MODEL)
    blocks = [_block(seed) for seed in range(6)]
    entries = {dtype: [encode_entry(b, MODEL, dtype) for b in blocks] for dtype in ("fp32", "bf16", "int8")}
    peak = _peak_rss_bytes()
    served = []
    for trial in range(count):
        corrupt = CORRUPTIONS[trial % len(CORRUPTIONS)]
        dtype = rng.choice(tuple(entries))
        which = rng.randrange(len(blocks))
        block, entry = blocks[which], entries[dtype][which]
        key = block_key(MODEL, block.context, block.token_ids)
        damaged = next(d for d in (corrupt(rng, entry, block) for _ in range(50)) if d != entry)  # no no-op edits
        store._write(key, damaged)
        got = store.get(key)
        figures.fault(f"store fuzz: {corrupt.__name__.replace('_', ' ')}", got is None, int(got is not None))
        if got is not None:
            served.append((trial, corrupt.__name__, dtype))
        assert key not in store, (trial, corrupt.__name__, dtype, got is None)
    growth = _peak_rss_bytes() - peak
    assert served == []
    assert store.stats().corrupt == count
    assert growth < 64 << 20, f"peak memory grew by {growth >> 20} MB"
    for block in blocks:  # the store still works: intact entries are served
        key = block_key(MODEL, block.context, block.token_ids)
        store.put(key, block)
        assert torch.equal(store.get(key).keys, block.keys)
    store.close()
