"""dsv4_kernels.compat.flashmla against FlashMLA's documented semantics, on our ops.

FlashMLA's facts (its public sparse decode and prefill API): q [b, s_q, h_q, 512]; k_cache [blocks,
block_size, 1, 584] over pages padded to a multiple of 576 bytes (37440 at block 64); indices [b, s_q,
topk] flat slots, -1 invalid; topk_length one per batch row; lse returned as [b, h_q, s_q]; the sink
joins the denominator, not lse; a row with no valid index gives out 0 and lse +inf. The expected values
come from dsv4_kernels.sparse_mqa (the reference) on the dequantised pool.
"""
import pytest
import torch

import dsv4_kernels as dk
from dsv4_kernels.compat import flashmla

BLOCK = 64
PADDED = 37440        # FlashMLA's page: 64 * 584 = 37376 rounded up to a multiple of 576


def _padded_cache(rows: torch.Tensor, dtype=torch.uint8):
    """rows [N, 512] bf16 -> (FlashMLA k_cache view [blocks, 64, 1, 584] over padded pages, the
    dequantised pool [N, 512])."""
    pages = dk.quantize_kv_cache_fp8(rows, BLOCK)
    buf = torch.full((pages.shape[0], PADDED), 0xEE, dtype=torch.uint8)   # pad bytes must never be read
    buf[:, :BLOCK * 584] = pages
    cache = buf[:, :BLOCK * 584].view(pages.shape[0], BLOCK, 1, 584)
    if dtype != torch.uint8:
        cache = buf.view(dtype)[:, :BLOCK * 584].view(pages.shape[0], BLOCK, 1, 584)
    return cache, dk.dequantize_kv_cache_fp8(pages, rows.shape[0], BLOCK)


def _close(out, want):
    """SPEC 6 attention tolerance: abs 1e-3 or rel 2/128."""
    torch.testing.assert_close(out.float(), want.float(), atol=1e-3, rtol=2 / 128)


def _decode_inputs(b=2, s_q=2, h=64, topk=24, n=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, s_q, h, 512, generator=g) / 512 ** 0.25).bfloat16()
    rows = (torch.randn(n, 512, generator=g) / 512 ** 0.25).bfloat16()
    indices = torch.randint(0, n, (b, s_q, topk), generator=g, dtype=torch.int32)
    indices[0, 0, -3:] = -1
    sink = 0.3 * torch.randn(h, generator=g)
    return q, rows, indices, sink


@pytest.mark.parametrize("cache_dtype", [torch.uint8, torch.float8_e4m3fn], ids=["uint8", "fp8-view"])
def test_sparse_decode_matches_sparse_mqa_on_the_dequantised_pool(cache_dtype):
    q, rows, indices, sink = _decode_inputs()
    cache, pool = _padded_cache(rows, cache_dtype)
    topk_length = torch.tensor([20, 24], dtype=torch.int32)             # one per batch row
    out, lse = flashmla.flash_mla_with_kvcache(q, cache, None, None, 512, None, is_fp8_kvcache=True,
                                               indices=indices, attn_sink=sink, topk_length=topk_length)
    b, s_q, h, _ = q.shape
    assert out.shape == (b, s_q, h, 512) and lse.shape == (b, h, s_q)
    want_out, want_lse = dk.sparse_mqa(q.view(b * s_q, h, 512), pool, indices.view(b * s_q, -1), sink,
                                       topk_length=topk_length.repeat_interleave(s_q), impl="reference")
    _close(out.reshape(b * s_q, h, 512), want_out)
    torch.testing.assert_close(lse.transpose(1, 2).reshape(b * s_q, h), want_lse, atol=1e-4, rtol=1e-4)


