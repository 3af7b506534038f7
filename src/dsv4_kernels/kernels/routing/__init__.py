"""MoE routing kernels (SPEC 3): triton.py and tilelang.py, one fused launch per op for every GPU target.

This module holds what needs no toolchain: the shapes the kernels were built for (the `supports_*`
guards the dispatcher asks before a launch). README.md has the design.
"""
from __future__ import annotations

import torch

MAX_EXPERTS = 512
MAX_TOPK = 16
LOGIT_DTYPES = (torch.float32, torch.bfloat16)

__all__ = ["MAX_EXPERTS", "MAX_TOPK", "supports_score_topk", "supports_hash_topk"]


def _logits_reason(router_logits) -> str | None:
    if router_logits.dtype not in LOGIT_DTYPES:
        return f"router_logits must be fp32 or bf16, got {router_logits.dtype}"
    if router_logits.dim() != 2 or not router_logits.is_contiguous():
        return f"router_logits must be a contiguous [T, E] tensor, got shape {tuple(router_logits.shape)}"
    if not 1 <= router_logits.shape[1] <= MAX_EXPERTS:
        return (f"built for up to {MAX_EXPERTS} experts (256 V4-Flash, 384 V4-Pro), "
                f"got E = {router_logits.shape[1]}")
    return None


def _shared_reason(num_fused_shared_experts) -> str | None:
    if num_fused_shared_experts not in (0, 1):
        return f"built for 0 or 1 fused shared experts, got {num_fused_shared_experts}"
    return None


def supports_score_topk(router_logits, bias, topk=6, routed_scaling_factor=1.0, num_fused_shared_experts=0,
                        apply_routed_scaling_factor_on_output=False, renormalize=True) -> str | None:
    if not 1 <= topk <= MAX_TOPK:
        return f"built for top-k up to {MAX_TOPK} (6 in V4), got topk = {topk}"
    if bias.dtype != torch.float32 or not bias.is_contiguous():
        return f"bias must be a contiguous fp32 tensor, got {bias.dtype}"
    return _logits_reason(router_logits) or _shared_reason(num_fused_shared_experts)


def supports_hash_topk(router_logits, input_ids, tid2eid, num_fused_shared_experts=0, routed_scaling_factor=1.0,
                       apply_routed_scaling_factor_on_output=False) -> str | None:
    if tid2eid.dim() != 2 or not 1 <= tid2eid.shape[1] <= MAX_TOPK:
        return f"built for tables of up to {MAX_TOPK} experts per token (6 in V4), got {tuple(tid2eid.shape)}"
    if tid2eid.dtype != torch.int32 or not tid2eid.is_contiguous():
        return f"tid2eid must be a contiguous int32 tensor, got {tid2eid.dtype}"
    if input_ids.dtype not in (torch.int32, torch.int64) or not input_ids.is_contiguous():
        return f"input_ids must be a contiguous int32 or int64 tensor, got {input_ids.dtype}"
    return _logits_reason(router_logits) or _shared_reason(num_fused_shared_experts)
