"""How requests share the one engine of a server process.

A single worker thread owns the model. Requests wait in a bounded first-in, first-out queue;
the worker admits up to ``max_active`` of them at a time and advances each admitted generation by
one step in turn (its prefill first, then a token at a time), so a new request's first token
waits for one step of each running generation, not for their whole answers. Each generation
keeps its own cache and sampler, so interleaving never changes an answer. When no request is
waiting or running, the worker runs the correctness gate's checks (off every request's latency).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from blockrag.engine import Block
from blockrag.integrations import Completion, PromptRunner
from blockrag.integrations.gate import GateResult, compare_first_token

from blockrag.errors import InvalidArgumentError, QueueFullError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(eq=False)
class Job:
    """One request's generation, and the channel its events go back to the event loop by.

    Events put on ``events``: ``("delta", str)``, ``("done", Completion)``, ``("error", exception)``.
    """

    start: Callable[[], Iterator[tuple[str, Completion | None]]]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    after: Callable[[Completion], None] | None = None
    """Called on the worker thread once the answer is complete (to queue a gate check)."""

    def send(self, kind: str, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, item))
        except RuntimeError:  # the event loop is closed: nobody waits for this request any more
            self.cancelled.set()

    def cancel(self) -> None:
        """Stop this generation at its next step (the client went away)."""
        self.cancelled.set()


class EngineWorker:
    """The thread that runs every generation and gate check of one engine."""

    def __init__(self, runner: PromptRunner, *, max_active: int, max_queue: int, max_gate_backlog: int,
                 retry_after_s: int, on_gate: Callable[[GateResult], None], on_gate_skipped: Callable[[], None],
                 on_stopped: Callable[[], None]):
        if max_active < 1 or max_queue < 0 or max_gate_backlog < 0:
            raise InvalidArgumentError("need max_active >= 1, max_queue >= 0 and max_gate_backlog >= 0")
        self.runner = runner
        self.max_active, self.max_queue, self.max_gate_backlog = max_active, max_queue, max_gate_backlog
        self.retry_after_s = retry_after_s
        self._on_gate, self._on_gate_skipped, self._on_stopped = on_gate, on_gate_skipped, on_stopped
        self._waiting: deque[Job] = deque()
        self._active: list[tuple[Job, Iterator[tuple[str, Completion | None]]]] = []
        self._gate: deque[Sequence[str | Block]] = deque()
        self._tasks: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="blockrag-engine", daemon=True)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def gate_backlog(self) -> int:
        return len(self._gate)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop admitting work; running generations are closed, waiting requests get an error."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def submit(self, job: Job) -> None:
        """Queue ``job``, or raise :class:`QueueFullError` when the queue is full."""
        with self._wake:
            if self._stopping:
                raise QueueFullError("the server is shutting down; send the request to another replica.",
                                     retry_after_s=self.retry_after_s)
            if len(self._waiting) + len(self._active) >= self.max_queue + self.max_active:
                raise QueueFullError(
                    f"all {self.max_queue} places in the request queue are taken; retry after "
                    f"{self.retry_after_s} s, or add replicas behind a load balancer.",
                    retry_after_s=self.retry_after_s)
            self._waiting.append(job)
            self._wake.notify()

    async def call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the worker thread (model work other than generation, such as encoding passages)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._stopping or len(self._tasks) >= self.max_queue:
                raise QueueFullError(f"the server has {len(self._tasks)} such calls waiting; retry after "
                                     f"{self.retry_after_s} s.", retry_after_s=self.retry_after_s)
            self._tasks.append((function, future))
            self._wake.notify()
        return await asyncio.wrap_future(future)

    def check_later(self, segments: Sequence[str | Block]) -> None:
        """Queue a gate check of ``segments``; skipped (and counted) when the gate's backlog is full."""
        with self._wake:
            if len(self._gate) >= self.max_gate_backlog:
                self._on_gate_skipped()
                return
            self._gate.append(segments)
            self._wake.notify()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._active or self._gate or self._tasks):
                    self._wake.wait()
                if self._stopping:
                    break
                task = self._tasks.popleft() if self._tasks else None
                while self._waiting and len(self._active) < self.max_active:
                    job = self._waiting.popleft()
                    if job.cancelled.is_set():
                        self._on_stopped()
                    else:
                        self._active.append((job, job.start()))
                check = self._gate.popleft() if not self._active and self._gate else None
            if task is not None:
                function, future = task
                try:
                    future.set_result(function())
                except Exception as exc:  # noqa: BLE001 - handed to the caller, which re-raises it
                    future.set_exception(exc)
            if check is not None:
                self._check(check)
            for job, generation in list(self._active):
                if not self._step(job, generation):
                    self._active.remove((job, generation))
        for job, generation in self._active:
            generation.close()  # type: ignore[attr-defined]
            job.send("error", QueueFullError("the server shut down during this request; send it again.",
                                             retry_after_s=self.retry_after_s))
        for _, future in self._tasks:
            future.set_exception(QueueFullError("the server shut down before this call ran; send it again.",
                                                retry_after_s=self.retry_after_s))
        for job in self._waiting:
            job.send("error", QueueFullError("the server shut down before this request started; send it again.",
                                             retry_after_s=self.retry_after_s))

    def _step(self, job: Job, generation: Iterator[tuple[str, Completion | None]]) -> bool:
        """Advance one generation by a step; whether it goes on."""
        if job.cancelled.is_set():
            generation.close()  # type: ignore[attr-defined]  # stops decoding: nobody reads the answer
            self._on_stopped()
            return False
        try:
            delta, done = next(generation)
        except StopIteration:
            return False
        except Exception as exc:  # noqa: BLE001 - handed to the request, which answers with it
            job.send("error", exc)
            return False
        if delta:
            job.send("delta", delta)
        if done is None:
            return True
        job.send("done", done)
        if job.after is not None:
            job.after(done)
        return False

    def _check(self, segments: Sequence[str | Block]) -> None:
        try:
            result = compare_first_token(self.runner.engine, segments)
        except Exception:  # noqa: BLE001 - a failed check must not stop the server; it is logged
            log.exception("the correctness gate's check failed")
            return
        self._on_gate(result)
