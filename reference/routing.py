"""MoE routing references (SPEC 3): score top-k and hash top-k over sqrt(softplus) gate scores.

Precision: s = sqrt(softplus(logits)) is evaluated in fp64 and rounded once to fp32, so the reference
s is the fp32 rounding of the exact value (an fp32 kernel lands within an ulp or so of it). The
selection key s + bias is an fp32 addition, as the spec writes it. The weight normalisation runs in
fp64 on the fp32 s values and is rounded once to fp32.

Weight convention (SPEC 3, the engines' one: FlashInfer's hash_topk, SGLang's fused gate): routed
weights come back normalised and NOT multiplied by routed_scaling_factor (the caller scales the MoE
output); a fused shared expert gets 1 / routed_scaling_factor. With
apply_routed_scaling_factor_on_output=True the routed weights are multiplied by the factor and the
shared column gets 1.0 (the official model's arithmetic). renormalize=False (score top-k) skips the
division by the sum.

Fused shared experts: with num_fused_shared_experts = n > 0 the outputs gain n trailing columns;
column topk + j holds expert id E + j (SPEC 3 states this for n = 1, the only value V4 uses; n > 1
extends it column by column). Engines that treat n > 1 as replicas of one shared expert drawn at
random into a single column are not modelled here.
"""
from __future__ import annotations

import torch

__all__ = ["sqrt_softplus", "routed_weights", "shared_weight", "score_topk", "hash_topk"]

SOFTPLUS_THRESHOLD = 20.0
WEIGHT_SUM_EPS = 1e-20


def sqrt_softplus(logits: torch.Tensor) -> torch.Tensor:
    """s = sqrt(softplus(logits)) as fp32, with softplus(x) = x for x > 20 (torch's threshold).

    Args:
        logits: [..., E] floating point (fp32 in routing).
    Returns:
        [..., E] fp32, >= 0. Computed in fp64 and rounded once; exp never overflows (its argument is
        clamped to the threshold, where the other branch is taken). Very negative logits give s = 0;
        NaN gives NaN; +inf gives +inf.
    """
    x = logits.double()
    soft = torch.where(x > SOFTPLUS_THRESHOLD, x, torch.log1p(torch.exp(x.clamp(max=SOFTPLUS_THRESHOLD))))
    return soft.sqrt().float()


def routed_weights(s: torch.Tensor, ids: torch.Tensor, routed_scaling_factor: float, apply_on_output: bool,
                   renormalize: bool, nan_rows: torch.Tensor) -> torch.Tensor:
    """w = s.gather(ids), divided by (sum(w) + 1e-20) when renormalize, times routed_scaling_factor when
    apply_on_output; fp64 math on fp32 s, fp32 out. An id of -1 (invalid) has weight 0 and is left out
    of the sum; rows flagged in nan_rows [T] are NaN."""
    valid = ids >= 0
    w = torch.where(valid, s.gather(-1, torch.where(valid, ids, 0).long()), 0.0).double()
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + WEIGHT_SUM_EPS)
    if apply_on_output:
        w = w * routed_scaling_factor
    return torch.where(nan_rows[:, None], float("nan"), w).float()


def shared_weight(routed_scaling_factor: float, apply_on_output: bool) -> float:
    """The fused shared expert's weight: 1.0 when the routed weights carry the factor, else 1 / factor."""
    return 1.0 if apply_on_output else 1.0 / routed_scaling_factor


def _append_shared(weights: torch.Tensor, ids: torch.Tensor, num_experts: int, num_fused_shared_experts: int,
                   routed_scaling_factor: float, apply_on_output: bool):
    """Append columns with ids E + j and the shared weight for j < num_fused_shared_experts."""
    n = num_fused_shared_experts
    if n == 0:
        return weights, ids
    t = ids.shape[0]
    shared_ids = (num_experts + torch.arange(n, dtype=torch.int32, device=ids.device)).expand(t, n)
    shared_w = torch.full((t, n), shared_weight(routed_scaling_factor, apply_on_output), dtype=torch.float32,
                          device=weights.device)
    return torch.cat([weights, shared_w], dim=-1), torch.cat([ids, shared_ids], dim=-1)


