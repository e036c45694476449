"""Running a framework's prompt on the engine: generation options, usage, and async without blocking.

Shared by the LlamaIndex and LangChain adapters, which only translate their frameworks' types.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from blockrag.engine import (DEFAULT_MODEL, BlockEngine, DecodeMode, GenerationOptions, PrefillMode,
                             blockrag_home)

from blockrag.errors import GenerationTimeoutError

from .gate import Gate
from .matching import BlockUse, Passage, PassageIndex, PromptPlan, plan_prompt

T = TypeVar("T")


DECODE_DESCRIPTION = ("'auto' decodes long prompts with Recycled Attention and short ones fully; or 'full', "
                      "'recycled', 'streaming'.")
GATE_DESCRIPTION = ("Fraction of block-mode answers checked against full attention after they are complete (first "
                    "token agreement and KL, in each response's metadata as running totals); 0 turns it off.")
#: Generation settings both adapters take as fields and as per-call arguments, and the engine option each sets.
ADAPTER_OPTIONS = {"mode": "mode", "max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
                   "top_k": "top_k", "seed": "seed", "decode": "decode", "recycle_k": "recycle_k",
                   "stride": "stride", "dynamic_threshold": "dynamic_threshold"}


def call_options(adapter: Any, kwargs: Mapping[str, Any], stop: Sequence[str] | None) -> GenerationOptions:
    """The engine options of one call: the adapter's fields, replaced by the call's arguments of the same names."""
    return GenerationOptions(stop=tuple(stop or ()), **{option: kwargs.get(name, getattr(adapter, name))
                                                          for name, option in ADAPTER_OPTIONS.items()})


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    """Prompt tokens served from blocks that were already in the store (no model work)."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_openai(self) -> dict:
        """The usage dict in OpenAI's layout, which LlamaIndex's token counters read."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens, "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass(frozen=True)
class Completion:
    """A finished answer with what it cost and which passages were served as blocks."""

    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
    blocks: list[BlockUse] = field(default_factory=list)
    ttft_s: float = 0.0
    """Time to first token, including finding the passages and loading their blocks."""
    total_s: float = 0.0
    decode: DecodeMode = "full"
    """How the answer's tokens attended to the prompt (``"auto"`` resolved)."""
    full_steps: float = 0.0
    """Decode steps that attended to the whole prompt (see :class:`blockrag.engine.GenerationResult`)."""
    gate: dict | None = None
    """Whether the correctness gate checks this answer (after it is complete), and its totals so far."""

    @property
    def reused_ids(self) -> list[str]:
        """Ids of the passages whose blocks came from the store, in prompt order."""
        return [b.id for b in self.blocks if b.id is not None]

    def report(self) -> dict:
        """A JSON-ready summary, put by the adapters into their responses' metadata."""
        return {"usage": self.usage.as_openai(), "reused_ids": self.reused_ids,
                "blocks": [{"id": b.id, "tokens": b.tokens} for b in self.blocks],
                "decode": {"mode": self.decode, "full_steps": round(self.full_steps, 2)},
                **({"gate": self.gate} if self.gate is not None else {}),
                "ttft_s": round(self.ttft_s, 4), "total_s": round(self.total_s, 4)}


@dataclass
class ReuseReport:
    """The LLM calls made for one query, and what they served from blocks."""

    completions: list[Completion] = field(default_factory=list)

    def add(self, completion: Completion) -> None:
        self.completions.append(completion)

    @property
    def reused_ids(self) -> list[str]:
        """Ids of passages served from stored blocks in any of the calls, first use first."""
        return list(dict.fromkeys(i for c in self.completions for i in c.reused_ids))

    @property
    def usage(self) -> Usage:
        return Usage(*(sum(getattr(c.usage, f) for c in self.completions)
                       for f in ("prompt_tokens", "completion_tokens", "cached_tokens")))


