"""The block store: format, bounds, both backends, integrity, limits and concurrency on synthetic blocks;
the engine's use of a store and int8 fidelity on the bundled SmolLM2."""

from __future__ import annotations

import ctypes
import errno
import gzip
import json
import logging
import multiprocessing
import os
import pickle
import socket
import uuid
import warnings
from pathlib import Path

import diskcache
import pytest
import safetensors.torch
import torch

from blockrag.engine import Block, BlockEngine, assemble, block_key
from blockrag.engine.transformer import Positions, forward
from blockrag.kvstore import (CorruptEntryError, DiskKVStore, MemoryTier, RedisKVStore, StoreError, StoreFullError,
                              StoreUnavailableError, WrongModelError, decode_entry, encode_entry, open_store)
from blockrag.kvstore.entry import read_header

MODEL = "a1b2c3d4e5f6a1b2c3d4e5f6"
OTHER_MODEL = "ffffffffffffffffffffffff"
CONTEXT = "0123456789abcdef01234567"
SMOLLM2_KV = (30, 3, 64)  # layers, kv heads, head dim of SmolLM2-135M


def make_block(seed: int, tokens: int = 32, shape: tuple[int, int, int] = (2, 2, 64), start: int = 7,
               context: str = CONTEXT) -> Block:
    """Random KV with the structure KIVI targets: keys with per-channel offsets and scales (outlier
    channels), values with per-token scales. By default 64 KB in fp32, 32 KB in bf16: diskcache keeps
    entries of 32 KB or more in files of their own."""
    g = torch.Generator().manual_seed(seed)
    layers, heads, head_dim = shape
    channel = torch.randn(layers, heads, 1, head_dim, generator=g) * 4
    spread = torch.rand(layers, heads, 1, head_dim, generator=g) * 3 + 0.1
    keys = torch.randn(layers, heads, tokens, head_dim, generator=g) * spread + channel
    values = torch.randn(layers, heads, tokens, head_dim, generator=g) * (torch.rand(layers, heads, tokens, 1,
                                                                                      generator=g) + 0.2)
    ids = torch.randint(0, 49152, (tokens,), generator=g)
    return Block(ids, keys, values, start, context)


def key_of(block: Block, model: str = MODEL) -> str:
    return block_key(model, block.context, block.token_ids)


def assert_same_block(got: Block, want: Block) -> None:
    assert torch.equal(got.token_ids, want.token_ids) and got.token_ids.dtype == torch.int64
    assert got.keys.dtype == want.keys.dtype and torch.equal(got.keys, want.keys)
    assert torch.equal(got.values, want.values)
    assert (got.start, got.context) == (want.start, want.context)


