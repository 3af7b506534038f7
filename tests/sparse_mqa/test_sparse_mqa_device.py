"""Sparse MQA at full V4 shapes on a device (`--backend=cuda|rocm`): every GPU implementation of both ops
(Triton and TileLang) against the reference computed on the CPU, at the SPEC 6 tolerances of
ops.sparse_mqa.compare (the Triton kernel tests' rule). On the CPU they skip with the reason: the Triton
interpreter tests cover small shapes and the TileLang kernels are codegen-verified there.

- V4-Pro decode: H = 128, 128 window + 1024 compressed indices, batch 64, FP8 cache (FlashMLA-padded
  pages) and the bf16 pool;
- V4-Flash decode: H = 64, 128 + 512, batch 64, both ops, with topk_length;
- prefill: 512 tokens of one sequence (one split: the in-block finish, no merge), H = 64;
- two caches read in place (SPEC 1.3), window cache + compressed cache, both topk_lengths;
- rows with no valid index (all -1, out of range, topk_length 0) next to ordinary rows: out 0, lse +inf;
- H = 8, 24, 120 (a partly filled 64-head tile);
- a decode step replayed from a CUDA graph gives the eager result bit for bit (no host sync).
"""
import pytest
import torch

from dsv4_kernels import ladder
from dsv4_kernels.ops import sparse_mqa as ops
from dsv4_kernels.ops.sparse_mqa import padded_pages, sparse_mqa, sparse_mqa_fp8
from dsv4_kernels.reference.formats import quantize_kv_cache_fp8

H_PRO, H_FLASH, D = 128, 64, 512


def _device_only(device):
    if device.type == "cpu":
        pytest.skip("full V4 shapes run on a device (--backend=cuda|rocm); on the CPU the Triton interpreter tests "
                    "cover small shapes and the TileLang kernels are codegen-verified")


def _compare(op, got, expected):
    check = ladder.get_check(op)
    for g, e in zip(got, expected):
        check.compare(g.cpu(), e)


def _decode(gen, T, H, window, topk, capacity):
    """T decode rows: each owns a window of `window` ring rows and `capacity` compressed rows in one pool;
    the indexer's top-k picks `topk` entries (a few -1, one duplicate), topk_length shorter on some rows."""
    N = T * (window + capacity)
    idx = torch.full((T, window + topk), -1, dtype=torch.int32)
    for t in range(T):
        base = t * (window + capacity)
        fill = window if t % 5 else window // 3                      # a short window now and then
        idx[t, :fill] = base + torch.arange(fill, dtype=torch.int32)
        picks = torch.randperm(capacity, generator=gen)[:topk].to(torch.int32) + base + window
        idx[t, window:] = picks
        idx[t, window + 3] = idx[t, window + 4]                       # a duplicate
        idx[t, window + 7] = -1
    lengths = torch.full((T,), window + topk, dtype=torch.int32)
    lengths[1::7] = window + topk // 2
    q = torch.randn(T, H, D, generator=gen).to(torch.bfloat16)
    kv = torch.randn(N, D, generator=gen).to(torch.bfloat16)
    sink = torch.randn(H, generator=gen)
    sink[3] = float("-inf")
    return q, kv, idx, sink, lengths


def _empty_rows(idx, lengths, N):
    idx[0] = -1                      # all -1
    idx[2] = N + 5                   # all out of range
    idx[4, :] = -7                   # other negatives
    lengths[6] = 0                   # nothing used
    return idx, lengths


@pytest.mark.op("sparse_mqa_fp8")
@pytest.mark.parametrize("H, topk", ((H_PRO, 1024), (H_FLASH, 512)), ids=["pro-H128-K1152", "flash-H64-K640"])
def test_decode_batch64_fp8(impl, device, H, topk):
    _device_only(device)
    gen = torch.Generator().manual_seed(H + topk)
    q, kv, idx, sink, lengths = _decode(gen, 64, H, 128, topk, topk + 200)
    idx, lengths = _empty_rows(idx, lengths, kv.shape[0])
    cache = padded_pages(quantize_kv_cache_fp8(kv, 64))
    expected = sparse_mqa_fp8(q, cache, idx, sink, None, lengths, 64, impl="reference")
    got = sparse_mqa_fp8(*(t.to(device) for t in (q, cache, idx, sink)), None, lengths.to(device), 64, impl=impl)
    _compare("sparse_mqa_fp8", got, expected)
    assert torch.equal(got[0][0].cpu(), torch.zeros(H, D, dtype=torch.bfloat16))
    assert torch.isinf(got[1][[0, 2, 4, 6]].cpu()).all()


@pytest.mark.op("sparse_mqa")
@pytest.mark.parametrize("H, topk", ((H_PRO, 1024), (H_FLASH, 512)), ids=["pro-H128-K1152", "flash-H64-K640"])
def test_decode_batch64_bf16(impl, device, H, topk):
    _device_only(device)
    gen = torch.Generator().manual_seed(7 * H + topk)
    q, kv, idx, sink, lengths = _decode(gen, 64, H, 128, topk, topk + 200)
    idx, lengths = _empty_rows(idx, lengths, kv.shape[0])
    expected = sparse_mqa(q, kv, idx, sink, None, lengths, impl="reference")
    got = sparse_mqa(*(t.to(device) for t in (q, kv, idx, sink)), None, lengths.to(device), impl=impl)
    _compare("sparse_mqa", got, expected)


