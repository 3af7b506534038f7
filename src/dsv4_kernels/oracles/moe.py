"""fp64 oracles for the FP4 grouped MoE (SPEC 5), written independently of reference/moe.py.

FP4 weights are decoded from the e2m1 bit fields (sign bit 3, exponent bits 2-1, mantissa bit 0) into
fp64, scaled by 2^(byte - 127), and multiplied in fp64 (products of FP8 and FP4 values are exact, and
their fp64 sums are exact for realistic data), then rounded to fp32 (an exact fp32 accumulator) and to
bf16. The grouped GEMM collects each expert's rows with a Python loop over m_indices and decodes the
FP8 activations from their bytes (oracles/formats.py tables). The MoE runs its routing as a loop over
tokens and slots and quantises activations block by block with Python's math.log2; h is formed in fp32
as SPEC 5 writes it (torch's silu on fp32), so the oracle shares that rounding point with the reference.

moe_fp64 and mxfp4_grouped_gemm_fp64 return the unrounded fp64 results. mxfp4_grouped_gemm and
fp4_grouped_moe take the ops' signatures and return the ops' bf16 outputs for the verification ladder,
with the unrounded fp64 values attached as the attribute `oracle_fp64`: the ops' compare functions use
it for an elementwise bound that only the reference-versus-oracle check applies.
"""
from __future__ import annotations

import math

import torch

from dsv4_kernels.oracles.formats import decode_fp8

__all__ = ["fp4_decode", "matmul64", "fp8_round_trip", "moe_fp64", "mxfp4_grouped_gemm_fp64",
           "mxfp4_grouped_gemm", "fp4_grouped_moe"]


def _fp4_table() -> torch.Tensor:
    """Values of the 16 e2m1 codes from their bit fields: sign bit 3, exponent bits 2-1, mantissa bit 0."""
    vals = []
    for code in range(16):
        exp, man = (code >> 1) & 3, code & 1
        mag = man * 0.5 if exp == 0 else (1 + man * 0.5) * 2.0 ** (exp - 1)
        vals.append(-mag if code & 8 else mag)
    return torch.tensor(vals, dtype=torch.float64)


_FP4_TABLE = _fp4_table()