def int8_bound(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Largest error int8 may make per element: half a step, the step being the group's range / 255
    after low is rounded down and step up to fp16 (each off by at most 2**-10 relative), plus fp16's
    smallest step (a floor for constant groups) and fp32 rounding of low + code * step."""
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    step = (high - low + 2**-10 * low.abs()) / 255 * (1 + 2**-10)
    return step / 2 + 2**-14 + 1e-6 * x.abs()


# --- the entry format -------------------------------------------------------------------------------------------

def test_fp32_entry_round_trips_exactly():
    block = make_block(0)
    assert_same_block(decode_entry(encode_entry(block, MODEL, "fp32"), key_of(block)), block)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_entries_are_standard_safetensors_files(tmp_path, dtype):
    block = make_block(5)
    data = encode_entry(block, MODEL, dtype)
    assert int.from_bytes(data[:8], "little") % 8 == 0  # tensor data starts 8-byte aligned, as safetensors writes
    (tmp_path / "entry.safetensors").write_bytes(data)
    with safetensors.safe_open(tmp_path / "entry.safetensors", "pt") as f:
        assert json.loads(f.metadata()["blockrag"])["dtype"] == dtype
        assert torch.equal(f.get_tensor("token_ids"), block.token_ids)
        stored = {name: f.get_tensor(name) for name in f.keys()}
    again = safetensors.torch.load(safetensors.torch.save(stored))
    assert stored.keys() == again.keys() and all(torch.equal(stored[n], again[n]) for n in stored)
    if dtype == "fp32":
        assert torch.equal(stored["keys"], block.keys) and torch.equal(stored["values"], block.values)


def test_an_entry_read_is_viewed_not_copied(tmp_path):
    block = make_block(6)
    store = DiskKVStore(tmp_path / "kv", dtype="fp32")
    store.put(key_of(block), block)
    (raw,) = store._read_many([key_of(block)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the read-only views warn nothing
        got = decode_entry(raw, key_of(block))
    start = _address(raw)
    # the block's tensors lie inside the bytes read, so no second copy of the entry was made
    assert all(start <= t.data_ptr() < start + len(raw) for t in (got.keys, got.values))
    assert_same_block(got, block)
    assert_same_block(decode_entry(bytearray(raw), key_of(block)), block)


def _address(data: bytes) -> int:
    """Where the bytes of ``data`` lie in memory."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value


def test_bf16_entry_is_within_bf16_rounding():
    block = make_block(1)
    got = decode_entry(encode_entry(block, MODEL, "bf16"), key_of(block))
    assert got.keys.dtype == torch.float32 and torch.equal(got.token_ids, block.token_ids)
    for restored, original in ((got.keys, block.keys), (got.values, block.values)):
        # round to nearest with 8 significant bits: relative error at most 2**-8
        assert torch.all((restored - original).abs() <= 2**-8 * original.abs())
        assert not torch.equal(restored, original)  # it really is stored in bf16


def test_auto_dtype_halves_fp32_and_keeps_16_bit_blocks():
    block = make_block(2)
    assert read_header(encode_entry(block, MODEL))["dtype"] == "bf16"
    half = Block(block.token_ids, block.keys.half(), block.values.half(), block.start, block.context)
    got = decode_entry(encode_entry(half, MODEL), key_of(half))
    assert read_header(encode_entry(half, MODEL))["dtype"] == "fp16" and torch.equal(got.keys, half.keys)


def test_int8_is_kivi_keys_per_channel_values_per_token():
    block = make_block(3, tokens=40)
    got = decode_entry(encode_entry(block, MODEL, "int8"), key_of(block))
    # The bound uses each group's own range: keys' groups run over tokens (per channel), values' over
    # head_dim (per token). A coarser grouping would break it on the outlier channels of make_block.
    assert torch.all((got.keys - block.keys).abs() <= int8_bound(block.keys, dim=2))
    assert torch.all((got.values - block.values).abs() <= int8_bound(block.values, dim=3))
    assert torch.equal(got.token_ids, block.token_ids) and got.keys.dtype == torch.float32


def test_int8_of_a_constant_group_and_of_large_values():
    block = make_block(4)
    keys = block.keys.clone()
    keys[0, 0, :, 0] = 3.25  # one channel constant over every token
    keys[1] *= 3000  # past fp16's safe range: steps and lows are kept in fp32 instead
    big = Block(block.token_ids, keys, block.values, block.start, block.context)
    got = decode_entry(encode_entry(big, MODEL, "int8"), key_of(big))
    assert torch.all((got.keys - keys).abs() <= int8_bound(keys, dim=2))
    assert torch.all(got.keys[0, 0, :, 0] == 3.25)


@pytest.mark.parametrize("dtype, most", [("fp32", 46080 * 1.01), ("bf16", 23040 * 1.02), ("int8", 12500)])
def test_bytes_per_token_at_smollm2_shape(dtype, most):
    # SmolLM2 KV per token: 30 layers x 3 heads x 64 x (keys, values) = 11520 elements; a 100-token
    # passage (shorter than a typical retrieved one) carries its header and int8 key scales.
    block = make_block(5, tokens=100, shape=SMOLLM2_KV)
    per_token = len(encode_entry(block, MODEL, dtype)) / 100
    assert 11520 * {"fp32": 4, "bf16": 2, "int8": 1}[dtype] < per_token <= most


def test_every_single_byte_flip_is_detected():
    block = make_block(6, tokens=8, shape=(1, 1, 8))
    key = key_of(block)
    entry = encode_entry(block, MODEL, "int8")
    header_end = 8 + int.from_bytes(entry[:8], "little")
    assert 500 < header_end < len(entry) - 200  # flips land in the header and in the tensors
    for offset in range(len(entry)):
        flipped = bytearray(entry)
        flipped[offset] ^= 0xFF
        with pytest.raises(CorruptEntryError):  # and no other exception
            decode_entry(bytes(flipped), key)


# --- both backends ----------------------------------------------------------------------------------------------

@pytest.fixture(params=["disk", "redis"])
def open_backend(request, tmp_path):
    """Opens stores of the parametrized backend, all on one folder or one Redis namespace."""
    opened = []
    namespace = f"test-{uuid.uuid4().hex[:12]}"

    def opener(**options):
        if request.param == "disk":
            store = DiskKVStore(tmp_path / "store", **options)
        else:
            store = RedisKVStore(request.getfixturevalue("redis_server"), namespace=namespace, **options)
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()


def test_store_threads_run_torch_on_one_thread_each():
    """The threads that read and decode a store's entries run torch's operations on themselves alone, and torch's
    thread count stays as it was elsewhere: each would start an OpenMP team of its own that outlives its operations,
    and with more OpenMP threads than cores every request's prefill after a store read ran slower."""
    import threading

    from blockrag.kvstore.base import parallel_map

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert parallel_map(lambda _: torch.get_num_threads(), list(range(8))) == [1] * 8
        assert torch.get_num_threads() == 2
        elsewhere = []
        thread = threading.Thread(target=lambda: elsewhere.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert elsewhere == [2]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_round_trip_through_each_backend(open_backend, dtype):
    store = open_backend(dtype=dtype)
    blocks = [make_block(10 + i, tokens=20 + i) for i in range(3)]
    for block in blocks:
        store.put(key_of(block), block)
    later = open_backend()  # another process, later: the entries carry their own dtype
    for got, want in zip(later.get_many([key_of(b) for b in blocks]), blocks):
        assert torch.equal(got.token_ids, want.token_ids) and (got.start, got.context) == (want.start, want.context)
        assert torch.equal(got.keys, want.keys) == (dtype == "fp32")
        tolerance = {"fp32": 0, "bf16": 2**-8 * want.keys.abs(), "int8": int8_bound(want.keys, dim=2)}[dtype]
        assert torch.all((got.keys - want.keys).abs() <= tolerance)


def test_store_interface(open_backend):
    store = open_backend(dtype="fp32")
    a, b, missing = make_block(20), make_block(21), make_block(22)
    assert store.fingerprint is None and store.get_many([]) == []
    store.put(key_of(a), a)
    store.put(key_of(b), b)
    assert store.fingerprint == MODEL
    got = store.get_many([key_of(b), key_of(missing), key_of(a)])
    assert got[1] is None
    assert_same_block(got[0], b)
    assert_same_block(got[2], a)
    assert key_of(a) in store and store.contains(key_of(b)) and key_of(missing) not in store
    assert sorted(store.keys()) == sorted([key_of(a), key_of(b)]) == sorted(store)
    stats = store.stats()
    assert (stats.entries, stats.hits, stats.misses, stats.corrupt) == (2, 2, 1, 0)
    assert stats.bytes >= 2 * len(encode_entry(a, MODEL, "fp32"))
    assert store.delete(key_of(a)) and not store.delete(key_of(a))
    assert store.get(key_of(a)) is None and list(store.keys()) == [key_of(b)]


def test_put_needs_the_blocks_own_key(open_backend):
    store = open_backend()
    a, b = make_block(23), make_block(24)
    with pytest.raises(ValueError, match="not this block's key"):
        store.put(key_of(b), a)
    with pytest.raises(ValueError, match="not a block key"):
        store.put("entry", a)


def test_a_store_serves_one_model(open_backend):
    store = open_backend()
    block = make_block(30)
    store.put(key_of(block), block)
    with pytest.raises(WrongModelError, match=f"holds blocks of model {MODEL}, not of this model .{OTHER_MODEL}"):
        store.get_many([key_of(block, OTHER_MODEL)])
    with pytest.raises(WrongModelError):
        store.put(key_of(block, OTHER_MODEL), block)
    with pytest.raises(WrongModelError, match="open another store for this one"):
        open_backend(fingerprint=OTHER_MODEL)
    assert open_backend(fingerprint=MODEL).get(key_of(block)) is not None


def test_opening_with_a_fingerprint_claims_the_store(open_backend):
    store = open_backend(fingerprint=OTHER_MODEL)
    block = make_block(31)
    with pytest.raises(WrongModelError):
        store.put(key_of(block), block)
    assert open_backend().fingerprint == OTHER_MODEL and not list(store.keys())


def _flip(entry: bytes, where: float) -> bytes:
    data = bytearray(entry)
    data[int(len(data) * where)] ^= 0x01
    return bytes(data)


CORRUPTIONS = {
    "flipped payload bit": lambda entry, block: _flip(entry, 0.7),
    "flipped header bit": lambda entry, block: _flip(entry, 0.02),
    "truncated": lambda entry, block: entry[: len(entry) // 2],
    "empty": lambda entry, block: b"",
    "not an entry": lambda entry, block: b"\x80\x04\x95" + os.urandom(5000),
    "another block's entry": lambda entry, block: encode_entry(make_block(99), MODEL, "fp32"),
    "another model's entry": lambda entry, block: encode_entry(block, OTHER_MODEL, "fp32"),
    "future format": lambda entry, block: entry.replace(b'\\"format\\": 2', b'\\"format\\": 9'),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_entries_are_logged_deleted_and_missed(open_backend, corruption, caplog):
    store = open_backend(dtype="fp32")
    block, good = make_block(40), make_block(41)
    store.put(key_of(block), block)
    store.put(key_of(good), good)
    entry = bytes(store._read_many([key_of(block)])[0])
    store._write(key_of(block), CORRUPTIONS[corruption](entry, block))  # damage the stored bytes in place
    with caplog.at_level(logging.WARNING, logger="blockrag.kvstore"):
        got = store.get_many([key_of(block), key_of(good)])
    assert got[0] is None
    assert_same_block(got[1], good)
    assert key_of(block) not in store and store.stats().corrupt == 1
    assert any(key_of(block) in r.getMessage() and "deleted unusable block entry" in r.getMessage()
               for r in caplog.records)
    store.put(key_of(block), block)  # the caller recomputes and stores it again
    assert_same_block(store.get(key_of(block)), block)


def test_unavailable_redis_gives_a_clear_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(StoreUnavailableError, match="cannot reach the Redis server"):  # nothing listens there
        RedisKVStore(f"redis://127.0.0.1:{port}/0", socket_timeout=2)


def test_full_redis_raises_store_full_and_keeps_entries(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server)
    store = RedisKVStore(redis_server, namespace=f"full-{uuid.uuid4().hex[:8]}", dtype="fp32")
    kept = make_block(50)
    store.put(key_of(kept), kept)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", used + 2_000_000)
    try:
        with pytest.raises(StoreFullError, match="Redis server of the block store .* is full"):
            for i in range(100):  # 100 entries of ~50 KB: over the 2 MB left
                block = make_block(1000 + i, tokens=50)
                store.put(key_of(block), block)
        assert_same_block(store.get(key_of(kept)), kept)
    finally:
        client.config_set("maxmemory", 0)
        client.close()
        store.close()


# --- the disk backend -------------------------------------------------------------------------------------------

def _value_files(path: Path) -> list[Path]:
    return sorted(path.rglob("*.val"))


def test_damage_to_the_files_on_disk(tmp_path, caplog):
    store = DiskKVStore(tmp_path, dtype="bf16")
    flipped, truncated = make_block(60), make_block(61)
    store.put(key_of(flipped), flipped)
    first = set(_value_files(tmp_path))
    store.put(key_of(truncated), truncated)
    (second,) = set(_value_files(tmp_path)) - first
    (first,) = first
    data = bytearray(first.read_bytes())
    data[len(data) // 3] ^= 0x10
    first.write_bytes(bytes(data))
    second.write_bytes(second.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="blockrag.kvstore"):
        assert store.get_many([key_of(flipped), key_of(truncated)]) == [None, None]
    assert "checksum mismatch" in caplog.text and "truncated" in caplog.text
    assert store.stats().entries == 0 and _value_files(tmp_path) == []


class _Exploit:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickled_rows_are_never_unpickled(tmp_path):
    store = DiskKVStore(tmp_path / "store")
    block = make_block(62)
    marker = tmp_path / "code-ran"
    with diskcache.Cache(str(tmp_path / "store")) as plain:  # a tampered store: pickled value and key
        plain.set(key_of(block), _Exploit(marker))
        plain.set(("tuple", "key"), b"x")
        plain.set(key_of(make_block(63)), "text value")
    pickle.loads(pickle.dumps(_Exploit(tmp_path / "probe"))).close()
    assert (tmp_path / "probe").exists()  # the exploit works wherever it is unpickled
    assert store.get(key_of(block)) is None and key_of(block) not in store
    assert sorted(store.keys()) == [key_of(make_block(63))]
    assert store.get(key_of(make_block(63))) is None
    assert not marker.exists() and store.stats().corrupt == 2


def test_size_limit_evicts_the_oldest_entries(tmp_path):
    entry_bytes = len(encode_entry(make_block(0), MODEL, "fp32"))
    store = DiskKVStore(tmp_path, dtype="fp32", size_limit=30 * entry_bytes)
    blocks = [make_block(100 + i) for i in range(60)]
    for block in blocks:
        store.put(key_of(block), block)
        assert store.stats().bytes <= store.stats().limit_bytes + entry_bytes
    kept = set(store.keys())
    assert 10 <= len(kept) < 60 and len(_value_files(tmp_path)) == len(kept)
    assert {key_of(b) for b in blocks[-10:]} <= kept  # the newest stay, the oldest went first
    assert key_of(blocks[0]) not in kept


def test_full_disk_raises_store_full_and_loses_nothing(tmp_path, monkeypatch):
    store = DiskKVStore(tmp_path, dtype="fp32")
    kept, new = make_block(70), make_block(71)
    store.put(key_of(kept), kept)

    def disk_fills_up(self, full_path, iterator, mode, encoding=None):
        os.makedirs(os.path.dirname(full_path), exist_ok=True)
        with open(full_path, mode) as partial:
            partial.write(b"the first bytes of an entry")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskcache.Disk, "_write", disk_fills_up)
    with pytest.raises(StoreFullError, match="is full .* no stored block was lost"):
        store.put(key_of(new), new)
    with pytest.raises(StoreFullError):
        store.put(key_of(kept), kept)  # overwriting an entry keeps the old one when the write fails
    monkeypatch.undo()
    assert_same_block(store.get(key_of(kept)), kept)
    assert store.get(key_of(new)) is None
    assert len(_value_files(tmp_path)) == 1  # no partial file left behind


def test_model_marker_is_validated(tmp_path):
    DiskKVStore(tmp_path, fingerprint=MODEL).close()
    assert json.loads((tmp_path / "blockrag-store.json").read_text())["fingerprint"] == MODEL
    (tmp_path / "blockrag-store.json").write_text("{not json")
    with pytest.raises(StoreError, match="not a blockrag store marker"):
        DiskKVStore(tmp_path)


def _writer_reader(path: str, mine: range, theirs: range, shared: range, barrier, results) -> None:
    """Stores blocks ``mine`` and ``shared`` while reading ``theirs`` and ``shared`` from the other process."""
    store = DiskKVStore(path, dtype="fp32")
    expected = {key_of(b): b for b in map(make_block, [*theirs, *shared])}
    seen = wrong = 0
    barrier.wait()
    for own, common in zip(mine, shared):
        for seed in (own, common):
            block = make_block(seed)
            store.put(key_of(block), block)
        for key, got in zip(expected, store.get_many(list(expected))):
            if got is not None:
                seen += 1
                want = expected[key]
                wrong += not (torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
                              and torch.equal(got.token_ids, want.token_ids))
    results.put((seen, wrong, store.stats().corrupt))


def test_two_processes_write_and_read_one_store_at_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    shared = range(500, 530)
    workers = [ctx.Process(target=_writer_reader, args=(str(tmp_path), mine, theirs, shared, barrier, results))
               for mine, theirs in ((range(200, 230), range(300, 330)), (range(300, 330), range(200, 230)))]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert all(wrong == 0 and corrupt == 0 for _, wrong, corrupt in outcomes)
    assert max(seen for seen, _, _ in outcomes) > 0  # reads of the other's entries happened
    store = DiskKVStore(tmp_path, dtype="fp32")
    everything = [make_block(s) for s in [*range(200, 230), *range(300, 330), *shared]]
    for got, want in zip(store.get_many([key_of(b) for b in everything]), everything):
        assert_same_block(got, want)
    assert store.stats().entries == len(everything) == len(_value_files(tmp_path))


# --- the memory tier and open_store -----------------------------------------------------------------------------

def test_memory_tier_is_an_lru_within_its_budget(tmp_path):
    disk = DiskKVStore(tmp_path, dtype="fp32")
    blocks = [make_block(80 + i) for i in range(4)]
    size = blocks[0].nbytes + blocks[0].token_ids.nbytes
    tier = MemoryTier(disk, max_bytes=3 * size)
    for block in blocks:
        tier.put(key_of(block), block)
    assert tier.stats().entries == 0  # filled by reads only
    keys = [key_of(b) for b in blocks]
    tier.get_many(keys[:3])
    tier.get(keys[0])  # now 1 is the least recently used
    tier.get(keys[3])  # evicts 1
    assert (tier.stats().entries, tier.stats().bytes, tier.stats().hits) == (3, 3 * size, 1)
    reads = disk.stats().hits
    for got, want in zip(tier.get_many([keys[0], keys[2], keys[3]]), [blocks[0], blocks[2], blocks[3]]):
        assert_same_block(got, want)
    assert disk.stats().hits == reads  # all three from memory
    tier.get(keys[1])
    assert disk.stats().hits == reads + 1
    assert tier.delete(keys[1]) and keys[1] not in tier and tier.get(keys[1]) is None


def test_memory_tier_serves_what_the_store_keeps(tmp_path):
    tier = MemoryTier(DiskKVStore(tmp_path, dtype="int8"))
    block = make_block(90)
    tier.put(key_of(block), block)
    from_store, from_memory = tier.get(key_of(block)), tier.get(key_of(block))
    assert from_memory is from_store and tier.stats().hits == 1
    assert not torch.equal(from_store.keys, block.keys)  # int8, as a later process would read it


def test_open_store_opens_a_folder_behind_a_memory_tier(tmp_path):
    with open_store(tmp_path / "blocks", dtype="int8") as store:
        assert isinstance(store, MemoryTier) and isinstance(store.store, DiskKVStore) and store.store.dtype == "int8"
        block = make_block(91)
        store.put(key_of(block), block)
        assert torch.equal(store.get(key_of(block)).token_ids, block.token_ids)
        assert store.stats().backing.backend == "disk"


def test_open_store_opens_redis_urls(redis_server):
    with open_store(redis_server, namespace=f"open-{uuid.uuid4().hex[:8]}", memory_bytes=0) as store:
        assert isinstance(store, RedisKVStore)
        block = make_block(92)
        store.put(key_of(block), block)
        assert torch.equal(store.get(key_of(block)).token_ids, block.token_ids)


# --- on SmolLM2 -------------------------------------------------------------------------------------------------

NQ = Path(__file__).resolve().parents[2] / "shared" / "data" / "nq-open-dev.jsonl.gz"
PASSAGES = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889 for the World's Fair.",
    "Mount Kilimanjaro in Tanzania is the highest mountain in Africa, rising 5,895 metres above sea level.",
    "The Danube flows through ten countries, more than any other river, before it reaches the Black Sea.",
]


@pytest.mark.slow
def test_engine_takes_blocks_from_the_store(smollm, tmp_path):
    question = "In which year was the Eiffel Tower completed?"
    fresh = BlockEngine(smollm).generate(None, PASSAGES, question, max_new_tokens=12)
    writer = BlockEngine(smollm, store=DiskKVStore(tmp_path, dtype="fp32"))
    first = writer.generate(None, PASSAGES, question, max_new_tokens=12)
    again = writer.generate(None, PASSAGES, question, max_new_tokens=12)
    reader = BlockEngine(smollm, store=DiskKVStore(tmp_path, dtype="fp32"))  # as in a later process
    later = reader.generate(None, PASSAGES, question, max_new_tokens=12)
    passage_tokens = sum(len(reader.passage_token_ids(p)) for p in PASSAGES)
    head_tokens = len(reader.head_block())
    assert first.block_tokens == 0 and first.prefilled_tokens == first.prompt_tokens
    assert again.block_tokens == head_tokens + passage_tokens  # the passages came from the store
    assert later.block_tokens == passage_tokens  # a new engine encodes its prefix once, passages come stored
    assert fresh.token_ids == first.token_ids == again.token_ids == later.token_ids and len(fresh.token_ids) > 3
    stored, served = reader.blocks(PASSAGES)
    assert served == passage_tokens
    for got, want in zip(stored, reader.encode(PASSAGES)):
        assert_same_block(got, want)


@pytest.mark.slow
def test_engine_with_the_default_store_serves_from_memory(smollm, tmp_path):
    store = open_store(tmp_path)
    engine = BlockEngine(smollm, store=store)
    engine.generate(None, PASSAGES, "Where is Kilimanjaro?", max_new_tokens=4)
    assert store.stats().entries == 0 and store.stats().backing.entries == len(PASSAGES)
    second = engine.generate(None, PASSAGES, "Where is Kilimanjaro?", max_new_tokens=4)
    third = engine.generate(None, PASSAGES, "Where is Kilimanjaro?", max_new_tokens=4)
    assert second.token_ids == third.token_ids
    stats = store.stats()
    assert (stats.hits, stats.entries, stats.backing.hits) == (len(PASSAGES), len(PASSAGES), len(PASSAGES))


def next_token_predictions(engine: BlockEngine, context: list[Block], ids: torch.Tensor) -> torch.Tensor:
    """Top-1 next token at every position of ``ids``, teacher-forced after the blocks of ``context``."""
    start = sum(len(b) for b in context)
    with torch.inference_mode():
        cache = assemble(engine.model, context, capacity=start + ids.shape[1])
        logits = forward(engine.model, cache, ids, Positions.span(start, ids.shape[1]), logits=ids.shape[1])
    return logits[0].argmax(-1)


@pytest.fixture(scope="module")
def nq(smollm_fp32):
    """Real questions and gold passages from Natural Questions: fp32 blocks, prompts and fp32 predictions.

    Each prompt is a question and its gold answer after the gold passage between two others.
    """
    if not NQ.is_file():
        pytest.skip(f"{NQ} is absent: the shared NQ sample (see ../shared/data/README.md) is needed")
    with gzip.open(NQ, "rt") as lines:
        items = [json.loads(next(lines)) for _ in range(24)]
    engine = BlockEngine(smollm_fp32)
    blocks = engine.encode([f"{i['ctxs'][0]['title']}\n{i['ctxs'][0]['text']}" for i in items])
    prompts = []
    for i, item in enumerate(items):
        text = engine.template().question_text(item["question"]) + item["answers"][0]
        prompts.append(([(i + 1) % len(items), i, (i + 2) % len(items)],
                        torch.tensor([engine.tokenizer(text, add_special_tokens=False)["input_ids"]])))
    head = engine.head_block()
    reference = [next_token_predictions(engine, [head, *(blocks[c] for c in chosen)], ids) for chosen, ids in prompts]
    return engine, blocks, prompts, reference


@pytest.mark.slow
def test_int8_on_real_passages_is_bounded_and_small(nq):
    engine, blocks, _, _ = nq
    tokens = stored = 0
    for block in blocks:
        entry = encode_entry(block, engine.fingerprint, "int8")
        got = decode_entry(entry, key_of(block, engine.fingerprint))
        assert torch.all((got.keys - block.keys).abs() <= int8_bound(block.keys, dim=2))
        assert torch.all((got.values - block.values).abs() <= int8_bound(block.values, dim=3))
        tokens, stored = tokens + len(block), stored + len(entry)
    assert stored / tokens <= 12500  # bytes per token, headers and scales included


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_lossy_blocks_predict_the_next_tokens_of_fp32_blocks(nq, dtype):
    engine, blocks, prompts, reference = nq
    head = engine.head_block()
    lossy = [decode_entry(encode_entry(b, engine.fingerprint, dtype), key_of(b, engine.fingerprint))
             for b in blocks]
    agree = total = 0
    for (chosen, ids), want in zip(prompts, reference):
        got = next_token_predictions(engine, [head, *(lossy[c] for c in chosen)], ids)
        agree += int((got == want).sum())
        total += len(want)
    assert total > 400
    assert agree / total > 0.99, f"{dtype}: {agree} of {total} next tokens agree with fp32 blocks"


def test_an_entry_claiming_another_start_is_not_served(tiny_engine, tmp_path):
    """Protects the engine's check of a stored block's start position: the store's key names the model, context
    and tokens, not the start, so an entry rewritten with another start (and a fresh checksum) passes the store."""
    engine = BlockEngine(tiny_engine.loaded, store=DiskKVStore(tmp_path))
    passage = "A passage whose stored block claims to start elsewhere."
    block = engine.encode([passage])[0]
    engine.store.put(engine.block_keys([passage])[0],
                     Block(block.token_ids, block.keys, block.values, block.start + 1, block.context))
    result = engine.generate(None, [passage], "Where does it start?", max_new_tokens=1)
    assert result.block_tokens == len(engine.head_block())  # the head only: the passage was encoded again
