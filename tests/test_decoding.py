"""Exactness of Recycled Attention and StreamingLLM decoding on tiny random-weight models."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from blockrag.engine import (BlockEngine, DecodeOptions, FixedStride, FullDecoding, LoadedModel, QuerySimilarity,
                             Recovery, RecycledDecoding, StreamingDecoding, load_model, model_fingerprint,
                             start_decoding)
from blockrag.engine.transformer import DecodeStep, KVCache, Positions, empty_cache, forward, project, use_four_bit

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, vocab_size=49152)
FAMILIES = {
    "llama": lambda: LlamaConfig(**TINY),
    "qwen2": lambda: Qwen2Config(**TINY, use_sliding_window=False),
}
PROMPT = 48
STEPS = 12


def tiny_model(family: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    config = FAMILIES[family]()
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config).eval()


def random_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1000, 40000, (n,), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, new_tokens: int = STEPS) -> KVCache:
    cache = empty_cache(model, len(ids) + new_tokens)
    forward(model, cache, ids.unsqueeze(0), Positions.span(0, len(ids)))
    return cache


@torch.inference_mode()
def teacher_forced(model, options: DecodeOptions, prompt: torch.Tensor, answer: torch.Tensor):
    """The decoding and the logits of each step when fed ``answer`` after ``prompt``."""
    decoding = start_decoding(model, prefill(model, prompt, len(answer)), options, len(answer))
    return decoding, [decoding.step(int(t)) for t in answer]


def assert_same_logits(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"step {step}: max difference {(x - y).abs().max().item()}"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_recycled_equals_full_when_k_covers_the_context_or_every_step_is_full(family, attn):
    model = tiny_model(family, attn)
    prompt, answer = random_ids(PROMPT, 1), random_ids(STEPS, 2)
    full, reference = teacher_forced(model, DecodeOptions("full"), prompt, answer)
    assert isinstance(full, FullDecoding)
    for options in (DecodeOptions("recycled", recycle_k=PROMPT + STEPS, stride=5),  # K >= context
                    DecodeOptions("recycled", recycle_k=1.0, stride=1000),  # one full step, then all partial
                    DecodeOptions("recycled", recycle_k=3, stride=1),        # every step full
                    DecodeOptions("recycled", recycle_k=3, stride=1, dynamic_threshold=1.0)):  # every check drifts
        decoding, logits = teacher_forced(model, options, prompt, answer)
        assert_same_logits(logits, reference)
    # Sanity: a small recycle set with partial steps does change the logits.
    decoding, logits = teacher_forced(model, DecodeOptions("recycled", recycle_k=3, stride=1000), prompt, answer)
    assert decoding.full_layer_steps == model.config.num_hidden_layers  # the first step only
    assert not torch.equal(logits[-1], reference[-1])


def test_streaming_equals_full_while_the_window_holds_everything():
    model = tiny_model("llama")
    prompt, answer = random_ids(PROMPT, 3), random_ids(STEPS, 4)
    _, reference = teacher_forced(model, DecodeOptions("full"), prompt, answer)
    _, logits = teacher_forced(model, DecodeOptions("streaming", recycle_k=PROMPT + STEPS), prompt, answer)
    assert_same_logits(logits, reference)


@torch.inference_mode()
def test_streaming_window_keeps_sinks_and_most_recent_tokens():
    model = tiny_model("llama")
    prompt, answer = random_ids(PROMPT, 5), random_ids(STEPS, 6)
    budget, sinks = 16, 4
    decoding, _ = teacher_forced(model, DecodeOptions("streaming", recycle_k=budget, sinks=sinks), prompt, answer)
    assert isinstance(decoding, StreamingDecoding)
    # Layer-0 keys depend only on token and position, so the reference is the whole sequence encoded at once.
    total = PROMPT + STEPS
    reference = prefill(model, torch.cat([prompt, answer])).layer(0)[0]
    expected = reference[:, :, [*range(sinks), *range(total - (budget - sinks), total)]]
    layer = decoding.layers[0]
    window, oldest = layer.window.keys, layer.oldest
    chronological = torch.cat([window[:, :, :sinks], window[:, :, oldest:], window[:, :, sinks:oldest]], dim=2)
    # Tolerance: the prompt's keys come from a 48-token forward, the new tokens' from one-token forwards
    # (different matmul shapes, so float32 rounding may differ in the last bits).
    torch.testing.assert_close(chronological, expected, rtol=0, atol=1e-5)


def pooled_reference(probs: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max over each token's neighbours within ``kernel // 2``, written out plainly."""
    n, r = probs.shape[-1], kernel // 2
    return torch.stack([probs[..., max(0, i - r): i + r + 1].amax(-1) for i in range(n)], dim=-1)


