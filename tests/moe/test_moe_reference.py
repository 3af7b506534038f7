"""FP4 grouped MoE reference (SPEC 5): hand cases for the clamp and the routing weight, the grouped
GEMM against dense per-row products, and fp4_grouped_moe against an independent fp64 loop-over-tokens
oracle (dsv4_kernels.oracles.moe.moe_fp64) at toy, V4-Flash and V4-Pro sizes.

Tolerance of the oracle comparison: calc_diff < 1e-4, as the lead's brief asks, plus every element within
one bf16 ulp of the oracle. Both sides accumulate the GEMMs exactly (fp64 over exact FP8 x FP4
products) and round to fp32 then bf16, and form h in fp32 with the same formula, so they share every
rounding point up to the last: the reference sums the per-expert bf16 results in fp32 and casts to bf16
(half an ulp of the exact sum, which the oracle keeps in fp64). calc_diff of half-ulp bf16 noise is
about 1.5e-6. A real defect (wrong expert, missing clamp or weight, wrong block size) shows far beyond
both bounds, as the hand cases and the block-size case show.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv4_kernels.oracles.moe import fp4_decode as _fp4_decode, moe_fp64 as _moe_oracle
from dsv4_kernels.reference.formats import pack_fp4, quantize_fp8_blockwise
from dsv4_kernels.reference.moe import fp4_grouped_moe, mxfp4_grouped_gemm, random_mxfp4_weights
from dsv4_kernels.testing import assert_calc_diff, bf16_ulp, calc_diff


def _assert_matches_oracle(y: torch.Tensor, oracle: torch.Tensor) -> None:
    assert_calc_diff(y, oracle, 1e-4, "fp4_grouped_moe")
    far = (y.double() - oracle).abs() > bf16_ulp(oracle.float()).double()
    worst = [(tuple(i), y[tuple(i)].item(), oracle[tuple(i)].item()) for i in far.nonzero()[:3].tolist()]
    assert not far.any(), f"{far.sum().item()} elements beyond one bf16 ulp of the oracle: {worst}"


def _const_weights(n_experts: int, rows: int, k: int, code: int, scale_byte: int = 127):
    """MXFP4 weights whose every element is FP4 code `code` times 2^(scale_byte - 127)."""
    packed = pack_fp4(torch.full((n_experts, rows, k), code, dtype=torch.uint8))
    return packed, torch.full((n_experts, rows, k // 32), scale_byte, dtype=torch.uint8)


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("m,n,k", [(0, 64, 256), (1, 63, 128), (3, 100, 384), (100, 32, 256)])
def test_grouped_gemm_vs_dense_rows(block, m, n, k):
    groups = 4
    x = torch.randn(m, k).to(torch.bfloat16)
    a, a_scale = quantize_fp8_blockwise(x, block)
    b, b_scale = random_mxfp4_weights(groups, n, k)
    # Unsorted expert ids plus padding rows (-1) and an id past the last group: both give zero rows.
    m_indices = torch.randint(-1, groups + 1, (m,), dtype=torch.int32)
    c = mxfp4_grouped_gemm(a, a_scale, b, b_scale, m_indices, act_block_size=block)
    assert c.shape == (m, n) and c.dtype == torch.bfloat16
    a_f = _fp8_dequant(a, a_scale)
    for row in range(m):
        g = int(m_indices[row])
        if not 0 <= g < groups:
            assert (c[row] == 0).all()
            continue
        exact = _fp4_decode(b[g], b_scale[g]) @ a_f[row]
        # The reference is the exact product rounded to fp32 (an exact accumulator), then to bf16.
        assert torch.equal(c[row], exact.float().to(torch.bfloat16))


def _fp8_dequant(a: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
    block = a.shape[-1] // a_scale.shape[-1]
    return a.double() * a_scale.double().repeat_interleave(block, dim=-1)


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("route_w,per_col", [(0.5, 48.0), (0.3, 30.0)])
def test_moe_hand_clamp_and_weight_before_down(block, route_w, per_col):
    """dim = I = block, x = 1, W1 = W3 = W2 = 1: g = u = dim > 10, both clamp to 10.
    h = silu(10) * 10 * w: w = 0.5 -> 49.9977 -> bf16 50 -> fp8 (scale 2^-3) 400, a tie between 384
    (mantissa 100) and 416 (101) -> 384 -> 48. w = 0.3 -> 29.9986 -> bf16 30 -> 240 * 2^-3 = 30.
    y = I * per_col. Applying w after the down projection instead would give I * 96 * 0.3 = I * 28.8
    for w = 0.3; no clamp gives h = dim^2 w."""
    dim = inter = block
    x = torch.ones(1, dim, dtype=torch.bfloat16)
    w13, w13_s = _const_weights(1, 2 * inter, dim, code=2)
    w2, w2_s = _const_weights(1, dim, inter, code=2)
    ids = torch.tensor([[0]], dtype=torch.int32)
    y = fp4_grouped_moe(x, ids, torch.tensor([[route_w]]), w13, w13_s, w2, w2_s, act_block_size=block)
    assert y.dtype == torch.bfloat16 and y.shape == (1, dim)
    assert (y == inter * per_col).all()
    unclamped = fp4_grouped_moe(x, ids, torch.tensor([[route_w]]), w13, w13_s, w2, w2_s,
                                act_block_size=block, swiglu_limit=0.0)
    assert torch.equal(unclamped, _moe_oracle(x, ids, torch.tensor([[route_w]]), w13, w13_s, w2, w2_s,
                                              block, swiglu_limit=0.0).to(torch.bfloat16))
    assert (unclamped.float() > 10 * y.float()).all()


@pytest.mark.parametrize("block", [32, 128])
def test_moe_hand_gate_clamp_is_one_sided_and_experts_sum(block):
    dim = inter = block
    x = torch.ones(2, dim, dtype=torch.bfloat16)
    # Expert 0: gate -1 (g = -dim, below -10: not clamped, silu(g) ~ -dim e^-dim, h rounds to fp8 0),
    # up +1. Expert 1: all +1 as in the test above.
    w13 = torch.cat((_const_weights(1, inter, dim, code=10)[0], _const_weights(1, inter, dim, code=2)[0],
                     _const_weights(1, 2 * inter, dim, code=2)[0]), dim=1).reshape(2, 2 * inter, dim // 2)
    w13_s = torch.full((2, 2 * inter, dim // 32), 127, dtype=torch.uint8)
    w2, w2_s = _const_weights(2, dim, inter, code=2)
    ids = torch.tensor([[0, 1], [1, 1]], dtype=torch.int32)
    weights = torch.tensor([[0.5, 0.3], [0.5, 0.3]])
    y = fp4_grouped_moe(x, ids, weights, w13, w13_s, w2, w2_s, act_block_size=block)
    # A symmetric gate clamp (g -> -10) would give h = silu(-10) * 10 * 0.5 = -2.27e-3, far from 0.
    assert (y[0] == inter * 30.0).all()
    assert (y[1] == inter * (48.0 + 30.0)).all()  # a duplicate id counts once per occurrence


def test_moe_invalid_ids_contribute_nothing():
    dim, inter, n_experts = 256, 128, 3
    x = torch.randn(4, dim).to(torch.bfloat16)
    w13, w13_s = random_mxfp4_weights(n_experts, 2 * inter, dim)
    w2, w2_s = random_mxfp4_weights(n_experts, dim, inter)
    weights = torch.rand(4, 3)
    ids = torch.tensor([[0, -1, 2], [n_experts, 1, -1], [-1, -1, -1], [1, 2, 0]], dtype=torch.int32)
    y = fp4_grouped_moe(x, ids, weights, w13, w13_s, w2, w2_s)
    # Same routing with each invalid slot sent to expert 0 at weight 0: h = 0 exactly, so y is identical.
    invalid = (ids < 0) | (ids >= n_experts)
    y0 = fp4_grouped_moe(x, torch.where(invalid, 0, ids), torch.where(invalid, 0.0, weights), w13, w13_s, w2, w2_s)
    assert torch.equal(y, y0)
    assert (y[2] == 0).all()
    assert (y[3] != 0).any()


def _random_case(g: torch.Generator, t: int, dim: int, inter: int, n_experts: int, k: int, x_scale: float):
    x = (torch.randn(t, dim, generator=g) * x_scale).to(torch.bfloat16)
    ids = torch.randint(-1, n_experts + 1, (t, k), generator=g, dtype=torch.int32)
    weights = torch.rand(t, k, generator=g) * 2.5 / k
    w13, w13_s = random_mxfp4_weights(n_experts, 2 * inter, dim, generator=g)
    w2, w2_s = random_mxfp4_weights(n_experts, dim, inter, generator=g)
    return x, ids, weights, w13, w13_s, w2, w2_s


@settings(deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(0, 4), dim=st.sampled_from([128, 256, 384]),
       inter=st.sampled_from([128, 256]), n_experts=st.integers(1, 5), k=st.integers(1, 6),
       block=st.sampled_from([32, 128]), x_scale=st.sampled_from([1.0, 40.0]))
def test_moe_matches_oracle(seed, t, dim, inter, n_experts, k, block, x_scale):
    g = torch.Generator().manual_seed(seed)
    case = _random_case(g, t, dim, inter, n_experts, k, x_scale)
    y = fp4_grouped_moe(*case, act_block_size=block)
    assert y.shape == (t, dim) and y.dtype == torch.bfloat16
    _assert_matches_oracle(y, _moe_oracle(*case, act_block_size=block))


@pytest.mark.parametrize("block", [32, 128])
def test_moe_clamp_triggers(block):
    g = torch.Generator().manual_seed(7)
    # x of scale 40 with weights of variance 1/dim gives gate/up values of order 40: most clamp.
    case = _random_case(g, 3, 256, 128, 2, 4, 40.0)
    y = fp4_grouped_moe(*case, act_block_size=block)
    _assert_matches_oracle(y, _moe_oracle(*case, act_block_size=block))
    assert calc_diff(y, _moe_oracle(*case, act_block_size=block, swiglu_limit=0.0)) > 1e-2


@pytest.mark.parametrize("block", [32, 128])
def test_moe_activation_block_size_is_followed(block):
    """Channels 0-31 are 2^20 times larger and their W1/W3 columns are zero. With 128-blocks, channels
    32-127 share their scale (2^13) and flush to fp8 zero; with 32-blocks they keep full precision."""
    g = torch.Generator().manual_seed(11)
    x, ids, weights, w13, w13_s, w2, w2_s = _random_case(g, 3, 256, 128, 2, 2, 1.0)
    x[:, :32] *= 2.0 ** 20
    w13[..., :16] = 0
    case = (x, ids, weights, w13, w13_s, w2, w2_s)
    y = fp4_grouped_moe(*case, act_block_size=block)
    _assert_matches_oracle(y, _moe_oracle(*case, act_block_size=block))
    other = 128 if block == 32 else 32
    assert calc_diff(y, _moe_oracle(*case, act_block_size=other)) > 1e-2


MODELS = {  # dim, I, experts, routed_scaling_factor (SPEC 0)
    "flash": (4096, 2048, 256, 1.5),
    "pro": (7168, 3072, 384, 2.5),
}


def _uniform_code_weights(n_experts: int, rows: int, k: int, g: torch.Generator):
    """Uniformly random FP4 codes (rms value 2.93) with one scale 2^round(log2(1 / (2.93 sqrt(K)))), so
    entries have the magnitude of N(0, 1/sqrt(K)) weights; 20x cheaper than quantising Gaussians, which
    matters at V4-Pro sizes on a shared CPU."""
    packed = torch.randint(0, 256, (n_experts, rows, k // 2), generator=g, dtype=torch.uint8)
    byte = 127 + round(math.log2(1 / (2.93 * math.sqrt(k))))
    return packed, torch.full((n_experts, rows, k // 32), byte, dtype=torch.uint8)


@pytest.fixture(scope="module")
def model_weights():
    """Real hidden/intermediate sizes with two experts only: full weights are 2-8 GB."""
    cache = {}

    def get(model):
        if model not in cache:
            dim, inter, _, _ = MODELS[model]
            g = torch.Generator().manual_seed(1 if model == "flash" else 2)
            cache[model] = (*_uniform_code_weights(2, 2 * inter, dim, g), *_uniform_code_weights(2, dim, inter, g))
        return cache[model]
    return get


@pytest.mark.parametrize("model,block", [("flash", 128), ("pro", 32)])
@pytest.mark.parametrize("t", [0, 1, 3])
def test_moe_model_shapes(model_weights, model, block, t):
    dim, _, _, scaling = MODELS[model]
    w13, w13_s, w2, w2_s = model_weights(model)
    x = torch.randn(t, dim).to(torch.bfloat16)
    # Top-6 rows touching one (T = 1) or two experts; -1 marks dropped slots.
    ids = torch.tensor([[1, -1, -1, -1, -1, -1], [0, -1, -1, 1, -1, -1], [-1, 0, 1, -1, -1, 1]],
                       dtype=torch.int32)[:t]
    weights = torch.softmax(torch.randn(t, 6), dim=-1) * scaling
    y = fp4_grouped_moe(x, ids, weights, w13, w13_s, w2, w2_s, act_block_size=block)
    assert y.shape == (t, dim) and y.dtype == torch.bfloat16
    _assert_matches_oracle(y, _moe_oracle(x, ids, weights, w13, w13_s, w2, w2_s, act_block_size=block))


@pytest.mark.parametrize("model", ["flash", "pro"])
def test_moe_true_expert_count(model):
    """The true E (256 / 384) in the weight tensors at small dim and I. Only touched experts are filled;
    the others carry scale byte 255 (NaN), so reading an untouched expert would poison the output."""
    _, _, n_experts, scaling = MODELS[model]
    dim, inter = 256, 128
    touched = [0, 137, n_experts - 1]
    w13 = torch.zeros(n_experts, 2 * inter, dim // 2, dtype=torch.uint8)
    w13_s = torch.full((n_experts, 2 * inter, dim // 32), 255, dtype=torch.uint8)
    w2 = torch.zeros(n_experts, dim, inter // 2, dtype=torch.uint8)
    w2_s = torch.full((n_experts, dim, inter // 32), 255, dtype=torch.uint8)
    for e in touched:
        (w13[e], w13_s[e]), (w2[e], w2_s[e]) = (tuple(w[0] for w in random_mxfp4_weights(1, 2 * inter, dim)),
                                                tuple(w[0] for w in random_mxfp4_weights(1, dim, inter)))
    ids = torch.tensor([[n_experts - 1, 0, -1, 137, n_experts, -1], [137, 137, n_experts - 1, 0, -1, -1],
                        [-1, -1, -1, -1, -1, n_experts - 1]], dtype=torch.int32)
    weights = torch.softmax(torch.randn(3, 6), dim=-1) * scaling
    for block in (32, 128):
        y = fp4_grouped_moe(torch.randn(3, dim).to(torch.bfloat16), ids, weights, w13, w13_s, w2, w2_s,
                            act_block_size=block)
        assert y.isfinite().all()
    x = torch.randn(3, dim).to(torch.bfloat16)
    y = fp4_grouped_moe(x, ids, weights, w13, w13_s, w2, w2_s)
    _assert_matches_oracle(y, _moe_oracle(x, ids, weights, w13, w13_s, w2, w2_s))
    poisoned = ids.clone()
    poisoned[0, 2] = 5  # an unfilled expert: its NaN scales reach the output, so the check above is live
    assert fp4_grouped_moe(x, poisoned, weights, w13, w13_s, w2, w2_s)[0].isnan().any()
