"""Tests of the mHC references (SPEC 4): mhc_sinkhorn, mhc_pre, mhc_post, mhc_head, mhc_post_pre.

The oracles are independent fp64 implementations written as plain Python loops; they live in
dsv4_kernels.oracles.mhc, where the verification ladder uses them too.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv4_kernels.oracles.mhc import head_fp64 as _head64
from dsv4_kernels.oracles.mhc import mixes_fp64 as _mixes64
from dsv4_kernels.oracles.mhc import post_fp64 as _post64
from dsv4_kernels.oracles.mhc import sinkhorn_fp64 as _sinkhorn64
from dsv4_kernels.oracles.mhc import stream_sum_fp64 as _stream_sum64
from dsv4_kernels.reference.mhc import mhc_head, mhc_post, mhc_post_pre, mhc_pre, mhc_sinkhorn
from dsv4_kernels.testing import assert_close, bf16_ulp

# SPEC 6 tolerance for Sinkhorn outputs against fp64: 20 fp32 normalisations of 4-term sums drift by
# a few fp32 ulps per step; 2e-5 + 1e-4 relative covers that and still catches one missing or extra
# normalisation step (checked in test_sinkhorn_vs_fp64_oracle).
SK_ATOL, SK_RTOL = 2e-5, 1e-4
DIMS = [4096, 7168, 256 * 3]
LN3, LN7 = math.log(3.0), math.log(7.0)


def _assert_bf16_close(actual, exact, magnitude, what):
    """bf16 output vs an fp64 value: SPEC 6 allows two bf16 ulps; 1e-6 * sum|terms| adds room for the
    fp32 rounding of gates and products (a few 1e-7 relative) when the terms cancel."""
    assert actual.dtype == torch.bfloat16 and actual.shape == exact.shape
    err = (actual.double() - exact).abs()
    bound = 2 * bf16_ulp(exact.float()).double() + 1e-6 * magnitude
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.numel()} beyond 2 bf16 ulps, worst error "
                           f"{err.max().item():.3g}")


def _site(dim, m=4, rows=None, comb_scale=2.0, seed=None):
    """Realistic site weights: hc_fn rows of unit norm, so the RMS-scaled mixes are of order 1."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    rows = rows if rows is not None else (2 + m) * m
    hc_fn = torch.randn(rows, m * dim, generator=g) / math.sqrt(m * dim)
    hc_scale = torch.tensor([0.5, 0.5, comb_scale])
    hc_base = 0.5 * torch.randn(rows, generator=g)
    return hc_fn, hc_scale, hc_base


def _residual(T, dim, m=4, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(T, m, dim, generator=g).to(torch.bfloat16)


def test_sinkhorn_iters1_hand_case():
    # Softmax rows chosen as simple fractions; eps = 0 so the result is exactly rational:
    #   P = [1/4 1/4 1/4 1/4; 1/8 1/8 1/4 1/2; 1/6 1/6 1/2 1/6; 1/2 1/4 1/8 1/8]
    #   column sums 25/24, 19/24, 27/24, 25/24 -> C[i, j] = P[i, j] / colsum[j]
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, math.log(2.0), math.log(4.0)],
                           [0.0, 0.0, LN3, 0.0],
                           [math.log(4.0), math.log(2.0), 0.0, 0.0]]).flatten()
    expected = torch.tensor([[6 / 25, 6 / 19, 2 / 9, 6 / 25],
                             [3 / 25, 3 / 19, 2 / 9, 12 / 25],
                             [4 / 25, 4 / 19, 4 / 9, 4 / 25],
                             [12 / 25, 6 / 19, 1 / 9, 3 / 25]], dtype=torch.float64)
    # token 0 carries the logits in hc_base, token 1 in mixes with hc_scale[2] = 2
    mixes = torch.zeros(2, 24)
    mixes[1, 8:] = logits / 2
    base = torch.zeros(24)
    scale = torch.tensor([1.0, 1.0, 2.0])
    _, _, c0 = mhc_sinkhorn(mixes[:1], scale, torch.cat([base[:8], logits]), iters=1, eps=0.0)
    _, _, c1 = mhc_sinkhorn(mixes[1:], scale, base, iters=1, eps=0.0)
    # fp32 logs and softmax: a few 1e-8 off the rational values.
    assert_close(c0[0], expected, atol=1e-6, rtol=0, what="comb from base")
    assert_close(c1[0], expected, atol=1e-6, rtol=0, what="comb from mixes")