@pytest.mark.parametrize("sinks,tail", [(0, 0), (2, 3)], ids=["top-k-only", "with-sinks-and-prompt-tail"])
@pytest.mark.parametrize("kernel", [1, 7])
@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.inference_mode()
def test_recycle_set_is_the_top_k_of_eager_attention_scores(family, kernel, sinks, tail):
    model = tiny_model(family, "eager")
    prompt, answer = random_ids(PROMPT, 7), random_ids(3, 8)
    k = 10
    options = DecodeOptions("recycled", recycle_k=k, stride=2, pool_kernel=kernel, sinks=sinks,
                             prompt_tail=tail)
    decoding, _ = teacher_forced(model, options, prompt, answer)
    assert isinstance(decoding, RecycledDecoding)
    # The last full step was step 2: the query of answer[2] over the prompt and answer[:3].
    sequence = torch.cat([prompt, answer]).unsqueeze(0)
    attentions = model(input_ids=sequence, output_attentions=True).attentions
    heads = model.config.num_key_value_heads
    for layer, weights in enumerate(attentions):
        scores = weights[0, :, -1].view(heads, -1, sequence.shape[1]).amax(1)  # max over each group's query heads
        scores = pooled_reference(scores, kernel)
        selected = decoding.layers[layer].selected
        assert selected.shape == (heads, k)
        assert torch.equal(selected, selected.sort(-1).values) and len(set(selected[0].tolist())) == k
        n = sequence.shape[1]  # the full step's token is the last position
        kept = torch.zeros(n, dtype=torch.bool)
        kept[:sinks] = kept[PROMPT - tail:PROMPT] = True
        for head in range(heads):
            chosen = torch.zeros(n, dtype=torch.bool)
            chosen[selected[head]] = True
            assert chosen[kept].all(), (layer, head)  # the sinks and the prompt's tail, whatever they score
            # The rest a valid top-K: every chosen score at least every other one. Tolerance: the engine's scores
            # come from cached keys and a single-query softmax, the reference from one eager forward (float32).
            assert scores[head][chosen & ~kept].min() >= scores[head][~chosen].max() - 1e-6, (layer, head)
        # The partial cache holds exactly the keys and values of the recycle set, then the token decoded since none.
        recycled = decoding.layers[layer].recycled
        for held, full in zip((recycled.keys, recycled.values), decoding.cache.layer(layer)):
            expected = torch.stack([full[0, h, selected[h]] for h in range(heads)]).unsqueeze(0)
            assert torch.equal(held, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # torch's check; the kernel library's in bf16
def test_query_similarity_schedule_refreshes_on_drift_only(dtype):
    schedule = QuerySimilarity(threshold=0.9, every=2)
    a = torch.tensor([1.0, 0.0, 0.0, 0.0] * 4)
    b = torch.tensor([0.0, 1.0, 0.0, 0.0] * 4)

    def query(direction: torch.Tensor) -> torch.Tensor:  # [1, heads, 1, head_dim], heads whose mean is `direction`
        return torch.stack([direction + 0.5, direction - 0.5]).view(1, 2, 1, 16).to(dtype)

    assert schedule.full_step(0, 0, query(a))          # first step: full, a becomes the anchor
    assert not schedule.full_step(0, 1, query(b))      # not a check step
    assert not schedule.full_step(0, 2, query(a))      # check step, query repeats
    assert schedule.full_step(1, 2, query(b))          # another layer has no anchor yet
    assert not schedule.full_step(0, 3, query(b))      # drifted, but not a check step
    assert schedule.full_step(0, 4, query(b))          # check step, query changed: b becomes the anchor
    assert not schedule.full_step(0, 6, query(b * 3))  # same direction
    mean, similarity = schedule.summary(query(a), schedule.anchors[0])
    assert torch.equal(mean, a) and similarity == pytest.approx(0.0)


def test_dynamic_schedule_on_a_model_refreshes_less_than_fixed_stride():
    model = tiny_model("llama")
    prompt, answer = random_ids(PROMPT, 9), random_ids(STEPS, 10)
    layers = model.config.num_hidden_layers
    never, _ = teacher_forced(model, DecodeOptions("recycled", recycle_k=8, stride=1, dynamic_threshold=-1.0),
                              prompt, answer)
    always, _ = teacher_forced(model, DecodeOptions("recycled", recycle_k=8, stride=1, dynamic_threshold=1.0),
                               prompt, answer)
    assert never.full_layer_steps == layers                # cosine similarity is never below -1: first step only
    assert always.full_layer_steps == layers * STEPS       # distinct queries are never exactly aligned


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("smollm2-135m").tokenizer


@pytest.mark.parametrize("mode", ["block", "full"])
def test_generate_with_every_decode_mode_and_prefill_mode(tokenizer, mode):
    model = tiny_model("llama")
    engine = BlockEngine(LoadedModel(model, tokenizer, model_fingerprint(model, tokenizer)))
    passages = ["The tower is 330 metres tall and was finished in 1889.", "Its designer was Gustave Eiffel."]
    ask = dict(mode=mode, max_new_tokens=10, stop=None)
    full = engine.generate(None, passages, "How tall is the tower?", **ask)
    assert len(full.token_ids) == 10  # random weights: no end of sequence
    exact = [dict(decode="recycled", recycle_k=1.0, stride=4), dict(decode="recycled", recycle_k=2, stride=1),
             dict(decode="streaming", recycle_k=full.prompt_tokens + 10)]
    for decode in exact:
        assert engine.generate(None, passages, "How tall is the tower?", **ask, **decode).token_ids == full.token_ids
    stream = engine.stream(None, passages, "How tall is the tower?", **ask, decode="recycled", recycle_k=0.25,
                           stride=3, dynamic_threshold=0.5)
    text = "".join(stream)
    assert stream.result is not None and len(stream.result.token_ids) == 10 and text == stream.result.text


def test_a_step_beyond_the_caches_room_raises():
    model = tiny_model("llama")
    decoding = start_decoding(model, prefill(model, random_ids(PROMPT, 11), 1), DecodeOptions("recycled"), 1)
    decoding.step(5)
    with pytest.raises(RuntimeError, match="cannot hold"):
        decoding.step(6)  # beyond max_new_tokens
    with pytest.raises(ValueError, match="room"):
        start_decoding(model, prefill(model, random_ids(PROMPT, 11), 1), DecodeOptions("full"), 2)


def test_budget_and_option_validation():
    assert DecodeOptions("recycled").budget(8000) == 1000
    assert DecodeOptions("recycled", recycle_k=0.1).budget(15) == 2
    assert DecodeOptions("recycled", recycle_k=300).budget(8000) == 300
    for bad in (dict(mode="sparse"), dict(recycle_k=0), dict(recycle_k=1.5), dict(recycle_k=True),
                dict(stride=0), dict(mode="streaming", dynamic_threshold=0.9),
                dict(mode="recycled", dynamic_threshold=2.0), dict(pool_kernel=4), dict(sinks=-1),
                dict(prompt_tail=-1)):
        with pytest.raises(ValueError):
            DecodeOptions(**bad)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="sink"):
        start_decoding(model, prefill(model, random_ids(PROMPT, 12)), DecodeOptions("streaming", recycle_k=4), 4)


