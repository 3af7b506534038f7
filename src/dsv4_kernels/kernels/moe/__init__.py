"""FP4 grouped MoE kernels (SPEC 5): triton.py (grouped GEMM and the op), triton_route.py (permutation,
combine), triton_quant.py (FP8 quantisation, SwiGLU + requantisation); tilelang.py (the grouped GEMM and
the MoE composed of it, tilelang_quant.py and tilelang_route.py, with their own guards on top of these).
This module holds what needs no toolchain: the `supports_*` guards the dispatcher asks before a launch.
README.md has the design.

Which path serves which chip (`PATHS`, `scaled_path`): the portable path decodes FP4 weights and FP8
activations to bf16 in registers (exactly) and multiplies on the bf16 tensor cores with fp32
accumulation: sm_90a (Hopper has no FP4 tensor cores), gfx942 (e4m3fnuz activations), the decode tiles
of sm_100a, and every TileLang kernel. The Triton GEMM's native MXFP4 scaled-dot path serves gfx950 at
every tile and sm_100a at the 128-row prefill tile.
"""
from __future__ import annotations

import torch

__all__ = ["PATHS", "scaled_path", "supports_mxfp4_grouped_gemm", "supports_fp4_grouped_moe"]

# target -> the Triton grouped GEMM's paths there (README.md). bf16-dequant: both operands decoded to bf16
# in registers (exact), bf16 MMA. mxfp4-scaled: tl.dot_scaled on the MXFP4 block-scaled MMA, operands as
# stored (e4m3fn bytes with their scale's e8m0 exponent, packed e2m1 with its ue8m0 bytes).
PATHS = {"sm_90a": "bf16-dequant (no FP4 tensor cores)",
         "sm_100a": "mxfp4-scaled (tcgen05 kind::mxf8f6f4 block_scale) for 128-row tiles (prefill, e4m3fn); "
                    "bf16-dequant for decode tiles, which the block-scaled MMA does not take",
         "gfx942": "bf16-dequant (e4m3fnuz activations; no FP4 MFMA)",
         "gfx950": "mxfp4-scaled (v_mfma_scale_f32_*_f8f6f4) for e4m3fn activations at every tile; "
                   "bf16-dequant for e4m3fnuz"}
# the archs whose block-scaled MMA the scaled path was compiled and checked for -> the smallest BLOCK_M
# that lowers to it (sm_100: tcgen05 takes M = 128; smaller tiles would be upcast to bf16 by Triton)
_SCALED_MIN_ROWS = {"sm_100": 128, "gfx950": 16}


def scaled_path(arch: str, fnuz: bool, block_m: int) -> bool:
    """Whether the Triton grouped GEMM takes the MXFP4 scaled-dot path on `arch` (platform arch, e.g.
    "sm_100", "gfx950") for this activation encoding and row tile. A program whose activation scales
    an e8m0 byte cannot hold (not a positive normal power of two) takes the bf16 path for that pass, so
    either path gives the same values."""
    rows = _SCALED_MIN_ROWS.get(arch)
    return rows is not None and not fnuz and block_m >= rows


_INT32 = 2 ** 31


def _contiguous(**tensors) -> str | None:
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            return f"{name} must be contiguous"
    return None


def supports_mxfp4_grouped_gemm(a, a_scale, b, b_scale, m_indices, act_block_size=128) -> str | None:
    """Built for: a float8_e4m3fn or float8_e4m3fnuz [M, K] (any M, K a multiple of 32 and of the block),
    act_block_size 32 or 128, any G and N; every operand contiguous; activation and output offsets below
    2^31 elements (weight offsets are 64-bit)."""
    if a.dtype not in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        return f"a must be float8_e4m3fn or float8_e4m3fnuz, got {a.dtype}"
    if act_block_size not in (32, 128):
        return f"built for act_block_size 32 or 128, got {act_block_size}"
    if a.shape[1] % 32:
        return f"built for K a multiple of 32, got K = {a.shape[1]}"
    if a.numel() >= _INT32 or a.shape[0] * b.shape[1] >= _INT32:
        return f"built for M * K and M * N below 2^31, got M = {a.shape[0]}, K = {a.shape[1]}, N = {b.shape[1]}"
    return _contiguous(a=a, a_scale=a_scale, b=b, b_scale=b_scale, m_indices=m_indices)


def supports_fp4_grouped_moe(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, act_block_size=128,
                             swiglu_limit=10.0, expert_map=None, act_fmt=None) -> str | None:
    """Built for: bf16 x [T, dim], top-k up to 16, up to 1024 local experts, act_block_size 32 or 128,
    either FP8 encoding, T * k * max(2I, dim) below 2^31; every operand contiguous."""
    T, k = topk_ids.shape
    if x.dtype != torch.bfloat16:
        return f"x must be bf16, got {x.dtype}"
    if act_block_size not in (32, 128):
        return f"built for act_block_size 32 or 128, got {act_block_size}"
    if k > 16:
        return f"built for top-k up to 16 (6 in V4), got k = {k}"
    if w13.shape[0] > 1024:
        return f"built for up to 1024 local experts (256 V4-Flash, 384 V4-Pro), got E = {w13.shape[0]}"
    if T * k * max(w13.shape[1], x.shape[1]) >= _INT32:
        return f"built for T * k * max(2I, dim) below 2^31, got T = {T}, k = {k}"
    return _contiguous(x=x, topk_ids=topk_ids, topk_weights=topk_weights, w13=w13, w13_scale=w13_scale, w2=w2,
                       w2_scale=w2_scale, expert_map=expert_map)
