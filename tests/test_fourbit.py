"""Four-bit copies of four- and eight-bit weights for decode steps: found exactly, read correctly, used only where
valid."""

import contextlib
import copy

import pytest
import torch

from blockrag.engine import cpu_kernels
from blockrag.engine import BlockEngine, DecodeOptions, LoadedModel, load_model, model_fingerprint, start_decoding
from blockrag.engine.fourbit import (GROUP, dequantize, dequantize_eight_bit, four_bit_weights, is_eight_bit,
                                    is_four_bit, quantize, quantize_eight_bit)
from blockrag.engine.transformer import (FOUR_BIT, KVCache, KVShape, Positions, forward, decode_projections, project,
                                         use_four_bit)
from blockrag.errors import InvalidArgumentError
from tiny_models import on_grid, tiny_model


def grid_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """An fp32 weight that is four-bit already: each group of GROUP inputs is ``scale * q + minimum``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols // GROUP, GROUP), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # Q4_1's rule: the group's minimum and maximum are on the grid's ends
    scale = (torch.rand(rows, cols // GROUP, 1, generator=g) * 0.02 + 0.001).half().float()  # fp16, as Q4_1 has
    minimum = (-7.5 * scale + torch.randn(rows, cols // GROUP, 1, generator=g) * scale).half().float()
    return (q * scale + minimum).flatten(1)


def eight_bit_grid_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """An fp32 weight that is eight-bit already: each group of GROUP inputs is ``scale * q``, Q8_0's rule."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (rows, cols // GROUP, GROUP), generator=g).float()
    q[..., 0] = 127 * torch.where(torch.rand(rows, cols // GROUP, generator=g) < 0.5, -1, 1)  # the largest is +-127
    scale = (torch.rand(rows, cols // GROUP, 1, generator=g) * 0.002 + 0.0001).half().float()  # fp16, as Q8_0 has
    return (q * scale).flatten(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_four_bit_weights_are_recognised_and_others_are_not(dtype):
    weight = grid_weight(64, 128).to(dtype)
    q, scale, minimum = quantize(weight)
    assert is_four_bit(weight, q, scale, minimum)
    assert four_bit_weights(weight, exact_only=True) is not None
    if dtype == torch.float32:  # the grid's own values come back exactly
        assert torch.equal(dequantize(q, scale, minimum), weight)
    dense = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)).to(dtype) * 0.05
    assert not is_four_bit(dense, *quantize(dense))
    assert four_bit_weights(dense, exact_only=True) is None
    assert four_bit_weights(dense, exact_only=False) is not None  # '4bit': quantized anyway


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eight_bit_weights_are_recognised_and_read_by_either_kernel(dtype):
    weight = eight_bit_grid_weight(64, 128).to(dtype)
    q, scale = quantize_eight_bit(weight)
    assert is_eight_bit(weight, q, scale) and not is_four_bit(weight, *quantize(weight))
    if dtype == torch.float32:  # the grid's own values come back exactly
        assert torch.equal(dequantize_eight_bit(q, scale), weight)
    copy = four_bit_weights(weight, exact_only=True)
    assert copy.eight_bit and copy.rows == 64
    assert not four_bit_weights(grid_weight(64, 128).to(dtype), exact_only=True).eight_bit  # four-bit stays so
    dense = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)).to(dtype) * 0.05
    assert not is_eight_bit(dense, *quantize_eight_bit(dense))
    assert four_bit_weights(dense, exact_only=True) is None
    row = torch.randn(128, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = copy.matvec(row)
    assert out.dtype == dtype and out.shape == (64,)
    # The halves' scales are the scale times 16 or 1, zeros 0 or 8 times it: exact in bf16 as the scale is. The
    # scale is rounded to bf16 (half an ulp, times up to 128 steps of q: half an ulp of the weight), and so are the
    # input (an fp32 one too) and the output: within a few bf16 ulps of the sum of |terms|, as the four-bit product.
    assert_read_through_bf16(copy, row, out)
    reference, magnitude = weight.double() @ row.double(), weight.double().abs() @ row.double().abs()
    bound = 8 * torch.finfo(torch.bfloat16).eps * magnitude
    assert ((out.double() - reference).abs() <= bound).all()
    with cpu_kernels.disabled():  # torch's four-bit kernel over the halves, unpacked from the library's layout
        halves = copy.matvec(row)
    assert ((halves.double() - reference).abs() <= bound).all()


def assert_read_through_bf16(copy, row: torch.Tensor, out: torch.Tensor) -> None:
    """``out``, the copy's product over ``row``, is its product over ``row`` rounded to bf16: the kernel's one
    vectorized dtype, whatever the model's."""
    assert torch.equal(out, copy.matvec(row.to(torch.bfloat16)).to(row.dtype))


def test_shapes_the_kernel_cannot_take_stay_dense():
    assert four_bit_weights(grid_weight(24, 64), exact_only=False) is None  # rows not a multiple of 16
    assert four_bit_weights(torch.zeros(32, 48), exact_only=False) is None  # inputs not whole groups


@pytest.mark.parametrize("library", ["on", "off when made", "off when read"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_four_bit_product_is_the_grid_weights_product(dtype, library):
    """The kernel library's product where it runs, else torch's four-bit kernel: from a copy made without the
    library, or from the library's layout unpacked for torch's while the library is off."""
    weight = grid_weight(96, 256).to(dtype)
    row = torch.randn(256, generator=torch.Generator().manual_seed(2)).to(dtype)
    with cpu_kernels.disabled() if library == "off when made" else contextlib.nullcontext():
        copy = four_bit_weights(weight, exact_only=True)
    with cpu_kernels.disabled() if library == "off when read" else contextlib.nullcontext():
        out = copy.matvec(row)
        assert_read_through_bf16(copy, row, out)
    assert out.dtype == dtype and out.shape == (96,)
    reference = weight.double() @ row.double()
    # The scale and zero are rounded to bf16 (half an ulp each, times up to 8 steps of q), and so are the input (an
    # fp32 one too) and the output: within a few bf16 ulps of the sum of |terms|.
    magnitude = weight.double().abs() @ row.double().abs()
    bound = 8 * torch.finfo(torch.bfloat16).eps * magnitude
    assert ((out.double() - reference).abs() <= bound).all()


def test_auto_packs_exactly_the_four_bit_projections_in_any_dtype():
    """``auto`` copies the weights on a grid, ``4bit`` every weight, in fp32 as in bf16 (the copies read bf16)."""
    model = tiny_model("llama").to(torch.bfloat16)
    projections = decode_projections(model)
    assert use_four_bit(model, "auto") == 0  # random weights are not four-bit
    assert use_four_bit(model, "4bit") == len(projections) == 15  # seven in each of two layers, and the LM head
    assert use_four_bit(model, "dense") == 0
    assert all(getattr(p, FOUR_BIT) is None for p in projections)
    grid = on_grid(tiny_model("llama"))
    assert use_four_bit(grid, "auto") == len(projections)
    assert use_four_bit(grid, "dense") == 0
    assert use_four_bit(grid, "4bit") == len(projections)
    assert use_four_bit(grid.to(torch.bfloat16), "auto") == len(projections)
    with pytest.raises(InvalidArgumentError, match="decode_weights"):
        use_four_bit(model, "int4")


@pytest.mark.parametrize("family,head", [("llama", "four-bit"), ("qwen2", "four-bit"), ("qwen3", "four-bit"),
                                         ("llama", "eight-bit")])
def test_decoding_an_fp32_model_from_four_bit_copies_errs_less_than_the_model_in_bf16(family, head):
    """fp32 grid weights: the copies hold the same weights (to their scales' bf16 rounding) and round each product's
    input and output to bf16, where the model run in bf16 rounds those and everything else (weights, residual
    stream, attention). So, teacher-forced along the dense fp32 greedy tokens, the copies' logits stay nearer to
    the dense fp32 ones than the bf16 model's on average, and their largest error within twice its largest (Qwen2's
    biases are added after the four-bit product); and they did read the copies: not equal to the dense logits. The LM head is on the four-bit grid, or on the eight-bit one,
    as the bundled model's is."""
    model = on_grid(tiny_model(family))
    with torch.no_grad():
        if head == "eight-bit":
            q, scale = quantize_eight_bit(model.lm_head.weight)
            model.lm_head.weight.copy_(dequantize_eight_bit(q, scale))
        for projection in decode_projections(model):
            if projection.bias is not None:  # initialised to zero: make them count
                projection.bias.normal_(0, 0.5)
    prompt = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(3))

    def decode(model, tokens: list[int] | None) -> tuple[list[int], torch.Tensor]:
        """Greedy from the prompt, or fed ``tokens``; the tokens and each step's fp32 logits."""
        with torch.inference_mode():
            cache = KVCache.empty(KVShape.of(model), 60)
            logits = forward(model, cache, prompt, Positions.span(0, 40))
            decoding = start_decoding(model, cache, DecodeOptions("full"), 16)
            fed, steps = [int(logits[0, -1].argmax())] if tokens is None else tokens[:1], []
            for i in range(16):
                steps.append(decoding.step(fed[i]).float())
                fed.append(int(steps[-1].argmax()) if tokens is None else tokens[i + 1])
        return fed, torch.stack(steps)

    assert use_four_bit(model, "dense") == 0
    tokens, dense = decode(model, None)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert use_four_bit(bf16, "dense") == 0
    assert use_four_bit(model, "auto") == 15
    assert getattr(model.lm_head, FOUR_BIT).weights.eight_bit == (head == "eight-bit")
    four_bit_error = (decode(model, tokens)[1] - dense).abs()
    bf16_error = (decode(bf16, tokens)[1] - dense).abs()
    assert 0 < four_bit_error.mean() < bf16_error.mean()
    assert four_bit_error.max() < 2 * bf16_error.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projections_of_one_input_share_a_copy_whose_rows_are_each_ones_own_product(dtype):
    """Query, key and value (and gate and up) are packed as one copy, read in one product by a decode step: each
    projection's rows of it must equal, to the bit, the product of a copy of its weight alone."""
    model = on_grid(tiny_model("qwen2")).to(dtype)
    assert use_four_bit(model, "auto" if dtype == torch.bfloat16 else "4bit") == 15
    x = torch.randn(64, generator=torch.Generator().manual_seed(4)).to(dtype)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj)):
            copies = [getattr(p, FOUR_BIT) for p in group]
            assert all(c.weights is copies[0].weights for c in copies)
            assert copies[-1].end == copies[0].weights.rows == sum(p.out_features for p in group)
            for projection, copy in zip(group, copies):
                row = x if projection.in_features == 64 else torch.randn(projection.in_features).to(dtype)
                alone = four_bit_weights(projection.weight, exact_only=True).matvec(row)
                assert torch.equal(copy.matvec(row), alone)


def test_a_projection_off_the_grid_leaves_the_others_of_its_input_their_own_copies():
    model = on_grid(tiny_model("llama")).to(torch.bfloat16)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight.add_(torch.randn_like(attn.k_proj.weight) * 0.01)
    assert use_four_bit(model, "auto") == 14
    q, k, v = (getattr(p, FOUR_BIT, None) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert k is None and q.weights is not v.weights and q.weights.rows == attn.q_proj.out_features


def test_a_changed_weight_or_autograd_uses_the_dense_weight():
    model = on_grid(tiny_model("llama"))
    use_four_bit(model, "4bit")
    projection = model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 1, 64)
    four_bit = getattr(projection, FOUR_BIT)
    with torch.inference_mode():
        assert torch.equal(project(projection, x), four_bit.matvec(x.reshape(-1)).view(1, 1, -1))
    with torch.no_grad():
        projection.weight.mul_(2)
    with torch.inference_mode():
        assert torch.equal(project(projection, x), torch.mv(projection.weight, x.reshape(-1)).view(1, 1, -1))
    use_four_bit(model, "4bit")
    x.requires_grad_(True)
    out = project(projection, x)  # the kernel has no derivative: autograd takes the dense weight
    out.sum().backward()
    torch.testing.assert_close(x.grad.reshape(-1), projection.weight.sum(0))


def test_the_bundled_model_is_four_bit_and_decodes_from_its_copies(smollm_fp32, smollm_dense):
    """SmolLM2's layers ship as Q4_1 and its LM head (its embedding matrix) as Q8_0: ``auto`` finds all of them as
    they are, in bf16 and in fp32 (every layer projection re-quantizes exactly, the head on the eight-bit grid),
    and answers as the dense fp32 weights do."""
    bf16 = load_model("smollm2-135m", dtype="bfloat16")
    assert smollm_dense.four_bit_projections == 0
    for loaded in (bf16, smollm_fp32):
        assert loaded.four_bit_projections == len(decode_projections(loaded.model)) == 211
        eight_bit = [getattr(p, FOUR_BIT).weights.eight_bit for p in decode_projections(loaded.model)]
        assert eight_bit == [False] * 210 + [True]
    for projection in decode_projections(smollm_fp32.model)[:14]:
        q, scale, minimum = quantize(projection.weight)
        assert torch.equal(dequantize(q, scale, minimum), projection.weight)
    head = smollm_fp32.model.lm_head.weight
    q, scale = quantize_eight_bit(head)
    assert torch.equal(dequantize_eight_bit(q, scale), head)
    assert smollm_fp32.fingerprint == smollm_dense.fingerprint
    question = "Answer in a few words.\n\nQuestion: what is the capital of France?"
    answers = [BlockEngine(loaded).generate(None, [], question, max_new_tokens=24).text
               for loaded in (smollm_fp32, smollm_dense)]
    assert answers[0] == answers[1] and answers[0]


def test_load_model_refuses_unknown_decode_weights():
    with pytest.raises(InvalidArgumentError, match="decode_weights"):
        load_model("smollm2-135m", decode_weights="int8")


def test_an_engine_over_a_four_bit_tiny_model_answers_as_the_dense_one(smollm):
    model = on_grid(tiny_model("llama"))
    texts = []
    for decode_weights in ("dense", "4bit"):
        use_four_bit(model, decode_weights)
        engine = BlockEngine(LoadedModel(model, smollm.tokenizer, model_fingerprint(model, smollm.tokenizer)))
        texts.append(engine.generate(None, ["A passage about rivers."], "Which river?", max_new_tokens=12).text)
    assert texts[0] == texts[1]