def test_sinkhorn_gates_hand_case():
    mixes = torch.zeros(1, 24)
    mixes[0, :4] = torch.tensor([0.0, LN3 / 2, -LN3 / 2, 0.0])
    scale = torch.tensor([2.0, 1.0, 1.0])
    base = torch.zeros(24)
    base[3] = LN7
    base[4:8] = torch.tensor([0.0, LN3, -LN3, LN7])
    pre, post, comb = mhc_sinkhorn(mixes, scale, base, eps=1e-6)
    # sigmoid(ln a) = a / (1 + a); ln 3 and ln 7 are rounded to fp32, which moves the gates by ~1e-7
    assert_close(pre, torch.tensor([[0.5, 0.75, 0.25, 0.875]], dtype=torch.float64) + 1e-6, 3e-7, 0)
    assert_close(post, torch.tensor([[1.0, 1.5, 0.5, 1.75]], dtype=torch.float64), 3e-7, 0)
    # all comb logits equal -> uniform
    assert_close(comb, torch.full((1, 4, 4), 0.25, dtype=torch.float64), 1e-6, 0)


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
@pytest.mark.parametrize("iters", [1, 2, 20])
@pytest.mark.parametrize("level", [0.0, 7.5])
def test_sinkhorn_all_equal_closed_form(eps, iters, level):
    # Equal logits keep every entry equal to some a. Softmax + eps gives 1/4 + eps, the first
    # column step a = (1/4 + eps) / (1 + 5 eps); every later row or column step maps
    # a -> a / (4a + eps), whose fixed point is (1 - eps) / 4.
    a = (0.25 + eps) / (1 + 5 * eps)
    for _ in range(2 * (iters - 1)):
        a = a / (4 * a + eps)
    mixes = torch.full((3, 24), level)
    pre, post, comb = mhc_sinkhorn(mixes, torch.ones(3), torch.zeros(24), iters=iters, eps=eps)
    # eight fp32 roundings of values near 1/4: a few 1e-8
    assert_close(comb, torch.full((3, 4, 4), a, dtype=torch.float64), 1e-7, 0)
    if iters == 20:
        assert abs(a - (1 - eps) / 4) < 1e-12
    if eps == 1e-2:
        # the eps terms are visible: the uniform 1/4 is not the answer
        assert (comb - 0.25).abs().min() > 1e-3


@pytest.mark.parametrize("comb_scale", [1.0, 3.0, 10.0, 30.0])
@pytest.mark.parametrize("iters", [1, 2, 3, 20])
def test_sinkhorn_vs_fp64_oracle(comb_scale, iters):
    T = 64
    mixes = torch.randn(T, 24)
    scale = torch.tensor([0.7, 1.3, comb_scale])
    base = 0.3 * torch.randn(24)
    pre, post, comb = mhc_sinkhorn(mixes, scale, base, iters=iters)
    assert pre.dtype == post.dtype == comb.dtype == torch.float32
    assert pre.shape == (T, 4) and post.shape == (T, 4) and comb.shape == (T, 4, 4)
    e_pre, e_post, e_comb = _sinkhorn64(mixes, scale, base, iters=iters)
    assert_close(pre, e_pre, SK_ATOL, SK_RTOL, "pre")
    assert_close(post, e_post, SK_ATOL, SK_RTOL, "post")
    assert_close(comb, e_comb, SK_ATOL, SK_RTOL, "comb")
    assert (pre > 0).all() and (post > 0).all() and (post < 2).all()
    assert (comb >= 0).all()
    # every iteration ends on a column step c -> c / (c + eps): columns sum to 1 - eps / c. With one
    # iteration a column can hold only softmax leftovers (c ~ 4 eps under large logits); after a row
    # step c is of order 1 and the sums are within 1e-5 of 1 (SPEC 4).
    assert_close(comb.sum(dim=-2), e_comb.sum(dim=-2), SK_ATOL, SK_RTOL, "column sums")
    if iters >= 2:
        assert_close(comb.sum(dim=-2), torch.ones(T, 4, dtype=torch.float64), 1e-5, 0, "column sums")
    # rows only approach 1: compare them with the fp64 rows, not with 1
    assert_close(comb.sum(dim=-1), e_comb.sum(dim=-1), SK_ATOL, SK_RTOL, "row sums")
    if comb_scale >= 3.0 and iters == 20:
        assert (comb.sum(dim=-1) - 1).abs().max() > 1e-3, "large logits should leave rows visibly off 1"
    if comb_scale >= 3.0:
        # one normalisation pair more or less is outside the tolerance: the comparison above would
        # catch an off-by-one iteration count
        for other in (iters - 1, iters + 1):
            if other >= 1:
                with pytest.raises(AssertionError):
                    assert_close(_sinkhorn64(mixes, scale, base, iters=other)[2], e_comb, SK_ATOL, SK_RTOL)


