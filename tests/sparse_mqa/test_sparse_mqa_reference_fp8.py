"""sparse_mqa_fp8 (SPEC 1.2): the bf16 op applied to the dequantised paged FP8 cache, bit for bit."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv4_kernels.reference.formats import (dequantize_kv_cache_fp8, quantize_kv_cache_fp8,
                                            store_kv_cache_fp8, KV_TOKEN_BYTES)
from dsv4_kernels.reference.sparse_mqa import sparse_mqa, sparse_mqa_fp8

D = 512
INF = float("inf")


def assert_identical(a, b):
    """Same (out, lse) bit for bit; +inf lse entries compare equal under torch.equal."""
    assert a[0].dtype == b[0].dtype == torch.bfloat16 and a[1].dtype == b[1].dtype == torch.float32
    assert torch.equal(a[0], b[0]), "out differs"
    assert torch.equal(a[1], b[1]), "lse differs"


@pytest.mark.parametrize("block_size", [64, 16])
@pytest.mark.parametrize("n_tokens", [1, 63, 100, 128])
def test_equals_bf16_op_on_dequantised_cache(n_tokens, block_size):
    T, H, K = 3, 16, 40
    q = torch.randn(T, H, D).to(torch.bfloat16)
    kv = torch.randn(n_tokens, D).to(torch.bfloat16)
    pages = quantize_kv_cache_fp8(kv, block_size)
    capacity = pages.shape[0] * block_size
    # Indices cover written rows, never-written rows of the last page (valid: zero bytes), rows past the
    # last page (invalid), negatives, and duplicates.
    indices = torch.randint(-3, capacity + 3, (T, K), dtype=torch.int32)
    indices[:, 0] = indices[:, 1]
    sink = torch.randn(H)
    lengths = torch.tensor([K, 0, K // 2], dtype=torch.int32)
    fp8 = sparse_mqa_fp8(q, pages, indices, sink, None, lengths, block_size)
    dequantised = dequantize_kv_cache_fp8(pages, capacity, block_size)
    assert_identical(fp8, sparse_mqa(q, dequantised, indices, sink, None, lengths))
    assert torch.all(fp8[0][1] == 0) and torch.all(fp8[1][1] == INF)


@pytest.mark.parametrize("heads,topk", [(64, 512), (128, 1024)])
@pytest.mark.parametrize("T", [0, 1, 3])
def test_model_shapes(heads, topk, T):
    n_tokens = 128 + topk + 37
    q = torch.randn(T, heads, D).to(torch.bfloat16)
    kv = torch.randn(n_tokens, D).to(torch.bfloat16)
    pages = quantize_kv_cache_fp8(kv)
    indices = torch.randint(-1, n_tokens, (T, 128 + topk), dtype=torch.int32)
    sink = torch.randn(heads)
    fp8 = sparse_mqa_fp8(q, pages, indices, sink)
    assert fp8[0].shape == (T, heads, D) and fp8[1].shape == (T, heads)
    assert_identical(fp8, sparse_mqa(q, dequantize_kv_cache_fp8(pages, pages.shape[0] * 64), indices, sink))


def test_index_addresses_page_and_slot():
    # Tokens scattered over pages by store_kv_cache_fp8: index n must read page n // bs, slot n % bs.
    bs, n_pages, H = 16, 5, 8
    kv = torch.randn(12, D).to(torch.bfloat16)
    slots = torch.randperm(n_pages * bs)[:12]
    pages = torch.zeros(n_pages, bs * KV_TOKEN_BYTES, dtype=torch.uint8)
    store_kv_cache_fp8(pages, slots, kv, bs)
    rows = dequantize_kv_cache_fp8(quantize_kv_cache_fp8(kv, bs), 12, bs)      # token i's dequantised row
    q = torch.randn(4, H, D).to(torch.bfloat16)
    picks = torch.randint(0, 12, (4, 9))
    sink = torch.randn(H)
    fp8 = sparse_mqa_fp8(q, pages, slots[picks].int(), sink, block_size=bs)
    assert_identical(fp8, sparse_mqa(q, rows, picks.int(), sink))


@settings(deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), T=st.integers(0, 3), n_tokens=st.integers(1, 90),
       K=st.integers(0, 50), block_size=st.sampled_from([8, 16, 64]), minus_inf_sink=st.booleans())
def test_fp8_property(seed, T, n_tokens, K, block_size, minus_inf_sink):
    gen = torch.Generator().manual_seed(seed)
    H = 8
    q = torch.randn(T, H, D, generator=gen).to(torch.bfloat16)
    kv = (torch.randn(n_tokens, D, generator=gen) * torch.rand(n_tokens, 1, generator=gen) * 4).to(torch.bfloat16)
    pages = quantize_kv_cache_fp8(kv, block_size)
    capacity = pages.shape[0] * block_size
    indices = torch.randint(-2, capacity + 2, (T, K), generator=gen, dtype=torch.int32)
    sink = torch.full((H,), -INF) if minus_inf_sink else torch.randn(H, generator=gen)
    fp8 = sparse_mqa_fp8(q, pages, indices, sink, block_size=block_size)
    dequantised = dequantize_kv_cache_fp8(pages, capacity, block_size)
    assert_identical(fp8, sparse_mqa(q, dequantised, indices, sink))
