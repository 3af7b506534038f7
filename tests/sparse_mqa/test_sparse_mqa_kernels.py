"""The Triton sparse MQA kernels (kernels/sparse_mqa) through the interpreter against the reference:
V4-Flash / V4-Pro head counts and a tensor-parallel split, index lists with a tail block, every kind of
invalid entry, topk_length, the split-K merge and the one-split (prefill) path, the sink, NaN, the FP8
cache against the bf16 pool on the dequantised rows, and the launch plan. SPEC 6 tolerances (ops.compare),
data with logits of order 1 (q, kv ~ N(0, 1), scale 512^-0.5)."""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv4_kernels import dispatch
from dsv4_kernels.ops import sparse_mqa as ops
from dsv4_kernels.reference.formats import dequantize_kv_cache_fp8, quantize_kv_cache_fp8
from dsv4_kernels.reference.sparse_mqa import sparse_mqa as reference
from dsv4_kernels.reference.sparse_mqa import sparse_mqa_fp8 as reference_fp8

D = 512
INF = float("inf")
K = 128 + 37          # a window and a compressed part whose last block is a tail
BS = 16


@functools.lru_cache(maxsize=None)
def _inputs(T, H, N=200, seed=0):
    """Rows: 0 all valid but for duplicates; 1 out-of-range and negative entries, topk_length 100; 2 all
    invalid (empty); topk_length 0 for a fourth row when T = 4. Built once per shape (interpreter time)."""
    gen = torch.Generator().manual_seed(seed + 31 * H + T)
    q = torch.randn(T, H, D, generator=gen).to(torch.bfloat16)
    kv = torch.randn(N, D, generator=gen).to(torch.bfloat16)
    indices = torch.randint(0, N, (T, K), generator=gen, dtype=torch.int32)
    indices[0, 10:20] = indices[0, 0]                                   # duplicates: each occurrence counts
    if T > 1:
        indices[1, ::3] = torch.tensor([-1, -2, N, N + 5, 2 ** 31 - 1, -2 ** 31], dtype=torch.int32).repeat(10)[:55]
    if T > 2:
        indices[2] = torch.where(torch.arange(K) % 2 == 0, -1, N)
    lengths = torch.tensor([K, 100, K, 0][:T], dtype=torch.int32)
    sink = torch.randn(H, generator=gen)
    sink[0] = -INF
    cache = quantize_kv_cache_fp8(kv, BS)
    return q, kv, indices, sink, lengths, cache


def _check(out, lse, expected):
    ops.compare(out, expected[0])
    ops.compare(lse, expected[1])


@pytest.mark.parametrize("T, H", [(1, 128), (2, 64), (4, 24)], ids=["pro-T1", "flash-T2", "tp-H24-T4"])
def test_bf16_kernel_matches_reference(T, H):
    q, kv, indices, sink, lengths, _ = _inputs(T, H)
    out, lse = ops.sparse_mqa(q, kv, indices, sink, None, lengths, impl="triton")
    _check(out, lse, reference(q, kv, indices, sink, None, lengths))
    if T > 2:
        assert torch.all(out[2] == 0) and torch.all(lse[2] == INF)
    if T > 3:
        assert torch.all(out[3] == 0) and torch.all(lse[3] == INF)


@pytest.mark.parametrize("T, H", [(4, 24)], ids=["tp-H24-T4"])
def test_fp8_kernel_equals_bf16_kernel_on_dequantised_cache(T, H):
    q, _, indices, sink, lengths, cache = _inputs(T, H)
    kv = dequantize_kv_cache_fp8(cache, cache.shape[0] * BS, BS)
    out, lse = ops.sparse_mqa_fp8(q, cache, indices, sink, None, lengths, BS, impl="triton")
    want = ops.sparse_mqa(q, kv, indices, sink, None, lengths, impl="triton")
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])     # same rows, same program: same bits
    _check(out, lse, reference_fp8(q, cache, indices, sink, None, lengths, BS))


@pytest.mark.parametrize("programs, max_splits, block_n", [(1, 32, 64), (0, 2, 16), (64, 32, 16)],
                         ids=["one-split", "uneven-gpu-tile", "split-per-block-gpu-tile"])