def score_topk(router_logits: torch.Tensor, bias: torch.Tensor, topk: int = 6,
               routed_scaling_factor: float = 1.0, num_fused_shared_experts: int = 0,
               apply_routed_scaling_factor_on_output: bool = False, renormalize: bool = True):
    """Score-layer routing (SPEC 3, layers >= 3): top-k of s + bias, weights from s alone.

    Args:
        router_logits: [T, E] fp32 (or bf16, upcast), the gate GEMM output. T may be 0.
        bias: [E] fp32, the score-correction bias; used for selection only, never in the weights.
        topk: routed experts per token, 1 <= topk <= E.
        routed_scaling_factor: positive float (see the module docstring for where it applies).
        num_fused_shared_experts: n >= 0 trailing shared-expert columns (see the module docstring).
        apply_routed_scaling_factor_on_output: multiply the routed weights by the factor (shared 1.0).
        renormalize: divide the routed weights by their sum (+ 1e-20); False keeps the raw s.
    Returns:
        weights: [T, topk + n] fp32. Routed columns: s[ids] / (sum of the topk s[ids] + 1e-20), so they
            sum to 1 (to 0 if every selected s is 0), times routed_scaling_factor when applied on the
            output. Shared columns: 1 / routed_scaling_factor, or 1.0 when applied on the output.
        ids: [T, topk + n] int32. Routed columns: distinct expert ids in descending order of the fp32
            key s + bias; equal keys are ordered by the smaller expert index first (a stable
            descending sort, not torch.topk, whose tie order is unspecified). Shared columns: E + j.
    Edge cases: T = 0 gives [0, topk + n] outputs. NaN in, NaN out: a row with a NaN logit, or every
    row when the bias holds a NaN, gets NaN routed weights (its ids are still distinct experts, in
    torch.sort's order, which puts NaN keys first), never a confident choice made from a NaN.
    """
    s = sqrt_softplus(router_logits)
    key = s + bias.float()
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    ids = order[:, :topk].to(torch.int32)
    apply = apply_routed_scaling_factor_on_output
    weights = routed_weights(s, ids, routed_scaling_factor, apply, renormalize, key.isnan().any(dim=-1))
    return _append_shared(weights, ids, router_logits.shape[-1], num_fused_shared_experts, routed_scaling_factor,
                          apply)


def hash_topk(router_logits: torch.Tensor, input_ids: torch.Tensor, tid2eid: torch.Tensor,
              num_fused_shared_experts: int = 0, routed_scaling_factor: float = 1.0,
              apply_routed_scaling_factor_on_output: bool = False):
    """Hash-layer routing (SPEC 3, layers 0-2): experts looked up from the token id, weights from s.

    Args:
        router_logits: [T, E] fp32, the gate GEMM output. T may be 0.
        input_ids: [T] int32 or int64 token ids, each in [0, V).
        tid2eid: [V, k] int32 frozen table; every entry in [0, E).
        num_fused_shared_experts: n >= 0 trailing shared-expert columns (see the module docstring).
        routed_scaling_factor: positive float, as in score_topk.
        apply_routed_scaling_factor_on_output: as in score_topk.
    Returns:
        weights: [T, k + n] fp32, computed from s = sqrt(softplus(logits)) exactly as in score_topk
            with renormalize=True (no bias exists in hash layers); shared columns as in score_topk.
        ids: [T, k + n] int32: tid2eid[input_ids] in table order (not sorted), then E + j.
    Edge cases: T = 0 gives [0, k + n] outputs. A table row with a repeated expert is used as is:
    that expert's s is counted once per occurrence. Invalid entries are never wrapped: a token id
    outside [0, V) gives a row of routed ids -1 with weight 0 (the shared column stays); a table entry
    outside [0, E) gives id -1 with weight 0, and the row is normalised over its valid entries. NaN in,
    NaN out: a NaN logit at one of the row's experts makes its routed weights NaN (logits of experts the
    table does not name are not read).
    """
    s = sqrt_softplus(router_logits)
    V, E = tid2eid.shape[0], router_logits.shape[-1]
    token_ok = (input_ids >= 0) & (input_ids < V)
    rows = tid2eid[torch.where(token_ok, input_ids, 0).long()]
    ids = torch.where(token_ok[:, None] & (rows >= 0) & (rows < E), rows, -1).to(torch.int32)
    apply = apply_routed_scaling_factor_on_output
    gathered = torch.where(ids >= 0, s.gather(-1, torch.where(ids >= 0, ids, 0).long()), 0.0)
    weights = routed_weights(s, ids, routed_scaling_factor, apply, True, gathered.isnan().any(dim=-1))
    return _append_shared(weights, ids, E, num_fused_shared_experts, routed_scaling_factor, apply)
