"""The correctness gate: how far block mode's first token is from full attention's over the same prompt.

Reused KV is an approximation, and the answers it gets wrong still read plausibly. For a sampled
fraction of block-mode answers, the gate recomputes the first token's distribution with full
attention over the very same segments and compares the two: whether their most likely tokens
agree, and the KL divergence of block mode's distribution from full attention's. Callers run it
after the answer has been sent, so that its cost stays off the answer's latency.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from blockrag.errors import InvalidArgumentError
from blockrag.engine import Block, BlockEngine, PrefillMode


@dataclass(frozen=True)
class GateResult:
    """One comparison of the first token after a prompt, block mode against full attention."""

    agree: bool
    """Whether both modes rank the same token first."""
    kl: float
    """KL(full || block) of the first token's distributions, in nats."""
    block_token: int
    full_token: int


def first_token_logits(engine: BlockEngine, segments: Sequence[str | Block], mode: PrefillMode) -> torch.Tensor:
    """The logits (over the vocabulary) of the token that follows ``segments`` prefilled in ``mode``.

    The one place that reaches into the engine's prefill, until the engine offers this as a public method.
    """
    with torch.inference_mode():
        return engine.prefill_segments(segments, mode=mode, max_new_tokens=1).logits.float()


def compare_first_token(engine: BlockEngine, segments: Sequence[str | Block]) -> GateResult:
    """Block mode's first-token distribution over ``segments`` against full attention's over the same tokens."""
    block = torch.log_softmax(first_token_logits(engine, segments, "block"), -1)
    full = torch.log_softmax(first_token_logits(engine, segments, "full"), -1)
    kl = float((full.exp() * (full - block)).sum())
    block_token, full_token = int(block.argmax()), int(full.argmax())
    return GateResult(block_token == full_token, max(kl, 0.0), block_token, full_token)


class GateSampler:
    """Picks the block-mode answers the gate checks: each with probability ``fraction`` (0 turns the gate off).

    ``seed`` makes the choice reproducible; calls from several threads are safe.
    """

    def __init__(self, fraction: float = 0.0, seed: int | None = None):
        if not 0.0 <= fraction <= 1.0:
            raise InvalidArgumentError(f"the gate's fraction must be between 0 and 1, got {fraction}")
        self.fraction = fraction
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def should_check(self) -> bool:
        if self.fraction == 0.0:
            return False
        with self._lock:
            return self._random.random() < self.fraction


class GateRecord:
    """Running totals of the gate's checks, safe to add to from a background thread."""

    def __init__(self):
        self.checks = 0
        self.agreements = 0
        self.kl_total = 0.0
        self._lock = threading.Lock()

    def add(self, result: GateResult) -> None:
        with self._lock:
            self.checks += 1
            self.agreements += result.agree
            self.kl_total += result.kl

    def summary(self) -> dict:
        """Checks so far, how many agreed on the first token, and the mean KL (None before the first check)."""
        with self._lock:
            return {"checks": self.checks, "first_token_agreements": self.agreements,
                    "mean_kl": round(self.kl_total / self.checks, 6) if self.checks else None}


class Gate:
    """The gate of one adapter: samples block-mode answers and checks them on a thread of its own, one at a time,
    after the answer is complete, recording the results in :attr:`record`."""

    def __init__(self, fraction: float = 0.0, seed: int | None = None):
        self.sampler = GateSampler(fraction, seed)
        self.record = GateRecord()
        self._queue: list[tuple[BlockEngine, Sequence[str | Block]]] = []
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()

    def after(self, engine: BlockEngine, segments: Sequence[str | Block], force: bool | None = None) -> bool:
        """Queue a check of an answered prompt if ``force`` (or, when None, the sampler) says so; True if queued."""
        if not (self.sampler.should_check() if force is None else force):
            return False
        with self._lock:
            self._queue.append((engine, segments))
            self._idle.clear()
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="blockrag-gate", daemon=True)
                self._worker.start()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every queued check has run; False if ``timeout`` passed first."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._idle.set()
                    return
                engine, segments = self._queue.pop(0)
            self.record.add(compare_first_token(engine, segments))