@pytest.mark.parametrize("T", [0, 1, 3])
@pytest.mark.parametrize("dim", DIMS)
def test_mhc_pre_vs_fp64_oracle(T, dim):
    x = _residual(T, dim)
    hc_fn, hc_scale, hc_base = _site(dim)
    y, post, comb = mhc_pre(x, hc_fn, hc_scale, hc_base)
    assert y.shape == (T, dim) and post.shape == (T, 4) and comb.shape == (T, 4, 4)
    assert post.dtype == comb.dtype == torch.float32
    mixes = _mixes64(x, hc_fn)
    e_pre, e_post, e_comb = _sinkhorn64(mixes, hc_scale, hc_base)
    assert_close(post, e_post, SK_ATOL, SK_RTOL, "post")
    assert_close(comb, e_comb, SK_ATOL, SK_RTOL, "comb")
    _assert_bf16_close(y, *_stream_sum64(x, e_pre), "y")


def test_mhc_pre_zero_token_row():
    dim = 256
    x = _residual(2, dim)
    x[1] = 0
    hc_fn, hc_scale, hc_base = _site(dim)
    y, post, comb = mhc_pre(x, hc_fn, hc_scale, hc_base)
    # mixes are 0 (the rsqrt stays finite through norm_eps): the gates come from the biases alone
    assert torch.equal(y[1], torch.zeros(dim, dtype=torch.bfloat16))
    _, e_post, e_comb = _sinkhorn64(torch.zeros(1, 24), hc_scale, hc_base)
    assert_close(post[1:], e_post, SK_ATOL, SK_RTOL, "post")
    assert_close(comb[1:], e_comb, SK_ATOL, SK_RTOL, "comb")


def test_mhc_post_identity_and_permutation():
    T, dim = 3, 100
    x, f = _residual(T, dim), torch.randn(T, dim).to(torch.bfloat16)
    eye = torch.eye(4).expand(T, 4, 4)
    assert torch.equal(mhc_post(f, x, torch.zeros(T, 4), eye), x)
    # cycle: stream i feeds destination (i + 1) % 4, so X'[:, j] = X[:, j - 1]; the transposed
    # (wrong) orientation would give X[:, j + 1]
    cycle = torch.zeros(4, 4)
    cycle[torch.arange(4), (torch.arange(4) + 1) % 4] = 1
    out = mhc_post(f, x, torch.zeros(T, 4), cycle.expand(T, 4, 4))
    assert torch.equal(out, x.roll(1, dims=1))
    # post only: powers of two times bf16 values are exact
    post = torch.tensor([1.0, 0.5, 2.0, 0.0]).expand(T, 4)
    out = mhc_post(f, x, post, torch.zeros(T, 4, 4))
    assert torch.equal(out, (post.unsqueeze(-1) * f.float().unsqueeze(1)).to(torch.bfloat16))


