"""``blockrag bench store``: what keeping blocks in the store costs, per stored dtype.

Measured in one run on one prompt of about ``--tokens`` tokens (a prefix, passages of random
token ids decoded to text, a question; TTFT does not depend on what the tokens say):

- bytes per token of the stored entries (headers and scales included);
- load throughput of all the prompt's blocks, in entry MB/s and blocks/s: from the disk store
  cold (a fresh store object, the page cache of its files dropped with posix_fadvise), warm
  (files in the page cache), and from the memory tier;
- TTFT with the passages' blocks taken from the warm disk store by the engine (tokenize, key,
  read, verify, decode, assemble, prefill the question), next to TTFT with the same blocks
  already in memory and to a full prefill. Timings are interleaved and the minimum is kept.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from blockrag.engine import BlockEngine, block_key, load_model
from blockrag.errors import BenchmarkError
from blockrag.kvstore.disk import DiskKVStore
from blockrag.kvstore.entry import encode_entry
from blockrag.kvstore.memory import MemoryTier

from .common import QUESTION, add_model_argument, machine, question_tokens, random_texts
DTYPES = ("fp32", "bf16", "int8")
DEFAULT_DTYPE = "bf16"  # what "auto" stores for an fp32 model
TARGET_RATIO = 1.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--tokens", type=int, default=8000, help="prompt length in tokens for TTFT")
    parser.add_argument("--passage-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the minimum is reported")
    parser.add_argument("--store-dir", help="folder to create the stores in (default: a temporary folder)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")


def _passages(engine: BlockEngine, tokens: int, passage_tokens: int) -> list[str]:
    """Texts of ``passage_tokens`` random tokens each, as many as fit a ``tokens``-token prompt once re-tokenized."""
    room = tokens - len(engine.head_block()) - question_tokens(engine)
    generator = torch.Generator().manual_seed(0)
    passages: list[str] = []
    while True:
        (text,) = random_texts(engine, generator, 1, passage_tokens)
        room -= len(engine.passage_token_ids(text))
        if room < 0:
            return passages
        passages.append(text)


def _drop_page_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # only clean pages can be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _throughput(seconds: float, nbytes: int, blocks: int) -> dict:
    return {"s": round(seconds, 6), "mb_s": round(nbytes / seconds / 1e6, 1), "blocks_s": round(blocks / seconds, 1)}


def _timed_load(store, keys: list[str]) -> float:
    started = time.perf_counter()
    found = store.get_many(keys)
    seconds = time.perf_counter() - started
    if any(b is None for b in found):
        raise BenchmarkError("a stored block was not found; the benchmark's store is incomplete")
    return seconds


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="blockrag-bench-store-", dir=args.store_dir) as root:
        return _measure(args, Path(root))


def _measure(args: argparse.Namespace, root: Path) -> dict:
    loaded = load_model(args.model)
    engine = BlockEngine(loaded)
    passages = _passages(engine, args.tokens, args.passage_tokens)
    blocks = []
    for lo in tqdm(range(0, len(passages), engine.batch_size), desc="encoding passages", unit="batch"):
        blocks += engine.encode(passages[lo:lo + engine.batch_size])
    keys = [block_key(loaded.fingerprint, b.context, b.token_ids) for b in blocks]
    passage_tokens = sum(len(b) for b in blocks)
    budget = 4 * sum(b.nbytes for b in blocks)  # memory tiers that hold every block
    bytes_per_token, write, load, stores = {}, {}, {}, {}
    for dtype in tqdm(DTYPES, desc="stores", unit="dtype"):
        entries = [encode_entry(b, loaded.fingerprint, dtype) for b in blocks]
        nbytes = sum(map(len, entries))
        bytes_per_token[dtype] = round(nbytes / passage_tokens, 1)
        store = DiskKVStore(root / dtype, dtype=dtype)
        started = time.perf_counter()
        for key, block in zip(keys, blocks):
            store.put(key, block)
        write[dtype] = _throughput(time.perf_counter() - started, nbytes, len(blocks))
        cold = []
        for _ in range(args.repeats):
            store.close()
            _drop_page_cache(root / dtype)
            store = DiskKVStore(root / dtype, dtype=dtype)
            cold.append(_timed_load(store, keys))
        warm = min(_timed_load(store, keys) for _ in range(args.repeats))
        front = MemoryTier(store, budget)
        front.get_many(keys)
        memory = min(_timed_load(front, keys) for _ in range(args.repeats))
        load[dtype] = {"disk_cold": _throughput(min(cold), nbytes, len(blocks)),
                       "disk_warm": _throughput(warm, nbytes, len(blocks)),
                       "memory_tier": _throughput(memory, nbytes, len(blocks))}
        stores[dtype] = store

    tier = MemoryTier(stores[DEFAULT_DTYPE], budget)
    candidates = {"blocks_in_memory": (engine, blocks)}  # name -> (engine, what it is given)
    candidates |= {f"disk_warm_{dtype}": (BlockEngine(loaded, store=stores[dtype]), passages) for dtype in DTYPES}
    candidates[f"memory_tier_{DEFAULT_DTYPE}"] = (BlockEngine(loaded, store=tier), passages)

    def ttft(name: str) -> float:
        answering, source = candidates[name]
        result = answering.generate(None, source, QUESTION, max_new_tokens=1)
        if source is passages and result.block_tokens < passage_tokens:
            raise BenchmarkError(f"{name}: the store did not serve every passage block")
        return result.ttft_s

    for name in candidates:
        ttft(name)  # warm-up: prefix blocks, page cache, memory tier
    times = {name: [] for name in candidates}
    for _ in tqdm(range(args.repeats), desc="block TTFT", unit="round"):
        for name in candidates:  # interleaved, so that changes in machine load hit all alike
            times[name].append(ttft(name))
    best = {name: min(t) for name, t in times.items()}
    full = engine.generate(None, passages, QUESTION, mode="full", max_new_tokens=1)
    ratios = {dtype: round(best[f"disk_warm_{dtype}"] / best["blocks_in_memory"], 3) for dtype in DTYPES}
    for store in stores.values():
        store.close()
    return {
        "benchmark": "store", "model": args.model, "device": "cpu",
        "dtype": str(next(loaded.model.parameters()).dtype),
        "machine": machine(engine.device), "repeats": args.repeats, "store_dir": str(root.parent),
        "prompt_tokens": full.prompt_tokens, "passages": len(passages), "passage_tokens": passage_tokens,
        "bytes_per_token": bytes_per_token,
        "write": write,
        "load": load,
        "ttft_s": {"full_prefill": round(full.ttft_s, 4), **{name: round(s, 4) for name, s in best.items()}},
        "disk_over_memory_ttft": ratios,
        "target": {"max_ratio": TARGET_RATIO, "dtype": DEFAULT_DTYPE,
                   "met": ratios[DEFAULT_DTYPE] <= TARGET_RATIO},
    }
