"""FlashMLA's sparse attention entry points, served by dsv4_kernels.sparse_mqa_fp8 and sparse_mqa.

    flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                           num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=False,
                           indices=None, attn_sink=None, extra_k_cache=None, extra_indices_in_kvcache=None,
                           topk_length=None, extra_topk_length=None) -> (out, lse)
        mirrors flash_mla.flash_mla_with_kvcache in its sparse decode form (DeepSeek-V3.2/V4: `indices`
        given, FP8 cache, causal False): q [b, s_q, h_q, 512] bf16; k_cache [blocks, block_size, 1, 584]
        in FlashMLA's paged layout (uint8, int8 or float8_e4m3fn bytes; a page may be padded to a multiple
        of 576 bytes, e.g. 37440 at block 64, so stride(0) >= block_size * 584 and stride(1) == 584);
        indices [b, s_q, topk] int32 flat cache slots (page * block_size + slot, -1 invalid);
        topk_length and extra_topk_length [b] int32, one per batch row; attn_sink [h_q] fp32.
        Returns out [b, s_q, h_q, 512] bf16 and lse [b, h_q, s_q] fp32 (a transposed view, as FlashMLA
        returns it; the sink is not in lse). block_table, cache_seqlens, tile_scheduler_metadata and
        num_splits belong to FlashMLA's scheduler and are ignored (our kernels schedule themselves).
    flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None)
        -> (out, max_logits, lse)
        mirrors flash_mla.flash_mla_sparse_fwd (sparse prefill on a bf16 pool): q [s_q, h_q, 512] bf16,
        kv [s_kv, 1, 512] bf16, indices [s_q, 1, topk] int32 (-1 or >= s_kv invalid), topk_length
        [s_q] int32. Returns out [s_q, h_q, 512] bf16, max_logits None (sparse_mqa does not compute the
        per-row maximum logit; an engine that reads it needs FlashMLA itself) and lse [s_q, h_q] fp32.

No copy on the call path except where FlashMLA's convention differs from ours: topk_length per batch
row becomes one per query token (a [b * s_q] int32 tensor, only when s_q > 1), and flash_mla_sparse_fwd
without a sink passes a [h_q] tensor of -inf. What FlashMLA allows and sparse_mqa_fp8 does not is
refused with a ValueError naming FlashMLA's argument: an extra cache with a block size other than the
main cache's (sparse_mqa_fp8 takes one block_size), causal or dense decode, head_dim_v or d_qk other
than 512, more than one KV head.
"""
from __future__ import annotations

import torch

import dsv4_kernels as dk
from dsv4_kernels.compat._common import engine_names
from dsv4_kernels.ops import _checks

__all__ = ["flash_mla_with_kvcache", "flash_mla_sparse_fwd"]

D = 512
TOKEN_BYTES = 584
_CACHE_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn)
_DECODE_NAMES = {"q": "q", "kv_cache": "k_cache", "indices": "indices", "attn_sink": "attn_sink",
                 "topk_length": "topk_length", "extra_kv_cache": "extra_k_cache",
                 "extra_indices": "extra_indices_in_kvcache", "extra_topk_length": "extra_topk_length",
                 "softmax_scale": "softmax_scale"}
_PREFILL_NAMES = {"q": "q", "kv": "kv", "indices": "indices", "attn_sink": "attn_sink",
                  "topk_length": "topk_length", "softmax_scale": "sm_scale"}


def _pages(name: str, cache: torch.Tensor) -> tuple[torch.Tensor, int]:
    """FlashMLA's [blocks, block_size, 1, 584] cache as the [blocks, block_size * 584] uint8 page view
    sparse_mqa_fp8 takes (same storage, page stride kept), and its block size."""
    if not isinstance(cache, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(cache).__name__}")
    if cache.dtype not in _CACHE_DTYPES:
        raise ValueError(f"{name}: expected dtype {' or '.join(map(str, _CACHE_DTYPES))} (the FP8 cache bytes), "
                         f"got {cache.dtype}")
    if cache.dim() != 4 or cache.shape[2] != 1 or cache.shape[3] != TOKEN_BYTES:
        raise ValueError(f"{name}: expected shape (blocks, block_size, 1, {TOKEN_BYTES}), got {tuple(cache.shape)}")
    blocks, block_size = cache.shape[0], cache.shape[1]
    if cache.stride(3) != 1 or cache.stride(1) != TOKEN_BYTES or cache.stride(0) < block_size * TOKEN_BYTES:
        raise ValueError(f"{name}: expected strides (>= {block_size * TOKEN_BYTES}, {TOKEN_BYTES}, *, 1) (pages "
                         f"of block_size * 584 bytes, possibly padded), got {cache.stride()}")
    raw = cache if cache.dtype == torch.uint8 else cache.view(torch.uint8)
    return raw.as_strided((blocks, block_size * TOKEN_BYTES), (cache.stride(0), 1)), block_size


