"""LangChain integration: a chat model, a retriever over blockrag's index, and a RAG chain.

:class:`ChatBlockAttention` serves passages from their cached blocks wherever it can place them
in the rendered chat: ``text-plain`` content blocks with an ``id``, ids passed as ``block_ids=``,
or plain text it recognises (content matching), so a stock LCEL chain gets the speed-up as it is.
Tool calling (:meth:`~ChatBlockAttention.bind_tools`) and structured output
(:meth:`~ChatBlockAttention.with_structured_output`) constrain generation, so calls and objects always parse.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from blockrag.engine import (DEFAULT_PASSAGE_ORDER, BlockEngine, GenerationOptions, PassageOrder,
                             in_prompt_order)
from blockrag.errors import InvalidArgumentError, MissingExtraError, StructuredRequestError, UnknownOptionError

from .gate import Gate
from .matching import Passage, PassageIndex
from .runner import (ADAPTER_OPTIONS, Completion, PromptRunner, aiter_in_thread, call_options,
                     index_passages, shared_engine)
from .tools import (CallDelta, ToolCall, ToolCallStream, ToolSpec, parse_tool_calls, render_tool_chat,
                    request_constraint, response_schema)

try:
    from langchain_core.callbacks import (AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun,
                                          CallbackManagerForRetrieverRun)
    from langchain_core.documents import Document
    from langchain_core.language_models import BaseChatModel, LangSmithParams
    from langchain_core.language_models.chat_models import generate_from_stream
    from langchain_core.messages import (AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage,
                                         ToolMessage)
    from langchain_core.messages.ai import UsageMetadata
    from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
    from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import (Runnable, RunnableLambda, RunnableMap, RunnableParallel,
                                          RunnablePassthrough)
    from langchain_core.tools import BaseTool
    from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
    from langchain_core.utils.pydantic import is_basemodel_subclass
    from pydantic import ConfigDict, Field, PrivateAttr

    from .fields import AdapterFields  # pydantic, which the framework brings
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError("the LangChain integration", "langchain", exc) from exc

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "function"}
_CALL_OPTIONS = ("block_ids", "gate", "tools", "tool_choice", "parallel_tool_calls", "response_format",
                 *ADAPTER_OPTIONS)
#: Blocks in a message's content that repeat its ``tool_calls`` (Anthropic's layout): rendered from those instead.
_TOOL_CALL_BLOCKS = ("tool_use", "tool_call")
StructuredMethod = Literal["json_schema", "json_mode", "function_calling"]
DEFAULT_RAG_SYSTEM_PROMPT = "Answer the question using the documents given by the user. Answer briefly."


def message_text(message: BaseMessage) -> tuple[str, list[Passage]]:
    """A message's text as the model reads it, and the ``text-plain`` blocks in it as passages.

    Text blocks and strings are joined as they are (like ``message.text``); each ``text-plain``
    block is stripped and set off from its neighbours by a blank line. Tool-call blocks are left out: an
    assistant message's calls are rendered from its ``tool_calls``.
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
        elif kind not in _TOOL_CALL_BLOCKS:
            raise InvalidArgumentError(f"ChatBlockAttention reads 'text' and 'text-plain' content blocks; got {kind!r}. "
                             "Pass documents as text-plain blocks with their text inline.")
    text = ""
    for i, (document, part) in enumerate(parts):
        if i and (document or parts[i - 1][0]):
            text += "\n\n"
        text += part
    return text, passages


def _turn(message: BaseMessage) -> tuple[dict[str, Any], list[Passage]]:
    """A message as a chat turn (role, content, and an assistant's tool calls), and its passages."""
    text, passages = message_text(message)
    turn: dict[str, Any] = {"role": _ROLES.get(message.type) or getattr(message, "role", message.type),
                            "content": text}
    if isinstance(message, AIMessage) and message.tool_calls:
        turn["tool_calls"] = [ToolCall(c["name"], c["args"], c.get("id") or "") for c in message.tool_calls]
    if isinstance(message, ToolMessage):
        turn["tool_call_id"] = message.tool_call_id
    return turn, passages


