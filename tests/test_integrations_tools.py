"""Tool calling and structured output in both adapters: rendering, the constraint, parsing (whole and streamed),
round trips with tool results, and passages served from blocks whatever metadata header surrounds them."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("llguidance", reason='needs pip install "blockrag[structured]"')
pytest.importorskip("langchain_core", reason='needs pip install "blockrag[langchain]"')
pytest.importorskip("llama_index.core", reason='needs pip install "blockrag[llama-index]"')

import jsonschema  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from llama_index.core.llms import ChatMessage  # noqa: E402
from llama_index.core.prompts import PromptTemplate  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from blockrag.engine import BlockEngine, InvalidConstraintError, StructuredRequestError  # noqa: E402
from blockrag.integrations.langchain import ChatBlockAttention  # noqa: E402
from blockrag.integrations.llamaindex import BlockAttentionLLM  # noqa: E402
from blockrag.integrations.tools import (CallDelta, ToolCall, ToolCallStream, ToolSpec, closed_schema,  # noqa: E402
                                         parse_tool_calls, render_tool_chat, request_constraint)

WEATHER = ToolSpec("get_weather", "Get the weather in a city.", {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"]})


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(description="full name")
    age: int


@tool
def get_weather(city: str, days: int) -> str:
    """Get the weather in a city."""
    return f"Sunny in {city} for {days} days."


def test_streamed_calls_split_into_text_and_argument_deltas_that_join_exactly():
    text = ('Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Pa}ris", "days": 2}}</tool_call>\n'
            '<tool_call>{"name": "noop", "arguments": {}}</tool_call>')
    for step in (1, 3, 7, len(text)):
        stream, parts = ToolCallStream(), []
        for i in range(0, len(text), step):
            parts += stream.feed(text[i:i + step])
        parts += stream.finish()
        words = "".join(p for p in parts if isinstance(p, str))
        starts = [p for p in parts if isinstance(p, CallDelta) and p.name is not None]
        arguments = ["".join(p.arguments for p in parts if isinstance(p, CallDelta) and p.index == i)
                     for i in range(2)]
        assert words == "Sure. \n"
        assert [(p.index, p.name) for p in starts] == [(0, "get_weather"), (1, "noop")]
        assert arguments == ['{"city": "Pa}ris", "days": 2}', "{}"]
        assert [(c.name, c.arguments, c.id) for c in stream.calls] == [
            ("get_weather", {"city": "Pa}ris", "days": 2}, starts[0].id), ("noop", {}, starts[1].id)]
    rest, calls = parse_tool_calls(text)
    assert rest == "Sure." and [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"city": "Pa}ris", "days": 2}), ("noop", {})]
    assert parse_tool_calls("no <tool_call>{broken") == ("no <tool_call>{broken", [])
    held = ToolCallStream()
    assert held.feed("a <tool") == ["a "] and held.finish() == ["<tool"]
    cut = ToolCallStream()
    assert cut.feed('<tool_call>{"name": "f", "arguments": {"a": ')[1:] == [CallDelta(0, '{"a": ')]
    assert cut.finish() == ['<tool_call>{"name": "f", "arguments": {"a": '] and cut.calls == []


def test_requests_constrain_to_calls_or_schemas_and_refuse_what_cannot_be_used():
    assert request_constraint([WEATHER], "none") is None and request_constraint([], "auto") is None
    assert "ANSWER" in request_constraint([WEATHER], "auto").source
    assert "ANSWER" not in request_constraint([WEATHER], "get_weather").source
    with pytest.raises(StructuredRequestError, match="names no bound tool"):
        request_constraint([WEATHER], "get_time")
    with pytest.raises(StructuredRequestError, match="not both"):
        request_constraint([WEATHER], "auto", response_format={"type": "json_object"})
    with pytest.raises(StructuredRequestError, match="response_format must be"):
        request_constraint([], response_format={"type": "xml"})
    assert closed_schema({"type": "object", "properties": {"a": {"type": "object", "properties": {}}},
                          "additionalProperties": True}) == {
        "type": "object", "properties": {"a": {"type": "object", "properties": {}, "additionalProperties": False}},
        "additionalProperties": True}


def test_a_template_without_tools_gets_them_in_the_system_message(smollm):
    call = ToolCall("get_weather", {"city": "Oslo", "days": 1}, "call_1")
    prompt = render_tool_chat(smollm.tokenizer, [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "Rain.", "tool_call_id": "call_1"}], [WEATHER])
    listing = json.dumps(WEATHER.as_openai()["function"])
    assert prompt == (
        "<|im_start|>system\nBe brief.\n\nYou can call these tools:\n<tools>\n" + listing + "\n</tools>\n"
        'To call a tool, reply with <tool_call>{"name": <tool name>, "arguments": <arguments as a JSON object>}'
        "</tool_call> and nothing else.<|im_end|>\n<|im_start|>user\nWeather in Oslo?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}'
        "</tool_call><|im_end|>\n<|im_start|>tool\nRain.<|im_end|>\n<|im_start|>assistant\n")


def test_langchain_tool_call_round_trip(tiny_engine):
    """A random model, forced to call: the call parses, streamed chunks merge to it, and its result goes back."""
    chat = ChatBlockAttention(engine=tiny_engine, max_tokens=40).bind_tools([get_weather], tool_choice="any")
    called = chat.invoke("Weather in Oslo for 2 days?")
    (call,) = called.tool_calls
    assert call["name"] == "get_weather" and call["type"] == "tool_call" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], get_weather.args_schema.model_json_schema())
    assert called.response_metadata["finish_reason"] == "tool_calls"
    chunks = list(chat.stream("Weather in Oslo for 2 days?"))
    merged = sum(chunks[1:], chunks[0])
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(call["name"], call["args"])]
    assert all(not c.tool_call_chunks or c.tool_call_chunks[0]["index"] == 0 for c in chunks)
    history = [HumanMessage("Weather in Oslo for 2 days?"), called,
               ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    auto = ChatBlockAttention(engine=tiny_engine, max_tokens=12).bind_tools([get_weather])
    prompt, _ = auto.bound._prepare(history, None, dict(auto.kwargs))
    assert json.dumps({"name": "get_weather", "arguments": call["args"]}) in prompt
    assert f"<|im_start|>tool\nSunny in {call['args']['city']}" in prompt
    assert isinstance(auto.invoke(history), AIMessage)


def test_langchain_structured_output_parses_streams_and_reports_bad_schemas(tiny_engine):
    chat = ChatBlockAttention(engine=tiny_engine, max_tokens=40)
    person = chat.with_structured_output(Person).invoke("Ada Lovelace, 36.")
    assert isinstance(person, Person)
    raw = chat.with_structured_output(Person, include_raw=True).invoke("Ada Lovelace, 36.")
    assert raw["parsed"] == person and raw["parsing_error"] is None and json.loads(raw["raw"].content) == \
        person.model_dump()
    streamed = list(chat.with_structured_output(Person).stream("Ada Lovelace, 36."))
    assert streamed[-1] == person  # partial objects are yielded only once they validate (here: once age is there)
    as_dicts = list(chat.with_structured_output(Person.model_json_schema()).stream("Ada Lovelace, 36."))
    assert len(as_dicts) > 1 and set(as_dicts[-1]) == {"name", "age"}
    assert all(isinstance(d, dict) and set(d) <= {"name", "age"} for d in as_dicts)
    called = chat.with_structured_output(Person, method="function_calling").invoke("Ada Lovelace, 36.")
    assert isinstance(called, Person)
    anything = chat.with_structured_output(None, method="json_mode").invoke("JSON please.")
    assert isinstance(anything, dict)
    with pytest.raises(InvalidConstraintError, match="Invalid type"):
        chat.with_structured_output({"title": "T", "type": "objekt", "properties": {"a": {}}}).invoke("x")


def test_llamaindex_tool_call_round_trip_and_structured_predict(tiny_engine):
    llm = BlockAttentionLLM(engine=tiny_engine, max_tokens=40)
    assert llm.metadata.is_function_calling_model
    weather = FunctionTool.from_defaults(lambda city, days: f"Sunny in {city} for {days} days.", name="get_weather",
                                         description="Get the weather in a city.",
                                         fn_schema=get_weather.args_schema)
    response = llm.chat_with_tools([weather], user_msg="Weather in Oslo?", tool_required=True)
    (selection,) = llm.get_tool_calls_from_response(response)
    assert selection.tool_name == "get_weather"
    jsonschema.validate(selection.tool_kwargs, get_weather.args_schema.model_json_schema())
    streamed = list(llm.stream_chat_with_tools([weather], user_msg="Weather in Oslo?", tool_required=True))
    assert [(s.tool_name, s.tool_kwargs) for s in llm.get_tool_calls_from_response(streamed[-1])] == [
        (selection.tool_name, selection.tool_kwargs)]
    history = [ChatMessage(role="user", content="Weather in Oslo?"), response.message,
               ChatMessage(role="tool", content="Rain.", additional_kwargs={"tool_call_id": selection.tool_id})]
    assert isinstance(llm.chat_with_tools([weather], chat_history=history).message.content, str)
    output = llm.predict_and_call([weather], user_msg="Weather in Oslo?", tool_required=True)
    assert output.response == f"Sunny in {selection.tool_kwargs['city']} for {selection.tool_kwargs['days']} days."
    with pytest.raises(StructuredRequestError, match="no tool call"):
        llm.get_tool_calls_from_response(llm.chat([ChatMessage(role="user", content="Hi")], max_tokens=4))
    with pytest.raises(TypeError, match="tools go to chat calls"):
        llm.complete("hi", tools=[])
    prompt = PromptTemplate("Who is in this text? {text}")
    person = llm.structured_predict(Person, prompt, text="Ada Lovelace, 36.")
    assert isinstance(person, Person)
    assert asyncio.run(llm.astructured_predict(Person, prompt, text="Ada Lovelace, 36.")) == person
    parts = list(llm.stream_structured_predict(Person, prompt, text="Ada Lovelace, 36."))
    assert len(parts) > 2 and parts[-1] == person and parts[-2].model_dump() == person.model_dump()

    async def collect():
        return [p async for p in await llm.astream_structured_predict(Person, prompt, text="Ada Lovelace, 36.")]

    assert asyncio.run(collect())[-1] == person


@pytest.mark.slow
def test_a_function_agent_calls_the_tool_and_finishes(smollm_dense):
    """Two steps on the bundled model: the agent calls the tool with a parseable argument, then answers.

    In fp32 decoding from the dense weights: whether the 135M model calls again or answers turns on logits so close
    that bf16 rounding (a bf16 model's, or the four-bit copies' products) decides it.
    """
    smollm = smollm_dense
    from llama_index.core.agent.workflow import FunctionAgent

    calls = []

    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"It is sunny and 21 degrees in {city}."

    llm = BlockAttentionLLM(engine=BlockEngine(smollm), max_tokens=48)
    # The description spelled out: this module's postponed annotations would quote the types in it, and the 135M
    # model's choice between calling again and answering turns on such details.
    weather = FunctionTool.from_defaults(get_weather, description="get_weather(city: str) -> str\n"
                                                                  "Get the current weather in a city.")
    agent = FunctionAgent(tools=[weather], llm=llm, initial_tool_choice="get_weather",
                          system_prompt="You answer questions about the weather using the tool.")

    async def ask():
        return await agent.run(user_msg="What is the weather in Paris?", max_iterations=4)

    answer = asyncio.run(ask())
    assert calls == ["Paris"]
    assert [c.tool_name for c in answer.tool_calls] == ["get_weather"] and answer.response.content


def test_a_nodes_block_is_served_whatever_metadata_header_surrounds_it(tiny_engine, tmp_path):
    """LlamaIndex's default metadata template, a custom one, and a LangChain chain quoting the text alone."""
    from langchain_core.prompts import ChatPromptTemplate
    from llama_index.core.schema import MetadataMode, TextNode

    from blockrag.integrations.llamaindex import BlockKVPrecomputer
    from blockrag.kvstore import open_store

    engine = BlockEngine(tiny_engine.loaded, store=open_store(tmp_path / "kv"))
    llm = BlockAttentionLLM(engine=engine, max_tokens=2)
    text = ("Ada Lovelace worked with Charles Babbage on the Analytical Engine and wrote the first published "
            "algorithm for it.")
    default = TextNode(text=text, metadata={"file_path": "notes/ada.md", "author": "A. Byron"})
    custom = TextNode(text=text.replace("Ada", "Augusta Ada"), metadata={"source": "letters"},
                      metadata_template="<{key}={value}>", text_template="Source {metadata_str}\n---\n{content}")
    BlockKVPrecomputer(llm)([default, custom])
    for node in (default, custom):
        quoted = node.get_content(metadata_mode=MetadataMode.LLM)
        assert quoted != node.text
        done = llm.complete(f"Context:\n{quoted}\n\nWho wrote the algorithm?")
        assert done.raw["blocks"] == [{"id": node.node_id, "tokens": len(engine.passage_token_ids(
            node.text, exact_text=True))}]
    chat = ChatBlockAttention(engine=engine, passages=llm.passages, max_tokens=2)
    chain = ChatPromptTemplate.from_messages([("human", "Context:\n\n{context}\n\nQuestion: {question}")]) | chat
    answer = chain.invoke({"context": default.get_content(metadata_mode=MetadataMode.NONE), "question": "Who?"})
    assert answer.response_metadata["blockrag"]["blocks"] == [{"id": default.node_id, "tokens": len(
        engine.passage_token_ids(text, exact_text=True))}]
