"""FP4 grouped MoE (SPEC 5): FP8 activations x MXFP4 expert weights, SwiGLU with clamp, routed sum."""
from __future__ import annotations

import torch

from dsv4_kernels.platform import device_info

from .formats import dequantize_fp8_blockwise, dequantize_mxfp4, quantize_fp8_blockwise, quantize_mxfp4

__all__ = ["mxfp4_grouped_gemm", "fp4_grouped_moe", "random_mxfp4_weights"]


_ROWS = 1024  # weight rows dequantised at a time, to bound memory at V4-Pro sizes


def _fp4_gemm(a: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """a [M, K] fp32 (dequantised FP8) times one expert's MXFP4 weight b [N, K/2] (scale [N, K/32]).

    Products of FP8 and FP4 values are exact, and the fp64 sum of them is (nearly always) exact too; it
    is rounded once to fp32. So the result is what an fp32 accumulator without rounding error would
    hold: [M, N] fp32, independent of summation order.
    """
    a64 = a.double()
    parts = [a64 @ dequantize_mxfp4(b[n0:n0 + _ROWS], b_scale[n0:n0 + _ROWS]).double().T
             for n0 in range(0, b.shape[0], _ROWS)]
    return torch.cat(parts, dim=1).float()


def mxfp4_grouped_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                       m_indices: torch.Tensor, act_block_size: int = 128) -> torch.Tensor:
    """Grouped GEMM c[m] = dequant(a[m]) @ dequant(b[m_indices[m]])^T, fp32 accumulation, bf16 result.

    Args:
        a: [M, K] torch.float8_e4m3fn or torch.float8_e4m3fnuz activations (the encoding is the dtype's);
            M may be 0.
        a_scale: [M, K / act_block_size] fp32 power-of-two block scales.
        b: [G, N, K / 2] uint8 packed FP4 weights (low nibble = even k).
        b_scale: [G, N, K / 32] uint8 ue8m0 scales.
        m_indices: [M] int32 expert of each row. The SPEC contract is that rows of one expert are
            contiguous; the reference does not need it. -1 (or any id outside [0, G), never wrapped) marks
            a padding row, whose output is 0 whatever a holds there.
        act_block_size: activation block size along K (32 or 128); the reference reads it from the
            shapes, the argument is kept for the op's signature.
    Returns:
        c: [M, N] bf16: the exact product rounded to fp32 (the accumulator) and then to bf16.
    """
    a_f = dequantize_fp8_blockwise(a, a_scale)
    m_idx = m_indices.long()
    c = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    for g in m_idx.unique().tolist():
        if 0 <= g < b.shape[0]:
            rows = (m_idx == g).nonzero(as_tuple=True)[0]
            c[rows] = _fp4_gemm(a_f[rows], b[g], b_scale[g])
    return c.to(torch.bfloat16)