def tool_choice_of(choice: str | bool | dict | None) -> str:
    """LangChain's ``tool_choice`` values as blockrag's: None "auto", "any" or True "required", a name or
    ``{"type": "function", "function": {"name": ...}}`` that tool."""
    if choice is None:
        return "auto"
    if choice is True or choice == "any":
        return "required"
    if isinstance(choice, dict):
        return choice.get("function", {}).get("name") or choice.get("name") or ""
    if isinstance(choice, str):
        return choice
    raise StructuredRequestError(f"tool_choice must be None, 'auto', 'any', 'required', 'none', True, a tool name or an "
                        f"OpenAI tool choice dict; got {choice!r}")


def _usage(done: Completion) -> UsageMetadata:
    u = done.usage
    return UsageMetadata(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens, total_tokens=u.total_tokens,
                         input_token_details={"cache_read": u.cached_tokens})


class ChatBlockAttention(BaseChatModel, AdapterFields):
    """A local Hugging Face chat model that answers with Block-Attention over cached passages.

    Build it with ``model`` (and ``store``: KV store folder or ``redis://`` URL, by default
    ``$BLOCKRAG_HOME/kv``), with ``engine=`` (your :class:`BlockEngine` and its store), or from a
    blockrag index with :meth:`from_index`. ``max_retries`` and ``api_key`` are accepted for LangChain's
    standard interface; a local model has no transient failures to retry and no key to check, so they change
    nothing. Any other unknown field raises.
    """

    stop: list[str] | None = None
    timeout: float | None = Field(default=None, description="Wall-clock limit per call in seconds.")
    max_retries: int = Field(default=0, ge=0)
    streaming: bool = Field(default=False, description="Answer invoke() through the streaming path, so that "
                            "callbacks see each token.")
    api_key: str | None = Field(default=None, repr=False, description="Accepted for LangChain's standard "
                                "interface; a local model needs none.")

    model_config = ConfigDict(extra="forbid")


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
            turn, passages = _turn(message)
            turns.append(turn)
            hints += passages
        tools = [ToolSpec.from_openai(t) for t in kwargs.get("tools") or ()]
        constraint = request_constraint(tools, tool_choice_of(kwargs.get("tool_choice")),
                                        kwargs.get("parallel_tool_calls", False), kwargs.get("response_format"))
        options = GenerationOptions.of(call_options(self, kwargs, stop if stop is not None else self.stop),
                                       {"constraint": constraint})
        prompt = render_tool_chat(self.engine.tokenizer, turns, tools, response_schema(kwargs.get("response_format")))
        return prompt, {"hints": hints, "options": options, "timeout_s": self.timeout, "gate": kwargs.get("gate")}

    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | BaseTool], *,
                   tool_choice: str | bool | dict | None = None, parallel_tool_calls: bool = False,
                   **kwargs: Any) -> Runnable[Any, AIMessage]:
        """The model with ``tools`` offered; its answers are constrained so that every call parses.

        ``tool_choice``: None or "auto" (call or answer), "any"/"required"/True (call one), "none", or a tool's
        name; ``parallel_tool_calls`` allows several calls in one answer (one otherwise).
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        request_constraint([ToolSpec.from_openai(t) for t in formatted], tool_choice_of(tool_choice),
                           parallel_tool_calls, None)  # an unknown tool name fails here, not at the first call
        return self.bind(tools=formatted, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                         **kwargs)

    def with_structured_output(self, schema: dict[str, Any] | type | None = None, *,
                               method: StructuredMethod = "json_schema", include_raw: bool = False,
                               strict: bool | None = None, **kwargs: Any) -> Runnable[Any, dict | Any]:
        """The model answering with an object of ``schema`` (pydantic class, TypedDict or JSON schema).

        ``"json_schema"`` constrains the answer to the schema; ``"json_mode"`` to a JSON object (one of the
        schema, when given, as the parser accepts nothing else); ``"function_calling"`` to a call of a tool
        whose arguments are the schema. ``strict`` is accepted for LangChain's interface: the constraint
        always holds. With ``include_raw``, ``{"raw", "parsed", "parsing_error"}``.
        """
        if kwargs:
            raise UnknownOptionError(f"unexpected argument(s) {sorted(kwargs)} for with_structured_output")
        if schema is None and method != "json_mode":
            raise StructuredRequestError(f"method={method!r} needs a schema; only method='json_mode' works without one")
        pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        traced = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format=traced)
            parser: Runnable = PydanticToolsParser(tools=[schema], first_tool_only=True) if pydantic else \
                JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        elif method in ("json_schema", "json_mode"):
            json_schema = None if schema is None else (schema if isinstance(schema, dict) and "properties" in schema
                                                       else convert_to_json_schema(schema))
            llm = self.bind(response_format={"type": "json_object"} if json_schema is None else {
                "type": "json_schema", "json_schema": {"schema": json_schema}}, ls_structured_output_format=traced)
            parser = PydanticOutputParser(pydantic_object=schema) if pydantic else JsonOutputParser()
        else:
            raise StructuredRequestError(f"method must be 'json_schema', 'json_mode' or 'function_calling', got {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")

    def _response_metadata(self, done: Completion, called: bool = False) -> dict[str, Any]:
        return {"model_name": self.model, "finish_reason": "tool_calls" if called else done.finish_reason,
                "blockrag": done.report()}

    def _message(self, done: Completion, tools: bool) -> AIMessage:
        text, calls = parse_tool_calls(done.text) if tools else (done.text, [])
        return AIMessage(content=text, tool_calls=[{"name": c.name, "args": c.arguments, "id": c.id,
                                                    "type": "tool_call"} for c in calls],
                         usage_metadata=_usage(done), response_metadata=self._response_metadata(done, bool(calls)))

    @staticmethod
    def _parts(pairs: Iterator[tuple[str, Completion | None]],
               tools: bool) -> Iterator[tuple[str | CallDelta, Completion | None, bool]]:
        """The runner's deltas, split into text and call deltas when tools are bound; the last carries the
        :class:`Completion` and whether the answer made calls."""
        calls = ToolCallStream() if tools else None
        for delta, done in pairs:
            parts: list[str | CallDelta] = [delta] if calls is None else \
                [*calls.feed(delta), *(calls.finish() if done is not None else ())]
            if done is None:
                yield from ((p, None, False) for p in parts)
            else:
                yield from ((p, None, False) for p in parts[:-1])
                yield (parts[-1] if parts else ""), done, bool(calls and calls.calls)

    def _chunk(self, part: str | CallDelta, done: Completion | None, called: bool = False) -> ChatGenerationChunk:
        fields: dict[str, Any] = {"content": part} if isinstance(part, str) else {"content": "", "tool_call_chunks": [
            {"name": part.name, "args": part.arguments, "id": part.id, "index": part.index,
             "type": "tool_call_chunk"}]}
        if done is not None:
            fields.update(usage_metadata=_usage(done), response_metadata=self._response_metadata(done, called),
                          chunk_position="last")
        return ChatGenerationChunk(message=AIMessageChunk(**fields))

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        prompt, call = self._prepare(messages, stop, kwargs)
        done = self._runner.complete(prompt, **call)
        return ChatResult(generations=[ChatGeneration(message=self._message(done, bool(kwargs.get("tools"))))])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        prompt, call = self._prepare(messages, stop, kwargs)
        for part, done, called in self._parts(self._runner.stream(prompt, **call), bool(kwargs.get("tools"))):
            chunk = self._chunk(part, done, called)
            if run_manager is not None:
                run_manager.on_llm_new_token(part if isinstance(part, str) else "", chunk=chunk)
            yield chunk

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        prompt, call = self._prepare(messages, stop, kwargs)
        tools = bool(kwargs.get("tools"))
        async for part, done, called in aiter_in_thread(lambda: self._parts(self._runner.stream(prompt, **call),
                                                                            tools)):
            chunk = self._chunk(part, done, called)
            if run_manager is not None:
                await run_manager.on_llm_new_token(part if isinstance(part, str) else "", chunk=chunk)
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
