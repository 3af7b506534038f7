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
rows (decode: x quantised in its prologue instead) -> fused clamp + SwiGLU + routing weight + FP8
requantisation -> down GEMM -> combine: six launches at prefill, five at decode,
every buffer sized by T, k, E, dim and I, no host sync (CUDA-graph capturable).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4_kernels import dispatch, platform
from dsv4_kernels.kernels._triton_util import FP_FUSION, bf16_rne
from dsv4_kernels.kernels.moe import scaled_path
from dsv4_kernels.kernels.moe.triton_quant import FMT_MAX, fp8_decode, quant_rows, quantize_fp8, swiglu_quant
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
def _quant_tile(x_ptr, arow, sel, k0, K, ACT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                FNUZ: tl.constexpr, EVEN_K: tl.constexpr):
    # the QUANT_A prologue: bf16 x rows arow (where sel), columns k0 .. k0 + BLOCK_K, quantised in registers
    # by the x quantisation's rule -> (bytes [BLOCK_M, BLOCK_K / ACT_BLOCK, ACT_BLOCK], scales [BLOCK_M,
    # BLOCK_K / ACT_BLOCK]), the values quantize_fp8 would have stored (blocks past K are all 0)
    k = k0 + tl.arange(0, BLOCK_K)
    rows = tl.multiple_of(arow * K, 32)
    if EVEN_K:
        x = tl.load(x_ptr + rows[:, None] + k[None, :], mask=sel[:, None], other=0.0)
    else:
        x = tl.load(x_ptr + rows[:, None] + k[None, :], mask=sel[:, None] & (k < K)[None, :], other=0.0)
    fmt_max: tl.constexpr = 240.0 if FNUZ else 448.0
    return quant_rows(tl.reshape(x.to(tl.float32), (BLOCK_M, BLOCK_K // ACT_BLOCK, ACT_BLOCK)), fmt_max, FNUZ)


@triton.jit
def _act_tile(a_ptr, as_ptr, arow, sel, k0, K, ACT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_K: tl.constexpr, FNUZ: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr,
              QUANT_A: tl.constexpr):
    # [BLOCK_M, BLOCK_K] bf16: the FP8 activations of rows arow (where sel) times their block scales;
    # QUANT_A: a_ptr is bf16 x, quantised here
    if QUANT_A:
        q, s = _quant_tile(a_ptr, arow, sel, k0, K, ACT_BLOCK, BLOCK_M, BLOCK_K, FNUZ, EVEN_K)
        v = fp8_decode(q, FNUZ)
    else:
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
def _k_loop_bf16(a_ptr, as_ptr, arow, sel, b_ptr, bs_ptr, base, sbase, n, n_ok, K, ACT_BLOCK: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FNUZ: tl.constexpr,
                 EVEN_K: tl.constexpr, INTERPRET: tl.constexpr, QUANT_A: tl.constexpr):
    # one expert's [BLOCK_M, BLOCK_N] fp32 product: both operands decoded to bf16 (exact), bf16 MMA
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):   # k0 = kt * BLOCK_K: its divisibility is known
        k0 = kt * BLOCK_K
        a = _act_tile(a_ptr, as_ptr, arow, sel, k0, K, ACT_BLOCK, BLOCK_M, BLOCK_K, FNUZ, EVEN_K, INTERPRET, QUANT_A)
        w = _weight_tile(b_ptr, bs_ptr, base, sbase, n, n_ok, k0, K, BLOCK_N, BLOCK_K, EVEN_K, INTERPRET)
        if INTERPRET:   # fp32 operands holding the bf16 values: the same exact products
            part = tl.dot(a, tl.trans(w), input_precision="ieee")
        else:
            part = tl.dot(a, tl.trans(w), out_dtype=tl.float32)
        acc += part
    return acc


@triton.jit
def _e8m0_scales(as_ptr, arow, sel, K, ACT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # True when every activation scale of the selected rows is a positive normal power of two (an e8m0
    # byte holds it exactly): the scales quantize_fp8_blockwise makes, apart from a NaN block's
    kb = tl.arange(0, BLOCK_K // ACT_BLOCK)
    odd = tl.zeros([BLOCK_M, BLOCK_K // ACT_BLOCK], dtype=tl.int32)
    for kt in range(0, K // BLOCK_K):
        s = tl.load(as_ptr + arow[:, None] * (K // ACT_BLOCK) + kt * (BLOCK_K // ACT_BLOCK) + kb[None, :],
                    mask=sel[:, None], other=1.0).to(tl.uint32, bitcast=True)
        e = s >> 23                                       # sign set: 256 or more
        odd |= (((s & 0x7FFFFF) != 0) | (e == 0) | (e >= 255)).to(tl.int32)
    return tl.max(tl.max(odd, axis=1), axis=0) == 0


@triton.jit
def _k_loop_scaled(a_ptr, as_ptr, arow, sel, b_ptr, bs_ptr, base, sbase, n, n_ok, K, ACT_BLOCK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QUANT_A: tl.constexpr):
    # one expert's [BLOCK_M, BLOCK_N] fp32 product on the MXFP4 scaled MMA: e4m3fn activation bytes with
    # the e8m0 exponent byte of their fp32 block scale (repeated per 32 channels for block 128), packed e2m1
    # weights with their ue8m0 bytes, both as stored (QUANT_A: the bytes and scales of the bf16 x rows,
    # quantised here; a NaN block's scale gives byte 255 and its bytes are NaN). K % BLOCK_K == 0, e4m3fn only.
    k = tl.arange(0, BLOCK_K)
    kh = tl.arange(0, BLOCK_K // 2)
    kw = tl.arange(0, BLOCK_K // 32)
    kb = tl.arange(0, BLOCK_K // ACT_BLOCK)
    arows = tl.multiple_of(arow * K, 32)
    wrows = tl.multiple_of(base + n.to(tl.int64) * (K // 2), 16)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kt in range(0, K // BLOCK_K):
        k0 = kt * BLOCK_K
        if QUANT_A:
            q, s = _quant_tile(a_ptr, arow, sel, k0, K, ACT_BLOCK, BLOCK_M, BLOCK_K, False, True)
            a = tl.reshape(q, (BLOCK_M, BLOCK_K))
        else:
            a = tl.load(a_ptr + arows[:, None] + k0 + k[None, :], mask=sel[:, None], other=0)
            s = tl.load(as_ptr + arow[:, None] * (K // ACT_BLOCK) + k0 // ACT_BLOCK + kb[None, :],
                        mask=sel[:, None], other=1.0)
        sa = ((s.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.uint8)           # [BM, BK / ACT_BLOCK]
        if ACT_BLOCK != 32:
            sa = tl.reshape(tl.broadcast_to(sa[:, :, None], (BLOCK_M, BLOCK_K // ACT_BLOCK, ACT_BLOCK // 32)),
                            (BLOCK_M, BLOCK_K // 32))
        w = tl.load(b_ptr + wrows[:, None] + k0 // 2 + kh[None, :], mask=n_ok[:, None], other=0)   # [BN, BK / 2]
        sw = tl.load(bs_ptr + sbase + n[:, None].to(tl.int64) * (K // 32) + k0 // 32 + kw[None, :],
                     mask=n_ok[:, None], other=127)                                              # [BN, BK / 32]
        acc = tl.dot_scaled(a.to(tl.float8e4nv, bitcast=True), sa, "e4m3", tl.trans(w), sw, "e2m1", acc=acc,
                            out_dtype=tl.float32)
    return acc


@triton.jit
def gemm_kernel(a_ptr, as_ptr, gather_ptr, m_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, G, HAS_GATHER: tl.constexpr,
                FNUZ: tl.constexpr, ACT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr, SCALED: tl.constexpr = False,
                CHECK_SCALES: tl.constexpr = True, QUANT_A: tl.constexpr = False):
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
        if SCALED:
            if CHECK_SCALES and not QUANT_A:   # scales an e8m0 byte cannot hold: this pass takes the bf16 path
                exact = _e8m0_scales(as_ptr, arow, sel, K, ACT_BLOCK, BLOCK_M, BLOCK_K)
            else:
                exact = True
            if exact:
                acc = _k_loop_scaled(a_ptr, as_ptr, arow, sel, b_ptr, bs_ptr, base, sbase, n, n_ok, K, ACT_BLOCK,
                                     BLOCK_M, BLOCK_N, BLOCK_K, QUANT_A)
            else:
                acc = _k_loop_bf16(a_ptr, as_ptr, arow, sel, b_ptr, bs_ptr, base, sbase, n, n_ok, K, ACT_BLOCK,
                                   BLOCK_M, BLOCK_N, BLOCK_K, FNUZ, EVEN_K, INTERPRET, QUANT_A)
        else:
            acc = _k_loop_bf16(a_ptr, as_ptr, arow, sel, b_ptr, bs_ptr, base, sbase, n, n_ok, K, ACT_BLOCK,
                               BLOCK_M, BLOCK_N, BLOCK_K, FNUZ, EVEN_K, INTERPRET, QUANT_A)
        out = tl.where(sel[:, None], acc, out)
        remaining = remaining & ~sel
    tl.store(c_ptr + r[:, None].to(tl.int64) * N + n[None, :], bf16_rne(out), mask=r_ok[:, None] & n_ok[None, :])


# The interpreter runs one Python step per tile operation: large tiles keep CPU tests fast. GPU tiles come
# from the registered defaults (and a device's tuned table).
_INTERPRETER_TILES = {"BLOCK_M": 16, "BLOCK_N": 2048, "BLOCK_K": 2048, "num_warps": 4}
_INTERPRETER_TILE_ELEMENTS = 2 ** 20   # weight elements decoded per step


def _tiles(op: str, device: torch.device, M: int, N: int, K: int, fnuz: bool) -> dict:
    if device.type == "cpu":   # no larger than the problem: masked lanes cost the interpreter as much
        t = dict(_INTERPRETER_TILES)
        t["BLOCK_M"] = min(128, max(16, triton.next_power_of_2(M)))   # fewer row blocks, fewer expert passes
        t["BLOCK_K"] = min(t["BLOCK_K"], max(128, triton.next_power_of_2(K)))
        t["BLOCK_N"] = min(t["BLOCK_N"], max(16, triton.next_power_of_2(N)), _INTERPRETER_TILE_ELEMENTS // t["BLOCK_K"])
        t["SCALED"] = False   # the interpreter runs the scaled path only when asked (tests)
        return t
    info = platform.device_info(device)
    cfg = dispatch.config(dispatch.get(op, "triton"), info)
    arch = info.arch.split(":")[0]
    if M > cfg["PREFILL_ROWS"]:
        wide = scaled_path(arch, fnuz, cfg["BLOCK_M_SCALED"]) and not scaled_path(arch, fnuz, cfg["BLOCK_M_PREFILL"])
        cfg["BLOCK_M"] = cfg["BLOCK_M_SCALED"] if wide else cfg["BLOCK_M_PREFILL"]
        if wide:
            cfg["num_warps"] = cfg["num_warps_scaled"]
    cfg["SCALED"] = scaled_path(arch, fnuz, cfg["BLOCK_M"])
    return cfg


def grouped_gemm(a_bytes: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 m_indices: torch.Tensor, act_block: int, fnuz: bool, gather: torch.Tensor | None = None,
                 op: str = "mxfp4_grouped_gemm", tiles: dict | None = None, own_scales: bool = False,
                 quant_a: bool = False) -> torch.Tensor:
    """a_bytes [R, K] uint8 FP8 bytes (fnuz: e4m3fnuz, else e4m3fn), a_scale [R, K / act_block] fp32,
    b [G, N, K / 2] uint8, b_scale [G, N, K / 32] uint8, m_indices [M] int32, gather None (R = M) or
    [M] int32 activation rows -> c [M, N] bf16. One launch. tiles: BLOCK_M / BLOCK_N / BLOCK_K / SCALED
    overrides (tests use small tiles to run many tiles cheaply, and SCALED to run the scaled path in the
    interpreter). own_scales: a_scale comes from quantize_fp8_blockwise (powers of two, NaN for a block
    whose bytes are NaN), so the scaled path skips its check of the scales. quant_a: a_bytes is bf16 x
    [R, K] instead, block-quantised in the GEMM's prologue (a_scale unused), the values of
    quantize_fp8(x, act_block, fnuz's encoding): no quantisation launch, no FP8 copy of x."""
    M = m_indices.shape[0]
    G, N, K = b.shape[0], b.shape[1], a_bytes.shape[1]
    c = torch.empty((M, N), dtype=torch.bfloat16, device=a_bytes.device)
    if M == 0:
        return c
    cfg = {**_tiles(op, a_bytes.device, M, N, K, fnuz), **(tiles or {})}
    block_k = max(cfg["BLOCK_K"], act_block)
    scaled = bool(cfg["SCALED"]) and not fnuz and K % block_k == 0
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    gemm_kernel[grid](a_bytes, a_scale, gather if gather is not None else m_indices, m_indices, b, b_scale, c,
                      M, N, K, G, HAS_GATHER=gather is not None, FNUZ=fnuz, ACT_BLOCK=act_block,
                      BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, EVEN_K=K % block_k == 0,
                      INTERPRET=a_bytes.device.type == "cpu", SCALED=scaled, CHECK_SCALES=not own_scales,
                      QUANT_A=quant_a, num_warps=cfg["num_warps"], enable_fp_fusion=FP_FUSION)
    return c


def mxfp4_grouped_gemm(a, a_scale, b, b_scale, m_indices, act_block_size=128):
    return grouped_gemm(a.view(torch.uint8), a_scale, b, b_scale, m_indices, act_block_size,
                        a.dtype == torch.float8_e4m3fnuz)


def fp4_grouped_moe(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, act_block_size=128,
                    swiglu_limit=10.0, expert_map=None, act_fmt=None, quant_in_gemm: bool | None = None):
    """The routed experts (SPEC 5). quant_in_gemm (not part of the op; None: the rule below, tests force
    either): x is quantised in the gate/up GEMM's prologue instead of by its own launch. Default: when
    the GEMM has at most PREFILL_ROWS rows (T * k), i.e. decode, where the launch costs more than each
    column block quantising its few rows again (x stays in L2); prefill quantises x once."""
    T, dim = x.shape
    y = torch.empty((T, dim), dtype=torch.bfloat16, device=x.device)
    if T == 0:
        return y
    fmt = act_fmt if act_fmt is not None else platform.device_info(x).fp8_encoding
    fnuz = fmt == "e4m3fnuz"
    E = w13.shape[0]
    if quant_in_gemm is None:
        rows = dispatch.config(dispatch.get("fp4_grouped_moe", "triton"), platform.device_info(x))["PREFILL_ROWS"]
        quant_in_gemm = topk_ids.numel() <= rows   # a device's tuned table may move it
    route = permute(topk_ids, topk_weights, E, expert_map)
    if quant_in_gemm:
        gu = grouped_gemm(x, x, w13, w13_scale, route["experts"], act_block_size, fnuz, gather=route["tokens"],
                          op="fp4_grouped_moe", own_scales=True, quant_a=True)
    else:
        xq, xs = quantize_fp8(x, act_block_size, fmt)
        gu = grouped_gemm(xq.view(torch.uint8), xs, w13, w13_scale, route["experts"], act_block_size, fnuz,
                          gather=route["tokens"], op="fp4_grouped_moe", own_scales=True)
    hq, hs = swiglu_quant(gu, route["experts"], route["weights"], E, act_block_size, fmt, swiglu_limit)
    ys = grouped_gemm(hq, hs, w2, w2_scale, route["experts"], act_block_size, fnuz, op="fp4_grouped_moe",
                      own_scales=True)
    return combine(ys, route["inv"])


def _gemm_spec(target, op: str, gather: bool, label: str, scaled: bool = False, quant_a: bool = False,
               prefill: bool = False, act_block: int = 32):
    from dsv4_kernels.codegen import TritonKernel
    cfg = dispatch.get(op, "triton").defaults
    wide = scaled and target.name == "sm_100a"   # the tile _tiles gives sm_100a's prefill
    block_m = cfg["BLOCK_M_SCALED"] if wide else cfg["BLOCK_M_PREFILL"] if prefill else cfg["BLOCK_M"]
    act = "*bf16" if quant_a else "*u8"
    sig = {"a_ptr": act, "as_ptr": "*bf16" if quant_a else "*fp32", "gather_ptr": "*i32", "m_ptr": "*i32",
           "b_ptr": "*u8", "bs_ptr": "*u8", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "G": "i32"}
    expects = {"reduced_precision_mma": True,
               # ROCm: the packed weights load as dwords (4 B) at this tile (README.md, open tuning)
               "vector_loads": None if target.backend == "rocm" else True}
    if scaled:
        expects["scaled_mma"] = True
    return TritonKernel(gemm_kernel, sig, {"HAS_GATHER": gather, "FNUZ": target.name == "gfx942",
                                           "ACT_BLOCK": act_block, "BLOCK_M": block_m, "BLOCK_N": cfg["BLOCK_N"],
                                           "BLOCK_K": cfg["BLOCK_K"], "EVEN_K": True, "INTERPRET": False,
                                           "SCALED": scaled, "CHECK_SCALES": not quant_a, "QUANT_A": quant_a},
                        num_warps=cfg["num_warps_scaled"] if wide else cfg["num_warps"], label=label, expects=expects)


def codegen_mxfp4_grouped_gemm(target) -> list:
    """The decode tile of the grouped GEMM (activation block 32, the device's FP8 encoding) on the bf16
    path, and where the chip has it (kernels/moe PATHS) the scaled-dot path at the tile that takes it:
    sm_100a's 128-row prefill tile, gfx950's decode tile."""
    from dsv4_kernels.kernels.moe import scaled_path
    cfg = dispatch.get("mxfp4_grouped_gemm", "triton").defaults
    specs = [_gemm_spec(target, "mxfp4_grouped_gemm", False, "decode-b32")]
    arch = {"sm_90a": "sm_90", "sm_100a": "sm_100"}.get(target.name, target.name)   # platform's arch names
    if scaled_path(arch, False, cfg["BLOCK_M_SCALED"]):
        tile = "prefill" if target.name == "sm_100a" else "decode"
        specs.append(_gemm_spec(target, "mxfp4_grouped_gemm", False, f"{tile}-scaled-b32", scaled=True))
    return specs


def codegen_fp4_grouped_moe(target) -> list:
    """The MoE's own kernels: the gathering gate/up GEMM (decode: x quantised in its prologue, block 32;
    prefill: the quantised x, block 128, the prefill tile; the down GEMM is mxfp4_grouped_gemm's kernel), x
    quantisation, permutation, SwiGLU + requantisation and combine, activation block 32, the device's FP8
    encoding."""
    from dsv4_kernels.codegen import TritonKernel
    from dsv4_kernels.kernels.moe.triton_quant import quant_blocks, quant_kernel, swiglu_quant_kernel
    from dsv4_kernels.kernels.moe.triton_route import COMBINE_BLOCK_D, PERMUTE_CHUNK, combine_kernel, permute_kernel
    fnuz = target.name == "gfx942"
    fmt_max = FMT_MAX["e4m3fnuz" if fnuz else "e4m3fn"]
    quant = {"BLOCK": 32, "NB": quant_blocks(32), "ROWS": 1, "FMT_MAX": fmt_max, "FNUZ": fnuz}
    return [
        _gemm_spec(target, "fp4_grouped_moe", True, "gate-up-gather-quant-b32", quant_a=True,   # decode
                   scaled=target.name == "gfx950"),
        _gemm_spec(target, "fp4_grouped_moe", True, "gate-up-gather-prefill-b128", prefill=True, act_block=128,
                   scaled=target.name in ("sm_100a", "gfx950")),   # the path _tiles takes there
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
