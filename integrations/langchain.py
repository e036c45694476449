"""LangChain integration: a chat model, a retriever over blockrag's index, and a RAG chain.

:class:`ChatBlockAttention` serves passages from their cached blocks wherever it can place them
in the rendered chat: ``text-plain`` content blocks with an ``id``, ids passed as ``block_ids=``,
or plain text it recognises (content matching), so a stock LCEL chain gets the speed-up as it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from blockrag.engine import (DEFAULT_MODEL, DEFAULT_PASSAGE_ORDER, BlockEngine, PassageOrder,
                             PrefillMode, in_prompt_order)

from blockrag.errors import UnknownOptionError, InvalidArgumentError, MissingExtraError
from .gate import Gate
from .matching import Passage, PassageIndex, render_chat
from .runner import (ADAPTER_OPTIONS, Completion, PromptRunner, aiter_in_thread, call_options,
                     index_passages, shared_engine)

try:
    from langchain_core.callbacks import (AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun,
                                          CallbackManagerForRetrieverRun)
    from langchain_core.documents import Document
    from langchain_core.language_models import BaseChatModel, LangSmithParams
    from langchain_core.language_models.chat_models import generate_from_stream
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
    from langchain_core.messages.ai import UsageMetadata
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import Runnable, RunnableLambda, RunnableParallel, RunnablePassthrough
    from pydantic import ConfigDict, Field, PrivateAttr

    from .fields import DecodeFields  # pydantic, which the framework brings
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError("the LangChain integration", "langchain", exc) from exc

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "function"}
_CALL_OPTIONS = ("block_ids", "gate", *ADAPTER_OPTIONS)
DEFAULT_RAG_SYSTEM_PROMPT = "Answer the question using the documents given by the user. Answer briefly."


def message_text(message: BaseMessage) -> tuple[str, list[Passage]]:
    """A message's text as the model reads it, and the ``text-plain`` blocks in it as passages.

    Text blocks and strings are joined as they are (like ``message.text``); each ``text-plain``
    block is stripped and set off from its neighbours by a blank line.
    """
    if isinstance(message.content, str):
        return message.content, []
    parts: list[tuple[bool, str]] = []
    passages: list[Passage] = []
    for block in message.content:
        kind = "text" if isinstance(block, str) else block.get("type")
        if kind == "text":
            parts.append((False, block if isinstance(block, str) else block["text"]))
        elif kind == "text-plain" and isinstance(block.get("text"), str):
            passage = Passage.of(block["text"], block.get("id"))
            parts.append((True, passage.text))
            passages.append(passage)
        else:
            raise InvalidArgumentError(f"ChatBlockAttention reads 'text' and 'text-plain' content blocks; got {kind!r}. "
                             "Pass documents as text-plain blocks with their text inline.")
    text = ""
    for i, (document, part) in enumerate(parts):
        if i and (document or parts[i - 1][0]):
            text += "\n\n"
        text += part
    return text, passages


def _usage(done: Completion) -> UsageMetadata:
    u = done.usage
    return UsageMetadata(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens, total_tokens=u.total_tokens,
                         input_token_details={"cache_read": u.cached_tokens})


class ChatBlockAttention(BaseChatModel, DecodeFields):
    """A local Hugging Face chat model that answers with Block-Attention over cached passages.

    Build it with ``model`` (and ``store``: KV store folder or ``redis://`` URL, by default
    ``$BLOCKRAG_HOME/kv``), with ``engine=`` (your :class:`BlockEngine` and its store), or from a
    blockrag index with :meth:`from_index`. ``max_retries`` and ``api_key`` are accepted for LangChain's
    standard interface; a local model has no transient failures to retry and no key to check, so they change
    nothing. Any other unknown field raises.
    """

    model: str = Field(default=DEFAULT_MODEL, description="Bundled alias, model folder or GGUF file.")
    store: str | None = Field(default=None, description="KV store folder or redis:// URL.")
    mode: PrefillMode = Field(default="block", description="'block' serves passages from blocks; 'full' prefills all.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 decodes greedily.")
    max_tokens: int = Field(default=256, gt=0, description="Most tokens generated per call.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 disables top-k filtering.")
    seed: int | None = None
    stop: list[str] | None = None
    timeout: float | None = Field(default=None, description="Wall-clock limit per call in seconds.")
    max_retries: int = Field(default=0, ge=0)
    streaming: bool = Field(default=False, description="Answer invoke() through the streaming path, so that "
                            "callbacks see each token.")
    api_key: str | None = Field(default=None, repr=False, description="Accepted for LangChain's standard "
                                "interface; a local model needs none.")

    model_config = ConfigDict(extra="forbid")

    _runner: PromptRunner = PrivateAttr()

    def __init__(self, *, engine: BlockEngine | None = None, passages: PassageIndex | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._runner = PromptRunner(engine or shared_engine(self.model, self.store), passages,
                                    Gate(self.gate_fraction))

    @classmethod
    def from_index(cls, index: Any, **kwargs: Any) -> "ChatBlockAttention":
        """A chat model serving a :class:`blockrag.retriever.Index`'s KV store, knowing all its passages."""
        from blockrag.retriever import load_engine

        return cls(engine=load_engine(index), passages=index_passages(index), model=index.config.model, **kwargs)

    @property
    def engine(self) -> BlockEngine:
        return self._runner.engine

    @property
    def gate(self) -> Gate:
        """The correctness gate: ``gate.record.summary()`` totals its checks (``gate.wait()`` for pending ones)."""
        return self._runner.gate  # type: ignore[return-value]

    @property
    def passages(self) -> PassageIndex:
        """Passages known for content matching and for resolving ``block_ids``."""
        return self._runner.passages

    @property
    def _llm_type(self) -> str:
        return "blockrag-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "fingerprint": self.engine.fingerprint, "mode": self.mode,
                "temperature": self.temperature, "max_tokens": self.max_tokens, "top_p": self.top_p,
                "top_k": self.top_k, "seed": self.seed}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="blockrag", ls_model_name=kwargs.get("model", self.model),
                                 ls_model_type="chat", ls_temperature=kwargs.get("temperature", self.temperature),
                                 ls_max_tokens=kwargs.get("max_tokens", self.max_tokens))
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        unknown = set(kwargs) - set(_CALL_OPTIONS)
        if unknown:
            raise UnknownOptionError(f"unexpected argument(s) {sorted(unknown)}; ChatBlockAttention accepts {_CALL_OPTIONS}")
        turns, hints = [], self._runner.hints_for(kwargs.get("block_ids", ()))
        for message in messages:
            text, passages = message_text(message)
            turns.append({"role": _ROLES.get(message.type) or getattr(message, "role", message.type), "content": text})
            hints += passages
        options = call_options(self, kwargs, stop if stop is not None else self.stop)
        prompt = render_chat(self.engine.tokenizer, turns)
        return prompt, {"hints": hints, "options": options, "timeout_s": self.timeout, "gate": kwargs.get("gate")}

    def _response_metadata(self, done: Completion) -> dict[str, Any]:
        return {"model_name": self.model, "finish_reason": done.finish_reason, "blockrag": done.report()}

    def _chunk(self, delta: str, done: Completion | None) -> ChatGenerationChunk:
        if done is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=delta))
        return ChatGenerationChunk(message=AIMessageChunk(
            content=delta, usage_metadata=_usage(done), response_metadata=self._response_metadata(done),
            chunk_position="last"))

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        prompt, call = self._prepare(messages, stop, kwargs)
        done = self._runner.complete(prompt, **call)
        message = AIMessage(content=done.text, usage_metadata=_usage(done),
                            response_metadata=self._response_metadata(done))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        prompt, call = self._prepare(messages, stop, kwargs)
        for delta, done in self._runner.stream(prompt, **call):
            chunk = self._chunk(delta, done)
            if run_manager is not None:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        prompt, call = self._prepare(messages, stop, kwargs)
        async for delta, done in aiter_in_thread(lambda: self._runner.stream(prompt, **call)):
            chunk = self._chunk(delta, done)
            if run_manager is not None:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk


