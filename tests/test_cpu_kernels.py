"""The kernel library (engine/cpu_kernels.py): one-token attention against exact attention, a decode step's small
operations against torch's, and both in the decode path (bf16); a question's attention over the blocks (bf16, fp32)."""

import pytest
import torch

from blockrag.engine import cpu_kernels
from blockrag.engine.transformer import _rotate, _signed_sin
from blockrag.errors import InvalidArgumentError
from blockrag.engine.decoding import DecodeOptions

from test_decoding import random_ids, teacher_forced, tiny_model

bf16_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                  reason="the bf16 kernels need a C++ compiler and a CPU with AVX512-BF16")


def exact(query, keys, values, scaling):
    """Attention in fp64 of bf16 inputs (exact in fp64), and the log-sum-exp of the scaled scores."""
    q, k, v = (t.double() for t in (query, keys, values))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) * scaling
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


@bf16_kernels
@pytest.mark.parametrize("length", [1, 15, 16, 17, 255, 256, 257, 1000])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 2, 16), (8, 1, 128), (2, 2, 32)])
def test_one_token_attention_is_exact_attention_rounded_once_to_bf16(length, heads, kv_heads, dim):
    generator = torch.Generator().manual_seed(length * dim + heads)
    capacity = length + 7  # the cache has room past the keys read: rows of a head are not contiguous
    cache_k, cache_v = (torch.randn(1, kv_heads, capacity, dim, generator=generator).mul(3).bfloat16() for _ in range(2))
    query = torch.randn(1, heads, 1, dim, generator=generator).mul(3).bfloat16()
    keys, values, scaling = cache_k[:, :, :length], cache_v[:, :, :length], dim ** -0.5
    with torch.inference_mode():
        out, lse = cpu_kernels.decode_attention(query, keys, values, scaling, with_lse=True)
    reference, reference_lse = exact(query, keys, values, scaling)
    assert out.dtype == torch.bfloat16 and out.shape == query.shape
    # Rounding to bf16 once costs at most half an ulp, at most 2^-8 of the value; the fp32 sums before it
    # add error of order 2^-24 per term, far below 2^-16 of the largest value.
    bound = reference.abs() * 2 ** -8 + reference.abs().max() * 2 ** -16
    assert bool(((out.double() - reference).abs() <= bound).all())
    assert lse.shape == (1, kv_heads, heads // kv_heads)
    assert torch.allclose(lse.double().view(-1), reference_lse.view(-1), rtol=0, atol=1e-4)


@bf16_kernels
@pytest.mark.parametrize(("length", "rows", "dim"), [(8000, 135, 64), (1000, 7, 64), (257, 33, 32), (31, 9, 128),
                                                    (256, 8, 64), (1, 3, 64)])
def test_many_query_rows_over_a_prefix_are_exact_attention_within_bf16_probabilities(length, rows, dim):
    generator = torch.Generator().manual_seed(length + rows)
    capacity = length + 5  # room past the keys read, as in a request's cache
    cache_k, cache_v = (torch.randn(1, 3, capacity, dim, generator=generator).mul(2).bfloat16() for _ in range(2))
    query = torch.randn(1, 3, rows, dim, generator=generator).mul(2).bfloat16()
    keys, values, scaling = cache_k[:, :, :length], cache_v[:, :, :length], dim ** -0.5
    with torch.inference_mode():
        out, lse = cpu_kernels.prefix_attention(query, keys, values, scaling)
    reference, reference_lse = exact(query, keys, values, scaling)
    assert out.dtype == torch.bfloat16 and out.shape == query.shape and lse.shape == (1, 3, rows)
    # The probabilities are rounded to bf16 for their products with the values (as torch's flash kernel does): each
    # weight off by at most 2^-9 of itself, so the output by at most 2^-9 of the largest value; then the output's
    # own rounding, half an ulp (2^-9 of it); the fp32 sums add far less. Bounded here at twice each.
    bound = reference.abs() * 2 ** -8 + values.double().abs().amax(dim=(2, 3), keepdim=True) * 2 ** -8
    assert bool(((out.double() - reference).abs() <= bound).all())
    assert torch.allclose(lse.double(), reference_lse, rtol=0, atol=1e-4)
    with torch.inference_mode():
        assert cpu_kernels.prefix_attention(query.half(), keys.half(), values.half(), scaling) is None
        assert cpu_kernels.prefix_attention(query[..., :16], keys[..., :16], values[..., :16], scaling) is None
        odd = torch.zeros(1, 3, length, dim + 1, dtype=torch.bfloat16)[..., :dim]  # rows an odd count apart
        assert cpu_kernels.prefix_attention(query, odd, odd, scaling) is None


@pytest.mark.skipif(not cpu_kernels.block_kernels_run(torch.float32),
                    reason="the fp32 attention needs a C++ compiler and a CPU with AVX2 and FMA")
@pytest.mark.parametrize(("length", "rows", "dim"), [(8000, 135, 64), (2052, 72, 64), (1000, 7, 64), (513, 17, 32),
                                                    (31, 9, 128), (256, 24, 16), (1, 3, 64)])
def test_many_fp32_query_rows_over_a_prefix_are_as_exact_as_torchs_flash_kernel(length, rows, dim):
    generator = torch.Generator().manual_seed(length + rows)
    capacity = length + 5  # room past the keys read, as in a request's cache
    cache_k, cache_v = (torch.randn(1, 3, capacity, dim, generator=generator).mul(2) for _ in range(2))
    query = torch.randn(1, 3, rows, dim, generator=generator).mul(2)
    keys, values, scaling = cache_k[:, :, :length], cache_v[:, :, :length], dim ** -0.5
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with torch.inference_mode():
        out, lse = cpu_kernels.prefix_attention(query, keys, values, scaling)
        torchs, torchs_lse = flash(query, keys, values, scale=scaling)[:2]
    reference, reference_lse = exact(query, keys, values, scaling)
    assert out.dtype == torch.float32 and out.shape == query.shape and lse.shape == (1, 3, rows)
    # fp32 throughout, as torch's kernel: the two differ in the order of their sums and in exp's last bits (the
    # library's polynomial is within about 1e-7 of it), so the library errs at most twice as much as torch's kernel
    # against fp64, plus 2^-20 of the largest value for those last bits.
    error, torchs_error = ((t.double() - reference).abs().max() for t in (out, torchs))
    assert error <= 2 * torchs_error + values.abs().max() * 2 ** -20
    assert torch.allclose(lse.double(), reference_lse, rtol=0, atol=1e-5)
    assert torch.allclose(lse, torchs_lse, rtol=0, atol=1e-5)
    with torch.inference_mode():
        assert cpu_kernels.prefix_attention(query[..., :8], keys[..., :8], values[..., :8], scaling) is None  # head
        assert cpu_kernels.prefix_attention(query, keys, values.double(), scaling) is None  # dtypes differ
        assert cpu_kernels.prefix_attention(query, keys, values.contiguous(), scaling) is None  # laid out differently
        with cpu_kernels.disabled():
            assert cpu_kernels.prefix_attention(query, keys, values, scaling) is None
    assert cpu_kernels.prefix_attention(query, keys, values, scaling) is None  # autograd


@bf16_kernels
@pytest.mark.parametrize(("length", "k", "pool", "sinks", "kept"),
                         [(1000, 100, 7, 4, (900, 910)), (300, 30, 1, 0, (300, 300)), (40, 40, 3, 2, (30, 40)),
                          (257, 20, 5, 4, (250, 257))])
def test_a_full_recycled_step_chooses_the_top_k_of_exact_scores_beside_the_same_attention(length, k, pool, sinks,
                                                                                          kept):
    generator = torch.Generator().manual_seed(length + k)
    heads, kv_heads, dim = 9, 3, 64
    keys, values = (torch.randn(1, kv_heads, length, dim, generator=generator).mul(2).bfloat16() for _ in range(2))
    query = torch.randn(1, heads, 1, dim, generator=generator).mul(2).bfloat16()
    with torch.inference_mode():
        out, positions = cpu_kernels.attend_and_recycle(query, keys, values, 0.125, k, pool, sinks, kept)
        assert torch.equal(out, cpu_kernels.decode_attention(query, keys, values, 0.125)[0])
    scores = (query.double().view(kv_heads, heads // kv_heads, dim) @ keys[0].double().transpose(1, 2)) * 0.125
    scores = (scores - torch.logsumexp(scores, -1, keepdim=True)).amax(1)  # [kv_heads, length] log-probabilities
    scores = torch.nn.functional.max_pool1d(scores, pool, stride=1, padding=pool // 2)
    forced = torch.zeros(length, dtype=torch.bool)
    forced[:sinks] = forced[kept[0]:kept[1]] = True
    assert positions.shape == (kv_heads, k)
    for head in range(kv_heads):
        chosen = torch.zeros(length, dtype=torch.bool)
        chosen[positions[head]] = True
        assert torch.equal(positions[head], positions[head].sort().values) and int(chosen.sum()) == k
        assert chosen[forced].all()
        if k < length:  # the rest a valid top-K; tolerance: fp32 dot products and log-sum-exp against fp64
            assert scores[head][chosen & ~forced].min() >= scores[head][~chosen].max() - 1e-4
    with torch.inference_mode(), pytest.raises(InvalidArgumentError):
        cpu_kernels.attend_and_recycle(query, keys, values, 0.125, length + 1, pool, sinks, kept)


@bf16_kernels
@pytest.mark.parametrize(("length", "k", "sinks", "kept"), [(1000, 100, 4, (990, 1000)), (60, 7, 2, (30, 33))])
def test_among_equal_scores_the_recycle_set_takes_the_earliest(length, k, sinks, kept):
    # A zero query scores every key alike: the set is the forced positions, then the earliest of the others.
    keys = torch.randn(1, 3, length, 64, generator=torch.Generator().manual_seed(length)).bfloat16()
    with torch.inference_mode():
        _, positions = cpu_kernels.attend_and_recycle(torch.zeros(1, 9, 1, 64, dtype=torch.bfloat16), keys, keys,
                                                      0.125, k, 7, sinks, kept)
    forced = list(range(sinks)) + list(range(*kept))
    earliest = [j for j in range(length) if j not in forced][: k - len(forced)]
    assert positions.tolist() == [sorted(forced + earliest)] * 3


@bf16_kernels
def test_a_recycle_set_is_gathered_into_its_buffer_row_by_row():
    generator = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(1, 3, 50, 16, generator=generator).bfloat16() for _ in range(2))
    positions = torch.stack([torch.randperm(50, generator=generator)[:20] for _ in range(3)])
    to_keys, to_values = (torch.zeros(1, 3, 24, 16, dtype=torch.bfloat16) for _ in range(2))
    assert cpu_kernels.gather_rows(keys[:, :, :40], values[:, :, :40], positions.clamp(max=39), to_keys, to_values)
    for head in range(3):
        assert torch.equal(to_keys[0, head, :20], keys[0, head, positions[head].clamp(max=39)])
        assert torch.equal(to_values[0, head, :20], values[0, head, positions[head].clamp(max=39)])
    assert not to_keys[:, :, 20:].any()  # rows past the set untouched
    assert not cpu_kernels.gather_rows(keys.float(), values.float(), positions, to_keys.float(), to_values.float())


def four_bit_grid(rows: int, inputs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q`` in 0..15 and bf16 ``scale`` and ``zero`` per group of 32 inputs, spread as a trained layer's are."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, inputs), generator=generator, dtype=torch.int32)
    scale = (torch.rand(rows, inputs // 32, generator=generator) * 0.02 + 1e-3).bfloat16()
    zero = (torch.randn(rows, inputs // 32, generator=generator) * scale).bfloat16()
    return q, scale, zero


@bf16_kernels
def test_a_four_bit_weight_packs_and_unpacks_to_itself():
    q, scale, zero = four_bit_grid(48, 96, seed=0)
    tiles = cpu_kernels.pack_four_bit(q, scale, zero)
    assert tiles.shape == (3, 3, 160) and tiles.dtype == torch.int16
    back = cpu_kernels.unpack_four_bit(tiles)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, scale, zero)))


@bf16_kernels
def test_an_eight_bit_weight_packs_and_unpacks_to_itself():
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (48, 96), generator=generator, dtype=torch.int32)
    scale = (torch.rand(48, 3, generator=generator) * 0.002 + 1e-4).bfloat16()
    tiles = cpu_kernels.pack_eight_bit(q, scale)
    assert tiles.shape == (3, 3, 272) and tiles.dtype == torch.int16
    back_q, back_scale = cpu_kernels.unpack_eight_bit(tiles)
    assert torch.equal(back_q, q) and torch.equal(back_scale, scale)


@bf16_kernels
@pytest.mark.parametrize(("rows", "inputs"), [(16, 32), (49152 // 64, 576), (48, 2304)])
def test_an_eight_bit_product_is_the_exact_one_rounded_once_to_bf16(rows, inputs):
    generator = torch.Generator().manual_seed(rows + inputs)
    q = torch.randint(-127, 128, (rows, inputs), generator=generator, dtype=torch.int32)
    scale = (torch.rand(rows, inputs // 32, generator=generator) * 0.002 + 1e-4).bfloat16()
    x = (torch.randn(inputs, generator=torch.Generator().manual_seed(1)) * 2).bfloat16()
    out = cpu_kernels.eight_bit_matvec(cpu_kernels.pack_eight_bit(q, scale), x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows,)
    exact = (q.double().unflatten(1, (-1, 32)) * scale.double()[..., None]).flatten(1) @ x.double()
    # As the four-bit product's bound below: each half's 32 products (128 + nibble) * x exact in fp32 and summed
    # there (partial sums at most 143 * sum |x| of the group), 136 times the group's sum subtracted; then 16 times
    # the high half's, the low half's and 8 times the sum added, and scaled: within 2^-24 * 64 * 143 * 17 * sum
    # |x| * |scale| per group, then rounded to bf16 once (2^-8 of the value).
    sums = x.double().abs().unflatten(0, (-1, 32)).sum(-1)
    fp32 = 2.0 ** -24 * 64 * 143 * 17 * (scale.double().abs() @ sums)
    assert ((out.double() - exact).abs() <= 2.0 ** -8 * exact.abs() + fp32).all()
    assert (out.double() - exact).abs().max() > 0  # it did round: bf16 output, not a copy of fp64


@bf16_kernels
@pytest.mark.parametrize(("rows", "inputs"), [(16, 32), (960, 576), (576, 1536), (48, 2304)])
def test_a_four_bit_product_is_the_exact_one_rounded_once_to_bf16(rows, inputs):
    q, scale, zero = four_bit_grid(rows, inputs, seed=rows + inputs)
    x = (torch.randn(inputs, generator=torch.Generator().manual_seed(1)) * 2).bfloat16()
    out = cpu_kernels.four_bit_matvec(cpu_kernels.pack_four_bit(q, scale, zero), x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows,)
    weight = ((q.double() - 8).unflatten(1, (-1, 32)) * scale.double()[..., None] + zero.double()[..., None])
    exact = weight.flatten(1) @ x.double()
    # Rounding to bf16 once costs at most half an ulp: 2^-8 of the value. Before it, each group's 32 products
    # (128 + q) * x are exact in fp32 and summed there (each partial sum within 2^-24 of itself, at most
    # 143 * sum |x| of the group); 136 times the group's sum of x is subtracted, one more such error; scaled,
    # offset and summed over the groups in fp32: in all, within 2^-24 * 64 * 143 * sum |x| * |scale| per group.
    sums = x.double().abs().unflatten(0, (-1, 32)).sum(-1)
    fp32 = 2.0 ** -24 * 64 * 143 * (scale.double().abs() @ sums + zero.double().abs() @ sums)
    assert ((out.double() - exact).abs() <= 2.0 ** -8 * exact.abs() + fp32).all()
    assert (out.double() - exact).abs().max() > 0  # it did round: bf16 output, not a copy of fp64


@bf16_kernels
@pytest.mark.parametrize("dim", [64, 40, 16])
def test_keys_are_moved_by_the_exact_rotation_rounded_once(dim):
    """A block's keys into its slots of a request's cache (strided): the rotation in fp64 of the bf16 keys, rounded
    once to bf16, within fp32's error of its products before the rounding."""
    generator = torch.Generator().manual_seed(dim)
    keys = torch.randn(2, 3, 37, dim, generator=generator).mul(4).bfloat16()
    angles = torch.rand(37, dim // 2, generator=generator) * 100
    cos, sin = angles.cos(), angles.sin()
    cache = torch.zeros(2, 1, 3, 50, dim, dtype=torch.bfloat16)
    assert cpu_kernels.rerotate(keys, cos, sin, cache[:, 0, :, 5:42])
    k0, k1, c, s = keys.double()[..., :dim // 2], keys.double()[..., dim // 2:], cos.double(), sin.double()
    exact = torch.cat((k0 * c - k1 * s, k1 * c + k0 * s), -1)
    magnitude = torch.cat((k0.abs() * c.abs() + k1.abs() * s.abs(),) * 2, -1)
    moved = cache[:, 0, :, 5:42].double()
    assert ((moved - exact).abs() <= 2.0 ** -8 * exact.abs() + 2.0 ** -22 * magnitude).all()
    assert not cache[:, :, :, :5].any() and not cache[:, :, :, 42:].any()  # nothing written outside the slots
    alone = torch.empty(3, 37, dim, dtype=torch.bfloat16)
    assert cpu_kernels.rerotate(keys[0], cos, sin, alone)  # [heads, tokens, d] too
    assert torch.equal(alone, cache[0, 0, :, 5:42])
    assert not cpu_kernels.rerotate(keys.half(), cos, sin, cache[:, 0, :, 5:42].half())  # bf16 and fp32 only
    assert not cpu_kernels.rerotate(keys, cos, sin, cache[:, 0, :, 5:42].float())  # of one dtype


@pytest.mark.skipif(not cpu_kernels.block_kernels_run(torch.float32),
                    reason="the fp32 kernels need a C++ compiler and a CPU with AVX2 and FMA")
@pytest.mark.parametrize("dim", [64, 40, 16, 6])
def test_fp32_keys_are_moved_as_torchs_eager_rotation_to_the_bit(dim):
    """A block's fp32 keys into its slots of a request's cache (strided): the very products and sums of
    engine/rope.py's eager rotation, each rounded as torch rounds it (the vector loop and the scalar tail alike)."""
    from blockrag.engine.rope import _rotated

    generator = torch.Generator().manual_seed(dim)
    keys = torch.randn(2, 3, 37, dim, generator=generator).mul(4)
    angles = torch.rand(37, dim // 2, generator=generator) * 100
    cos, sin = angles.cos(), angles.sin()
    cache = torch.zeros(2, 1, 3, 50, dim)
    with torch.inference_mode():
        assert cpu_kernels.rerotate(keys, cos, sin, cache[:, 0, :, 5:42])
    assert torch.equal(cache[:, 0, :, 5:42], _rotated(keys, cos, sin))
    assert not cache[:, :, :, :5].any() and not cache[:, :, :, 42:].any()  # nothing written outside the slots
    alone = torch.empty(3, 37, dim)
    assert cpu_kernels.rerotate(keys[0], cos, sin, alone)  # [heads, tokens, d] too
    assert torch.equal(alone, cache[0, 0, :, 5:42])
    with cpu_kernels.disabled():
        assert not cpu_kernels.rerotate(keys, cos, sin, cache[:, 0, :, 5:42])


def test_without_a_compiler_nothing_runs_and_nothing_fails(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-for-blockrag")
    for name, value in (("_loaded", False), ("_library", None), ("_features", 0)):
        monkeypatch.setattr(cpu_kernels, name, value)
    assert not cpu_kernels.available() and not cpu_kernels.block_kernels_run(torch.float32)
    query = torch.zeros(1, 1, 2, 64)
    with torch.inference_mode():
        assert cpu_kernels.prefix_attention(query, query, query, 0.125) is None
        assert not cpu_kernels.rerotate(query[0], torch.ones(2, 32), torch.zeros(2, 32), torch.empty(1, 2, 64))


@bf16_kernels
def test_it_declines_what_it_does_not_compute():
    query, keys = torch.zeros(1, 4, 1, 16, dtype=torch.bfloat16), torch.zeros(1, 2, 8, 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert cpu_kernels.decode_attention(query.float(), keys.float(), keys.float(), 0.25) is None  # fp32
        assert cpu_kernels.decode_attention(query.expand(2, -1, -1, -1), keys.expand(2, -1, -1, -1),
                                              keys.expand(2, -1, -1, -1), 0.25) is None  # a batch
        assert cpu_kernels.decode_attention(query[..., :8], keys[..., :8], keys[..., :8], 0.25) is None  # head size
        with cpu_kernels.disabled():
            assert cpu_kernels.decode_attention(query, keys, keys, 0.25) is None
        assert cpu_kernels.decode_attention(query, keys, keys, 0.25) is not None
    assert cpu_kernels.decode_attention(query, keys, keys, 0.25) is None  # autograd


@bf16_kernels
@pytest.mark.parametrize(("rows", "size"), [(1, 576), (9, 64), (3, 40), (2, 16)])
def test_the_residual_sum_and_the_rotation_are_torchs_to_the_bit(rows, size):
    # Each result is one product or sum of bf16 values, computed in fp32 and rounded to bf16: the same arithmetic
    # as torch's, so the same bits (a size of 40 leaves a part register at the end of each half).
    generator = torch.Generator().manual_seed(rows * size)
    hidden, delta, weight = (torch.randn(rows, size, generator=generator).mul(3).bfloat16() for _ in range(3))
    summed = hidden.clone()
    cpu_kernels.add_rms_norm(summed, delta, weight[0], 1e-5)
    assert torch.equal(summed, hidden + delta)
    untouched = hidden.clone()
    cpu_kernels.add_rms_norm(untouched, None, weight[0], 1e-5)
    assert torch.equal(untouched, hidden)
    x = hidden.view(1, rows, 1, size)
    angles = torch.randn(1, size, generator=generator) * 100
    cos, signed_sin = angles.cos().bfloat16(), _signed_sin(angles.sin().bfloat16())
    assert torch.equal(cpu_kernels.rotate(x, cos, signed_sin), _rotate(x, cos, signed_sin))


@bf16_kernels
@pytest.mark.parametrize(("heads", "dim"), [(9, 64), (4, 16), (32, 128)])
def test_a_query_summary_is_torchs_mean_and_cosine_similarity(heads, dim):
    # The mean sums the heads' fp32 values in order and divides, as torch does: the same bits. The similarity is
    # summed in double where torch sums normalised fp32 values: within fp32's rounding of a sum of `dim` terms.
    generator = torch.Generator().manual_seed(heads * dim)
    query, later = (torch.randn(1, heads, 1, dim, generator=generator).bfloat16() for _ in range(2))
    anchor, none = cpu_kernels.query_similarity(query, None)
    assert torch.equal(anchor, query[0, :, -1].float().mean(0)) and none is None
    for other in (later, query, -query):
        mean, similarity = cpu_kernels.query_similarity(other, anchor)
        assert torch.equal(mean, other[0, :, -1].float().mean(0))
        assert similarity == pytest.approx(float(torch.cosine_similarity(mean, anchor, dim=0)), abs=dim * 2e-7)


@bf16_kernels
@pytest.mark.parametrize(("rows", "size"), [(1, 576), (9, 64), (3, 40), (1, 1536)])
def test_the_norm_and_the_activation_are_within_a_rounding_of_torchs(rows, size):
    generator = torch.Generator().manual_seed(rows + size)
    hidden, delta, weight = (torch.randn(rows, size, generator=generator).mul(3).bfloat16() for _ in range(3))
    gate_up = torch.randn(2 * size, generator=generator).mul(4).bfloat16()
    norm = cpu_kernels.add_rms_norm(hidden.clone(), delta, weight[0], 1e-5)
    reference_norm = torch.rms_norm(hidden + delta, [size], None, 1e-5) * weight[0]
    gate, up = gate_up.view(2, -1)
    pairs = [(norm, reference_norm), (cpu_kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)]
    for got, reference in pairs:
        # The kernel sums the squares in another order than torch, and its exponential differs from torch's by
        # about 1e-7: each moves the fp32 value before a rounding by a few 2^-24 of it, so a bf16 result is
        # torch's, or where that value sat that close to a rounding boundary, its neighbour: one ulp, at most
        # 2^-7 of the value, in a few cases out of 2^16.
        difference = (got.float() - reference.float()).abs()
        assert bool((difference <= reference.float().abs() * 2 ** -7).all())
        assert int((difference > 0).sum()) <= max(1, got.numel() // 100)


@bf16_kernels
@pytest.mark.parametrize("options", [DecodeOptions("full"), DecodeOptions("recycled", recycle_k=8, stride=3)],
                         ids=["full", "recycled"])
def test_bf16_decoding_runs_the_kernel_and_stays_within_bf16_rounding_of_torchs_kernel(options, monkeypatch):
    model = tiny_model("llama").to(torch.bfloat16)
    prompt, answer = random_ids(40, 3), random_ids(8, 4)
    with cpu_kernels.disabled():
        _, stock = teacher_forced(model, options, prompt, answer)
    calls = []
    real = cpu_kernels._attend  # what decode_attention and a full recycled step's attend_and_recycle both run

    def counted(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(cpu_kernels, "_attend", counted)
    _, got = teacher_forced(model, options, prompt, answer)
    assert len(calls) == model.config.num_hidden_layers * len(answer) and all(calls)  # every layer of every step
    for step, (a, b) in enumerate(zip(got, stock)):
        # The two kernels sum in different orders, so their bf16 outputs may differ by an ulp, and the layers after
        # carry that on: a few ulps of bf16 at the logits' scale.
        assert float((a.float() - b.float()).abs().max()) <= 2 ** -5 * float(b.float().abs().max()), step
