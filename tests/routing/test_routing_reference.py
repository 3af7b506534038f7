"""Tests of the MoE routing references (SPEC 3): score_topk, hash_topk, sqrt_softplus."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv4_kernels.oracles.routing import hash_topk_fp64 as _hash_oracle
from dsv4_kernels.oracles.routing import score_topk_fp64 as _score_oracle
from dsv4_kernels.oracles.routing import sqrt_softplus as _s_oracle
from dsv4_kernels.reference.routing import hash_topk, score_topk, sqrt_softplus
from dsv4_kernels.testing import assert_close

# Weights: the reference rounds an fp64 quotient of fp32 s values once to fp32, the oracle evaluates
# the same quotient in Python floats; they differ by at most half an fp32 ulp (6e-8 relative) plus
# fp64 noise, so rtol 1e-6 has margin while a wrong normaliser (bias, missing eps, wrong scale)
# misses by orders of magnitude more. atol 1e-12 only matters for weights that are exactly 0.
W_ATOL, W_RTOL = 1e-12, 1e-6

FLASH = dict(E=256, rsf=1.5)
PRO = dict(E=384, rsf=2.5)


def _check_against_oracle(weights, ids, exp_w, exp_ids):
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert ids.shape == exp_ids.shape and weights.shape == exp_w.shape
    assert torch.equal(ids, exp_ids), f"ids differ:\n{ids}\nexpected\n{exp_ids}"
    assert_close(weights, exp_w, atol=W_ATOL, rtol=W_RTOL, what="weights")


def _check_score_invariants(logits, bias, weights, ids, topk, rsf, n_shared, apply=False):
    """Structure every score_topk output must have, checked without sorting."""
    T, E = logits.shape
    s = _s_oracle(logits)
    key = s + bias
    routed = ids[:, :topk].long()
    for t in range(T):
        row = routed[t].tolist()
        assert len(set(row)) == topk and all(0 <= e < E for e in row)
        k = key[t, routed[t]]
        for a in range(topk - 1):
            assert k[a] > k[a + 1] or (k[a] == k[a + 1] and row[a] < row[a + 1]), "not (key desc, index asc)"
        unselected = torch.ones(E, dtype=torch.bool)
        unselected[routed[t]] = False
        last_key, last_id = k[-1].item(), row[-1]
        rest = torch.nonzero(unselected).flatten()
        assert not (key[t, rest] > last_key).any(), "an unselected expert has a larger key"
        tied = rest[key[t, rest] == last_key]
        assert not (tied < last_id).any(), "a tied unselected expert has a smaller index"
        if s[t, routed[t]].double().sum() > 1e-12:
            # Six fp32 weights each within half an ulp: their fp64 sum is within 1e-6 relative.
            total = rsf if apply else 1.0
            assert abs(weights[t, :topk].double().sum().item() - total) <= 1e-6 * total
    if n_shared:
        assert torch.equal(ids[:, topk:], (E + torch.arange(n_shared, dtype=torch.int32)).expand(T, n_shared))
        shared = 1.0 if apply else 1.0 / rsf
        assert torch.equal(weights[:, topk:], torch.full((T, n_shared), shared, dtype=torch.float32))


def test_sqrt_softplus_hand_values():
    x = torch.tensor([25.0, 100.0, 1000.0, 1e30, 89.0, 20.5, 0.0, -800.0, -1e30, 20.0, -3.0, -200.0])
    s = sqrt_softplus(x)
    assert s.dtype == torch.float32
    assert torch.isfinite(s).all(), "softplus must not overflow for large finite logits"
    # x > 20: softplus(x) = x, and sqrt of a perfect square is exact in IEEE arithmetic.
    assert s[:2].tolist() == [5.0, 10.0]
    assert s[2].item() == torch.tensor(math.sqrt(1000.0), dtype=torch.float32).item()
    assert s[3].item() == torch.tensor(1e15, dtype=torch.float32).item()
    assert s[4].item() == torch.tensor(math.sqrt(89.0), dtype=torch.float32).item()
    # softplus(0) = ln 2; below about -745 the fp64 exp underflows and s is exactly 0.
    assert s[6].item() == torch.tensor(math.sqrt(math.log(2.0)), dtype=torch.float32).item()
    assert s[7].item() == 0.0 and s[8].item() == 0.0
    # s(-200) = exp(-100), an fp32 subnormal; an fp32 exp would have flushed it to 0.
    assert s[11].item() == torch.tensor(math.exp(-100.0), dtype=torch.float32).item() > 0
    assert s[9].item() == torch.tensor(math.sqrt(math.log1p(math.exp(20.0))), dtype=torch.float32).item()
    assert s[10].item() == torch.tensor(math.sqrt(math.log1p(math.exp(-3.0))), dtype=torch.float32).item()


def test_sqrt_softplus_matches_oracle_and_torch():
    x = torch.cat([torch.randn(4000) * 10, torch.linspace(-110, 60, 3401)])
    s = sqrt_softplus(x)
    assert torch.equal(s, _s_oracle(x))
    # torch's fp32 softplus is not correctly rounded (a couple of fp32 ulps off), and its exp loses
    # precision in the subnormal range below about -87, so the comparison stops there.
    normal = x > -80
    assert_close(s[normal], torch.nn.functional.softplus(x[normal]).sqrt(), atol=0.0, rtol=3e-7,
                 what="s vs torch")


def test_score_topk_hand_case():
    # Logits above 20 are their own softplus: s = sqrt(logit) is exact.
    logits = torch.tensor([[25.0, 100.0, 36.0, 64.0, 49.0, 81.0, 30.25, 121.0]])
    #                 s =   5     10     6     8     7     9     5.5    11
    bias = torch.tensor([0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    # keys = 5 10 16 8 7 9 5.5 11 -> top 3: expert 2 (16), 7 (11), 1 (10). By s alone it would be 7, 1, 5.
    w, ids = score_topk(logits, bias, topk=3, routed_scaling_factor=1.5)
    assert ids.tolist() == [[2, 7, 1]]
    # weights from s: (6, 11, 10) / 27, not scaled by routed_scaling_factor (the engines' convention)
    assert_close(w, torch.tensor([[6 / 27, 11 / 27, 10 / 27]], dtype=torch.float64), W_ATOL, W_RTOL)
    w, ids = score_topk(logits, bias, topk=3, routed_scaling_factor=1.5, apply_routed_scaling_factor_on_output=True)
    # scaled on the output: (6, 11, 10) / 27 * 1.5 = 1/3, 11/18, 5/9
    assert_close(w, torch.tensor([[1 / 3, 11 / 18, 5 / 9]], dtype=torch.float64), W_ATOL, W_RTOL)
    for apply, scale in ((False, 1.0), (True, 1.5)):
        w, ids = score_topk(logits, bias, 3, 1.5, 1, apply, renormalize=False)
        assert ids.tolist() == [[2, 7, 1, 8]]
        # the raw s of the selected experts; shared column 1 / rsf, or 1 when the factor is applied
        want = torch.tensor([[6.0 * scale, 11.0 * scale, 10.0 * scale, 1.0 if apply else 1 / 1.5]])
        assert torch.equal(w, want)


def test_score_topk_exact_ties_smaller_index_first():
    # s = 5 6 4.5 7 5.5 6 ; bias = 1 0 0 -1 2 0 ; keys = 6 6 4.5 6 7.5 6 (exact in fp32)
    logits = torch.tensor([[25.0, 36.0, 20.25, 49.0, 30.25, 36.0]])
    bias = torch.tensor([1.0, 0.0, 0.0, -1.0, 2.0, 0.0])
    w, ids = score_topk(logits, bias, topk=4)
    # 7.5 first, then the four-way tie at 6 in index order 0, 1, 3 (5 loses the tie). Breaking ties by
    # s instead would pick 3 (s = 7) before 1 and 5 (s = 6) before 0 (s = 5).
    assert ids.tolist() == [[4, 0, 1, 3]]
    # weights (5.5, 5, 6, 7) / 23.5
    assert_close(w, torch.tensor([[5.5, 5.0, 6.0, 7.0]], dtype=torch.float64) / 23.5, W_ATOL, W_RTOL)


def test_score_topk_all_equal_row():
    w, ids = score_topk(torch.zeros(2, 8), torch.zeros(8), topk=6, routed_scaling_factor=2.5,
                        apply_routed_scaling_factor_on_output=True)
    assert ids.tolist() == [[0, 1, 2, 3, 4, 5]] * 2
    assert_close(w, torch.full((2, 6), 2.5 / 6, dtype=torch.float64), W_ATOL, W_RTOL)


def test_score_topk_many_exact_ties_large_e():
    # Logits drawn from 4 values and bias from 2: thousands of exact key ties across 384 experts.
    logits = torch.tensor([21.0, 25.0, 30.25, 36.0])[torch.randint(0, 4, (50, 384))]
    bias = torch.tensor([0.0, 0.5])[torch.randint(0, 2, (384,))]
    w, ids = score_topk(logits, bias, topk=6, routed_scaling_factor=2.5)
    _check_against_oracle(w, ids, *_score_oracle(logits, bias, 6, 2.5, 0))
    _check_score_invariants(logits, bias, w, ids, 6, 2.5, 0)


def test_v4_flash_bias_trap():
    """Biases ~8.08 and nearly uniform: weights must come from s, never from s + bias."""
    T, E, rsf = 16, 256, 1.5
    logits = torch.randn(T, E)
    bias = 8.08 + 0.003 * torch.randn(E)
    w, ids = score_topk(logits, bias, topk=6, routed_scaling_factor=rsf, apply_routed_scaling_factor_on_output=True)
    exp_w, exp_ids = _score_oracle(logits, bias, 6, rsf, 0, apply=True)
    _check_against_oracle(w, ids, exp_w, exp_ids)
    # The wrong weights (biased scores renormalised) are nearly flat, rsf / 6 each. They must be far
    # outside the tolerance above, so that this test fails if the reference used them.
    key = (_s_oracle(logits) + bias).double().gather(1, ids.long())
    wrong = key / key.sum(dim=1, keepdim=True) * rsf
    assert (wrong - rsf / 6).abs().max() < 0.1 * rsf / 6
    assert (wrong - exp_w).abs().max() > 1000 * W_RTOL * rsf
    with pytest.raises(AssertionError):
        assert_close(wrong.float(), exp_w, W_ATOL, W_RTOL)


@pytest.mark.parametrize("n_shared", [1, 2])
def test_score_topk_fused_shared_expert(n_shared):
    E, rsf = FLASH["E"], FLASH["rsf"]
    logits, bias = torch.randn(5, E), 8.08 + 0.01 * torch.randn(E)
    w0, ids0 = score_topk(logits, bias, 6, rsf, 0)
    w, ids = score_topk(logits, bias, 6, rsf, n_shared)
    assert w.shape == (5, 6 + n_shared) and ids.shape == (5, 6 + n_shared)
    assert torch.equal(w[:, :6], w0) and torch.equal(ids[:, :6], ids0)
    assert ids[:, 6:].tolist() == [[E + j for j in range(n_shared)]] * 5
    assert w[:, 6:].tolist() == [[torch.tensor(1 / rsf, dtype=torch.float32).item()] * n_shared] * 5


@pytest.mark.parametrize("model", [FLASH, PRO], ids=["flash", "pro"])
@pytest.mark.parametrize("T", [0, 1, 3, 100])
@pytest.mark.parametrize("n_shared", [0, 1])
def test_score_topk_model_sizes(model, T, n_shared):
    E, rsf = model["E"], model["rsf"]
    logits = 2.0 * torch.randn(T, E)
    bias = 8.08 + 0.01 * torch.randn(E) if E == 256 else 0.1 * torch.randn(E)
    w, ids = score_topk(logits, bias, 6, rsf, n_shared)
    assert w.shape == (T, 6 + n_shared) and ids.shape == (T, 6 + n_shared)
    _check_against_oracle(w, ids, *_score_oracle(logits, bias, 6, rsf, n_shared))
    _check_score_invariants(logits, bias, w, ids, 6, rsf, n_shared)


def test_hash_topk_hand_case():
    logits = torch.tensor([[25.0, 100.0, 36.0, 64.0, 49.0, 81.0, 30.25, 121.0],
                           [0.0] * 8,
                           [121.0, 100.0, 81.0, 64.0, 49.0, 36.0, 25.0, 30.25]])
    #  s row 0 = 5 10 6 8 7 9 5.5 11 ; row 2 = 11 10 9 8 7 6 5 5.5
    tid2eid = torch.tensor([[0, 1, 2], [7, 0, 5], [3, 3, 4], [6, 2, 1]], dtype=torch.int32)
    for dtype in (torch.int64, torch.int32):
        input_ids = torch.tensor([1, 3, 2], dtype=dtype)
        w, ids = hash_topk(logits, input_ids, tid2eid, routed_scaling_factor=2.0,
                           apply_routed_scaling_factor_on_output=True)
        # table order, not sorted by score
        assert ids.tolist() == [[7, 0, 5], [6, 2, 1], [3, 3, 4]]
        # row 0: s = 11, 5, 9 -> /25 ; row 1: all s equal ; row 2: s = 8, 8, 7 (duplicate counted twice) -> /23
        expected = torch.tensor([[11 / 25, 5 / 25, 9 / 25], [1 / 3] * 3, [8 / 23, 8 / 23, 7 / 23]],
                                dtype=torch.float64) * 2.0
        assert_close(w, expected, W_ATOL, W_RTOL)
    w, ids = hash_topk(logits, torch.tensor([1, 3, 2]), tid2eid, num_fused_shared_experts=1,
                       routed_scaling_factor=2.0)
    # the engines' convention: routed weights normalised, the shared expert 1 / rsf
    assert ids[:, 3].tolist() == [8, 8, 8] and w[:, 3].tolist() == [0.5, 0.5, 0.5]
    assert_close(w[:, :3], expected / 2.0, W_ATOL, W_RTOL)
    w, ids = hash_topk(logits, torch.tensor([1, 3, 2]), tid2eid, 1, 2.0, apply_routed_scaling_factor_on_output=True)
    assert w[:, 3].tolist() == [1.0, 1.0, 1.0]
    assert_close(w[:, :3], expected, W_ATOL, W_RTOL)


@pytest.mark.parametrize("model", [FLASH, PRO], ids=["flash", "pro"])
@pytest.mark.parametrize("T", [0, 1, 3, 100])
@pytest.mark.parametrize("n_shared", [0, 1])
def test_hash_topk_model_sizes(model, T, n_shared):
    E, rsf, V = model["E"], model["rsf"], 129280
    tid2eid = torch.randint(0, E, (V, 6), dtype=torch.int32)
    input_ids = torch.randint(0, V, (T,))
    if T:
        input_ids[-1] = V - 1
    logits = 2.0 * torch.randn(T, E)
    w, ids = hash_topk(logits, input_ids, tid2eid, n_shared, rsf)
    assert w.shape == (T, 6 + n_shared) and ids.shape == (T, 6 + n_shared)
    _check_against_oracle(w, ids, *_hash_oracle(logits, input_ids, tid2eid, n_shared, rsf))
    assert torch.equal(ids[:, :6], tid2eid[input_ids])


@st.composite
def _routing_case(draw):
    T = draw(st.integers(0, 24))
    E = draw(st.integers(1, 400))
    topk = draw(st.integers(1, min(E, 8)))
    rsf = draw(st.sampled_from([1.0, 1.5, 2.5, 0.7]))
    n_shared = draw(st.integers(0, 2))
    apply = draw(st.booleans())
    scale = draw(st.sampled_from([0.1, 1.0, 4.0, 40.0]))
    quantised = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = scale * torch.randn(T, E, generator=g)
    bias = draw(st.sampled_from([0.0, 8.08])) + 0.05 * torch.randn(E, generator=g)
    if quantised:
        logits, bias = logits.round(), (4 * bias).round() / 4
    return logits, bias, topk, rsf, n_shared, apply


@given(_routing_case())
@settings(deadline=None)
def test_score_topk_property(case):
    logits, bias, topk, rsf, n_shared, apply = case
    w, ids = score_topk(logits, bias, topk, rsf, n_shared, apply)
    _check_against_oracle(w, ids, *_score_oracle(logits, bias, topk, rsf, n_shared, apply))
    _check_score_invariants(logits, bias, w, ids, topk, rsf, n_shared, apply)
    raw_w, raw_ids = score_topk(logits, bias, topk, rsf, n_shared, apply, renormalize=False)
    _check_against_oracle(raw_w, raw_ids, *_score_oracle(logits, bias, topk, rsf, n_shared, apply, False))


@given(_routing_case(), st.integers(1, 300), st.integers(0, 2**31 - 1))
@settings(deadline=None)
def test_hash_topk_property(case, V, seed):
    logits, _, topk, rsf, n_shared, apply = case
    g = torch.Generator().manual_seed(seed)
    tid2eid = torch.randint(0, logits.shape[1], (V, topk), generator=g, dtype=torch.int32)
    input_ids = torch.randint(0, V, (logits.shape[0],), generator=g)
    w, ids = hash_topk(logits, input_ids, tid2eid, n_shared, rsf, apply)
    _check_against_oracle(w, ids, *_hash_oracle(logits, input_ids, tid2eid, n_shared, rsf, apply))