def test_split_plans_agree(monkeypatch, programs, max_splits, block_n):
    """The one-split path (prefill, finishes in the kernel) and split-K with a merge, even and uneven; with
    the interpreter's 64-entry steps and with the GPUs' BLOCK_N = 16."""
    impl = dispatch.get("sparse_mqa", "triton")
    monkeypatch.setitem(impl.defaults, "PROGRAMS", programs)
    monkeypatch.setitem(impl.defaults, "MAX_SPLITS", max_splits)
    monkeypatch.setitem(impl.defaults, "INTERPRET_BLOCK_N", block_n)
    q, kv, indices, sink, lengths, _ = _inputs(2, 64)
    out, lse = ops.sparse_mqa(q, kv, indices, sink, None, lengths, impl="triton")
    _check(out, lse, reference(q, kv, indices, sink, None, lengths))


def test_prefill_tokens_take_one_split():
    T, H, N = 8, 8, 159
    from dsv4_kernels.kernels.sparse_mqa.triton import plan
    cfg = dispatch.config(dispatch.get("sparse_mqa", "triton"), dispatch.platform.CPU)
    assert plan(T, H, 5, cfg, torch.device("cpu"))[2] == 1
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(T, H, D, generator=gen).to(torch.bfloat16)
    kv = torch.randn(N, D, generator=gen).to(torch.bfloat16)
    indices = ops.build_sparse_indices(torch.arange(150, 150 + T), 128)       # HCA prefill chunk: K = 129
    sink = torch.randn(H, generator=gen)
    out, lse = ops.sparse_mqa(q, kv, indices, sink, impl="triton")
    _check(out, lse, reference(q, kv, indices, sink))


def test_plan_depends_on_shapes_only():
    from dsv4_kernels.kernels.sparse_mqa.triton import plan
    cfg = dict(dispatch.get("sparse_mqa", "triton").defaults, PROGRAMS=264)
    cpu = torch.device("cpu")
    assert plan(64, 128, 72, cfg, cpu) == (32, 4, 2, 36)      # V4-Pro decode, batch 64, K 1152: 2 splits
    assert plan(1, 128, 72, cfg, cpu) == (32, 4, 24, 3)       # one token: 32 splits asked, 24 of 3 blocks
    assert plan(1, 8, 5, cfg, cpu) == (16, 1, 5, 1)           # never more splits than blocks
    assert plan(4096, 64, 72, cfg, cpu)[2] == 1               # prefill: one split, no workspace
    assert plan(3, 24, 0, cfg, cpu)[2] == 1                   # K = 0


def test_sink_of_minus_inf_is_dense_attention():
    """Every row of a small pool, sink -inf: plain softmax attention, computed densely in fp32."""
    T, H, N = 2, 16, 70
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(T, H, D, generator=gen).to(torch.bfloat16)
    kv = torch.randn(N, D, generator=gen).to(torch.bfloat16)
    indices = torch.arange(N, dtype=torch.int32).repeat(T, 1)
    sink = torch.full((H,), -INF)
    out, lse = ops.sparse_mqa(q, kv, indices, sink, impl="triton")
    logits = (q.float() @ kv.float().T) * D ** -0.5                  # [T, H, N]
    dense = (torch.softmax(logits, dim=-1) @ kv.float()).to(torch.bfloat16)
    _check(out, lse, (dense, torch.logsumexp(logits, dim=-1)))
    with_sink = ops.sparse_mqa(q, kv, indices, torch.zeros(H), impl="triton")[0].float()
    assert not torch.allclose(with_sink, out.float(), atol=1e-3)      # a finite sink does change out


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")   # numpy's max in the interpreter
def test_nan_in_nan_out():
    q, kv, indices, sink, lengths, _ = _inputs(4, 24)
    q, kv = q.clone(), kv.clone()
    q[0, 5, 7] = float("nan")                                         # one head of row 0
    first = set(indices[0].tolist())
    used = next(int(i) for i in indices[1, :100].tolist() if 0 <= i < kv.shape[0] and i not in first)
    kv[used] = float("nan")                                           # a row that row 1 uses, row 0 does not
    unused = int(torch.isin(torch.arange(kv.shape[0]), indices.long()).logical_not().nonzero()[0])
    kv[unused] = float("nan")                                         # a row no entry names
    indices = indices.clone()
    indices[1, 120] = unused                                          # ... but one past row 1's topk_length
    out, lse = ops.sparse_mqa(q, kv, indices, sink, None, lengths, impl="triton")
    _check(out, lse, reference(q, kv, indices, sink, None, lengths))
    assert out[0, 5].isnan().all() and lse[0, 5].isnan() and not out[0, 4].isnan().any()
    assert out[1].isnan().all() and lse[1].isnan().all()
    assert torch.all(out[2] == 0) and torch.all(lse[2] == INF)        # empty row: unaffected


