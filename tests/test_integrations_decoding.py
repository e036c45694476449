"""Decode options and the correctness gate through both framework adapters, and ``decode="auto"``, on a tiny
random-weight model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

pytest.importorskip("langchain_core", reason='needs pip install "blockrag[langchain]"')
pytest.importorskip("llama_index.core", reason='needs pip install "blockrag[llama-index]"')

from langchain_core.messages import HumanMessage  # noqa: E402

import blockrag.engine.decoding as decoding  # noqa: E402
from blockrag.engine import BlockEngine  # noqa: E402
from blockrag.integrations import Passage, PassageIndex  # noqa: E402
from blockrag.integrations.gate import compare_first_token  # noqa: E402
from blockrag.integrations.langchain import ChatBlockAttention  # noqa: E402
from blockrag.integrations.llamaindex import BlockAttentionLLM  # noqa: E402

PROMPT = "The lighthouse on Carrow Point was lit in 1871 and automated in 1990. When was it automated?"
RECYCLED = dict(decode="recycled", recycle_k=4, stride=3)


@pytest.fixture
def long_prompts_from(monkeypatch):
    """Make ``decode="auto"`` count every prompt here as long (the tiny model's context is short)."""
    monkeypatch.setattr(decoding, "AUTO_RECYCLE_FROM", 8)


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


class _Store:
    """The engine's BlockStore protocol over a dict."""

    def __init__(self):
        self.blocks = {}

    def get_many(self, keys):
        return [self.blocks.get(k) for k in keys]

    def put(self, key, block):
        self.blocks[key] = block


PASSAGE = "The lighthouse on Carrow Point was lit in 1871 and automated in 1990."


def gated_engine(tiny_engine):
    engine = BlockEngine(tiny_engine.loaded, store=_Store())
    engine.blocks([PASSAGE], exact_text=True)  # stored, as ingestion would
    return engine, PassageIndex([Passage(PASSAGE, "lighthouse")])


def test_the_gate_checks_block_answers_after_they_complete_in_both_adapters(tiny_engine):
    engine, passages = gated_engine(tiny_engine)
    prompt = f"Read this.\n\n{PASSAGE}\n\nWhen was it automated?"
    llm = BlockAttentionLLM(engine=engine, passages=passages, max_tokens=3, gate_fraction=1.0)
    first = llm.complete(prompt).raw
    assert first["reused_ids"] == ["lighthouse"] and first["gate"]["checked"] is True
    assert llm.gate.wait(60) and llm.gate.record.summary()["checks"] == 1
    assert llm.complete(prompt, gate=False).raw["gate"] == {"checked": False, **llm.gate.record.summary()}
    chat = ChatBlockAttention(engine=engine, passages=passages, max_tokens=3)  # gate_fraction 0: off unless asked
    assert chat.invoke([HumanMessage(prompt)]).response_metadata["blockrag"]["gate"]["checked"] is False
    assert chat.invoke([HumanMessage(prompt)], gate=True).response_metadata["blockrag"]["gate"]["checked"] is True
    assert chat.gate.wait(60)
    summary = chat.gate.record.summary()
    assert summary["checks"] == 1 and summary["mean_kl"] >= 0 and summary["first_token_agreements"] in (0, 1)
    segments = llm._runner.plan(llm.completion_to_prompt(prompt)).segments
    expected = compare_first_token(engine, segments)  # the comparison the gate made, made here
    assert llm.gate.record.kl_total == pytest.approx(expected.kl, abs=1e-6)


def test_the_gate_skips_full_mode_and_prompts_without_blocks(tiny_engine):
    engine, passages = gated_engine(tiny_engine)
    llm = BlockAttentionLLM(engine=engine, passages=passages, max_tokens=2, gate_fraction=1.0)
    assert llm.complete(f"{PASSAGE}\n\nWhen?", mode="full").raw["gate"]["checked"] is False
    assert llm.complete("No passage here. When?").raw["gate"]["checked"] is False
    with pytest.raises(ValidationError):
        BlockAttentionLLM(engine=engine, gate_fraction=1.5)
