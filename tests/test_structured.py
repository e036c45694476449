"""Constrained decoding: output restricted to a JSON schema or grammar parses, in every prefill and decode mode."""

from __future__ import annotations

import json
import re
import sys

import pytest

pytest.importorskip("llguidance", reason='needs pip install "blockrag[structured]"')

import jsonschema  # noqa: E402

from blockrag.engine import (BlockEngine, Constraint, MissingExtraError, GenerationOptions,  # noqa: E402
                             InvalidConstraintError, constrain)
from blockrag.integrations.tools import closed_schema  # noqa: E402

PASSAGE = ("Ada Lovelace was an English mathematician, born in London on 10 December 1815. She worked with "
           "Charles Babbage on his Analytical Engine and wrote the first published algorithm for it. She died "
           "in 1852, aged 36.")
TEXT = {"type": "string", "maxLength": 40}
#: Twenty schemas of the kinds extraction asks for: nested objects, arrays, enums, numbers, optional fields.
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": TEXT}, "required": ["name"]},
    {"type": "object", "properties": {"name": TEXT, "born": {"type": "integer"}}, "required": ["name", "born"]},
    {"type": "object", "properties": {"age": {"type": "number"}}, "required": ["age"]},
    {"type": "object", "properties": {"city": TEXT, "country": TEXT}, "required": ["city"]},
    {"type": "object", "properties": {"field": {"enum": ["mathematics", "poetry", "medicine"]}}, "required": ["field"]},
    {"type": "object", "properties": {"alive": {"type": "boolean"}}, "required": ["alive"]},
    {"type": "object", "properties": {"people": {"type": "array", "items": TEXT, "minItems": 1, "maxItems": 3}},
     "required": ["people"]},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {"name": TEXT, "died": {
        "type": "integer"}}, "required": ["name", "died"]}}, "required": ["person"]},
    {"type": "object", "properties": {"years": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
     "required": ["years"]},
    {"type": "object", "properties": {"name": TEXT, "nickname": {"anyOf": [TEXT, {"type": "null"}]}},
     "required": ["name", "nickname"]},
    {"type": "object", "properties": {"sentiment": {"enum": ["positive", "neutral", "negative"]},
                                      "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["sentiment", "confidence"]},
    {"type": "array", "items": {"type": "object", "properties": {"year": {"type": "integer"}, "event": TEXT},
                                "required": ["year", "event"]}, "minItems": 1, "maxItems": 2},
    {"type": "object", "properties": {"born": {"type": "object", "properties": {
        "day": {"type": "integer", "minimum": 1, "maximum": 31}, "month": TEXT, "year": {"type": "integer"}},
        "required": ["day", "month", "year"]}}, "required": ["born"]},
    {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "reason": TEXT},
     "required": ["answer"]},
    {"type": "object", "properties": {"collaborator": TEXT, "machine": TEXT}, "required": ["collaborator",
                                                                                           "machine"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["science", "history", "art"]},
                                               "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"age_at_death": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["age_at_death"]},
    {"type": "object", "properties": {"summary": {"type": "string", "maxLength": 60}, "words": {
        "type": "integer"}}, "required": ["summary"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": TEXT}, "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]},
    {"type": "object", "properties": {"language": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
                                      "count": {"type": "integer"}}, "required": ["language", "count"]},
]


@pytest.mark.slow
def test_twenty_schemas_parse_in_block_mode(smollm):
    """Each output is JSON valid against its schema, generated over a passage served as a block. The objects are
    closed to extra properties, as the adapters close them (a small model would otherwise add properties)."""
    engine = BlockEngine(smollm)
    block = engine.encode([PASSAGE])
    outputs = []
    for schema in SCHEMAS:
        result = engine.generate(None, block, "Answer about this passage in JSON.", mode="block",
                                 constraint=Constraint.json_schema(closed_schema(schema)), max_new_tokens=96)
        assert result.finish_reason == "stop" and result.block_tokens > 0, (schema, result.text)
        jsonschema.validate(json.loads(result.text), schema)
        outputs.append(result.text)
    assert len(set(outputs)) == len(SCHEMAS)


@pytest.mark.parametrize("mode", ["block", "full"])
@pytest.mark.parametrize("decode", ["full", "recycled", "streaming"])
def test_every_prefill_and_decode_mode_keeps_the_constraint(tiny_engine, mode, decode):
    """A random model's greedy output is forced through a pattern, and sampling through an enum."""
    options = GenerationOptions(mode=mode, decode=decode, recycle_k=8, stride=2, max_new_tokens=24)
    pattern = r"[0-9]{3}-[a-z]{2}"
    unconstrained = tiny_engine.generate(None, [PASSAGE], "Code?", options)
    assert not re.fullmatch(pattern, unconstrained.text)
    coded = tiny_engine.generate(None, [PASSAGE], "Code?", options, constraint=Constraint.regex(pattern))
    assert re.fullmatch(pattern, coded.text) and coded.finish_reason == "stop" and coded.decode == decode
    choices = ["alpha", "beta", "gamma"]
    for seed in range(3):
        picked = tiny_engine.generate(None, [PASSAGE], "Pick.", options, temperature=1.0, seed=seed,
                                      constraint=Constraint.json_schema({"enum": choices}))
        assert json.loads(picked.text) in choices and picked.finish_reason == "stop"


def test_streamed_structured_output_joins_to_the_result(tiny_engine):
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[a-f]{6}$"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["code", "n"], "additionalProperties": False}
    stream = tiny_engine.stream(None, [PASSAGE], "JSON?", constraint=Constraint.json_schema(schema),
                                max_new_tokens=40)
    deltas = list(stream)
    assert len(deltas) > 1 and "".join(deltas) == stream.result.text
    value = json.loads(stream.result.text)
    jsonschema.validate(value, schema)
    assert stream.result.text == json.dumps(value)  # the compact layout: one space after ',' and ':'


def test_a_bad_schema_gets_a_specific_error_before_any_model_work(tiny_engine, monkeypatch):
    monkeypatch.setattr(tiny_engine, "_prefill", lambda *a, **k: pytest.fail("prefilled a bad request"))
    with pytest.raises(InvalidConstraintError, match="Invalid type: objekt"):
        tiny_engine.generate(None, [], "x", constraint=Constraint.json_schema({"type": "objekt"}))
    with pytest.raises(InvalidConstraintError, match="does not exist"):
        tiny_engine.generate(None, [], "x", constraint=Constraint.json_schema({"$ref": "#/$defs/missing"}))
    with pytest.raises(InvalidConstraintError, match="regular expression"):
        tiny_engine.generate(None, [], "x", constraint=Constraint.regex("(("))
    with pytest.raises(InvalidConstraintError, match="not valid JSON"):
        Constraint.json_schema("{type: object}")
    with pytest.raises(InvalidConstraintError, match="must be a JSON object"):
        Constraint.json_schema("[1, 2]")
    with pytest.raises(TypeError, match="Constraint.json_schema"):
        GenerationOptions(constraint={"type": "object"})


def test_a_compiled_constraint_is_reused(tiny_engine):
    constrain._compile.cache_clear()
    for _ in range(2):
        tiny_engine.generate(None, [], "x", constraint=Constraint.regex("ab"), max_new_tokens=4)
    assert constrain._compile.cache_info().hits == 1 and constrain._compile.cache_info().misses == 1


def test_without_the_extra_a_constraint_says_what_to_install(tiny_engine, monkeypatch):
    constrain._compile.cache_clear()
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(MissingExtraError, match=r'pip install "blockrag\[structured\]"'):
        tiny_engine.generate(None, [], "x", constraint=Constraint.regex("ab"))
    constrain._compile.cache_clear()