def test_mhc_post_hand_case_orientation():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]], dtype=torch.bfloat16)
    f = torch.tensor([[10.0, 20.0]], dtype=torch.bfloat16)
    post = torch.tensor([[0.5, 0.0, 0.0, 0.0]])
    comb = torch.tensor([[[0.5, 0.5, 0.0, 0.0],
                          [0.0, 0.5, 0.5, 0.0],
                          [0.0, 0.0, 0.5, 0.5],
                          [0.5, 0.0, 0.0, 0.5]]])
    # X'0 = 0.5 F + 0.5 X0 + 0.5 X3 = (9, 15); X'1 = 0.5 X0 + 0.5 X1 = (2, 3); X'2 = (4, 5); X'3 = (6, 7).
    # With comb transposed X'0 would be 0.5 F + 0.5 X0 + 0.5 X1 = (7, 13).
    out = mhc_post(f, x, post, comb)
    assert out.tolist() == [[[9.0, 15.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]]


@pytest.mark.parametrize("T", [0, 1, 3])
@pytest.mark.parametrize("dim", DIMS)
def test_mhc_post_vs_fp64_oracle(T, dim):
    x, f = _residual(T, dim), torch.randn(T, dim).to(torch.bfloat16)
    post = 2 * torch.rand(T, 4)
    comb = torch.rand(T, 4, 4)
    comb = comb / comb.sum(dim=1, keepdim=True)
    out = mhc_post(f, x, post, comb)
    assert out.shape == (T, 4, dim)
    _assert_bf16_close(out, *_post64(f, x, post, comb), "X'")


def test_mhc_head_hand_case():
    # hc_fn = 0 -> mixes = 0 -> pre = sigmoid(base) + eps = 3/4, 1/4, 1/2, 7/8 (+1e-6)
    x = torch.tensor([[[4.0, 8.0], [4.0, -8.0], [2.0, 0.0], [8.0, 0.0]]], dtype=torch.bfloat16)
    base = torch.tensor([LN3, -LN3, 0.0, LN7])
    y = mhc_head(x, torch.zeros(4, 8), torch.tensor([3.0]), base)
    # y = (3 + 1 + 1 + 7, 6 - 2) = (12, 4); the eps share (1e-6 * 18) is far below a bf16 ulp of 12
    assert y.dtype == torch.bfloat16 and y.tolist() == [[12.0, 4.0]]


@pytest.mark.parametrize("T", [0, 1, 3])
@pytest.mark.parametrize("dim", DIMS)
def test_mhc_head_vs_fp64_oracle(T, dim):
    x = _residual(T, dim)
    hc_fn = torch.randn(4, 4 * dim) / math.sqrt(4 * dim)
    hc_scale, hc_base = torch.tensor([0.8]), 0.5 * torch.randn(4)
    y = mhc_head(x, hc_fn, hc_scale, hc_base)
    assert y.shape == (T, dim)
    _assert_bf16_close(y, *_head64(x, hc_fn, hc_scale, hc_base), "y")


@pytest.mark.parametrize("T", [0, 1, 3])
@pytest.mark.parametrize("dim", [4096, 768])
def test_mhc_post_pre_is_the_composition(T, dim):
    x, f = _residual(T, dim), torch.randn(T, dim).to(torch.bfloat16)
    _, post, comb = mhc_pre(x, *_site(dim))
    nxt = _site(dim, comb_scale=5.0)
    x_new, y, post_new, comb_new = mhc_post_pre(f, x, post, comb, *nxt, iters=7, eps=1e-5, norm_eps=1e-4)
    want_x = mhc_post(f, x, post, comb)
    want_y, want_post, want_comb = mhc_pre(want_x, *nxt, iters=7, eps=1e-5, norm_eps=1e-4)
    for got, want in ((x_new, want_x), (y, want_y), (post_new, want_post), (comb_new, want_comb)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    # and the new residual is X' itself: the next pre reads the bf16-rounded X'
    _assert_bf16_close(x_new, *_post64(f, x, post, comb), "X'")


def test_zero_tokens_all():
    dim = 64
    x, f = _residual(0, dim), torch.zeros(0, dim, dtype=torch.bfloat16)
    hc_fn, hc_scale, hc_base = _site(dim)
    pre, post, comb = mhc_sinkhorn(torch.zeros(0, 24), hc_scale, hc_base)
    assert pre.shape == (0, 4) and post.shape == (0, 4) and comb.shape == (0, 4, 4)
    y, post, comb = mhc_pre(x, hc_fn, hc_scale, hc_base)
    assert y.shape == (0, dim) and y.dtype == torch.bfloat16 and comb.shape == (0, 4, 4)
    out = mhc_post(f, x, post, comb)
    assert out.shape == (0, 4, dim) and out.dtype == torch.bfloat16
    assert mhc_head(x, hc_fn[:4], hc_scale[:1], hc_base[:4]).shape == (0, dim)
    shapes = [t.shape for t in mhc_post_pre(f, x, post, comb, hc_fn, hc_scale, hc_base)]
    assert shapes == [(0, 4, dim), (0, dim), (0, 4), (0, 4, 4)]


@given(st.integers(0, 32), st.sampled_from([2, 4]), st.integers(1, 25),
       st.sampled_from([1e-6, 1e-4, 1e-2]), st.sampled_from([0.3, 1.0, 4.0, 20.0]), st.integers(0, 2**31 - 1))
@settings(deadline=None)
def test_sinkhorn_property(T, m, iters, eps, comb_scale, seed):
    g = torch.Generator().manual_seed(seed)
    mixes = torch.randn(T, (2 + m) * m, generator=g)
    scale = torch.tensor([1.0, 1.0, comb_scale])
    base = 0.3 * torch.randn((2 + m) * m, generator=g)
    pre, post, comb = mhc_sinkhorn(mixes, scale, base, hc_mult=m, iters=iters, eps=eps)
    e_pre, e_post, e_comb = _sinkhorn64(mixes, scale, base, m=m, iters=iters, eps=eps)
    assert_close(pre, e_pre, SK_ATOL, SK_RTOL, "pre")
    assert_close(post, e_post, SK_ATOL, SK_RTOL, "post")
    assert_close(comb, e_comb, SK_ATOL, SK_RTOL, "comb")
    assert (comb >= 0).all() and (pre >= eps).all() and (post >= 0).all() and (post <= 2).all()
    assert_close(comb.sum(dim=-2), e_comb.sum(dim=-2), SK_ATOL, SK_RTOL, "column sums")
    assert_close(comb.sum(dim=-1), e_comb.sum(dim=-1), SK_ATOL, SK_RTOL, "row sums")
    if iters >= 2:
        # the last step maps a column sum c of order 1 to c / (c + eps), 1 - eps / c
        assert ((comb.sum(dim=-2) - 1).abs() <= 10 * eps + 1e-6).all()


@given(st.integers(0, 4), st.integers(1, 300), st.sampled_from([2, 4]), st.integers(0, 2**31 - 1))
@settings(deadline=None)
def test_mhc_pre_post_head_property(T, dim, m, seed):
    x = _residual(T, dim, m=m, seed=seed)
    hc_fn, hc_scale, hc_base = _site(dim, m=m, comb_scale=4.0, seed=seed + 1)
    y, post, comb = mhc_pre(x, hc_fn, hc_scale, hc_base)
    e_pre, e_post, e_comb = _sinkhorn64(_mixes64(x, hc_fn), hc_scale, hc_base, m=m)
    assert_close(post, e_post, SK_ATOL, SK_RTOL, "post")
    assert_close(comb, e_comb, SK_ATOL, SK_RTOL, "comb")
    _assert_bf16_close(y, *_stream_sum64(x, e_pre), "y")
    f = _residual(T, dim, m=1, seed=seed + 2)[:, 0]
    _assert_bf16_close(mhc_post(f, x, post, comb), *_post64(f, x, post, comb), "X'")
    head_fn, _, head_base = _site(dim, m=m, rows=m, seed=seed + 3)
    head_scale = torch.tensor([0.8])
    _assert_bf16_close(mhc_head(x, head_fn, head_scale, head_base),
                       *_head64(x, head_fn, head_scale, head_base), "head y")
