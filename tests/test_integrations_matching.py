"""Content matching and the framework-free runner, on a tiny random model with the bundled tokenizer."""

from __future__ import annotations

import asyncio
import importlib
import re
import subprocess
import sys
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from blockrag.engine import BlockEngine, LoadedModel, load_model, model_fingerprint
from blockrag.integrations import (GenerationOptions, GenerationTimeoutError, MissingExtraError, Passage, PassageIndex,
                                   PromptRunner, ReuseReport)
from blockrag.integrations.matching import ANCHOR_CHARS, locate, plan_prompt, render_chat
from blockrag.integrations.runner import aiter_in_thread, shared_engine

ALPHA = "The Larkspur Observatory stands on Mount Tamsin in northern Wales and opened in 1962."
BETA = "Marrowbridge is a market town on the River Ende, famous for its October cheese fair."
GAMMA = "The Velloran language is spoken by roughly 12,000 people on the island of Tesk."


class DictStore:
    """The engine's BlockStore protocol over a dict, counting reads."""

    def __init__(self):
        self.blocks, self.reads = {}, 0

    def get_many(self, keys):
        self.reads += len(keys)
        return [self.blocks.get(k) for k in keys]

    def put(self, key, block):
        self.blocks[key] = block


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("smollm2-135m").tokenizer


@pytest.fixture
def engine(tokenizer) -> BlockEngine:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, vocab_size=len(tokenizer))
    model = AutoModelForCausalLM.from_config(config).eval()
    return BlockEngine(LoadedModel(model, tokenizer, model_fingerprint(model, tokenizer)), store=DictStore())


def prompt_of(*passages: str, question: str = "Which town holds a cheese fair?") -> str:
    return "Context information is below.\n-----\n" + "\n\n".join(passages) + f"\n-----\nQuery: {question}\nAnswer: "


def model_input(engine: BlockEngine, segments) -> str:
    """The text the model reads: every block's tokens and every text segment's tokens, decoded together."""
    ids = []
    for s in segments:
        ids += s.token_ids.tolist() if not isinstance(s, str) else engine.tokenizer(s, add_special_tokens=False)[
            "input_ids"]
    return engine.tokenizer.decode(ids)


def test_importing_the_package_imports_no_framework():
    code = ("import sys, blockrag.integrations; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('llama_index', 'langchain_core')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module, framework, extra", [("llamaindex", "llama_index", "llama-index"),
                                                      ("langchain", "langchain_core", "langchain")])
def test_missing_framework_names_the_extra_to_install(monkeypatch, module, framework, extra):
    for name in [framework, *(m for m in sys.modules if m.startswith(framework + "."))]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails as if uninstalled
    monkeypatch.delitem(sys.modules, f"blockrag.integrations.{module}", raising=False)
    with pytest.raises(MissingExtraError, match=re.escape(f'pip install "blockrag[{extra}]"')):
        importlib.import_module(f"blockrag.integrations.{module}")


def test_index_finds_known_passages_leftmost_and_longest():
    longer = BETA + " It draws forty thousand visitors."
    index = PassageIndex([Passage(ALPHA, "a"), Passage(BETA, "b"), Passage(longer, "b+"), Passage("Too short.", "s")])
    prompt = f"x {ALPHA} y {longer} z {BETA}"
    found = index.find(prompt)
    assert [(prompt[m.start:m.end], m.passage.id) for m in found] == [(ALPHA, "a"), (longer, "b+"), (BETA, "b")]
    assert index.find(prompt, 0, len(prompt) - 1)[-1].passage.id == "b+"  # a passage cut by the bound is not found
    assert index.get(["s", "nope"]) == [Passage("Too short.", "s"), None]  # short: reachable by id only
    assert len("Too short.") < ANCHOR_CHARS and not index.find("Too short. Too short.")


def test_locate_prefers_hints_and_leaves_the_last_passage_to_prefill():
    prompt = prompt_of(ALPHA, BETA, GAMMA)
    index = PassageIndex([Passage(ALPHA, "indexed-a"), Passage(GAMMA, "g")])
    found = locate(prompt, [Passage(ALPHA, "hint-a"), Passage(BETA, "b"), Passage("not in the prompt", "stale")], index)
    assert [(prompt[m.start:m.end], m.passage.id) for m in found] == [
        (ALPHA, "hint-a"), (BETA, "b"), (GAMMA, "g")]
    assert locate("Context: " + ALPHA, [Passage(ALPHA, "a")]) == []  # nothing after it: generation needs text


@pytest.mark.parametrize("hints", [
    [], [Passage(BETA, "b")], [Passage("a text nowhere in the prompt at all, stale", "x")],
    [Passage(ALPHA[:40], "partial")], [Passage(ALPHA, "a"), Passage(ALPHA[10:60], "overlapping")]])
def test_the_model_reads_exactly_the_prompt_whatever_the_hints(engine, hints):
    prompt = prompt_of(ALPHA, BETA, GAMMA)
    engine.blocks([GAMMA, BETA])
    index = PassageIndex([Passage(GAMMA, "g")])
    plan = plan_prompt(engine, prompt, hints, index)
    assert model_input(engine, plan.segments) == prompt
    assert [u.id for u in plan.blocks] == (["b", "g"] if hints[:1] == [Passage(BETA, "b")] else ["g"])


def test_stale_hints_change_nothing(engine):
    runner = PromptRunner(engine, PassageIndex([Passage(BETA, "b")]))
    prompt = prompt_of(ALPHA, BETA, GAMMA)
    options = GenerationOptions(max_new_tokens=8)
    engine.blocks([BETA])
    plain = runner.complete(prompt, options=options)
    stale = runner.complete(prompt, hints=[Passage(ALPHA.replace("1962", "1963"), "a")], options=options)
    assert stale.text == plain.text and stale.usage == plain.usage and stale.blocks == plain.blocks