def test_zero_tokens_and_empty_lists():
    q, kv, indices, sink, lengths, cache = _inputs(2, 64)
    out, lse = ops.sparse_mqa(q[:0], kv, indices[:0], sink, impl="triton")
    assert out.shape == (0, 64, D) and lse.shape == (0, 64)
    out, lse = ops.sparse_mqa_fp8(q, cache, indices[:, :0].contiguous(), sink, block_size=BS, impl="triton")
    assert torch.all(out == 0) and torch.all(lse == INF)


@settings(max_examples=5)
@given(seed=st.integers(0, 2 ** 31 - 1), T=st.integers(0, 2), H=st.sampled_from([8, 40]), K1=st.integers(0, 70),
       K2=st.integers(0, 70), lengths=st.booleans(), block_size=st.sampled_from([1, 16, 64]))
def test_two_caches_any_shape(seed, T, H, K1, K2, lengths, block_size):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, D, generator=gen).to(torch.bfloat16)
    c1 = quantize_kv_cache_fp8(torch.randn(50, D, generator=gen).to(torch.bfloat16), block_size)
    c2 = quantize_kv_cache_fp8(torch.randn(30, D, generator=gen).to(torch.bfloat16), block_size)
    i1 = torch.randint(-2, c1.shape[0] * block_size + 2, (T, K1), generator=gen, dtype=torch.int32)
    i2 = torch.randint(-2, c2.shape[0] * block_size + 2, (T, K2), generator=gen, dtype=torch.int32)
    l1 = torch.randint(-1, K1 + 2, (T,), generator=gen, dtype=torch.int32) if lengths else None
    l2 = torch.randint(-1, K2 + 2, (T,), generator=gen, dtype=torch.int32) if lengths else None
    sink = torch.randn(H, generator=gen)
    args = (q, c1, i1, sink, None, l1, block_size, c2, i2, l2)
    out, lse = ops.sparse_mqa_fp8(*args, impl="triton")
    _check(out, lse, reference_fp8(*args))


def test_supports_refuses_what_the_kernel_was_not_built_for():
    from dsv4_kernels.kernels.sparse_mqa import supports_sparse_mqa, supports_sparse_mqa_fp8
    q, kv, indices, sink, lengths, cache = _inputs(2, 64)
    assert supports_sparse_mqa(q, kv, indices, sink) is None
    assert "multiple of 8" in supports_sparse_mqa(torch.zeros(2, 12, D, dtype=torch.bfloat16), kv, indices, sink)
    assert "contiguous" in supports_sparse_mqa(q, torch.stack((kv, kv), -1)[..., 0], indices, sink)
    assert supports_sparse_mqa_fp8(q, cache, indices, sink, block_size=BS) is None
    assert supports_sparse_mqa_fp8(q, ops.padded_pages(cache, 9600, slice_view=True, fp8_view=True), indices, sink,
                                   block_size=BS) is None
    odd = torch.zeros(3, 9347, dtype=torch.uint8)[:, :9344]
    assert "multiples of 8 bytes" in supports_sparse_mqa_fp8(q, odd, indices, sink, block_size=BS)
    shifted = torch.zeros(2 * 9344 + 1, dtype=torch.uint8)[1:].view(2, 9344)
    assert "8-byte boundaries" in supports_sparse_mqa_fp8(q, shifted, indices, sink, block_size=BS)
    assert "8-byte boundaries" in supports_sparse_mqa_fp8(q, cache, indices, sink, block_size=BS,
                                                          extra_kv_cache=shifted, extra_indices=indices)
