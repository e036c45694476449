"""The OpenAI-compatible HTTP API over one engine: a thin layer that parses, queues and formats.

The engine knows nothing of HTTP. A request's prompt (chat messages rendered with the model's
template, or a completion prompt as it is) is cut into text and stored blocks wherever it
quotes a known passage (:mod:`blockrag.integrations.matching`), checked against the context,
and queued for the engine's worker thread (:mod:`.worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from jinja2 import TemplateError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from blockrag.engine import Block, BlockEngine, PrefillMode, PromptTooLongError
from blockrag.engine.prompt import tokenize
from blockrag.integrations import Completion, Passage, PromptRunner
from blockrag.integrations.gate import GateSampler
from blockrag.integrations.matching import PromptPlan, render_chat
from blockrag.kvstore import StoreError

from blockrag.errors import (InvalidArgumentError, ContextLengthError, InternalServerError, InvalidRequestError, ModelNotServedError,
                     RouteNotFoundError, ServerError, StoreFailedError, UnknownBlockError)
from .metrics import CLIENT_CLOSED, ServerMetrics
from .passages import KnownPassages, StoreScanner
from .schema import ChatRequest, CompletionRequest, Decoded, decode, parse_body
from .worker import EngineWorker, Job

log = logging.getLogger(__name__)

Endpoint = Literal["chat", "completions"]


@dataclass(frozen=True)
class ServerSettings:
    """How one server process answers. ``model_name`` is the id clients send as ``model``."""

    model_name: str
    default_max_tokens: int = 256
    """``max_tokens`` when a request leaves it out (OpenAI's default, the rest of the context, is long on a CPU)."""
    default_mode: PrefillMode = "block"
    max_active: int = 4
    """Generations the worker interleaves; more requests wait in the queue."""
    max_queue: int = 64
    """Requests that may wait; beyond that a request gets 503 with ``Retry-After``."""
    retry_after_s: int = 1
    gate_fraction: float = 0.0
    """The fraction of block-mode requests (with at least one block) that the correctness gate checks."""
    gate_seed: int | None = None
    max_gate_backlog: int = 64
    scan_interval_s: float = 0.0
    """How often to scan the block store for passages other replicas stored (0: only at start-up)."""


class IngestRequest(BaseModel):
    """``POST /v1/blockrag/passages``: passages to encode into the store, served as blocks from then on."""

    model_config = ConfigDict(extra="forbid")

    passages: list[str] = Field(min_length=1, max_length=256)


class BlockragServer:
    """One engine behind the OpenAI API, with the passages it finds in prompts; ``app`` is the ASGI app.

    ``passages`` are known from the start (an index's); with ``scan_store`` the store's blocks are
    too (see :mod:`.passages`), scanned again every ``settings.scan_interval_s`` when set.
    """

    def __init__(self, engine: BlockEngine, settings: ServerSettings, *, passages: Iterable[Passage] = (),
                 scan_store: bool = False):
        if settings.default_mode not in ("block", "full"):
            raise InvalidArgumentError(f"default_mode must be 'block' or 'full', got {settings.default_mode!r}")
        self.engine = engine
        self.settings = settings
        self.runner = PromptRunner(engine)
        self.known = KnownPassages(self.runner, passages)
        if scan_store:
            self.known.scan()
        self.sampler = GateSampler(settings.gate_fraction, settings.gate_seed)
        self.worker = EngineWorker(self.runner, max_active=settings.max_active, max_queue=settings.max_queue,
                                   max_gate_backlog=settings.max_gate_backlog, retry_after_s=settings.retry_after_s,
                                   on_gate=lambda r: self.metrics.gate(r),
                                   on_gate_skipped=lambda: self.metrics.gate_skipped.inc(),
                                   on_stopped=lambda: self.metrics.stopped.inc())
        self.metrics = ServerMetrics(lambda: self.worker.waiting, lambda: self.worker.active, lambda: len(self.known))
        self.scanner = StoreScanner(self.known, settings.scan_interval_s) \
            if scan_store and settings.scan_interval_s > 0 else None
        engine.head_block()  # the prompt head's KV, computed now rather than in the first request
        self.app = self._build()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.worker.start()
        if self.scanner is not None:
            self.scanner.start()
        try:
            yield
        finally:
            if self.scanner is not None:
                self.scanner.stop()
            self.worker.stop()

    def _build(self) -> FastAPI:
        app = FastAPI(title="blockrag", lifespan=self._lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(ServerError, self._server_error)  # type: ignore[arg-type]
        app.add_exception_handler(StarletteHTTPException, self._http_error)  # type: ignore[arg-type]
        app.add_exception_handler(StoreError, self._store_error)  # type: ignore[arg-type]
        app.add_exception_handler(Exception, self._internal_error)
        app.post("/v1/chat/completions")(self.chat)
        app.post("/v1/completions")(self.completions)
        app.get("/v1/models")(self.models)
        app.post("/v1/blockrag/passages")(self.ingest)
        app.get("/health")(self.health)
        app.get("/metrics")(self.export_metrics)
        return app

    # -- errors ------------------------------------------------------------------------------------------------

    async def _server_error(self, request: Request, exc: ServerError) -> JSONResponse:
        endpoint = _endpoint(request.url.path)
        if endpoint is not None:
            self.metrics.requests.labels(endpoint, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    async def _http_error(self, request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = RouteNotFoundError(f"no endpoint {request.method} {request.url.path}; this server has "
                                   "/v1/chat/completions, /v1/completions, /v1/models, /health and /metrics.",
                                   status=exc.status_code)
        return await self._server_error(request, error)

    async def _store_error(self, request: Request, exc: StoreError) -> JSONResponse:
        return await self._server_error(request, _as_server_error(exc))

    async def _internal_error(self, request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error answering %s %s", request.method, request.url.path, exc_info=exc)
        return await self._server_error(request, InternalServerError(
            "the server failed on this request; it is logged on the server. Please report it."))

    # -- endpoints ---------------------------------------------------------------------------------------------

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "blockrag"}]}

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.settings.model_name, "fingerprint": self.engine.fingerprint,
                "passages": len(self.known), "waiting": self.worker.waiting, "active": self.worker.active,
                "gate_backlog": self.worker.gate_backlog,
                "store": self.engine.store.location if self.engine.store is not None else None}

    async def export_metrics(self) -> Response:
        return Response(self.metrics.export(), media_type=CONTENT_TYPE_LATEST)

    async def ingest(self, request: Request) -> dict[str, Any]:
        """Encode passages into the block store (the model's work runs on the engine's worker)."""
        body: IngestRequest = parse_body(await request.body(), IngestRequest)
        if self.engine.store is None:
            raise InvalidRequestError("this server has no block store to ingest into; start it with --store.")
        texts = [Passage.of(t).text for t in body.passages]
        if not all(texts):
            raise InvalidRequestError("a passage is empty or only whitespace.", param="passages")
        fits = [len(self.engine.passage_token_ids(t, exact_text=True)) for t in texts]
        if max(fits) >= self.engine.max_positions:
            raise ContextLengthError(f"a passage has {max(fits)} tokens but the model's context is "
                                     f"{self.engine.max_positions}; split it.", param="passages")

        def encode() -> tuple[list[Block], int]:
            return self.engine.blocks(texts, exact_text=True)

        blocks, reused = await self.worker.call(encode)
        keys = self.engine.block_keys(texts, exact_text=True)
        self.known.add(Passage(t, k) for t, k in zip(texts, keys))
        return {"object": "list", "data": [{"id": k, "object": "blockrag.passage", "tokens": len(b)}
                                           for k, b in zip(keys, blocks)],
                "encoded_tokens": sum(map(len, blocks)) - reused}

    async def chat(self, request: Request) -> Response:
        arrived = time.perf_counter()
        body: ChatRequest = parse_body(await request.body(), ChatRequest)
        self._check_model(body.model)
        try:
            prompt = render_chat(self.engine.tokenizer, body.turns())
        except TemplateError as exc:
            raise InvalidRequestError(f"the model's chat template refused these messages: {exc}",
                                      param="messages") from None
        return await self._answer("chat", prompt, decode(body, self.settings.default_max_tokens), arrived)

    async def completions(self, request: Request) -> Response:
        arrived = time.perf_counter()
        body: CompletionRequest = parse_body(await request.body(), CompletionRequest)
        self._check_model(body.model)
        return await self._answer("completions", body.text(), decode(body, self.settings.default_max_tokens),
                                  arrived)

    # -- answering ---------------------------------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model != self.settings.model_name:
            raise ModelNotServedError(f"this server serves the model {self.settings.model_name!r}, not {model!r}; "
                                      "send that name (GET /v1/models lists it).", param="model")

    def _plan(self, prompt: str, hints: list[Passage], mode: PrefillMode, param: str) -> PromptPlan:
        """The prompt's plan, refused before queueing if it does not fit the context (``param`` holds the prompt)."""
        plan = self.runner.plan_for(prompt, hints, mode)
        tokens = sum(len(s) if isinstance(s, Block) else len(tokenize(self.engine.tokenizer, s)) for s in plan.segments)
        if tokens == 0 or not isinstance(plan.segments[-1], str) or not plan.segments[-1]:
            raise InvalidRequestError("the prompt is empty; send some text.", param=param)
        if tokens >= self.engine.max_positions:
            raise ContextLengthError(
                f"this model's context is {self.engine.max_positions} tokens, but the prompt has {tokens} tokens; "
                "shorten it or send fewer passages.", param=param)
        return plan

    async def _answer(self, endpoint: Endpoint, prompt: str, request: Decoded, arrived: float) -> Response:
        mode = request.mode or self.settings.default_mode
        if request.gate and mode != "block":
            raise InvalidRequestError("the correctness gate checks block mode; leave gate out with mode 'full'.",
                                      param="blockrag.gate")
        hints: list[Passage] = []
        if request.block_ids:
            hints, unknown = await asyncio.to_thread(self.known.resolve, request.block_ids)
            if unknown:
                raise UnknownBlockError(f"unknown block ids {unknown}: neither this server's passages nor its "
                                        "block store hold them; ingest them first, or leave them out.",
                                        param="blockrag.block_ids")
        plan = await asyncio.to_thread(self._plan, prompt, hints, mode, "messages" if endpoint == "chat" else "prompt")
        check = mode == "block" and bool(plan.blocks) and \
            (request.gate if request.gate is not None else self.sampler.should_check())
        options = dataclasses.replace(request.options, mode=mode)
        job = Job(lambda: self.runner.stream(prompt, hints=hints, options=options, plan=plan),
                  asyncio.get_running_loop(),
                  after=(lambda done: self.worker.check_later(plan.segments)) if check else None)
        self.worker.submit(job)
        try:
            first = await job.events.get()
        except BaseException:
            job.cancel()
            raise
        _raise_failure(first)
        self.metrics.ttft.labels(mode).observe(time.perf_counter() - arrived)
        reply = _Reply(endpoint, self.settings.model_name, self.engine.fingerprint, mode,
                       [h.id for h in hints if h.id is not None])
        if request.stream:
            return StreamingResponse(self._stream(reply, job, first, request.include_usage, arrived),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        event = first
        try:
            while event[0] == "delta":  # the whole text comes with the completion
                event = await job.events.get()
                _raise_failure(event)
        except BaseException:
            job.cancel()
            raise
        done: Completion = event[1]
        self.metrics.answered(endpoint, done, time.perf_counter() - arrived)
        return JSONResponse(reply.whole(done))

    async def _stream(self, reply: _Reply, job: Job, first: tuple[str, Any], include_usage: bool,
                      arrived: float) -> AsyncIterator[str]:
        finished = False
        try:
            if reply.chat:
                yield reply.sse(reply.opening(include_usage))
            event = first
            while event[0] == "delta":
                yield reply.sse(reply.delta(event[1], include_usage))
                event = await job.events.get()
            if event[0] == "error":
                error = _as_server_error(event[1])
                self.metrics.requests.labels(reply.endpoint, str(error.status)).inc()
                yield reply.sse(error.body())
            else:
                done: Completion = event[1]
                yield reply.sse(reply.closing(done, include_usage))
                if include_usage:
                    yield reply.sse(reply.usage_chunk(done))
                self.metrics.answered(reply.endpoint, done, time.perf_counter() - arrived)
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:  # the client went away: stop the generation at its next step
                job.cancel()
                self.metrics.requests.labels(reply.endpoint, CLIENT_CLOSED).inc()


def _endpoint(path: str) -> str | None:
    return {"/v1/chat/completions": "chat", "/v1/completions": "completions",
            "/v1/blockrag/passages": "passages"}.get(path)


def _as_server_error(exc: BaseException) -> ServerError:
    if isinstance(exc, ServerError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return ContextLengthError(str(exc))
    if isinstance(exc, StoreError):
        return StoreFailedError(f"the block store failed: {exc}")
    log.error("generation failed", exc_info=exc)
    return InternalServerError("the server failed on this request; it is logged on the server. Please report it.")


def _raise_failure(event: tuple[str, Any]) -> None:
    if event[0] == "error":
        raise _as_server_error(event[1]) from event[1]


@dataclass(frozen=True)
class _Reply:
    """OpenAI's response objects for one request: whole, or as server-sent event chunks."""

    endpoint: Endpoint
    model: str
    fingerprint: str
    mode: PrefillMode
    requested_ids: list[str]
    serial: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def chat(self) -> bool:
        return self.endpoint == "chat"

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": f"{'chatcmpl' if self.chat else 'cmpl'}-{self.serial}", "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def blockrag(self, done: Completion) -> dict[str, Any]:
        """Which passages were served from stored blocks, and the engine's own timings."""
        report = done.report()
        del report["usage"]
        used = set(report["reused_ids"])
        return {"mode": self.mode, **report,
                "unused_block_ids": [i for i in self.requested_ids if i not in used]}

    def _choice(self, text: str | None, finish: str | None, chunk: bool, role: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if not chunk:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def whole(self, done: Completion) -> dict[str, Any]:
        return {**self._head(False), "choices": [self._choice(done.text, done.finish_reason, False)],
                "usage": done.usage.as_openai(), "blockrag": self.blockrag(done)}

    def _chunk(self, choices: list[dict[str, Any]], include_usage: bool, **extra: Any) -> dict[str, Any]:
        return {**self._head(True), "choices": choices, **({"usage": None} if include_usage else {}), **extra}

    def opening(self, include_usage: bool) -> dict[str, Any]:
        return self._chunk([self._choice("", None, True, role=True)], include_usage)

    def delta(self, text: str, include_usage: bool) -> dict[str, Any]:
        return self._chunk([self._choice(text, None, True)], include_usage)

    def closing(self, done: Completion, include_usage: bool) -> dict[str, Any]:
        return self._chunk([self._choice(None, done.finish_reason, True)], include_usage, blockrag=self.blockrag(done))

    def usage_chunk(self, done: Completion) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": done.usage.as_openai()}

    @staticmethod
    def sse(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"