def test_blocks_stored_at_ingestion_are_served_by_content_and_nothing_else_is(engine):
    engine.blocks([ALPHA, BETA])  # what ingestion does: each passage's exact text
    stored = set(engine.store.blocks)
    assert stored == set(engine.token_block_keys([engine.passage_token_ids(p, exact_text=True)
                                                  for p in (ALPHA, BETA)]))
    runner = PromptRunner(engine, PassageIndex([Passage(ALPHA, "a"), Passage(BETA, "b"), Passage(GAMMA, "g")]))
    prompt = prompt_of(ALPHA, BETA, GAMMA)
    done = runner.complete(prompt, options=GenerationOptions(max_new_tokens=4))
    assert [(u.id, u.tokens) for u in done.blocks] == [("a", len(engine.passage_token_ids(ALPHA))),
                                                       ("b", len(engine.passage_token_ids(BETA)))]
    assert done.usage.cached_tokens == sum(len(engine.store.blocks[k]) for k in stored)
    assert done.reused_ids == ["a", "b"]
    again = runner.complete(prompt, options=GenerationOptions(max_new_tokens=4))
    assert set(engine.store.blocks) == stored  # GAMMA, known but not stored, was prefilled, not stored
    assert again.text == done.text and again.blocks == done.blocks
    engine.blocks([GAMMA])  # the last passage is followed by the template's rule, not a blank line: still served
    plan = plan_prompt(engine, prompt, (), runner.passages)
    assert [u.id for u in plan.blocks] == ["a", "b", "g"]
    # ALPHA and BETA are followed by a blank line, so their whole blocks serve them with it; GAMMA is not, so its
    # block's first tokens, the passage alone, serve it
    separator = len(engine.separator_ids)
    assert [u.tokens for u in plan.blocks] == [len(engine.passage_token_ids(ALPHA)), len(engine.passage_token_ids(BETA)),
                                               len(engine.passage_token_ids(GAMMA)) - separator]
    assert [s.token_ids[-separator:].tolist() == engine.separator_ids for s in plan.segments if not isinstance(s, str)] \
        == [True, True, False]
    assert model_input(engine, plan.segments) == prompt


def test_a_wrong_stored_block_is_never_served(engine):
    (key,) = engine.token_block_keys([engine.passage_token_ids(ALPHA)])
    engine.store.put(key, engine.blocks([BETA])[0][0])  # a faulty store: BETA's block under ALPHA's key
    plan = plan_prompt(engine, prompt_of(ALPHA, GAMMA), [Passage(ALPHA, "a")])
    assert model_input(engine, plan.segments) == prompt_of(ALPHA, GAMMA)
    assert plan.blocks == [] and plan.segments == [prompt_of(ALPHA, GAMMA)]


def test_full_mode_prefills_everything_and_streams_the_same_text(engine):
    runner = PromptRunner(engine, PassageIndex([Passage(ALPHA, "a")]))
    prompt = prompt_of(ALPHA, BETA)
    full = runner.complete(prompt, options=GenerationOptions(mode="full", max_new_tokens=6))
    assert full.blocks == [] and full.usage.cached_tokens == 0
    pairs = list(runner.stream(prompt, options=GenerationOptions(max_new_tokens=6)))
    assert all(done is None for _, done in pairs[:-1]) and pairs[-1][1] is not None
    assert "".join(delta for delta, _ in pairs) == pairs[-1][1].text
    report = ReuseReport()
    report.add(full)
    report.add(pairs[-1][1])
    assert report.usage.prompt_tokens == full.usage.prompt_tokens + pairs[-1][1].usage.prompt_tokens


def test_timeout_stops_generation(engine):
    runner = PromptRunner(engine)
    with pytest.raises(GenerationTimeoutError, match="timeout"):
        runner.complete(prompt_of(ALPHA), options=GenerationOptions(max_new_tokens=50), timeout_s=0.0)


def test_adapters_built_by_name_share_one_engine_and_store(tmp_path):
    first, again = shared_engine("smollm2-135m", str(tmp_path)), shared_engine("smollm2-135m", str(tmp_path))
    assert first is again and first.store.location.endswith(str(tmp_path))


def test_render_chat_without_a_template(tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    text = render_chat(plain, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "system: Be brief.\nuser: Hi\nassistant:"
    assert render_chat(tokenizer, [{"role": "user", "content": "Hi"}]).endswith("<|im_start|>assistant\n")


def test_async_iteration_runs_in_a_worker_thread_and_leaves_the_loop_free():
    gate = threading.Event()
    stopped = threading.Event()

    def items():
        try:
            assert gate.wait(30), "the event loop was blocked"  # set only by a coroutine on the loop
            for i in range(1000):
                yield i
        finally:
            stopped.set()

    async def main():
        seen = []

        async def open_gate():
            gate.set()

        opener = asyncio.create_task(open_gate())
        async for i in aiter_in_thread(items):
            seen.append(i)
            if i == 2:
                break
        await opener
        return seen

    assert asyncio.run(main()) == [0, 1, 2]
    assert stopped.wait(30)  # leaving early stopped the worker


def test_async_iteration_reraises_the_workers_error():
    def failing():
        yield 1
        raise KeyError("boom")

    async def main():
        return [i async for i in aiter_in_thread(failing)]

    with pytest.raises(KeyError, match="boom"):
        asyncio.run(main())
