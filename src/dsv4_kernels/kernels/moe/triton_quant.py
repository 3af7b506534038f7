"""Triton FP8 pieces of the FP4 MoE (SPEC 5 / "Number formats"): the activation block quantisation kernel
(block 32 or 128, ue8m0 power-of-two scales as fp32, e4m3fn max 448 or e4m3fnuz max 240), the FP8 byte
decoder the grouped GEMM reads its activations with, and the fused clamp + SwiGLU + routing weight + FP8
requantisation kernel between the two GEMMs.

FP8 bytes are encoded and decoded with integer ops (round to nearest even, subnormals, the sign from the
IEEE bit; e4m3fnuz has no -0): the interpreter has no fp8 cast, and the same arithmetic gives the bytes
the GPUs' cvt.rn gives. The host views the bytes as the float8 dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4_kernels.kernels._triton_util import FP_FUSION, bf16_rne

FMT_MAX = {"e4m3fn": 448.0, "e4m3fnuz": 240.0}
FP8_DTYPE = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}


@triton.jit
def fp8_encode(v, FNUZ: tl.constexpr):
    # fp32 |v| <= fmt max (448 e4m3fn, 240 e4m3fnuz) -> FP8 byte, round to nearest even. e4m3fn: bias 7,
    # subnormal unit 2^-9 below 2^-6. e4m3fnuz: bias 8, unit 2^-10 below 2^-7, and no -0 (a zero code
    # keeps sign 0: byte 0x80 is its NaN).
    bits = v.to(tl.uint32, bitcast=True)
    a = tl.abs(v)
    abits = a.to(tl.uint32, bitcast=True)
    rounded = abits + 0x7FFFF + ((abits >> 20) & 1)                         # keep 3 mantissa bits, RNE
    if FNUZ:
        normal = ((tl.maximum(rounded >> 23, 120) - 119) << 3) | ((rounded >> 20) & 7)
        sub = ((a * 1024.0 + 8388608.0) - 8388608.0).to(tl.uint32)         # units of 2^-10, RNE
        code = tl.where(a < 0.0078125, sub, normal)
        sign = tl.where(code == 0, 0, bits >> 31)
    else:
        normal = ((tl.maximum(rounded >> 23, 121) - 120) << 3) | ((rounded >> 20) & 7)
        sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.uint32)          # units of 2^-9, RNE
        code = tl.where(a < 0.015625, sub, normal)
        sign = bits >> 31
    return (code | (sign << 7)).to(tl.uint8)


@triton.jit
def fp8_decode(byte, FNUZ: tl.constexpr):
    # FP8 byte (uint8 tensor) -> exact fp32 value; NaN bytes (e4m3fn S.1111.111, e4m3fnuz 0x80) -> NaN
    b = byte.to(tl.uint32)
    e = (b >> 3) & 15
    m = b & 7
    neg = (b >> 7) == 1
    if FNUZ:
        normal = ((e + 119) << 23 | (m << 20)).to(tl.float32, bitcast=True)
        mag = tl.where(e == 0, m.to(tl.float32) * 0.0009765625, normal)
        nan = b == 0x80
    else:
        normal = ((e + 120) << 23 | (m << 20)).to(tl.float32, bitcast=True)
        mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
        nan = (e == 15) & (m == 7)
    return tl.where(nan, float("nan"), tl.where(neg, -mag, mag))


@triton.jit
def quant_rows(v, FMT_MAX: tl.constexpr, FNUZ: tl.constexpr):
    # v [R, NB, BLK] fp32 blocks -> (bytes [R, NB, BLK] uint8, scale [R, NB] fp32) by the SPEC rule
    # scale = 2^ceil(log2(max(amax, 1e-4) / fmt_max)); a block holding a NaN or an inf gets scale NaN and
    # the format's NaN byte (0x7F e4m3fn, 0x80 e4m3fnuz) everywhere.
    bad = tl.max(tl.where((v - v) == 0.0, 0, 1), axis=2) > 0                 # [R, NB]
    amax = tl.max(tl.abs(v), axis=2)
    r = tl.div_rn(tl.maximum(amax, 0.0001), FMT_MAX).to(tl.uint32, bitcast=True)
    exp = (r >> 23) + ((r & 0x7FFFFF) != 0)                                   # ceil to a power of two
    scale = (exp << 23).to(tl.float32, bitcast=True)
    inv = ((254 - tl.minimum(exp, 254)) << 23).to(tl.float32, bitcast=True)  # 1 / scale, exact
    q = fp8_encode(tl.minimum(tl.maximum(v * inv[:, :, None], -FMT_MAX), FMT_MAX), FNUZ)
    nan_byte: tl.constexpr = 0x80 if FNUZ else 0x7F
    q = tl.where(bad[:, :, None], nan_byte, q).to(tl.uint8)
    return q, tl.where(bad, float("nan"), scale)


@triton.jit
def quant_kernel(x_ptr, q_ptr, s_ptr, R, K, BLOCK: tl.constexpr, NB: tl.constexpr, ROWS: tl.constexpr,
                 FMT_MAX: tl.constexpr, FNUZ: tl.constexpr):
    # One program per (ROWS rows, NB blocks of BLOCK channels): x [R, K] (bf16 or fp32) -> q [R, K] FP8
    # bytes and s [R, K / BLOCK] fp32 scales. K is a multiple of BLOCK. ROWS is 1 on GPUs; the
    # interpreter takes many rows per program (it pays per program and per operation).
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)          # [ROWS]
    b = tl.program_id(1) * NB + tl.arange(0, NB)                             # [NB] block index
    c = tl.arange(0, BLOCK)
    ok = (row < R)[:, None, None] & (b < K // BLOCK)[None, :, None]           # [ROWS, NB, 1]
    base = tl.multiple_of(row * K, BLOCK)                                    # rows of whole blocks
    offs = base[:, None, None] + (b[:, None].to(tl.int64) * BLOCK + c[None, :])[None, :, :]
    v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    q, s = quant_rows(v, FMT_MAX, FNUZ)
    tl.store(q_ptr + offs, q, mask=ok)
    tl.store(s_ptr + row[:, None] * (K // BLOCK) + b[None, :], s, mask=tl.reshape(ok, (ROWS, NB)))


QUANT_CHANNELS = 1024  # channels per program (32 blocks of 32, 8 of 128): 4 per lane of 4 wave64 warps


def quant_blocks(block: int) -> int:
    return QUANT_CHANNELS // block


def rows_per_program(device: torch.device) -> int:
    """1 on GPUs (one row of 1024 channels per program); 64 in the interpreter."""
    return 64 if device.type == "cpu" else 1


def quantize_fp8(x: torch.Tensor, block: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, K] bf16 or fp32, contiguous, K % block == 0 -> (q [rows, K] float8 of fmt, scale
    [rows, K / block] fp32): quantize_fp8_blockwise(x, block, fmt), bit for bit. One launch."""
    rows, K = x.shape
    q = torch.empty((rows, K), dtype=torch.uint8, device=x.device)
    s = torch.empty((rows, K // block), dtype=torch.float32, device=x.device)
    if rows:
        per = rows_per_program(x.device)
        quant_kernel[(triton.cdiv(rows, per), triton.cdiv(K // block, quant_blocks(block)))](
            x, q, s, rows, K, BLOCK=block, NB=quant_blocks(block), ROWS=per, FMT_MAX=FMT_MAX[fmt], FNUZ=fmt == "e4m3fnuz", num_warps=4,
            enable_fp_fusion=FP_FUSION)
    return q.view(FP8_DTYPE[fmt]), s


@triton.jit
def swiglu_quant_kernel(gu_ptr, m_ptr, w_ptr, q_ptr, s_ptr, M, I, G, limit, CLAMP: tl.constexpr,
                        BLOCK: tl.constexpr, NB: tl.constexpr, ROWS: tl.constexpr, FMT_MAX: tl.constexpr,
                        FNUZ: tl.constexpr):
    # One program per (ROWS sorted rows, NB blocks of I): gu [M, 2I] bf16 (gate | up) -> h = silu(clamp(g,
    # max=limit)) * clamp(u, -limit, limit) * w[r] in fp32, rounded to bf16, FP8 block-quantised into
    # q [M, I] bytes and s [M, I / BLOCK]. Rows whose expert m[r] is outside [0, G) (padding) are skipped:
    # the down GEMM never reads them. ROWS as in quant_kernel.
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    g_id = tl.load(m_ptr + row, mask=row < M, other=-1)
    live = (g_id >= 0) & (g_id < G)
    if tl.max(live.to(tl.int32), axis=0) > 0:
        b = tl.program_id(1) * NB + tl.arange(0, NB)
        c = tl.arange(0, BLOCK)
        ok = live[:, None, None] & (b < I // BLOCK)[None, :, None]             # [ROWS, NB, 1]
        col = (b[:, None].to(tl.int64) * BLOCK + c[None, :])[None, :, :]      # [1, NB, BLOCK]
        gbase = tl.multiple_of(row * 2 * I, BLOCK)[:, None, None]              # I % BLOCK == 0
        ubase = tl.multiple_of(row * 2 * I + I, BLOCK)[:, None, None]
        g = tl.load(gu_ptr + gbase + col, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + ubase + col, mask=ok, other=0.0).to(tl.float32)
        if CLAMP:   # NaN propagates, as torch.clamp does (the default min/max may return the other operand)
            nan: tl.constexpr = tl.PropagateNan.ALL
            g = tl.minimum(g, limit, propagate_nan=nan)
            u = tl.minimum(tl.maximum(u, -limit, propagate_nan=nan), limit, propagate_nan=nan)
        w = tl.load(w_ptr + row, mask=live, other=0.0)
        h = g / (1.0 + tl.exp(-g)) * u * w[:, None, None]
        h = bf16_rne(h).to(tl.float32)
        q, s = quant_rows(h, FMT_MAX, FNUZ)
        tl.store(q_ptr + tl.multiple_of(row * I, BLOCK)[:, None, None] + col, q, mask=ok)
        tl.store(s_ptr + row[:, None] * (I // BLOCK) + b[None, :], s, mask=tl.reshape(ok, (ROWS, NB)))


def swiglu_quant(gu: torch.Tensor, m_indices: torch.Tensor, row_w: torch.Tensor, G: int, block: int, fmt: str,
                 swiglu_limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """gu [M, 2I] bf16, m_indices [M] int32, row_w [M] fp32 -> (q [M, I] uint8 FP8 bytes of fmt, s
    [M, I / block] fp32); rows of padding (m outside [0, G)) are left unwritten. One launch."""
    M, two_i = gu.shape
    inter = two_i // 2
    q = torch.empty((M, inter), dtype=torch.uint8, device=gu.device)
    s = torch.empty((M, inter // block), dtype=torch.float32, device=gu.device)
    if M:
        per = rows_per_program(gu.device)
        swiglu_quant_kernel[(triton.cdiv(M, per), triton.cdiv(inter // block, quant_blocks(block)))](
            gu, m_indices, row_w, q, s, M, inter, G, float(swiglu_limit), CLAMP=swiglu_limit > 0, BLOCK=block,
            NB=quant_blocks(block), ROWS=per, FMT_MAX=FMT_MAX[fmt], FNUZ=fmt == "e4m3fnuz", num_warps=4, enable_fp_fusion=FP_FUSION)
    return q, s
