"""Triton source of the FP4 grouped MoE (SPEC 5): the grouped GEMM of FP8 activations and MXFP4 expert
weights, and the whole routed-expert forward through it. One source for sm_90a, sm_100a, gfx942 and
gfx950 (README.md: which path serves which chip).

gemm_kernel, one program per (BLOCK_M rows, BLOCK_N output columns). Rows of one expert are contiguous,
but a block of rows may hold several experts (decode: a few rows per expert) or padding: the program
loops over the experts present in its block, smallest id first, and runs the K loop of that expert with
the other rows masked out (a block of one expert, the prefill case, runs it once; a block of padding not
at all). In the K loop, BLOCK_K / 2 bytes of packed e2m1 codes per weight row are unpacked in registers
(low nibble = even k), decoded and multiplied by their ue8m0 scale (2^(byte - 127), byte 255 NaN) to
bf16, exactly: an e2m1 value times a power of two has at most 2 significant bits. The FP8 activation
bytes are decoded with integer ops and multiplied by their fp32 block scale (exact for the power-of-two
scales of quantize_fp8_blockwise) to bf16, and tl.dot accumulates the exact products in fp32. Rows of
padding (m_indices outside [0, G)) and the masked rows of other experts come out 0; the result is
rounded to bf16 by integer ops. With HAS_GATHER the activation row of output row r is gather[r] (the
MoE's gate/up GEMM reads the token's quantised x in place; -1 is padding).

fp4_grouped_moe = quantise x (one launch) -> permute (one launch) -> gate/up GEMM over the T * k sorted
rows -> fused clamp + SwiGLU + routing weight + FP8 requantisation -> down GEMM -> combine: six launches,
every buffer sized by T, k, E, dim and I, no host sync (CUDA-graph capturable).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4_kernels import dispatch, platform
from dsv4_kernels.kernels._triton_util import FP_FUSION, bf16_rne
from dsv4_kernels.kernels.moe.triton_quant import FMT_MAX, fp8_decode, quantize_fp8, swiglu_quant
from dsv4_kernels.kernels.moe.triton_route import combine, permute


@triton.jit
def fp4_decode(code):
    # e2m1 code (uint32, 0..15) -> fp32: sign bit 3, exponent bits 2-1, mantissa bit 0
    e = (code >> 1) & 3
    m = code & 1
    normal = ((e + 126) << 23 | (m << 22)).to(tl.float32, bitcast=True)      # (1 + m / 2) * 2^(e - 1)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.5, normal)
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _weight_tile(b_ptr, bs_ptr, base, sbase, n, n_ok, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, INTERPRET: tl.constexpr):
    # [BLOCK_N, BLOCK_K] bf16 of one expert's weight rows n, columns k0 .. k0 + BLOCK_K (0 past K)
    kh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    rows = tl.multiple_of(base + n.to(tl.int64) * (K // 2), 16)             # K % 32 == 0: 16-byte rows
    if EVEN_K:   # no K tail: the mask is constant along K and the loads vectorise
        packed = tl.load(b_ptr + rows[:, None] + kh[None, :], mask=n_ok[:, None], other=0).to(tl.uint32)
    else:
        packed = tl.load(b_ptr + rows[:, None] + kh[None, :],
                         mask=n_ok[:, None] & (kh < K // 2)[None, :], other=0).to(tl.uint32)   # [BN, BK/2]
    lo = fp4_decode(packed & 15)                                                      # even k
    hi = fp4_decode(packed >> 4)                                                      # odd k
    w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K // 32, 32))
    ks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    sb = tl.load(bs_ptr + sbase + n[:, None].to(tl.int64) * (K // 32) + ks[None, :],
                 mask=n_ok[:, None] & (ks < K // 32)[None, :], other=127).to(tl.uint32)  # [BN, BK/32]
    scale = tl.where(sb == 255, float("nan"), tl.where(sb == 0, 5.877471754111438e-39,
                                                       (sb << 23).to(tl.float32, bitcast=True)))
    w = tl.reshape(w * scale[:, :, None], (BLOCK_N, BLOCK_K))
    if INTERPRET:   # exact in bf16 already; the interpreter's dot reads bf16 as raw bits, so keep fp32
        return w
    return w.to(tl.bfloat16)


@triton.jit
def _act_tile(a_ptr, as_ptr, arow, sel, k0, K, ACT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_K: tl.constexpr, FNUZ: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr):
    # [BLOCK_M, BLOCK_K] bf16: the FP8 activations of rows arow (where sel) times their block scales
    k = k0 + tl.arange(0, BLOCK_K)
    rows = tl.multiple_of(arow * K, 32)
    if EVEN_K:
        raw = tl.load(a_ptr + rows[:, None] + k[None, :], mask=sel[:, None], other=0)
    else:
        raw = tl.load(a_ptr + rows[:, None] + k[None, :], mask=sel[:, None] & (k < K)[None, :], other=0)
    v = tl.reshape(fp8_decode(raw, FNUZ), (BLOCK_M, BLOCK_K // ACT_BLOCK, ACT_BLOCK))
    kb = k0 // ACT_BLOCK + tl.arange(0, BLOCK_K // ACT_BLOCK)
    s = tl.load(as_ptr + arow[:, None] * (K // ACT_BLOCK) + kb[None, :],
                mask=sel[:, None] & (kb < K // ACT_BLOCK)[None, :], other=0.0)
    v = tl.reshape(v * s[:, :, None], (BLOCK_M, BLOCK_K))
    if INTERPRET:
        return v
    return v.to(tl.bfloat16)


@triton.jit
def gemm_kernel(a_ptr, as_ptr, gather_ptr, m_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, G, HAS_GATHER: tl.constexpr,
                FNUZ: tl.constexpr, ACT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = r < M
    n_ok = n < N
    g = tl.load(m_ptr + r, mask=r_ok, other=-1)
    remaining = r_ok & (g >= 0) & (g < G)
    arow = r.to(tl.int64)
    if HAS_GATHER:
        arow = tl.load(gather_ptr + r, mask=remaining, other=-1).to(tl.int64)
        remaining = remaining & (arow >= 0)
    out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    while tl.max(remaining.to(tl.int32), axis=0) > 0:        # each expert present in the block, once
        ge = tl.min(tl.where(remaining, g, G), axis=0)
        sel = remaining & (g == ge)
        base = tl.multiple_of(ge.to(tl.int64) * N * (K // 2), 16)
        sbase = ge.to(tl.int64) * N * (K // 32)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):   # k0 = kt * BLOCK_K: its divisibility is known
            k0 = kt * BLOCK_K
            a = _act_tile(a_ptr, as_ptr, arow, sel, k0, K, ACT_BLOCK, BLOCK_M, BLOCK_K, FNUZ, EVEN_K, INTERPRET)
            w = _weight_tile(b_ptr, bs_ptr, base, sbase, n, n_ok, k0, K, BLOCK_N, BLOCK_K, EVEN_K, INTERPRET)
            if INTERPRET:   # fp32 operands holding the bf16 values: the same exact products
                part = tl.dot(a, tl.trans(w), input_precision="ieee")
            else:
                part = tl.dot(a, tl.trans(w), out_dtype=tl.float32)
            acc += part
        out = tl.where(sel[:, None], acc, out)
        remaining = remaining & ~sel
    tl.store(c_ptr + r[:, None].to(tl.int64) * N + n[None, :], bf16_rne(out), mask=r_ok[:, None] & n_ok[None, :])


# The interpreter runs one Python step per tile operation: large tiles keep CPU tests fast. GPU tiles come
# from the registered defaults (and a device's tuned table).
_INTERPRETER_TILES = {"BLOCK_M": 16, "BLOCK_N": 2048, "BLOCK_K": 2048, "num_warps": 4}
_INTERPRETER_TILE_ELEMENTS = 2 ** 20   # weight elements decoded per step


def _tiles(op: str, device: torch.device, M: int, N: int, K: int) -> dict:
    if device.type == "cpu":   # no larger than the problem: masked lanes cost the interpreter as much
        t = dict(_INTERPRETER_TILES)
        t["BLOCK_M"] = min(128, max(16, triton.next_power_of_2(M)))   # fewer row blocks, fewer expert passes
        t["BLOCK_K"] = min(t["BLOCK_K"], max(128, triton.next_power_of_2(K)))
        t["BLOCK_N"] = min(t["BLOCK_N"], max(16, triton.next_power_of_2(N)), _INTERPRETER_TILE_ELEMENTS // t["BLOCK_K"])
        return t
    cfg = dispatch.config(dispatch.get(op, "triton"), platform.device_info(device))
    if M > cfg["PREFILL_ROWS"]:
        cfg["BLOCK_M"] = cfg["BLOCK_M_PREFILL"]
    return cfg


def grouped_gemm(a_bytes: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 m_indices: torch.Tensor, act_block: int, fnuz: bool, gather: torch.Tensor | None = None,
                 op: str = "mxfp4_grouped_gemm", tiles: dict | None = None) -> torch.Tensor:
    """a_bytes [R, K] uint8 FP8 bytes (fnuz: e4m3fnuz, else e4m3fn), a_scale [R, K / act_block] fp32,
    b [G, N, K / 2] uint8, b_scale [G, N, K / 32] uint8, m_indices [M] int32, gather None (R = M) or
    [M] int32 activation rows -> c [M, N] bf16. One launch. tiles: BLOCK_M / BLOCK_N / BLOCK_K overrides
    (tests use small tiles to run many tiles cheaply)."""
    M = m_indices.shape[0]
    G, N, K = b.shape[0], b.shape[1], a_bytes.shape[1]
    c = torch.empty((M, N), dtype=torch.bfloat16, device=a_bytes.device)
    if M == 0:
        return c
    cfg = {**_tiles(op, a_bytes.device, M, N, K), **(tiles or {})}
    block_k = max(cfg["BLOCK_K"], act_block)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    gemm_kernel[grid](a_bytes, a_scale, gather if gather is not None else m_indices, m_indices, b, b_scale, c,
                      M, N, K, G, HAS_GATHER=gather is not None, FNUZ=fnuz, ACT_BLOCK=act_block,
                      BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, EVEN_K=K % block_k == 0,
                      INTERPRET=a_bytes.device.type == "cpu", num_warps=cfg["num_warps"], enable_fp_fusion=FP_FUSION)
    return c


def mxfp4_grouped_gemm(a, a_scale, b, b_scale, m_indices, act_block_size=128):
    return grouped_gemm(a.view(torch.uint8), a_scale, b, b_scale, m_indices, act_block_size,
                        a.dtype == torch.float8_e4m3fnuz)


def fp4_grouped_moe(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, act_block_size=128,
                    swiglu_limit=10.0, expert_map=None, act_fmt=None):
    T, dim = x.shape
    y = torch.empty((T, dim), dtype=torch.bfloat16, device=x.device)
    if T == 0:
        return y
    fmt = act_fmt if act_fmt is not None else platform.device_info(x).fp8_encoding
    fnuz = fmt == "e4m3fnuz"
    E = w13.shape[0]
    xq, xs = quantize_fp8(x, act_block_size, fmt)
    route = permute(topk_ids, topk_weights, E, expert_map)
    gu = grouped_gemm(xq.view(torch.uint8), xs, w13, w13_scale, route["experts"], act_block_size, fnuz,
                      gather=route["tokens"], op="fp4_grouped_moe")
    hq, hs = swiglu_quant(gu, route["experts"], route["weights"], E, act_block_size, fmt, swiglu_limit)
    ys = grouped_gemm(hq, hs, w2, w2_scale, route["experts"], act_block_size, fnuz, op="fp4_grouped_moe")
    return combine(ys, route["inv"])


def _gemm_spec(target, op: str, gather: bool, label: str):
    from dsv4_kernels.codegen import TritonKernel
    cfg = dispatch.get(op, "triton").defaults
    sig = {"a_ptr": "*u8", "as_ptr": "*fp32", "gather_ptr": "*i32", "m_ptr": "*i32", "b_ptr": "*u8",
           "bs_ptr": "*u8", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "G": "i32"}
    return TritonKernel(gemm_kernel, sig, {"HAS_GATHER": gather, "FNUZ": target.name == "gfx942",
                                           "ACT_BLOCK": 32, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                                           "BLOCK_K": cfg["BLOCK_K"], "EVEN_K": True, "INTERPRET": False},
                        num_warps=cfg["num_warps"], label=label,
                        # ROCm: the packed weights load as dwords (4 B) at this tile (README.md, open tuning)
                        expects={"reduced_precision_mma": True,
                                 "vector_loads": None if target.backend == "rocm" else True})


def codegen_mxfp4_grouped_gemm(target) -> list:
    """The decode tile of the grouped GEMM (activation block 32, the device's FP8 encoding)."""
    return [_gemm_spec(target, "mxfp4_grouped_gemm", False, "decode-b32")]


def codegen_fp4_grouped_moe(target) -> list:
    """The MoE's own kernels: the gathering gate/up GEMM (the down GEMM is mxfp4_grouped_gemm's kernel),
    x quantisation, permutation, SwiGLU + requantisation and combine, activation block 32, the device's
    FP8 encoding."""
    from dsv4_kernels.codegen import TritonKernel
    from dsv4_kernels.kernels.moe.triton_quant import quant_blocks, quant_kernel, swiglu_quant_kernel
    from dsv4_kernels.kernels.moe.triton_route import COMBINE_BLOCK_D, PERMUTE_CHUNK, combine_kernel, permute_kernel
    fnuz = target.name == "gfx942"
    fmt_max = FMT_MAX["e4m3fnuz" if fnuz else "e4m3fn"]
    quant = {"BLOCK": 32, "NB": quant_blocks(32), "ROWS": 1, "FMT_MAX": fmt_max, "FNUZ": fnuz}
    return [
        _gemm_spec(target, "fp4_grouped_moe", True, "gate-up-gather-b32"),
        TritonKernel(quant_kernel, {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp32", "R": "i32", "K": "i32"}, quant,
                     label="quant-x-b32"),
        TritonKernel(permute_kernel, {"ids_ptr": "*i32", "map_ptr": "*i32", "w_ptr": "*fp32", "counts_ptr": "*i32",
                                      "offsets_ptr": "*i32", "rank_ptr": "*i32", "tok_ptr": "*i32",
                                      "expert_ptr": "*i32", "roww_ptr": "*fp32", "inv_ptr": "*i32", "S": "i32",
                                      "E": "i32", "E_GLOBAL": "i32"},
                     {"TOPK": 6, "HAS_MAP": True, "E_PAD": 512, "CHUNK": PERMUTE_CHUNK}, label="permute-k6-E384",
                     expects={"vector_loads": None}),
        TritonKernel(swiglu_quant_kernel, {"gu_ptr": "*bf16", "m_ptr": "*i32", "w_ptr": "*fp32", "q_ptr": "*u8",
                                           "s_ptr": "*fp32", "M": "i32", "I": "i32", "G": "i32", "limit": "fp32"},
                     {"CLAMP": True, **quant}, label="swiglu-quant-b32"),
        TritonKernel(combine_kernel, {"ys_ptr": "*bf16", "inv_ptr": "*i32", "y_ptr": "*bf16", "T": "i32", "D": "i32"},
                     {"TOPK": 6, "K_PAD": 8, "BLOCK_D": COMBINE_BLOCK_D, "ROWS": 1}, label="combine-k6"),
    ]
