"""Sparse MQA kernels (SPEC 1, 1.2, 1.3): triton.py and tilelang.py, each one source for the bf16 pool
and the FP8 paged cache (one or two caches), decode and prefill. README.md has the design.

This module holds what needs no toolchain: the forms the kernels were built for (the `supports_*`
guards the dispatcher asks before a launch). The public ops have already checked dtypes, shapes, head
counts (8..128, step 8), devices and the index lists' layout; the guards add what the kernel assumes on
top: contiguous q, kv and index lists, and caches whose pages start on 8-byte boundaries (the rope and
scale bytes are read as 2- and 1-byte words from the page base).
"""
from __future__ import annotations

import torch

__all__ = ["HEAD_DIM", "MAX_HEADS", "supports_sparse_mqa", "supports_sparse_mqa_fp8"]

HEAD_DIM = 512
MAX_HEADS = 128
PAGE_ALIGN = 8


def _common(q, indices, attn_sink, topk_length) -> str | None:
    if q.dim() != 3 or q.dtype != torch.bfloat16 or q.shape[-1] != HEAD_DIM or not q.is_contiguous():
        return f"q must be a contiguous [T, H, {HEAD_DIM}] bf16 tensor, got {q.dtype} {tuple(q.shape)}"
    H = q.shape[1]
    if H % 8 or not 8 <= H <= MAX_HEADS:
        return f"built for H a multiple of 8 from 8 to {MAX_HEADS}, got H = {H}"
    if indices.dtype != torch.int32 or not indices.is_contiguous():
        return f"indices must be a contiguous int32 tensor, got {indices.dtype}"
    if attn_sink.dtype != torch.float32 or not attn_sink.is_contiguous():
        return f"attn_sink must be a contiguous fp32 tensor, got {attn_sink.dtype}"
    if topk_length is not None and (topk_length.dtype != torch.int32 or not topk_length.is_contiguous()):
        return f"topk_length must be a contiguous int32 tensor, got {topk_length.dtype}"
    return None


def supports_sparse_mqa(q, kv, indices, attn_sink, softmax_scale=None, topk_length=None) -> str | None:
    if kv.dtype != torch.bfloat16 or kv.dim() != 2 or kv.shape[-1] != HEAD_DIM or not kv.is_contiguous():
        return f"kv must be a contiguous [N, {HEAD_DIM}] bf16 tensor, got {kv.dtype} {tuple(kv.shape)}"
    return _common(q, indices, attn_sink, topk_length)


def _cache_reason(name: str, cache, block_size: int) -> str | None:
    if cache.dtype not in (torch.uint8, torch.float8_e4m3fn) or cache.dim() != 2:
        return f"{name} must be a [P, page_bytes] uint8 or float8_e4m3fn tensor, got {cache.dtype} {tuple(cache.shape)}"
    if cache.shape[1] < block_size * 584 or (cache.shape[1] > 1 and cache.stride(1) != 1):
        return f"{name} must hold pages of >= block_size * 584 contiguous bytes, got {tuple(cache.shape)}"
    if cache.shape[0] > 1 and cache.stride(0) % PAGE_ALIGN:
        return f"{name}: built for page strides that are multiples of {PAGE_ALIGN} bytes, got {cache.stride(0)}"
    if cache.data_ptr() % PAGE_ALIGN:
        return f"{name}: built for pages that start on {PAGE_ALIGN}-byte boundaries, got address {cache.data_ptr():#x}"
    return None


def supports_sparse_mqa_fp8(q, kv_cache, indices, attn_sink, softmax_scale=None, topk_length=None, block_size=64,
                            extra_kv_cache=None, extra_indices=None, extra_topk_length=None) -> str | None:
    reason = _common(q, indices, attn_sink, topk_length) or _cache_reason("kv_cache", kv_cache, block_size)
    if reason or extra_kv_cache is None:
        return reason
    if extra_indices is None or extra_indices.dtype != torch.int32 or not extra_indices.is_contiguous():
        return "extra_indices must be a contiguous int32 tensor with extra_kv_cache"
    if extra_topk_length is not None and (extra_topk_length.dtype != torch.int32
                                          or not extra_topk_length.is_contiguous()):
        return f"extra_topk_length must be a contiguous int32 tensor, got {extra_topk_length.dtype}"
    return _cache_reason("extra_kv_cache", extra_kv_cache, block_size)