def _per_token(name: str, length: torch.Tensor | None, batch: int, s_q: int) -> torch.Tensor | None:
    """FlashMLA's topk_length [b] (one per batch row) as ours, one per query token [b * s_q]."""
    if length is None:
        return None
    _checks.tensor(name, length, torch.int32, ndim=1)
    _checks.shape(name, length, (batch,))
    return length if s_q == 1 else length.repeat_interleave(s_q)


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                           num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None,
                           attn_sink=None, extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None,
                           extra_topk_length=None, *, impl=None):
    """FlashMLA's sparse decode on the FP8 paged cache(s); see the module docstring for the layouts.
    impl: our keyword, passed to sparse_mqa_fp8."""
    if indices is None:
        raise ValueError("indices: expected the [b, s_q, topk] int32 sparse index list (only FlashMLA's sparse "
                         "decode is served; dense MLA decode is not a DeepSeek-V4 op), got None")
    if not is_fp8_kvcache:
        raise ValueError("is_fp8_kvcache: expected True (the sparse decode reads the FP8 584-byte cache), got False")
    if causal:
        raise ValueError("causal: expected False (sparse attention takes its mask from the index list), got True")
    if head_dim_v != D:
        raise ValueError(f"head_dim_v: expected {D}, got {head_dim_v!r}")
    _checks.tensor("q", q, torch.bfloat16, ndim=4)
    _checks.shape("q", q, (None, None, None, D))
    batch, s_q, heads, _ = q.shape
    _checks.tensor("indices", indices, torch.int32, ndim=3)
    _checks.shape("indices", indices, (batch, s_q, None))
    if attn_sink is None:
        raise ValueError(f"attn_sink: expected a [{heads}] fp32 tensor (DeepSeek-V4's per-head sink), got None")
    pages, block_size = _pages("k_cache", k_cache)
    extra = {}
    if extra_k_cache is not None or extra_indices_in_kvcache is not None:
        if extra_k_cache is None or extra_indices_in_kvcache is None:
            missing = "extra_k_cache" if extra_k_cache is None else "extra_indices_in_kvcache"
            raise ValueError(f"{missing}: expected a tensor together with the other extra-cache argument, got None")
        extra_pages, extra_block = _pages("extra_k_cache", extra_k_cache)
        if extra_block != block_size:
            raise ValueError(f"extra_k_cache: expected block size {block_size} (the main cache's: sparse_mqa_fp8 "
                             f"reads both caches with one block_size), got {extra_block}")
        _checks.tensor("extra_indices_in_kvcache", extra_indices_in_kvcache, torch.int32, ndim=3)
        _checks.shape("extra_indices_in_kvcache", extra_indices_in_kvcache, (batch, s_q, None))
        extra = dict(extra_kv_cache=extra_pages,
                     extra_indices=extra_indices_in_kvcache.view(batch * s_q, -1),
                     extra_topk_length=_per_token("extra_topk_length", extra_topk_length, batch, s_q))
    elif extra_topk_length is not None:
        raise ValueError("extra_topk_length: expected None without extra_k_cache, got a tensor")
    with engine_names("sparse_mqa_fp8", _DECODE_NAMES):
        out, lse = dk.sparse_mqa_fp8(q.view(batch * s_q, heads, D), pages, indices.view(batch * s_q, -1), attn_sink,
                                     softmax_scale, _per_token("topk_length", topk_length, batch, s_q),
                                     block_size, **extra, impl=impl)
    return out.view(batch, s_q, heads, D), lse.view(batch, s_q, heads).transpose(1, 2)


def flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=D, attn_sink=None, topk_length=None, *, impl=None):
    """FlashMLA's sparse prefill on a bf16 pool; see the module docstring for the layouts.
    impl: our keyword, passed to sparse_mqa."""
    if d_v != D:
        raise ValueError(f"d_v: expected {D}, got {d_v!r}")
    _checks.tensor("q", q, torch.bfloat16, ndim=3)
    if q.shape[-1] != D:
        raise ValueError(f"q: expected d_qk = {D} (DeepSeek-V4: K = V, 512 wide), got shape {tuple(q.shape)}")
    _checks.tensor("kv", kv, torch.bfloat16, ndim=3)
    if kv.shape[1] != 1 or kv.shape[2] != D:
        raise ValueError(f"kv: expected shape (s_kv, 1, {D}) (one KV head: MQA), got {tuple(kv.shape)}")
    s_q, heads = q.shape[0], q.shape[1]
    _checks.tensor("indices", indices, torch.int32, ndim=3)
    if indices.shape[0] != s_q or indices.shape[1] != 1:
        raise ValueError(f"indices: expected shape ({s_q}, 1, topk), got {tuple(indices.shape)}")
    if attn_sink is None:
        attn_sink = torch.full((heads,), float("-inf"), dtype=torch.float32, device=q.device)
    with engine_names("sparse_mqa", _PREFILL_NAMES):
        out, lse = dk.sparse_mqa(q, kv.view(kv.shape[0], D), indices.view(s_q, -1), attn_sink, sm_scale, topk_length,
                                 impl=impl)
    return out, None, lse
