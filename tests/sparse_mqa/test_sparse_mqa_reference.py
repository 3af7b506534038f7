"""The sparse MQA reference (SPEC 1) against hand-computed values, dense softmax attention, closed forms
and an independent fp64 loop oracle."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv4_kernels.oracles.sparse_mqa import sparse_mqa_fp64 as oracle
from dsv4_kernels.reference import sparse_mqa as sparse_mqa_module
from dsv4_kernels.reference.indices import build_sparse_indices
from dsv4_kernels.reference.sparse_mqa import sparse_mqa
from dsv4_kernels.testing import assert_close, assert_same_nonfinite, bf16_ulp

D = 512
INF = float("inf")

# The reference computes in fp32 and rounds out to bf16 once. Against an fp64 value e it is within half
# a bf16 ulp of e plus the fp32 error that can carry it across a rounding midpoint. That fp32 error is
# below 1e-6 for logits of order 1, unit-size KV values and K <= 1152 (weights sum to <= 1, each fp32
# product and partial sum is off by ~6e-8 relative), so 1e-5 leaves a 10x margin.
OUT_SLACK = 1e-5
# lse is fp32 of magnitude <= ~10 (log of <= 1152 terms of order e): fp32 spacing there is ~1e-6,
# the logits carry ~1e-7 of error each; atol 1e-5 / rtol 1e-6 is tight but safe.
LSE_ATOL, LSE_RTOL = 1e-5, 1e-6


def assert_out_rounded_from(actual: torch.Tensor, exact: torch.Tensor, slack: float = OUT_SLACK,
                            what: str = "out"):
    """actual (bf16) is within half a bf16 ulp of the fp64 value, plus slack for fp32 arithmetic."""
    assert actual.dtype == torch.bfloat16, what
    assert actual.shape == exact.shape, (what, actual.shape, exact.shape)
    assert_same_nonfinite(actual, exact, what)
    err = (actual.double() - exact.double()).abs()
    bound = 0.5 * bf16_ulp(exact.float()).double() + slack
    bad = err > bound
    if bad.any():
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} elements off, first at {pos}: "
                             f"{actual[pos].item()} vs exact {exact[pos].item()}")


def check_against_oracle(q, kv, indices, attn_sink, softmax_scale=None, topk_length=None):
    out, lse = sparse_mqa(q, kv, indices, attn_sink, softmax_scale, topk_length)
    ref_out, ref_lse = oracle(q, kv, indices, attn_sink, softmax_scale, topk_length)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_out_rounded_from(out, ref_out)
    assert_close(lse, ref_lse, LSE_ATOL, LSE_RTOL, what="lse")
    return out, lse


def random_inputs(T, H, N, gen=None):
    """q, kv ~ N(0, 1) in bf16: with the default scale 512^-0.5 the logits are of order 1."""
    q = torch.randn(T, H, D, generator=gen).to(torch.bfloat16)
    kv = torch.randn(N, D, generator=gen).to(torch.bfloat16)
    return q, kv


def unit(i, value=1.0):
    v = torch.zeros(D)
    v[i] = value
    return v


def test_hand_computed_tiny():
    # scale 1, q = e0, so each logit is the row's component 0: rows 0, 1 -> 0, row 2 -> 1, row 3 -> -2.
    q = unit(0).expand(3, 2, D).to(torch.bfloat16).contiguous()
    kv = torch.stack([unit(1), unit(2), unit(0) + unit(3), unit(0, -2.0) + unit(4)]).to(torch.bfloat16)
    indices = torch.tensor([[0, 1, 2, -1],      # weights 1, 1, e
                            [2, 2, 7, 3],       # weights e, e (duplicate counts twice), e^-2; 7 >= N
                            [-1, -1, -9, 4]],   # nothing valid
                           dtype=torch.int32)
    sink = torch.tensor([0.0, -INF])            # head 0: sink adds exp(0) = 1; head 1: no sink
    out, lse = sparse_mqa(q, kv, indices, sink, softmax_scale=1.0)

    e = math.e
    expected = torch.zeros(3, 2, D, dtype=torch.float64)
    for h, sink_weight in ((0, 1.0), (1, 0.0)):
        den0 = 2 + e + sink_weight
        expected[0, h, 0] = e / den0
        expected[0, h, 1] = 1 / den0
        expected[0, h, 2] = 1 / den0
        expected[0, h, 3] = e / den0
        den1 = 2 * e + e ** -2 + sink_weight
        expected[1, h, 0] = (2 * e - 2 * e ** -2) / den1
        expected[1, h, 3] = 2 * e / den1
        expected[1, h, 4] = e ** -2 / den1
    expected_lse = torch.tensor([[math.log(2 + e)] * 2, [math.log(2 * e + e ** -2)] * 2, [INF] * 2],
                                dtype=torch.float64)
    assert_out_rounded_from(out, expected)
    assert_close(lse, expected_lse, LSE_ATOL, LSE_RTOL, what="lse")
    assert torch.all(out[2] == 0) and torch.all(lse[2] == INF)


def test_minus_inf_sink_over_all_rows_is_dense_softmax():
    T, H, N = 5, 16, 37
    q, kv = random_inputs(T, H, N)
    indices = torch.stack([torch.randperm(N) for _ in range(T)]).to(torch.int32)
    sink = torch.full((H,), -INF)
    out, lse = sparse_mqa(q, kv, indices, sink)
    logits = (q.float() @ kv.float().T) * D ** -0.5                        # [T, H, N]
    dense = torch.softmax(logits, dim=-1) @ kv.float()
    # torch's fp32 softmax has the same ~1e-6 error budget as the reference, so OUT_SLACK covers both.
    assert_out_rounded_from(out, dense.double())
    assert_close(lse, torch.logsumexp(logits, dim=-1), LSE_ATOL, LSE_RTOL, what="lse")


def test_sink_matches_closed_form():
    T, H, N, K = 4, 8, 50, 40
    q, kv = random_inputs(T, H, N)
    indices = torch.randint(-3, N + 3, (T, K), dtype=torch.int32)
    no_sink_out, no_sink_lse = sparse_mqa(q, kv, indices, torch.full((H,), -INF))
    sink = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 5.0, 30.0, -100.0])
    out, lse = sparse_mqa(q, kv, indices, sink)
    # The sink is outside lse: changing it may not move lse beyond fp32 rounding (2 ulps).
    assert_close(lse, no_sink_lse, atol=0.0, rtol=2.4e-7, what="lse with sink")
    # out(sink) = out(no sink) * S / (S + exp(sink)) with S = exp(lse) = 1 / (1 + exp(sink - lse)).
    factor = torch.sigmoid(no_sink_lse.double() - sink.double())[..., None]
    expected = no_sink_out.double() * factor
    # no_sink_out carries half an ulp of rounding; scaled by factor <= 1 that is at most one ulp of the
    # scaled value (its binade can drop), plus out's own half ulp: 1.5 ulp, bound taken as 2 ulp.
    err = (out.double() - expected).abs()
    assert torch.all(err <= 2 * bf16_ulp(expected.float()).double() + 1e-30)
    # Cross-check the same against the oracle, which builds the sink into the softmax directly.
    check_against_oracle(q, kv, indices, sink)


def test_invalid_out_of_range_and_duplicate_entries():
    T, H, N = 3, 8, 20
    q, kv = random_inputs(T, H, N)
    indices = torch.tensor([[-1, 3, N, 3, -7, 19, N + 5, 0],
                            [5, 5, 5, 5, 2 ** 31 - 1, -2 ** 31, 6, -1],
                            [0, 1, 2, 3, 4, 5, 6, 7]], dtype=torch.int32)
    sink = torch.linspace(-2, 2, H)
    out, lse = check_against_oracle(q, kv, indices, sink)
    # Every invalid value means the same as -1: identical result, bit for bit.
    cleaned = torch.where((indices >= 0) & (indices < N), indices, -1)
    out2, lse2 = sparse_mqa(q, kv, cleaned, sink)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    # Four copies of row 5 and one of row 6 weigh row 5 four times: lse = log(4 e^s5 + e^s6).
    s = (q[1].double() @ kv[[5, 6]].double().T) * D ** -0.5                # [H, 2]
    expected_lse = torch.log(4 * torch.exp(s[:, 0]) + torch.exp(s[:, 1]))
    assert_close(lse[1], expected_lse, LSE_ATOL, LSE_RTOL, what="duplicate lse")


def test_topk_length():
    T, H, N, K = 5, 8, 30, 12
    q, kv = random_inputs(T, H, N)
    indices = torch.randint(0, N, (T, K), dtype=torch.int32)
    sink = torch.randn(H)
    lengths = torch.tensor([0, 1, 7, K, K + 10], dtype=torch.int32)
    out, lse = check_against_oracle(q, kv, indices, sink, topk_length=lengths)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == INF)
    # Cutting a row at L is the same as writing -1 from column L on (same entries used, same order).
    cut = torch.where(torch.arange(K)[None, :] < lengths[:, None], indices, -1)
    out2, lse2 = sparse_mqa(q, kv, cut, sink)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    negative = sparse_mqa(q, kv, indices, sink, topk_length=torch.full((T,), -4, dtype=torch.int32))
    assert torch.all(negative[0] == 0) and torch.all(negative[1] == INF)


@pytest.mark.parametrize("sink_value", [0.0, 3.0, -INF])
def test_all_invalid_rows(sink_value):
    T, H, N, K = 4, 16, 10, 9
    q, kv = random_inputs(T, H, N)
    indices = torch.randint(0, N, (T, K), dtype=torch.int32)
    indices[1] = -1
    indices[3] = torch.tensor([N, N + 1, -1, -5, 1000, -1, N, -3, 2 ** 20])
    sink = torch.full((H,), sink_value)
    out, lse = check_against_oracle(q, kv, indices, sink)
    for t in (1, 3):
        assert torch.all(out[t] == 0) and torch.all(lse[t] == INF)
    assert torch.all(torch.isfinite(lse[[0, 2]]))


def test_empty_dimensions():
    q, kv = random_inputs(3, 8, 10)
    sink = torch.zeros(8)
    out, lse = sparse_mqa(q, kv, torch.zeros(3, 0, dtype=torch.int32), sink)
    assert torch.all(out == 0) and torch.all(lse == INF)
    out, lse = sparse_mqa(q, kv[:0], torch.zeros(3, 5, dtype=torch.int32), sink)
    assert torch.all(out == 0) and torch.all(lse == INF)


def test_extreme_logits_do_not_overflow():
    # Logits up to several hundred and a sink far above them: the max subtraction keeps all finite.
    T, H, N, K = 3, 8, 16, 16
    q, kv = random_inputs(T, H, N)
    indices = torch.randint(0, N, (T, K), dtype=torch.int32)
    sink = torch.tensor([0.0, 50.0, 200.0, -200.0, 1000.0, -INF, 10.0, -10.0])
    check_against_oracle(q, kv, indices, sink, softmax_scale=10.0)
    out, lse = sparse_mqa(q, kv, indices, sink, softmax_scale=1e-3)
    assert torch.all(torch.isfinite(out.float())) and torch.all(torch.isfinite(lse))


MODELS = {"flash": (64, 512), "pro": (128, 1024)}     # (heads H, indexer top-k)


def decode_case(T, H, topk, gen=None):
    """A CSA decode step: ring window + indexer-selected entries, T sequences in one pool."""
    capacity = topk + 100
    n_rows = 128 + capacity
    positions = torch.tensor([4 * capacity - 2, 130, 9][:T], dtype=torch.int64)
    selection = torch.stack([torch.randperm(capacity, generator=gen)[:topk] for _ in range(T)]) if T else \
        torch.zeros(0, topk, dtype=torch.int64)
    indices = build_sparse_indices(positions, 4, decode=True, compressed_selection=selection)
    q, kv = random_inputs(T, H, n_rows, gen)
    return q, kv, indices


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("T", [0, 1, 3])
def test_model_shapes(model, T):
    H, topk = MODELS[model]
    q, kv, indices = decode_case(T, H, topk)
    assert indices.shape == (T, 128 + topk)
    sink = torch.randn(H)
    out, lse = check_against_oracle(q, kv, indices, sink)
    assert out.shape == (T, H, D) and lse.shape == (T, H)


@pytest.mark.parametrize("H", [8, 16, 32])
def test_tensor_parallel_heads(H):
    q, kv, indices = decode_case(3, H, MODELS["pro"][1])
    check_against_oracle(q, kv, indices, torch.randn(H))


@pytest.mark.parametrize("K", [1, 63, 100])
def test_odd_k(K):
    T, H, N = 3, 8, 77
    q, kv = random_inputs(T, H, N)
    indices = torch.randint(-5, N + 5, (T, K), dtype=torch.int32)
    check_against_oracle(q, kv, indices, torch.randn(H), topk_length=torch.randint(0, K + 1, (T,)).int())


def test_token_chunking_does_not_change_results(monkeypatch):
    T, H, N, K = 7, 8, 40, 33
    q, kv = random_inputs(T, H, N)
    indices = torch.randint(-2, N, (T, K), dtype=torch.int32)
    sink = torch.randn(H)
    whole = sparse_mqa(q, kv, indices, sink)
    monkeypatch.setattr(sparse_mqa_module, "GATHER_BUDGET_ELEMS", 2 * K * D)
    chunked = sparse_mqa(q, kv, indices, sink)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


@settings(deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), T=st.integers(0, 4), H=st.sampled_from([8, 16]),
       N=st.integers(0, 48), K=st.integers(0, 70), use_lengths=st.booleans(),
       sink_kind=st.sampled_from(["finite", "minus_inf", "mixed"]),
       softmax_scale=st.one_of(st.none(), st.floats(0.01, 0.2)))
def test_matches_fp64_oracle(seed, T, H, N, K, use_lengths, sink_kind, softmax_scale):
    gen = torch.Generator().manual_seed(seed)
    q, kv = random_inputs(T, H, N, gen)
    # Indices in [-3, N + 3): invalid on both sides, and duplicates whenever K > N.
    indices = torch.randint(-3, N + 3, (T, K), generator=gen, dtype=torch.int32)
    lengths = torch.randint(-1, K + 2, (T,), generator=gen, dtype=torch.int32) if use_lengths else None
    sink = 2 * torch.randn(H, generator=gen)
    if sink_kind == "minus_inf":
        sink[:] = -INF
    elif sink_kind == "mixed":
        sink[::2] = -INF
    check_against_oracle(q, kv, indices, sink, softmax_scale, lengths)


def test_fp8_reference_dequantises_only_the_rows_it_reads(monkeypatch):
    """A real cache holds far more tokens than one batch reads: the FP8 reference gathers the distinct
    valid indices only, and gives the bits of the bf16 op on the whole dequantised cache."""
    from dsv4_kernels.reference import formats
    pages = formats.quantize_kv_cache_fp8(torch.randn(64 * 40, 512).to(torch.bfloat16), block_size=64)
    q = torch.randn(3, 16, 512).to(torch.bfloat16)
    indices = torch.tensor([[5, 5, 2000, -1], [7, 2559, 2560, -3], [-1, -1, -1, -1]], dtype=torch.int32)
    sink = torch.zeros(16)
    gathered = []
    real = sparse_mqa_module.gather_kv_cache_fp8
    monkeypatch.setattr(sparse_mqa_module, "gather_kv_cache_fp8",
                        lambda p, idx, bs: gathered.append(idx.numel()) or real(p, idx, bs))
    out, lse = sparse_mqa_module.sparse_mqa_fp8(q, pages, indices, sink)
    assert gathered == [4]  # 5, 7, 2000, 2559 (2560 is past the cache, negatives are invalid)
    want_out, want_lse = sparse_mqa(q, formats.dequantize_kv_cache_fp8(pages, 64 * 40, 64), indices, sink)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