def fp4_decode(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """packed [N, K/2] uint8 + ue8m0 scale [N, K/32] -> fp64 [N, K] (exact)."""
    n, half = packed.shape
    codes = torch.stack(((packed % 16).long(), (packed // 16).long()), dim=-1).reshape(n, 2 * half)
    s = torch.pow(2.0, scale.double() - 127)
    return (_FP4_TABLE[codes].reshape(n, scale.shape[1], -1) * s[..., None]).reshape(n, 2 * half)


def matmul64(packed: torch.Tensor, scale: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Decoded weight [N, K] times v [K, m] fp64 -> [N, m] fp64; 2048 weight rows at a time."""
    return torch.cat([fp4_decode(packed[i:i + 2048], scale[i:i + 2048]) @ v
                      for i in range(0, packed.shape[0], 2048)])


_FMT = {"e4m3fn": (448.0, torch.float8_e4m3fn), "e4m3fnuz": (240.0, torch.float8_e4m3fnuz)}


def fp8_round_trip(v: torch.Tensor, block: int, fmt: str = "e4m3fn") -> torch.Tensor:
    """v [K] (exact in bf16) -> fp64 values of its FP8 block quantisation in fmt ("e4m3fn", max 448, or
    "e4m3fnuz", max 240), one block at a time."""
    fmt_max, dtype = _FMT[fmt]
    out = torch.zeros(v.shape[0], dtype=torch.float64)
    for b0 in range(0, v.shape[0], block):
        chunk = v[b0:b0 + block].double()
        scale = 2.0 ** math.ceil(math.log2(max(chunk.abs().max().item(), 1e-4) / fmt_max))
        out[b0:b0 + block] = (chunk / scale).clamp(-fmt_max, fmt_max).float().to(dtype).double() * scale
    return out


def moe_fp64(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, act_block_size=128,
             swiglu_limit=10.0, expert_map=None, act_fmt=None) -> torch.Tensor:
    """y [T, dim] fp64 of SPEC 5, the final sum left unrounded. The routing loop runs over tokens and
    slots; the GEMMs of one expert are batched over its (token, slot) pairs and accumulated in fp64, then
    rounded to fp32 (an exact fp32 accumulator) and bf16. h is formed in fp32 as SPEC 5 writes it."""
    t_count, dim = x.shape
    n_experts, inter = w13.shape[0], w13.shape[1] // 2
    fmt = act_fmt or "e4m3fn"  # the oracle runs on the CPU, whose native encoding is e4m3fn
    work = {}  # expert -> [(token, slot)]
    xq = [fp8_round_trip(x[t], act_block_size, fmt) for t in range(t_count)]
    for t in range(t_count):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if expert_map is not None:   # global id -> local expert; unknown global ids and -1 drop out
                e = int(expert_map[e]) if 0 <= e < expert_map.shape[0] else -1
            if 0 <= e < n_experts:
                work.setdefault(e, []).append((t, j))
    y = torch.zeros(t_count, dim, dtype=torch.float64)
    for e, pairs in work.items():
        xs = torch.stack([xq[t] for t, _ in pairs], dim=1)  # [dim, pairs]
        gu = matmul64(w13[e], w13_scale[e], xs).float().to(torch.bfloat16).float()  # [2I, pairs]
        hq = []
        for p, (t, j) in enumerate(pairs):
            g, u = gu[:inter, p], gu[inter:, p]
            if swiglu_limit > 0:
                g = g.clamp(max=swiglu_limit)
                u = u.clamp(-swiglu_limit, swiglu_limit)
            h = torch.nn.functional.silu(g) * u * topk_weights[t, j].float()
            hq.append(fp8_round_trip(h.to(torch.bfloat16), act_block_size, fmt))
        ye = matmul64(w2[e], w2_scale[e], torch.stack(hq, dim=1)).float().to(torch.bfloat16).double()
        for p, (t, _) in enumerate(pairs):
            y[t] += ye[:, p]
    return y


def mxfp4_grouped_gemm_fp64(a, a_scale, b, b_scale, m_indices, act_block_size=128) -> torch.Tensor:
    """c [M, N] fp64, unrounded: row m is the decoded FP8 row a[m] (bytes read in a's encoding, e4m3fn or
    e4m3fnuz, times its fp32 block scales) times the decoded expert b[m_indices[m]]^T; rows whose id is outside [0, G) are 0."""
    M, K = a.shape
    G, N = b.shape[0], b.shape[1]
    block = K // a_scale.shape[1]
    fmt = "e4m3fnuz" if a.dtype == torch.float8_e4m3fnuz else "e4m3fn"
    a64 = decode_fp8(a.contiguous().view(torch.uint8), fmt) * a_scale.double().repeat_interleave(block, dim=1)
    rows_of: dict[int, list[int]] = {}
    for m, g in enumerate(m_indices.tolist()):
        if 0 <= g < G:
            rows_of.setdefault(g, []).append(m)
    c = torch.zeros(M, N, dtype=torch.float64)
    for g, rows in rows_of.items():
        c[rows] = matmul64(b[g], b_scale[g], a64[rows].T).T
    return c


def _with_fp64(exact: torch.Tensor) -> torch.Tensor:
    out = exact.float().to(torch.bfloat16)
    out.oracle_fp64 = exact
    return out


def mxfp4_grouped_gemm(a, a_scale, b, b_scale, m_indices, act_block_size=128) -> torch.Tensor:
    """The op's output: c [M, N] bf16 (fp64 -> fp32 -> bf16, the reference's rounding points), with the
    unrounded fp64 product attached as c.oracle_fp64."""
    return _with_fp64(mxfp4_grouped_gemm_fp64(a, a_scale, b, b_scale, m_indices, act_block_size))


def fp4_grouped_moe(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, act_block_size=128,
                    swiglu_limit=10.0, expert_map=None, act_fmt=None) -> torch.Tensor:
    """The op's output: y [T, dim] bf16, the fp64 sum of the per-expert bf16 results rounded once
    (through fp32), with the unrounded sum attached as y.oracle_fp64."""
    exact = moe_fp64(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, act_block_size, swiglu_limit,
                     expert_map, act_fmt)
    return _with_fp64(exact)
