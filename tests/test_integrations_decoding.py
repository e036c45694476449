"""Decode options through both framework adapters, and ``decode="auto"``, on a tiny random-weight model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

pytest.importorskip("langchain_core", reason='needs pip install "blockrag[langchain]"')
pytest.importorskip("llama_index.core", reason='needs pip install "blockrag[llama-index]"')

from langchain_core.messages import HumanMessage  # noqa: E402

import blockrag.engine.generate as generate  # noqa: E402
from blockrag.integrations.langchain import ChatBlockAttention  # noqa: E402
from blockrag.integrations.llamaindex import BlockAttentionLLM  # noqa: E402

PROMPT = "The lighthouse on Carrow Point was lit in 1871 and automated in 1990. When was it automated?"
RECYCLED = dict(decode="recycled", recycle_k=4, stride=3)


@pytest.fixture
def long_prompts_from(monkeypatch):
    """Make ``decode="auto"`` count every prompt here as long (the tiny model's context is short)."""
    monkeypatch.setattr(generate, "AUTO_RECYCLE_FROM", 8)


def test_llamaindex_llm_decodes_as_its_fields_and_call_arguments_say(tiny_engine):
    llm = BlockAttentionLLM(engine=tiny_engine, max_tokens=7, **RECYCLED)
    decode = llm.complete(PROMPT).raw["decode"]
    assert decode["mode"] == "recycled" and 0 < decode["full_steps"] < 6  # step 0 and 3 of 6: the stride's
    assert llm.complete(PROMPT, decode="full").raw["decode"] == {"mode": "full", "full_steps": 6}
    full_text = llm.complete(PROMPT, decode="full").text
    assert llm.complete(PROMPT, decode="recycled", recycle_k=1.0).text == full_text  # K covers the context: exact


def test_langchain_chat_model_decodes_as_its_fields_and_call_arguments_say(tiny_engine):
    chat = ChatBlockAttention(engine=tiny_engine, max_tokens=7, **RECYCLED)
    report = chat.invoke([HumanMessage(PROMPT)]).response_metadata["blockrag"]["decode"]
    assert report["mode"] == "recycled" and 0 < report["full_steps"] < 6
    streamed = list(chat.stream([HumanMessage(PROMPT)], decode="streaming", recycle_k=8))
    assert streamed[-1].response_metadata["blockrag"]["decode"] == {"mode": "streaming", "full_steps": 0}


def test_auto_decodes_long_prompts_with_recycled_attention(tiny_engine, long_prompts_from):
    assert BlockAttentionLLM(engine=tiny_engine, max_tokens=4).complete(PROMPT).raw["decode"]["mode"] == "recycled"
    chat = ChatBlockAttention(engine=tiny_engine, max_tokens=4)
    assert chat.invoke([HumanMessage(PROMPT)]).response_metadata["blockrag"]["decode"]["mode"] == "recycled"
    assert tiny_engine.generate(None, [], "Short?", max_new_tokens=2, decode="auto").decode == "recycled"


def test_auto_decodes_short_prompts_fully(tiny_engine):
    result = tiny_engine.generate(None, [], "Short?", max_new_tokens=3)
    assert result.decode == "full" and result.full_steps == 2


def test_unknown_fields_and_options_raise(tiny_engine):
    with pytest.raises(ValidationError, match="decode_mode"):
        BlockAttentionLLM(engine=tiny_engine, decode_mode="recycled")
    with pytest.raises(ValidationError, match="decode_mode"):
        ChatBlockAttention(engine=tiny_engine, decode_mode="recycled")
    with pytest.raises(ValidationError):
        ChatBlockAttention(engine=tiny_engine, decode="sparse")
    with pytest.raises(TypeError, match="recycle"):
        BlockAttentionLLM(engine=tiny_engine).complete(PROMPT, recycle=3)
    with pytest.raises(TypeError, match="unknown generation option"):
        tiny_engine.generate(None, [], "Short?", decoder="full")
    with pytest.raises(ValueError, match="dynamic_threshold"):
        tiny_engine.generate(None, [], "Short?", decode="full", dynamic_threshold=0.9)