class BlockAttentionRetriever(BaseRetriever):
    """The ``k`` passages of a blockrag index nearest to the query, as Documents whose ids are the node IDs.

    ``retriever`` is a :class:`blockrag.retriever.Retriever`. The passages are read from its index
    once, here: the index's SQLite connection belongs to the thread that opened it, while LCEL runs
    retrievers in worker threads. Build a new retriever after ingesting more documents.
    """

    k: int = Field(default=4, gt=0)
    _retriever: Any = PrivateAttr()

    def __init__(self, retriever: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self._retriever = retriever

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [Document(page_content=hit.text, id=hit.id,
                         metadata={**hit.metadata, "doc_id": hit.node.doc_id, "score": hit.score})
                for hit in self._retriever.retrieve(query, self.k)]

    async def _aget_relevant_documents(self, query: str, *, run_manager: Any) -> list[Document]:
        return await asyncio.to_thread(self._get_relevant_documents, query, run_manager=run_manager.get_sync())


def document_blocks(documents: Sequence[Document]) -> list[dict[str, Any]]:
    """Documents as standard ``text-plain`` content blocks carrying their ids (the chat model's hints)."""
    return [{"type": "text-plain", "mime_type": "text/plain", "text": d.page_content, **({"id": d.id} if d.id else {})}
            for d in documents]


def rag_chain(retriever: BaseRetriever, llm: BaseChatModel, *, system_prompt: str = DEFAULT_RAG_SYSTEM_PROMPT,
              passage_order: PassageOrder | None = None) -> Runnable:
    """question -> ``{"question", "context": [Document], "answer": AIMessage}``, documents passed as content blocks.

    ``context`` keeps the retriever's order (best first); the prompt places the documents by ``passage_order``
    (by default a :class:`ChatBlockAttention`'s engine's: the best last, next to the question, unless its adapter
    was trained otherwise; see :data:`blockrag.engine.DEFAULT_PASSAGE_ORDER`).
    """
    if passage_order is None:
        passage_order = llm.engine.passage_order if isinstance(llm, ChatBlockAttention) else DEFAULT_PASSAGE_ORDER
    in_prompt_order([], passage_order)  # a bad order fails here, not at the first question

    def messages(inputs: dict[str, Any]) -> list[BaseMessage]:
        documents = in_prompt_order(inputs["context"], passage_order)
        content = [{"type": "text", "text": "Documents:"}, *document_blocks(documents),
                   {"type": "text", "text": f"Question: {inputs['question']}"}]
        return [SystemMessage(system_prompt), HumanMessage(content=content)]

    return RunnableParallel(context=retriever, question=RunnablePassthrough()).assign(
        answer=RunnableLambda(messages) | llm)