def fp4_grouped_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                    act_block_size: int = 128, swiglu_limit: float = 10.0,
                    expert_map: torch.Tensor | None = None, act_fmt: str | None = None) -> torch.Tensor:
    """Routed experts of one MoE layer (SPEC 5); the shared expert is not included.

    For each expert e and each (token t, slot j) with topk_ids[t, j] == e:
        xq, sx = FP8 block quant of x[t] in act_fmt (block act_block_size)
        g, u   = (dequant(xq) @ W1_e^T, dequant(xq) @ W3_e^T) in fp32, each rounded to bf16
                 (the products are accumulated exactly and rounded once to fp32, see _fp4_gemm)
        u      = clamp(u, -swiglu_limit, swiglu_limit);  g = clamp(g, max=swiglu_limit)
        h      = silu(g) * u * topk_weights[t, j]                      (fp32)
        y_e    = dequant(FP8 block quant of h.to(bf16) in act_fmt) @ W2_e^T in fp32, rounded to bf16
    y[t] = sum of its y_e in fp32, cast to bf16.

    Args:
        x: [T, dim] bf16; T may be 0.
        topk_ids: [T, k] int32. An id of -1 (dropped slot), or any id outside [0, E) (never wrapped),
            contributes nothing; its weight is not read. A duplicate id in one row counts once per
            occurrence.
        topk_weights: [T, k] fp32 routing weights (applied before the down projection). A NaN or inf
            weight of a valid slot makes y[t] all NaN (its h block quantises to a NaN scale).
        w13: [E, 2I, dim / 2] uint8 MXFP4; rows [0, I) are the gate W1, rows [I, 2I) the up W3.
        w13_scale: [E, 2I, dim / 32] uint8 ue8m0.
        w2: [E, dim, I / 2] uint8 MXFP4 down projection.
        w2_scale: [E, dim, I / 32] uint8 ue8m0.
        act_block_size: FP8 activation block (32 as in DeepGEMM, or 128); dim and I are multiples of it.
        swiglu_limit: clamp bound; a value <= 0 disables both clamps.
        expert_map: optional [E_global] int32 (expert parallelism, SPEC 5): topk_ids are then global ids
            in [0, E_global), mapped to the local expert expert_map[id]; a local id outside [0, E) (-1:
            the expert lives on another rank) contributes nothing, as does a global id outside
            [0, E_global) (never wrapped). None: the ids are local ids.
        act_fmt: FP8 encoding of both activation quantisations, "e4m3fn" (max 448) or "e4m3fnuz" (max 240,
            gfx942); None: the native encoding of x's device (platform.device_info(x).fp8_encoding).
    Returns:
        y: [T, dim] bf16. A token whose ids are all invalid gets 0. A NaN or inf in x[t] makes y[t] all
            NaN if the token has a valid id (NaN in, NaN out).
    Only the experts that appear in topk_ids are read, so untouched experts' weights may hold anything.
    """
    t, dim = x.shape
    n_experts, inter = w13.shape[0], w13.shape[1] // 2
    fmt = act_fmt if act_fmt is not None else device_info(x).fp8_encoding
    xq, sx = quantize_fp8_blockwise(x, act_block_size, fmt)
    x_f = dequantize_fp8_blockwise(xq, sx)
    ids = topk_ids.long()
    if expert_map is not None:
        known = (ids >= 0) & (ids < expert_map.shape[0])
        ids = torch.where(known, expert_map.long()[torch.where(known, ids, 0)], -1)
    y = torch.zeros(t, dim, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        if not 0 <= e < n_experts:
            continue
        tok, slot = (ids == e).nonzero(as_tuple=True)
        gu = _fp4_gemm(x_f[tok], w13[e], w13_scale[e]).to(torch.bfloat16).float()
        g, u = gu[:, :inter], gu[:, inter:]
        if swiglu_limit > 0:
            u = u.clamp(-swiglu_limit, swiglu_limit)
            g = g.clamp(max=swiglu_limit)
        h = torch.nn.functional.silu(g) * u * topk_weights[tok, slot].float().unsqueeze(1)
        hq, sh = quantize_fp8_blockwise(h.to(torch.bfloat16), act_block_size, fmt)
        y_e = _fp4_gemm(dequantize_fp8_blockwise(hq, sh), w2[e], w2_scale[e]).to(torch.bfloat16)
        y.index_add_(0, tok, y_e.float())
    return y.to(torch.bfloat16)


def random_mxfp4_weights(E: int, N: int, K: int, generator: torch.Generator | None = None):
    """Random MXFP4 weights of realistic magnitude: N(0, 1/sqrt(K)) entries quantised per 32 along K.

    Args:
        E, N, K: experts, output rows, reduction length (K a multiple of 32).
        generator: optional CPU torch.Generator (default: the global RNG).
    Returns:
        packed [E, N, K / 2] uint8 and scale [E, N, K / 32] uint8 ue8m0, built 1024 rows at a time to
        bound memory.
    """
    packed = torch.zeros(E, N, K // 2, dtype=torch.uint8)
    scale = torch.zeros(E, N, K // 32, dtype=torch.uint8)
    for e in range(E):
        for n0 in range(0, N, 1024):
            rows = min(1024, N - n0)
            w = torch.randn(rows, K, generator=generator) * K ** -0.5
            packed[e, n0:n0 + rows], scale[e, n0:n0 + rows] = quantize_mxfp4(w, 32)
    return packed, scale