def test_two_caches_read_in_place_equal_one_pool():
    q, rows, indices, sink = _decode_inputs(topk=16)
    window, _ = _padded_cache(rows[:70])
    compressed, _ = _padded_cache(rows[70:])
    extra = torch.randint(0, 80, (2, 2, 8), dtype=torch.int32)
    out, lse = flashmla.flash_mla_with_kvcache(q, window, None, None, 512, None, is_fp8_kvcache=True,
                                               indices=indices.clamp(max=69), attn_sink=sink, extra_k_cache=compressed,
                                               extra_indices_in_kvcache=extra,
                                               extra_topk_length=torch.tensor([8, 5], dtype=torch.int32))
    joined, pool = _padded_cache(rows)
    both = torch.cat([indices.clamp(max=69), extra + 70], dim=-1)
    length = torch.tensor([16 + 8, 16 + 8], dtype=torch.int32)
    both[1, :, 16 + 5:] = -1                                                 # extra_topk_length 5 on row 1
    want_out, want_lse = flashmla.flash_mla_with_kvcache(q, joined, None, None, 512, None, is_fp8_kvcache=True,
                                                         indices=both, attn_sink=sink, topk_length=length)
    _close(out, want_out)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)


def test_a_row_with_no_valid_index_gives_zero_and_inf():
    q, rows, indices, sink = _decode_inputs()
    cache, _ = _padded_cache(rows)
    indices[1, 1] = -1
    out, lse = flashmla.flash_mla_with_kvcache(q, cache, None, None, 512, None, is_fp8_kvcache=True,
                                               indices=indices, attn_sink=sink)
    assert not out[1, 1].any() and torch.isinf(lse[1, :, 1]).all() and (lse[1, :, 1] > 0).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(indices=None), "indices: expected the [b, s_q, topk] int32 sparse index list"),
    (dict(is_fp8_kvcache=False), "is_fp8_kvcache: expected True"),
    (dict(causal=True), "causal: expected False"),
    (dict(head_dim_v=576), "head_dim_v: expected 512, got 576"),
    (dict(topk_length=torch.tensor([1, 2, 3], dtype=torch.int32)), "topk_length: expected shape (2,), got (3,)"),
])
def test_what_flashmla_takes_and_we_do_not_is_refused(kwargs, message):
    q, rows, indices, sink = _decode_inputs()
    cache, _ = _padded_cache(rows)
    args = dict(q=q, k_cache=cache, block_table=None, cache_seqlens=None, head_dim_v=512,
                tile_scheduler_metadata=None, is_fp8_kvcache=True, indices=indices, attn_sink=sink)
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        flashmla.flash_mla_with_kvcache(**args)
    assert message in str(err.value)


def test_an_extra_cache_with_another_block_size_is_refused():
    q, rows, indices, sink = _decode_inputs()
    cache, _ = _padded_cache(rows)
    other = torch.zeros(2, 32, 1, 584, dtype=torch.uint8)
    with pytest.raises(ValueError, match="extra_k_cache: expected block size 64 .* got 32"):
        flashmla.flash_mla_with_kvcache(q, cache, None, None, 512, None, is_fp8_kvcache=True, indices=indices,
                                        attn_sink=sink, extra_k_cache=other,
                                        extra_indices_in_kvcache=torch.zeros(2, 2, 4, dtype=torch.int32))


def test_sparse_prefill_matches_sparse_mqa():
    g = torch.Generator().manual_seed(3)
    s_q, h, n = 5, 64, 40
    q = (torch.randn(s_q, h, 512, generator=g) / 512 ** 0.25).bfloat16()
    kv = (torch.randn(n, 1, 512, generator=g) / 512 ** 0.25).bfloat16()
    indices = torch.randint(-1, n + 3, (s_q, 1, 12), generator=g, dtype=torch.int32)   # -1 and >= s_kv invalid
    out, max_logits, lse = flashmla.flash_mla_sparse_fwd(q, kv, indices, 512 ** -0.5)
    want_out, want_lse = dk.sparse_mqa(q, kv.view(n, 512), indices.view(s_q, 12),
                                       torch.full((h,), float("-inf")), 512 ** -0.5, impl="reference")
    assert max_logits is None and out.shape == (s_q, h, 512) and lse.shape == (s_q, h)
    _close(out, want_out)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"kv: expected shape \(s_kv, 1, 512\)"):
        flashmla.flash_mla_sparse_fwd(q, kv.expand(n, 2, 512).contiguous(), indices, 512 ** -0.5)