@pytest.mark.op("sparse_mqa")
@pytest.mark.parametrize("H", (8, 24, 120))
def test_head_counts_that_pad_the_head_tile(impl, device, H):
    """H not a multiple of the 64-head tile (TP ranks: 8, and odd splits): padded rows must stay unstored."""
    _device_only(device)
    gen = torch.Generator().manual_seed(H)
    q, kv, idx, sink, lengths = _decode(gen, 5, H, 128, 200, 300)
    expected = sparse_mqa(q, kv, idx, sink, 0.05, lengths, impl="reference")
    got = sparse_mqa(*(t.to(device) for t in (q, kv, idx, sink)), 0.05, lengths.to(device), impl=impl)
    _compare("sparse_mqa", got, expected)


@pytest.mark.op("sparse_mqa_fp8")
def test_prefill_512_tokens_fp8(impl, device):
    """Prefill of one sequence: query i sees its window and the compressed entries before it (HCA layer,
    ratio 128): many tokens, one split, no merge launch."""
    _device_only(device)
    gen = torch.Generator().manual_seed(512)
    T, H = 512, H_FLASH
    idx = ops.build_sparse_indices(torch.arange(T), 128).contiguous()
    N = T + T // 128
    q = torch.randn(T, H, D, generator=gen).to(torch.bfloat16)
    kv = torch.randn(N, D, generator=gen).to(torch.bfloat16)
    sink = torch.randn(H, generator=gen)
    cache = quantize_kv_cache_fp8(kv, 64)
    expected = sparse_mqa_fp8(q, cache, idx, sink, impl="reference")
    got = sparse_mqa_fp8(*(t.to(device) for t in (q, cache, idx, sink)), impl=impl)
    _compare("sparse_mqa_fp8", got, expected)
    expected = sparse_mqa(q, kv, idx, sink, impl="reference")
    got = sparse_mqa(*(t.to(device) for t in (q, kv, idx, sink)), impl=impl)
    _compare("sparse_mqa", got, expected)


@pytest.mark.op("sparse_mqa_fp8")
@pytest.mark.parametrize("H", (H_PRO, H_FLASH))
def test_two_caches_batch64(impl, device, H):
    """SPEC 1.3: window rows and compressed rows in two caches (one FlashMLA-padded, one a strided slice),
    both lists with lengths, one softmax: equal to the one-pool op on the concatenated rows."""
    _device_only(device)
    gen = torch.Generator().manual_seed(13 * H)
    T, capacity, topk = 64, 700, 512
    window_kv = torch.randn(T * 128, D, generator=gen).to(torch.bfloat16)
    comp_kv = torch.randn(T * capacity, D, generator=gen).to(torch.bfloat16)
    win = (torch.arange(T)[:, None] * 128 + torch.arange(128)[None, :]).to(torch.int32)
    win[5, 40:] = -1
    win[9] = -1
    comp = torch.stack([torch.randperm(capacity, generator=gen)[:topk] + t * capacity for t in range(T)])
    comp = comp.to(torch.int32)
    comp[9] = -1                                                       # row 9: nothing valid in either list
    comp[11, 0] = T * capacity + 2                                     # past the compressed cache
    len2 = torch.full((T,), topk, dtype=torch.int32)
    len2[::3] = 300
    q = torch.randn(T, H, D, generator=gen).to(torch.bfloat16)
    sink = torch.randn(H, generator=gen)
    c1 = padded_pages(quantize_kv_cache_fp8(window_kv, 64))
    c2 = padded_pages(quantize_kv_cache_fp8(comp_kv, 64), slice_view=True)
    expected = sparse_mqa_fp8(q, c1, win, sink, None, None, 64, c2, comp, len2, impl="reference")
    dev = [t.to(device) for t in (q, win, sink, comp, len2)]
    got = sparse_mqa_fp8(dev[0], ops._to(device, c1)[0], dev[1], dev[2], None, None, 64, ops._to(device, c2)[0],
                         dev[3], dev[4], impl=impl)
    _compare("sparse_mqa_fp8", got, expected)
    assert torch.isinf(got[1][9].cpu()).all() and not got[0][9].cpu().any()


@pytest.mark.op("sparse_mqa_fp8")
def test_decode_graph_replay_is_bitwise_equal(impl, device):
    _device_only(device)
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    gen = torch.Generator().manual_seed(99)
    q, kv, idx, sink, lengths = (t.to(device) for t in _decode(gen, 16, H_PRO, 128, 1024, 1100))
    cache = quantize_kv_cache_fp8(kv.cpu(), 64).to(device)

    def step():
        return sparse_mqa_fp8(q, cache, idx, sink, None, lengths, 64, impl=impl)

    eager = step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)
