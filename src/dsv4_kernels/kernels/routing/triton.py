"""Triton source of the routing ops (SPEC 3): one fused launch per op, one source for sm_90a, sm_100a,
gfx942 and gfx950.

score_kernel: BLOCK_T tokens x all E experts per program: s = sqrt(softplus(logit)), key = s + bias,
k rounds of (max key, smallest index among equal keys), the unbiased s gathered, normalised, scaled,
the shared column appended. hash_kernel: the table row of each token id and only the k logits it
names, s at those experts, the same weights. The expert count is a compile-time padding (E_PAD), the token count is not. README.md has the
numerics (softplus without log1p, the tie rule, NaN rows).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4_kernels import dispatch, platform
from dsv4_kernels.kernels._triton_util import FP_FUSION

CODEGEN_EXPERTS = (256, 384)  # V4-Flash, V4-Pro
SUM_EPS = tl.constexpr(1e-20)  # a global a @triton.jit function reads must be a constexpr


@triton.jit
def _sqrt_softplus(x):
    # s = sqrt(softplus(x)), softplus(x) = max(x, 0) + log1p(exp(-|x|)): log1p(z) for z in (0, 1] as
    # 2 atanh(w), w = z / (2 + z) <= 1/3, by its odd series (9 terms: w^18 < 2^-28). Only exp, division
    # and FMAs, so the interpreter, CUDA and ROCm agree to an ulp or two; for x > 20 the result rounds
    # to x exactly, as the reference's threshold does.
    z = tl.exp(-tl.abs(x))
    w = z / (2.0 + z)
    w2 = w * w
    p = 1.0 / 17.0
    p = p * w2 + 1.0 / 15.0
    p = p * w2 + 1.0 / 13.0
    p = p * w2 + 1.0 / 11.0
    p = p * w2 + 1.0 / 9.0
    p = p * w2 + 1.0 / 7.0
    p = p * w2 + 1.0 / 5.0
    p = p * w2 + 1.0 / 3.0
    p = p * w2 + 1.0
    return tl.sqrt_rn(tl.maximum(x, 0.0) + 2.0 * w * p)


@triton.jit
def _finish(w, ids, nan_row, t, mask_t, kk, w_ptr, ids_ptr, rsf, TOPK: tl.constexpr, E: tl.constexpr,
            SHARED: tl.constexpr, RENORMALIZE: tl.constexpr, APPLY_RSF: tl.constexpr):
    # w [BT, KP] selected s (0 for invalid ids), ids [BT, KP] int32 -> weights and ids rows of TOPK + SHARED
    if RENORMALIZE:
        w = w / (tl.sum(w, axis=1)[:, None] + SUM_EPS)          # w = w / (sum(w) + 1e-20)
    if APPLY_RSF:
        w = w * rsf
    w = tl.where(nan_row[:, None], float("nan"), w)              # NaN in, NaN out
    if SHARED:
        shared_w = 1.0 / rsf
        if APPLY_RSF:
            shared_w = 1.0
        w = tl.where(kk[None, :] == TOPK, shared_w, w)
        ids = tl.where(kk[None, :] == TOPK, E, ids)
    width: tl.constexpr = TOPK + SHARED
    offs = t[:, None] * width + kk[None, :]
    mask = mask_t[:, None] & (kk[None, :] < width)
    tl.store(w_ptr + offs, w, mask=mask)
    tl.store(ids_ptr + offs, ids, mask=mask)


@triton.jit
def score_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, rsf, E: tl.constexpr, E_PAD: tl.constexpr,
                 TOPK: tl.constexpr, K_PAD: tl.constexpr, SHARED: tl.constexpr, RENORMALIZE: tl.constexpr,
                 APPLY_RSF: tl.constexpr, BLOCK_T: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    mask_t = t < T
    e = tl.arange(0, E_PAD)  # [EP]
    mask_e = e < E
    m = mask_t[:, None] & mask_e[None, :]
    x = tl.load(logits_ptr + t[:, None] * E + e[None, :], mask=m, other=0.0).to(tl.float32)  # [BT, EP]
    s = _sqrt_softplus(x)
    key = s + tl.load(bias_ptr + e, mask=mask_e, other=0.0)[None, :]   # selection key s + bias
    nan_row = tl.max(tl.where(m & (key != key), 1, 0), axis=1) > 0
    # A NaN key is never a confident choice: selection treats it as -inf (the row's weights are NaN).
    key = tl.where(key != key, float("-inf"), key)
    taken = ~m
    kk = tl.arange(0, K_PAD)  # [KP]
    ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        best = tl.max(tl.where(taken, float("-inf"), key), axis=1)                        # [BT]
        hit = ~taken & (key == best[:, None])
        pick = tl.min(tl.where(hit, e[None, :], E_PAD), axis=1)                          # smallest index wins
        chosen = e[None, :] == pick[:, None]                                             # [BT, EP]
        taken = taken | chosen
        ids = tl.where(kk[None, :] == j, pick[:, None].to(tl.int32), ids)
        w = tl.where(kk[None, :] == j, tl.sum(tl.where(chosen, s, 0.0), axis=1)[:, None], w)  # s.gather(ids)
    _finish(w, ids, nan_row, t, mask_t, kk, w_ptr, ids_ptr, rsf, TOPK, E, SHARED, RENORMALIZE, APPLY_RSF)


@triton.jit
def hash_kernel(logits_ptr, input_ids_ptr, table_ptr, w_ptr, ids_ptr, T, V, rsf, E: tl.constexpr,
                TOPK: tl.constexpr, K_PAD: tl.constexpr, SHARED: tl.constexpr,
                APPLY_RSF: tl.constexpr, BLOCK_T: tl.constexpr):
    # Reads only the k logits the table names: k * 4 bytes per token, not the whole row.
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    mask_t = t < T
    tok = tl.load(input_ids_ptr + t, mask=mask_t, other=-1).to(tl.int64)
    tok_ok = mask_t & (tok >= 0) & (tok < V)                     # never wrapped: a bad id reads no row
    kk = tl.arange(0, K_PAD)
    row_m = tok_ok[:, None] & (kk < TOPK)[None, :]
    ids = tl.load(table_ptr + tok[:, None] * TOPK + kk[None, :], mask=row_m, other=-1)  # tid2eid[input_ids]
    ids = tl.where((ids >= 0) & (ids < E), ids, -1)
    valid = ids >= 0
    xs = tl.load(logits_ptr + t[:, None] * E + ids.to(tl.int64), mask=valid & mask_t[:, None], other=0.0)
    w = tl.where(valid, _sqrt_softplus(xs.to(tl.float32)), 0.0)  # s at the table's experts
    nan_row = tl.max(tl.where(w != w, 1, 0), axis=1) > 0
    _finish(w, ids, nan_row, t, mask_t, kk, w_ptr, ids_ptr, rsf, TOPK, E, SHARED, True, APPLY_RSF)


def _outputs(x: torch.Tensor, T: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((T, width), dtype=torch.float32, device=x.device),
            torch.empty((T, width), dtype=torch.int32, device=x.device))


def _config(op: str, x: torch.Tensor) -> dict:
    return dispatch.config(dispatch.get(op, "triton"), platform.device_info(x))


def _pads(E: int, width: int) -> tuple[int, int]:
    return triton.next_power_of_2(E), max(2, triton.next_power_of_2(width))


def score_topk(router_logits, bias, topk=6, routed_scaling_factor=1.0, num_fused_shared_experts=0,
               apply_routed_scaling_factor_on_output=False, renormalize=True):
    T, E = router_logits.shape
    width = topk + num_fused_shared_experts
    weights, ids = _outputs(router_logits, T, width)
    if T == 0:
        return weights, ids
    cfg = _config("score_topk", router_logits)
    e_pad, k_pad = _pads(E, width)
    score_kernel[(triton.cdiv(T, cfg["BLOCK_T"]),)](
        router_logits, bias, weights, ids, T, float(routed_scaling_factor), E=E, E_PAD=e_pad, TOPK=topk,
        K_PAD=k_pad, SHARED=num_fused_shared_experts, RENORMALIZE=renormalize,
        APPLY_RSF=apply_routed_scaling_factor_on_output, BLOCK_T=cfg["BLOCK_T"], num_warps=cfg["num_warps"],
        enable_fp_fusion=FP_FUSION)
    return weights, ids


def hash_topk(router_logits, input_ids, tid2eid, num_fused_shared_experts=0, routed_scaling_factor=1.0,
              apply_routed_scaling_factor_on_output=False):
    T, E = router_logits.shape
    topk = tid2eid.shape[1]
    width = topk + num_fused_shared_experts
    weights, ids = _outputs(router_logits, T, width)
    if T == 0:
        return weights, ids
    cfg = _config("hash_topk", router_logits)
    _, k_pad = _pads(E, width)
    hash_kernel[(triton.cdiv(T, cfg["BLOCK_T"]),)](
        router_logits, input_ids, tid2eid, weights, ids, T, tid2eid.shape[0], float(routed_scaling_factor), E=E,
        TOPK=topk, K_PAD=k_pad, SHARED=num_fused_shared_experts,
        APPLY_RSF=apply_routed_scaling_factor_on_output, BLOCK_T=cfg["BLOCK_T"], num_warps=cfg["num_warps"],
        enable_fp_fusion=FP_FUSION)
    return weights, ids


def _specs(op: str, kernel, signature: dict) -> list:
    from dsv4_kernels.codegen import TritonKernel
    cfg = dispatch.get(op, "triton").defaults
    specs = []
    for E, logits in zip(CODEGEN_EXPERTS, ("fp32", "bf16")):  # both models, both logit dtypes
        e_pad, k_pad = _pads(E, 7)
        score = {"E_PAD": e_pad, "RENORMALIZE": True} if kernel is score_kernel else {}
        specs.append(TritonKernel(kernel, {"logits_ptr": f"*{logits}", **signature}, {
            "E": E, "TOPK": 6, "K_PAD": k_pad, "SHARED": 1, "APPLY_RSF": False, "BLOCK_T": cfg["BLOCK_T"],
            **score}, num_warps=cfg["num_warps"], label=f"E{E}-{logits}"))
    return specs


def codegen_score_topk(target) -> list:
    return _specs("score_topk", score_kernel, {"bias_ptr": "*fp32", "w_ptr": "*fp32", "ids_ptr": "*i32",
                                               "T": "i32", "rsf": "fp32"})


def codegen_hash_topk(target) -> list:
    return _specs("hash_topk", hash_kernel, {"input_ids_ptr": "*i64", "table_ptr": "*i32", "w_ptr": "*fp32",
                                             "ids_ptr": "*i32", "T": "i32", "V": "i64", "rsf": "fp32"})
