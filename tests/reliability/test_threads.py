"""Eight threads sharing one engine and one store, each answering its own prompts."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from blockrag.engine import BlockEngine
from blockrag.kvstore import open_store

pytestmark = pytest.mark.reliability

THREADS = 8
_WORDS = "heron lantern granite bridge cider harbour orchard beacon ferry willow quarry meadow".split()


def _passage(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 30))).capitalize() + "."


def test_eight_threads_answer_as_one_thread_does_and_store_intact_blocks(tmp_path, engine, figures, long_mode):
    """Protects: the engine's per-prefix caches (prefix blocks under its lock), the memory tier's lock and
    diskcache's per-thread connections: concurrent requests through one engine and one store answer exactly
    as the same requests made one at a time, and blocks encoded and stored by eight threads at once are
    each stored intact under their own key.

    Each thread answers its own prompts (one of three system prompts, its own passages and question);
    blocks are fp32, so served and fresh KV are bit-identical and greedy answers must match token for token.
    """
    rounds = 12 if long_mode else 3
    rng = random.Random(8)
    prefixes = [None, "You answer in one word.", "You are a careful archivist."]
    pool = [_passage(rng) for _ in range(24)]
    requests = [[(rng.choice(prefixes), rng.sample(pool, rng.randint(1, 4)), f"What is {rng.choice(_WORDS)}? {t}.{r}")
                 for r in range(rounds)] for t in range(THREADS)]
    store = open_store(tmp_path / "kv", dtype="fp32")
    shared = BlockEngine(engine.loaded, store=store)
    shared.blocks(pool)  # every passage stored once, so both runs read the same blocks

    def answer(engine_: BlockEngine, prefix, passages, question) -> list[int]:
        return engine_.generate(prefix, passages, question, max_new_tokens=6).token_ids

    sequential = [[answer(BlockEngine(engine.loaded, store=store), *r) for r in mine] for mine in requests]
    with ThreadPoolExecutor(THREADS) as pool_:
        threaded = list(pool_.map(lambda mine: [answer(shared, *r) for r in mine], requests))
    same = [a == b for mine, theirs in zip(sequential, threaded) for a, b in zip(mine, theirs)]
    for ok in same:
        figures.fault("8 threads, one engine and store: answers", ok, 0)
    assert len(same) == THREADS * rounds and all(same)

    fresh = [[_passage(rng) for _ in range(3)] for _ in range(THREADS)]  # encoded and stored concurrently
    with ThreadPoolExecutor(THREADS) as pool_:
        list(pool_.map(shared.blocks, fresh))
    texts = [t for mine in fresh for t in mine]
    want = BlockEngine(engine.loaded).encode(texts)
    got = store.get_many(shared.block_keys(texts))
    intact = [g is not None and torch.equal(g.token_ids, w.token_ids) and torch.allclose(g.keys, w.keys, atol=1e-5)
              and torch.allclose(g.values, w.values, atol=1e-5) for g, w in zip(got, want)]
    for ok in intact:
        figures.fault("8 threads, one engine and store: stored blocks", ok, int(not ok))
    assert all(intact)
    store.close()