class PromptRunner:
    """Answers finished prompts with the engine, serving the passages found in them as blocks.

    ``passages`` are the passages known for content matching (added to by ingestion or by the
    caller); hints passed per call are tried first.
    """

    def __init__(self, engine: BlockEngine, passages: PassageIndex | None = None, gate: Gate | None = None):
        self.engine = engine
        self.passages = passages if passages is not None else PassageIndex()
        self.gate = gate
        """Checks a sampled fraction of block-mode answers against full attention (see :mod:`.gate`)."""

    def plan(self, prompt: str, hints: Sequence[Passage] = ()) -> PromptPlan:
        return plan_prompt(self.engine, prompt, hints, self.passages)

    def hints_for(self, ids: Iterable[str]) -> list[Passage]:
        """Known passages for explicit ids; unknown ids are skipped (they can only fall back to prefill)."""
        return [p for p in self.passages.get(ids) if p is not None]

    def plan_for(self, prompt: str, hints: Sequence[Passage] = (), mode: PrefillMode = "block") -> PromptPlan:
        """What :meth:`stream` prefills for ``prompt`` in ``mode``: in full mode, the whole prompt as text."""
        return self.plan(prompt, hints) if mode == "block" else PromptPlan([prompt], [])

    def stream(self, prompt: str, *, hints: Sequence[Passage] = (), options: GenerationOptions = GenerationOptions(),
               timeout_s: float | None = None, plan: PromptPlan | None = None,
               gate: bool | None = None) -> Iterator[tuple[str, Completion | None]]:
        """Yield ``(delta, None)`` pairs; the last pair carries the :class:`Completion` (its delta may be "").

        ``timeout_s`` limits the whole call's wall-clock time, checked between generated tokens. ``plan`` is
        :meth:`plan_for`'s result when the caller made it already (a server plans before queueing, to check
        the prompt's length); its time is then not in the completion's ``ttft_s``. ``gate`` forces (True) or
        skips (False) the correctness gate's check of a block-mode answer that used blocks; None leaves it to
        the gate's sampling.
        """
        started = time.perf_counter()
        plan = plan if plan is not None else self.plan_for(prompt, hints, options.mode)
        planned_s = time.perf_counter() - started
        stream = self.engine.stream_segments(plan.segments, options)
        deltas = iter(stream)
        pending: str | None = None
        try:
            for delta in deltas:
                if timeout_s is not None and time.perf_counter() - started > timeout_s:
                    raise GenerationTimeoutError(
                        f"generation ran past timeout={timeout_s}s; raise the timeout or lower max_tokens.")
                if pending is not None:
                    yield pending, None
                pending = delta
        finally:
            deltas.close()  # type: ignore[attr-defined]  # stops decoding when the caller stops early
        r = stream.result
        assert r is not None
        usage = Usage(r.prompt_tokens, r.completion_tokens, plan.cached_tokens)
        report = None
        if self.gate is not None:
            checked = options.mode == "block" and bool(plan.blocks) and \
                self.gate.after(self.engine, plan.segments, gate)
            report = {"checked": checked, **self.gate.record.summary()}
        yield pending or "", Completion(r.text, r.finish_reason, usage, plan.blocks, planned_s + r.ttft_s,
                                        time.perf_counter() - started, r.decode, r.full_steps, report)

    def complete(self, prompt: str, **kwargs) -> Completion:
        """Like :meth:`stream`, returning only the finished :class:`Completion`."""
        *_, (_, done) = self.stream(prompt, **kwargs)
        assert done is not None
        return done


def index_nodes(index: Any) -> list[Any]:
    """Every passage (:class:`blockrag.retriever.Node`) of a blockrag index, document by document."""
    return [node for doc_id in index.document_ids() for node in index.document_nodes(doc_id)]


def node_passages(index: Any) -> list[Passage]:
    """Every passage of a blockrag index, known by its node ID."""
    return [Passage.of(node.text, node.id) for node in index_nodes(index)]


def index_passages(index: Any) -> PassageIndex:
    """A blockrag index's passages, for content matching and for resolving node IDs given as hints."""
    return PassageIndex(node_passages(index))


@functools.lru_cache(maxsize=4)
def shared_engine(model: str = DEFAULT_MODEL, store: str | None = None) -> BlockEngine:
    """One engine per (model, store) in this process, so that adapters built by name share weights and store.

    ``store`` is a folder or ``redis://`` URL opened with :func:`blockrag.kvstore.open_store`;
    ``None`` is the folder ``kv`` under :func:`blockrag.engine.blockrag_home`.
    """
    from blockrag.kvstore import open_store

    return BlockEngine.from_pretrained(model, store=open_store(store or blockrag_home() / "kv"))


async def aiter_in_thread(make: Callable[[], Iterable[T]]) -> AsyncIterator[T]:
    """Iterate ``make()`` in a worker thread, handing items to the event loop through a queue.

    Leaving the async iteration early stops the worker at its next item.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
    cancelled = threading.Event()

    def put(kind: str, item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, item))
        except RuntimeError:  # the loop closed while the worker ran: nobody is listening any more
            cancelled.set()

    def pump() -> None:
        iterator = iter(make())
        try:
            for item in iterator:
                if cancelled.is_set():
                    break
                put("item", item)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side, which re-raises it
            put("error", exc)
            return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        put("done", None)

    context = contextvars.copy_context()
    worker = threading.Thread(target=context.run, args=(pump,), name="blockrag-stream", daemon=True)
    worker.start()
    try:
        while True:
            kind, item = await queue.get()
            if kind == "error":
                raise item  # type: ignore[misc]
            if kind == "done":
                return
            yield item  # type: ignore[misc]
    finally:
        cancelled.set()