BLOCK_PASSAGES = ["The tower is 330 metres tall and was finished in 1889.", "Its designer was Gustave Eiffel.",
                  "It was the tallest structure in the world until 1930."]


@torch.inference_mode()
def test_streaming_window_over_a_block_prompt_holds_the_first_and_last_positions(tiny_engine):
    """The cache of a block prompt is in position order, so the window keeps the question (the prompt's last
    tokens by position, separators and passages among them where they sit), not what prefill wrote last (the
    separators and question, after every block); layer-0 keys depend only on token and position, so the full-mode
    cache of the same prompt is the reference."""
    block = tiny_engine.prefill(None, BLOCK_PASSAGES, "How tall is it?", mode="block", block_mode="prefix", max_new_tokens=2)
    full = tiny_engine.prefill(None, BLOCK_PASSAGES, "How tall is it?", mode="full", max_new_tokens=2)
    budget, sinks, n = 48, 4, block.cache.length  # a window reaching back over the separators and a passage
    decoding = start_decoding(tiny_engine.model, block.cache, DecodeOptions("streaming", recycle_k=budget), 2)
    expected = full.cache.layer(0)[0][:, :, [*range(sinks), *range(n - (budget - sinks), n)]]
    torch.testing.assert_close(decoding.layers[0].window.keys, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("recovery", [None, Recovery(recompute=0.5, sink_tokens=1)], ids=["blocks", "recovered"])
@torch.inference_mode()
def test_recycled_equals_full_over_block_and_recovered_caches_when_k_covers_them(tiny_engine, recovery):
    answer = random_ids(6, 21)
    runs = {}
    for name, options in (("full", DecodeOptions("full")), ("recycled", DecodeOptions("recycled", 1.0, 1000)),
                          ("every_step_full", DecodeOptions("recycled", 3, 1))):
        done = tiny_engine.prefill(None, BLOCK_PASSAGES, "How tall is it?", mode="block", block_mode="prefix", recovery=recovery, max_new_tokens=len(answer))
        decoding = start_decoding(tiny_engine.model, done.cache, options, len(answer))
        runs[name] = [decoding.step(int(t)) for t in answer]
    assert_same_logits(runs["recycled"], runs["full"])
    assert_same_logits(runs["every_step_full"], runs["full"])




@torch.inference_mode()
def step_logits(model, prompt: torch.Tensor, answer: torch.Tensor) -> list[torch.Tensor]:
    """The logits of each one-token step fed ``answer`` after ``prompt``."""
    cache = prefill(model, prompt, len(answer))
    return [forward(model, cache, torch.tensor([[int(t)]]), Positions.span(cache.length, 1))[0, -1] for t in answer]


class OwnForward(torch.nn.Linear):
    """A linear layer of another class: called as a module, by its own one-row matrix product."""


class Doubled(torch.nn.Linear):
    """A linear layer that computes something other than its weight's product, as LoRA and quantized layers do."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_a_decode_step_by_matrix_vector_products_equals_the_layers_own_products_to_the_bit(family, dtype):
    # Qwen2 has biases on its query, key and value projections; Qwen3 normalises queries and keys per head.
    from tiny_models import tiny_model as tiny_of_family
    model = tiny_of_family(family, attn="sdpa").to(dtype)
    reference = copy.deepcopy(model)
    linears = [m for m in reference.modules() if type(m) is torch.nn.Linear]
    assert len(linears) == 7 * model.config.num_hidden_layers + 1
    for layer in linears:
        layer.__class__ = OwnForward
    prompt, answer = random_ids(PROMPT, 5), random_ids(4, 6)
    assert_same_logits(step_logits(model, prompt, answer), step_logits(reference, prompt, answer))
    assert DecodeStep.of(reference) is None  # layers of other classes: decoding runs them through forward
    assert_same_logits(teacher_forced(reference, DecodeOptions("full"), prompt, answer)[1],
                       step_logits(reference, prompt, answer))


@pytest.mark.parametrize("weights", ["dense", "four_bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_the_decode_step_equals_the_forward_pass_to_the_bit(family, dtype, weights):
    """Decoding runs each token through :class:`DecodeStep`; it must compute what forward computes for it, with the
    kernel library's fused operations (in bf16 where they run: their norm sums in another order than torch's, equal
    on these inputs; test_cpu_kernels bounds them by a rounding in general; four-bit layers also run their work after
    attention as one call) and without them."""
    from blockrag.engine import cpu_kernels
    from tiny_models import on_grid, tiny_model as tiny_of_family
    model = tiny_of_family(family, attn="sdpa")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:  # Qwen2's start at zero
                module.bias.normal_(0, 0.5)
    model = (on_grid(model) if weights == "four_bit" else model).to(dtype)
    assert use_four_bit(model, "auto") == (15 if weights == "four_bit" else 0)
    assert DecodeStep.of(model) is not None
    prompt, answer = random_ids(PROMPT, 5), random_ids(6, 6)
    for fused in (cpu_kernels.fuses(dtype, torch.device("cpu")), False):
        with contextlib.nullcontext() if fused else cpu_kernels.disabled():
            decoding, stepped = teacher_forced(model, DecodeOptions("full"), prompt, answer)
            assert decoding.one_token is DecodeStep.of(model)
            assert (decoding.one_token.rotate is cpu_kernels.rotate) == fused
            # fused four-bit layers run their work after attention as one call of the library
            one_call = [layer.after_attention is not None for layer in decoding.one_token.layers]
            assert one_call == [fused and weights == "four_bit"] * len(one_call)
            # and without biases or per-head norms, the whole layer (test_whole_layer_calls_...)
            whole = [layer.whole is not None for layer in decoding.one_token.layers]
            assert whole == [fused and weights == "four_bit" and family == "llama"] * len(whole)
            assert_same_logits(stepped, step_logits(model, prompt, answer))


WHOLE_LAYER_OPTIONS = {
    "full": DecodeOptions("full"),
    "recycled": DecodeOptions("recycled", recycle_k=8, stride=3, pool_kernel=3, prompt_tail=4),
    "dynamic": DecodeOptions("recycled", recycle_k=8, stride=2, dynamic_threshold=0.3, pool_kernel=3),
    "streaming": DecodeOptions("streaming", recycle_k=10),  # the window's ring wraps within the answer
}


@pytest.mark.parametrize("mode", sorted(WHOLE_LAYER_OPTIONS))
def test_whole_layer_calls_equal_the_forward_pass_in_every_decode_mode(mode, monkeypatch):
    """Where the kernel library runs a four-bit bf16 layer, a decode step runs each layer as one call (every step of
    full decoding, of StreamingLLM and of Recycled Attention, its full steps choosing the recycle set in the call; at
    the dynamic schedule's checks after a first call that gives the query, which decides):
    it must give the logits and recycle sets that the same decoding gives through forward, layer by layer, to the
    bit, with budgets below the context so that recycle sets, refreshes and the window all matter."""
    from blockrag.engine import cpu_kernels
    from tiny_models import on_grid, tiny_model as tiny_of_family
    if not cpu_kernels.fuses(torch.bfloat16, torch.device("cpu")):
        pytest.skip("the kernel library does not run on this CPU")
    model = on_grid(tiny_of_family("llama", attn="sdpa")).to(torch.bfloat16)
    use_four_bit(model, "auto")
    prompt, answer = random_ids(PROMPT, 7), random_ids(STEPS, 8)
    calls = []
    decode_layer = cpu_kernels.decode_layer
    monkeypatch.setattr(cpu_kernels, "decode_layer", lambda *args: calls.append(1) or decode_layer(*args))
    options = WHOLE_LAYER_OPTIONS[mode]
    decoding, whole = teacher_forced(model, options, prompt, answer)
    assert all(layer.whole is not None for layer in decoding.one_token.layers)
    layers = model.config.num_hidden_layers
    assert len(calls) == layers * STEPS
    if mode == "dynamic":  # check steps refresh some layers, not all
        assert 0 < decoding.full_layer_steps < layers * len(range(0, STEPS, options.stride))
    calls.clear()
    reference = start_decoding(model, prefill(model, prompt, len(answer)), options, len(answer))
    reference.one_token = None  # each step through forward, which calls the decoding's attention in every layer
    by_forward = [reference.step(int(t)) for t in answer]
    assert not calls
    assert reference.full_layer_steps == decoding.full_layer_steps
    assert_same_logits(whole, by_forward)
    if mode in ("recycled", "dynamic"):
        assert 0 < decoding.full_layer_steps < layers * STEPS
        for ours, theirs in zip(decoding.layers, reference.layers):
            assert torch.equal(ours.selected, theirs.selected)
            assert torch.equal(ours.recycled.keys, theirs.recycled.keys)


def test_the_decode_step_is_rebuilt_when_a_weight_changes_in_place():
    from tiny_models import on_grid, tiny_model as tiny_of_family
    model = on_grid(tiny_of_family("llama", attn="sdpa"))
    use_four_bit(model, "4bit")
    step = DecodeStep.of(model)
    assert DecodeStep.of(model) is step
    with torch.no_grad():  # its four-bit copy is now stale: the step must read the dense weight
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    assert DecodeStep.of(model) is not step
    prompt, answer = random_ids(PROMPT, 5), random_ids(4, 6)
    assert_same_logits(teacher_forced(model, DecodeOptions("full"), prompt, answer)[1],
                       step_logits(model, prompt, answer))
    use_four_bit(model, "dense")  # copies dropped: a new step again
    assert DecodeStep.of(model) is not step


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("threads", [2, 3])
def test_an_fp32_projection_is_read_in_one_block_of_rows_per_thread(threads, bias):
    """On more than one thread an fp32 one-token product runs as one batched product over blocks of rows (the
    matrix-vector kernel reads on one thread only); it must compute the matrix-vector product's dot products."""
    from blockrag.engine.transformer import _matvec
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 48, bias=bias)  # 48 rows: 2 and 3 divide them; 5 does not
    x = torch.randn(1, 1, 96)
    reference = (torch.addmv(layer.bias, layer.weight, x.view(-1)) if bias else torch.mv(layer.weight, x.view(-1)))
    # Any order of summing 96 products is within 96 * eps of their absolute sum (Higham, Accuracy and Stability,
    # 3.1); rows taken from the wrong block would be off by far more.
    bound = 96 * torch.finfo(torch.float32).eps * ((layer.weight * x.view(-1)).abs().sum(1) + (layer.bias.abs() if bias
                                                                                             else 0))
    for count in (threads, 5):
        with torch_threads(count), torch.inference_mode():
            out = project(layer, x).view(-1)
            split = "_matvec_in_parts" in getattr(_matvec(layer, True), "__qualname__", "")
        assert torch.all((out - reference).abs() <= bound)
        assert split == (count == threads)  # batched where the thread count divides the rows, torch.mv's kernel else


def test_the_decode_step_is_rebuilt_when_the_thread_count_changes():
    from tiny_models import tiny_model as tiny_of_family
    model = tiny_of_family("llama", attn="sdpa")
    with torch_threads(2):
        step = DecodeStep.of(model)
    with torch_threads(1):  # its products were split for two threads: a new step reads them on one
        assert DecodeStep.of(model) is not step
        prompt, answer = random_ids(PROMPT, 5), random_ids(4, 6)
        assert_same_logits(teacher_forced(model, DecodeOptions("full"), prompt, answer)[1],
                           step_logits(model, prompt, answer))


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's thread count set to ``count`` inside, and back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_a_models_decode_step_does_not_keep_the_model_alive():
    import gc
    import weakref
    from tiny_models import tiny_model as tiny_of_family
    model = tiny_of_family("llama", attn="sdpa")
    assert DecodeStep.of(model) is not None
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_a_single_tokens_layer_of_another_class_is_called_as_it_is():
    layer, x = Doubled(8, 4), torch.randn(1, 1, 8)
    with torch.inference_mode():
        assert torch.equal(project(layer, x), 2 * torch.nn.functional.linear(x, layer.weight, layer.bias))
