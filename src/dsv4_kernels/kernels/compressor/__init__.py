"""Compressor kernels (SPEC 2): triton.py (with triton_prefill.py, triton_indexer.py) and tilelang.py. This
module holds what needs no toolchain: the forms the kernels were built for (the `supports_*` guards the
dispatcher asks before a launch)."""
from __future__ import annotations

import torch

__all__ = ["supports_compressor_decode", "supports_compressor_prefill", "supports_compressor_prefill_batched",
           "supports_indexer_cache_quantize"]


def supports_compressor_decode(kv_state, score_state, kv, score, ape, positions, ratio, slot_ids=None,
                               norm_weight=None, rope_cos=None, rope_sin=None, kv_cache=None, cache_block_size=64,
                               cache_slots=None) -> str | None:
    if kv_cache is not None and not (kv_cache.is_contiguous() and cache_slots.is_contiguous()):
        return "kv_cache and cache_slots must be contiguous"
    for name, t in (("kv_state", kv_state), ("score_state", score_state), ("kv", kv), ("score", score),
                    ("ape", ape)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            return f"{name} must be a contiguous fp32 tensor, got {t.dtype}"
    if norm_weight is not None and not all(t.is_contiguous() and t.dtype == torch.float32
                                           for t in (norm_weight, rope_cos, rope_sin)):
        return "norm_weight, rope_cos and rope_sin must be contiguous fp32 tensors"
    return None


def _contiguous(**tensors) -> str | None:
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            return f"{name} must be contiguous"
    return None


def _fused_fp32(norm_weight, rope_cos, rope_sin) -> str | None:
    if norm_weight is not None and not all(t.is_contiguous() and t.dtype == torch.float32
                                           for t in (norm_weight, rope_cos, rope_sin)):
        return "norm_weight, rope_cos and rope_sin must be contiguous fp32 tensors"
    return None


def supports_compressor_prefill_batched(kv, score, ape, ratio, cu_seqlens, kv_state, score_state,
                                        start_positions=None, slot_ids=None, norm_weight=None, rope_cos=None,
                                        rope_sin=None, kv_cache=None, cache_block_size=64,
                                        cache_slots=None) -> str | None:
    for name, t in (("kv_state", kv_state), ("score_state", score_state), ("ape", ape)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            return f"{name} must be a contiguous fp32 tensor, got {t.dtype}"
    if kv.dtype not in (torch.float32, torch.bfloat16) or score.dtype != kv.dtype:
        return f"kv and score must share the dtype fp32 or bf16, got {kv.dtype} and {score.dtype}"
    return (_contiguous(kv=kv, score=score, cu_seqlens=cu_seqlens, start_positions=start_positions,
                        slot_ids=slot_ids, kv_cache=kv_cache, cache_slots=cache_slots)
            or _fused_fp32(norm_weight, rope_cos, rope_sin))


def supports_compressor_prefill(kv, score, ape, ratio, norm_weight=None, rope_cos=None, rope_sin=None,
                                kv_cache=None, cache_block_size=64, cache_slots=None) -> str | None:
    if ape.dtype != torch.float32 or not ape.is_contiguous():
        return f"ape must be a contiguous fp32 tensor, got {ape.dtype}"
    if kv.dtype not in (torch.float32, torch.bfloat16) or score.dtype != kv.dtype:
        return f"kv and score must share the dtype fp32 or bf16, got {kv.dtype} and {score.dtype}"
    return (_contiguous(kv=kv, score=score, kv_cache=kv_cache, cache_slots=cache_slots)
            or _fused_fp32(norm_weight, rope_cos, rope_sin))


def supports_indexer_cache_quantize(x) -> str | None:
    """The Triton indexer kernel reads x as contiguous [n, 128] bf16 rows."""
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != 128 or not x.is_contiguous():
        return f"x must be a contiguous [n, 128] bf16 tensor, got {x.dtype} {tuple(x.shape)}" + (
            "" if x.is_contiguous() else " (not contiguous)")
    return None
