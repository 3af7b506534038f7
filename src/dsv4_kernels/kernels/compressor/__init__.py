"""Compressor kernels (SPEC 2): triton.py. This module holds what needs no toolchain: the forms the
kernels were built for (the `supports_*` guards the dispatcher asks before a launch)."""
from __future__ import annotations

import torch

__all__ = ["supports_compressor_decode"]


def supports_compressor_decode(kv_state, score_state, kv, score, ape, positions, ratio, slot_ids=None,
                               norm_weight=None, rope_cos=None, rope_sin=None, kv_cache=None, cache_block_size=64,
                               cache_slots=None) -> str | None:
    if kv_cache is not None:
        return "the FP8 cache store (kv_cache) is not fused into the decode kernel yet (issue 13)"
    for name, t in (("kv_state", kv_state), ("score_state", score_state), ("kv", kv), ("score", score),
                    ("ape", ape)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            return f"{name} must be a contiguous fp32 tensor, got {t.dtype}"
    if norm_weight is not None and not all(t.is_contiguous() and t.dtype == torch.float32
                                           for t in (norm_weight, rope_cos, rope_sin)):
        return "norm_weight, rope_cos and rope_sin must be contiguous fp32 tensors"
    return None
