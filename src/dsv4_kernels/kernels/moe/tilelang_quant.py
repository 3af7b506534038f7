"""TileLang (GPU dialect) sources of the FP8 quantisation kernels of the FP4 MoE (SPEC 5 / "Number
formats"), the counterparts of triton_quant.py: the activation block quantisation (with an optional row
gather, so that x can be quantised straight into the expert-sorted order) and the fused clamp + SwiGLU +
routing weight + FP8 requantisation between the two grouped GEMMs. One source for sm_90a, sm_100a, gfx942
and gfx950.

Both kernels: grid (rows, ceil(K / CH)), `threads` threads; a block owns CH = min(1024, K) channels of
one row, i.e. CH / block quantisation blocks (32 of 32 or 8 of 128 at CH 1024): 8 channels per thread at
128 threads. The row's chunk is read into an fp32 fragment [CH / block, block]; the per-block amax is an
int32 max over the magnitudes' bit patterns (T.reduce_max over dim 1: integer, so it is exact, order
free, and a NaN, whose magnitude bits exceed every finite value's and inf's, is the max: a block holding a
NaN or an inf is found from its amax bits alone, >= 0x7F800000).

Every number is computed by integer ops on IEEE bits, never by a division or a float rounding trick, so the
bytes do not depend on the compiler's float flags (fast math, FMA contraction, FTZ):
- scale = 2^ceil(log2(max(amax, 1e-4) / fmt_max)): with A the bits of max(amax, fp32(1e-4)), fmt_max =
  1.75 * 2^8 (448, e4m3fn) or 1.875 * 2^7 (240, e4m3fnuz), the scale's biased exponent is
  (A >> 23) - (fmt_max's biased exponent) + 127 + (A's mantissa field > fmt_max's). This is the exponent
  triton_quant's rounded fp32 quotient div_rn(amax, fmt_max) gives: that quotient rounds to 2^k only when
  amax <= fmt_max 2^k (the next fp32 above 1.75 or 1.875 is more than half an ulp of the quotient away);
- the element is multiplied by 1 / scale = 2^(127 - e) (exact: a power of two; a product below the fp32
  normal range is far below half the smallest FP8 subnormal, so an FTZ flush gives the same code),
  clamped to +-fmt_max, and encoded by `_fp8_code`: a normal FP8 value keeps 3 mantissa bits rounded to
  nearest even on the fp32 bits (bits + 0x7FFFF + bit 20), a subnormal one is the 24-bit significand
  shifted right to units of 2^-9 (e4m3fn) or 2^-10 (e4m3fnuz), rounded to nearest even; the sign is the
  IEEE sign bit, except that e4m3fnuz has no -0 (a zero code keeps sign 0: 0x80 is its NaN);
- a NaN / inf block gets scale NaN and the format's NaN byte (0x7F e4m3fn, 0x80 e4m3fnuz) everywhere.

quant_kernel: x [T, K] (bf16 or fp32) -> q [R, K] FP8 bytes, s [R, K / block] fp32. Without a gather
R = T and row r quantises x[r]; with `rows` [R] int32, row r quantises x[rows[r]], and rows[r] outside
[0, T) (-1 padding included) gives zero bytes and scale 0 without reading x through it.

swiglu_quant_kernel: gu [M, 2I] bf16 (gate | up), m [M] int32, w [M] fp32 -> q [M, I] bytes, s [M, I /
block]: g = min(g, limit), u = clamp(u, -limit, limit), NaN propagating (selects, not fminf / fmaxf,
which return the other operand of a NaN), both compiled out when swiglu_limit <= 0; h = silu(g) * u * w
in fp32 (silu(g) = g / (1 + exp(-g))), rounded to bf16 by integer ops (round to nearest even, a NaN
stays a quiet NaN), then quantised as above. A row whose expert m[r] is outside [0, G) (padding) is not
written (the down GEMM does not read it) and reads nothing.

K (I), block, the encoding, x's dtype and the gather are compile-time; the row counts T, R, M and G are
symbolic: one compile per shape serves every token count, nothing is read back to the host (CUDA-graph
capturable). exp and the fp32 division of silu are the only operations whose last bit is the math
library's: the h quantisation matches the reference up to that rounding (as triton_quant's does). expf is
called by name: TileLang's T.exp is the fast __expf on HIP.

cpu=True builds the same prim_func for TileLang's C target (one thread, local arrays for the fragments,
T.grid for T.Parallel, bf16 as its int16 bits, the NaN literal): the public functions run it on CPU
tensors, which is how tests/moe/test_moe_tilelang_quant.py checks the numbers without a GPU.
"""

import functools

import torch
import tilelang
import tilelang.language as T

from dsv4_kernels import platform

F32, BF16, I32, U8 = "float32", "bfloat16", "int32", "uint8"
FMT_MAX = {"e4m3fn": 448.0, "e4m3fnuz": 240.0}
FP8_DTYPE = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}
IN_DTYPES = {torch.bfloat16: BF16, torch.float32: F32}
CHANNELS = 1024          # channels per block (a row's chunk)
THREADS = 128            # 8 channels per thread
BLOCKS = (32, 128)

# fp32 bit patterns
_INF_BITS = 0x7F800000    # a magnitude at or above it is inf or NaN
_EPS_BITS = 0x38D1B717    # fp32(1e-4), the amax floor of the scale rule
_NAN_BITS = 0x7FC00000
_HI16 = -65536            # 0xFFFF0000 as an int32
# fmt: (biased fp32 exponent of fmt_max, its mantissa field, the FP8 NaN byte, FP8 exponent bias)
_FMT = {False: (135, 0x600000, 0x7F, 7),    # e4m3fn: 448 = 1.75 * 2^8, NaN S.1111.111
        True: (134, 0x700000, 0x80, 8)}     # e4m3fnuz: 240 = 1.875 * 2^7, NaN 0x80 (no -0)


def _nan(cpu: bool = False):
    """The quiet NaN 0x7FC00000; the C target cannot take the address of a literal (its reinterpret), so
    its build writes the NaN literal (the same bits; the GPU sources' constant is checked by codegen)."""
    return T.float32(float("nan")) if cpu else T.reinterpret(T.int32(_NAN_BITS), F32)


def _bits(v):
    return T.reinterpret(v, I32)


def _mag_bits(v):
    """The bits of |v| (an int32 >= 0 whose order is the magnitudes' order; NaN above inf)."""
    return _bits(v) & 0x7FFFFFFF


def _scale_exp(amax_bits, fnuz: bool):
    """Biased fp32 exponent e of the block scale 2^(e - 127) = 2^ceil(log2(max(amax, 1e-4) / fmt_max)), from
    the bits of amax (a finite block: amax_bits < 0x7F800000)."""
    exp_max, man_max = _FMT[fnuz][:2]
    a = T.max(amax_bits, T.int32(_EPS_BITS))
    return (a >> 23) - (exp_max - 127) + T.if_then_else((a & 0x7FFFFF) > man_max, 1, 0)


def _fp8_code(y, fnuz: bool):
    """The int32 bits y of an fp32 value with |value| <= fmt_max -> the FP8 code of its magnitude (int32
    0..127: exponent and mantissa bits), round to nearest even. e4m3fn: bias 7, subnormal unit 2^-9 below
    2^-6; e4m3fnuz: bias 8, unit 2^-10 below 2^-7. y should be a variable or a buffer element (it is used
    several times); the sign is added by _byte."""
    bias = _FMT[fnuz][3]
    a = y & 0x7FFFFFFF
    e = a >> 23
    # normal: 3 mantissa bits, RNE on the bits (a carry moves into the exponent)
    r = a + 0x7FFFF + ((a >> 20) & 1)
    normal = (((r >> 23) - (127 - bias)) << 3) | ((r >> 20) & 7)
    # subnormal (e < 128 - bias): the significand 1.m (24 bits) in units of 2^(-bias - 2) is sig >> sh with
    # sh = 148 - bias - e >= 21, rounded to nearest even on the bits shifted out; a shift past 30 (e = 0
    # or tiny) is clamped to 30, which leaves 0 (sig < 2^24)
    sig = (a & 0x7FFFFF) | 0x800000
    sh = T.min((148 - bias) - e, 30)
    sub = (sig + ((T.int32(1) << (sh - 1)) - 1) + ((sig >> sh) & 1)) >> sh
    return T.if_then_else(e < 128 - bias, sub, normal)


def _scaled(v, sexp, fnuz: bool):
    """v / scale (times 1 / scale = 2^(127 - (sexp - 127)), exact: sexp <= 247 for a finite amax), clamped
    to +-fmt_max (a no-op for finite blocks, kept as a guard)."""
    fmt_max = FMT_MAX["e4m3fnuz" if fnuz else "e4m3fn"]
    inv = T.reinterpret((254 - sexp) << 23, F32)
    return T.min(T.max(v * inv, T.float32(-fmt_max)), T.float32(fmt_max))


def _byte(code, y, bad, fnuz: bool):
    """The stored byte: the format's NaN byte in a NaN / inf block, else the magnitude code plus the sign
    bit of y (the bits of v / scale); e4m3fnuz has no -0, so a zero code keeps sign 0 (0x80 is its NaN).
    code should be a variable or a buffer element."""
    neg = y < 0
    if fnuz:
        neg = T.And(neg, code != 0)
    return T.if_then_else(bad, _FMT[fnuz][2], code | T.if_then_else(neg, 128, 0))


def _scale(sexp, bad, cpu: bool):
    return T.if_then_else(bad, _nan(cpu), T.reinterpret(sexp << 23, F32))


def _bf16_rne(h):
    """fp32 -> the fp32 holding its bf16 rounding (nearest even; a NaN stays a quiet NaN, overflow -> inf,
    as _triton_util.bf16_rne). h should be a variable or a buffer element."""
    b = _bits(h)
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) & _HI16
    return T.reinterpret(T.if_then_else((b & 0x7FFFFFFF) > _INF_BITS, (b & _HI16) | 0x400000, rounded), F32)


def _clamp_gate(g, limit):
    """min(g, limit), NaN propagating (a NaN compares false and is kept)."""
    return T.if_then_else(g > limit, limit, g)


def _clamp_up(u, limit):
    """clamp(u, -limit, limit), NaN propagating."""
    return T.if_then_else(u > limit, limit, T.if_then_else(u < -limit, -limit, u))


def _silu_mul(g, u, w):
    """silu(g) * u * w in fp32 (rounded to bf16 by the caller, as the clamps are applied by it)."""
    return g / (T.float32(1) + T.call_extern(F32, "expf", -g)) * u * w   # T.exp is the fast __expf on HIP


def _check(K: int, block: int, fmt: str, name: str = "K"):
    if block not in BLOCKS:
        raise ValueError(f"block must be 32 or 128, got {block}")
    if fmt not in FMT_MAX:
        raise ValueError(f"fmt must be 'e4m3fn' or 'e4m3fnuz', got {fmt!r}")
    if K <= 0 or K % block:
        raise ValueError(f"{name} must be a positive multiple of block {block}, got {K}")


def _alloc(cpu: bool, threads: int):
    """The scratch buffers' allocator: register fragments on GPUs; with cpu=True (the C-target build of the
    same source that the CPU tests run, one thread) plain local arrays, which TileLang's C target reduces."""
    if cpu and threads != 1:
        raise ValueError(f"the C-target build runs one thread, got threads={threads}")
    return (T.alloc_local, T.grid) if cpu else (T.alloc_fragment, T.Parallel)


def _to_f32(v, raw_bf16: bool):
    """A loaded element as fp32: a cast (exact from bf16 or fp32), or, in the C-target build, which has no
    bf16 type, the bf16 bits (an int16) shifted into the high half of the fp32 bits (the same value)."""
    if raw_bf16:
        return T.reinterpret((T.cast(v, I32) & 0xFFFF) << 16, F32)
    return T.cast(v, F32)


def _layout(K: int, block: int, channels: int):
    ch = min(channels, K)
    ch -= ch % block
    return ch, ch // block, -(-K // ch)      # channels per block, quantisation blocks per chunk, chunks


def _quantise_chunk(xs, mag, qb, amax, sexp, Q, S, row, c, K: int, block: int, NB: int, fnuz: bool, cpu: bool,
                    live=None):
    """Shared tail of both kernels: the fragment xs [NB, block] (fp32 chunk c of output row `row`) ->
    bytes Q[row, (c NB + b) block + j] and scales S[row, c NB + b]; blocks past K / block (in the last
    chunk of a K that is not a multiple of the chunk) are not stored. live (the gather's row check): the
    scales are 0 where it is false. mag [NB, block] int32, amax and sexp
    [NB] int32 are scratch fragments (staging the steps through fragments keeps every expression small:
    TileLang lowers a nested select of a nested select very slowly)."""
    KB = K // block
    even = KB % NB == 0
    par = T.grid if cpu else T.Parallel

    @T.macro
    def body():
        for b, j in par(NB, block):
            mag[b, j] = _mag_bits(xs[b, j])
        T.reduce_max(mag, amax, dim=1)
        for b in par(NB):
            sexp[b] = _scale_exp(amax[b], fnuz)
        for b, j in par(NB, block):
            mag[b, j] = _bits(_scaled(xs[b, j], sexp[b], fnuz))     # reused: the bits of v / scale
            qb[b, j] = T.cast(_fp8_code(mag[b, j], fnuz), U8)
            qb[b, j] = T.cast(_byte(T.cast(qb[b, j], I32), mag[b, j], amax[b] >= _INF_BITS, fnuz), U8)
        for b, j in par(NB, block):     # a separate loop: 8-byte vector stores
            if even or c * NB + b < KB:
                Q[row, (c * NB + b) * block + j] = qb[b, j]
        for b in par(NB):
            if even or c * NB + b < KB:
                if live is None:
                    S[row, c * NB + b] = _scale(sexp[b], amax[b] >= _INF_BITS, cpu)
                else:   # a gathered padding row's scale is 0
                    S[row, c * NB + b] = T.if_then_else(live, _scale(sexp[b], amax[b] >= _INF_BITS, cpu), T.float32(0))
    return body


def make_quant_kernel(K: int, block: int, fmt: str, in_dtype: str = BF16, gather: bool = False,
                      threads: int = THREADS, channels: int = CHANNELS, cpu: bool = False):
    """quant_kernel (module docstring). Arguments: X [T, K] in_dtype, [ROWS [R] int32 with the gather],
    Q [R, K] uint8, S [R, K / block] fp32 (written)."""
    _check(K, block, fmt)
    if in_dtype not in (BF16, F32):
        raise ValueError(f"in_dtype must be bfloat16 or float32, got {in_dtype}")
    fnuz = fmt == "e4m3fnuz"
    CH, NB, NC = _layout(K, block, channels)
    KB = K // block
    even = KB % NB == 0
    alloc, par = _alloc(cpu, threads)
    raw = cpu and in_dtype == BF16            # the C target has no bf16: the bits as int16
    x_dtype = "int16" if raw else in_dtype
    R = T.dynamic("R")
    TX = T.dynamic("T") if gather else R

    def make(X, Q, S, ROWS=None):
        @T.macro
        def body():
            with T.Kernel(R, NC, threads=threads) as (r, c):
                xs = alloc((NB, block), F32)
                mag = alloc((NB, block), I32)
                qb = alloc((NB, block), U8)
                amax = alloc((NB,), I32)
                sexp = alloc((NB,), I32)
                if gather:
                    src = ROWS[r]
                    live = T.And(src >= 0, src < TX)
                    if live:
                        for b, j in par(NB, block):
                            if even or c * NB + b < KB:
                                xs[b, j] = _to_f32(X[src, (c * NB + b) * block + j], raw)
                            else:
                                xs[b, j] = T.float32(0)
                    else:   # a padding row reads nothing: its zeros quantise to zero bytes, its scale is 0
                        for b, j in par(NB, block):
                            xs[b, j] = T.float32(0)
                    _quantise_chunk(xs, mag, qb, amax, sexp, Q, S, r, c, K, block, NB, fnuz, cpu, live)()
                else:
                    for b, j in par(NB, block):
                        if even or c * NB + b < KB:
                            xs[b, j] = _to_f32(X[r, (c * NB + b) * block + j], raw)
                        else:
                            xs[b, j] = T.float32(0)
                    _quantise_chunk(xs, mag, qb, amax, sexp, Q, S, r, c, K, block, NB, fnuz, cpu)()
        return body

    if gather:
        @T.prim_func
        def quant_kernel(X: T.Tensor((TX, K), x_dtype), ROWS: T.Tensor((R,), I32), Q: T.Tensor((R, K), U8),
                         S: T.Tensor((R, KB), F32)):
            make(X, Q, S, ROWS)()
    else:
        @T.prim_func
        def quant_kernel(X: T.Tensor((R, K), x_dtype), Q: T.Tensor((R, K), U8), S: T.Tensor((R, KB), F32)):
            make(X, Q, S)()
    return quant_kernel


def make_swiglu_quant_kernel(I: int, block: int, fmt: str, clamp: bool, threads: int = THREADS,
                             channels: int = CHANNELS, cpu: bool = False):
    """swiglu_quant_kernel (module docstring). Arguments: GU [M, 2I] bf16, MI [M] int32, W [M] fp32, G and
    limit (scalars), Q [M, I] uint8, S [M, I / block] fp32 (written for live rows)."""
    _check(I, block, fmt, "I")
    fnuz = fmt == "e4m3fnuz"
    CH, NB, NC = _layout(I, block, channels)
    KB = I // block
    even = KB % NB == 0
    alloc, par = _alloc(cpu, threads)
    gu_dtype = "int16" if cpu else BF16
    M = T.dynamic("M")

    @T.prim_func
    def swiglu_quant_kernel(GU: T.Tensor((M, 2 * I), gu_dtype), MI: T.Tensor((M,), I32), W: T.Tensor((M,), F32),
                            G: T.int32, limit: T.float32, Q: T.Tensor((M, I), U8), S: T.Tensor((M, KB), F32)):
        with T.Kernel(M, NC, threads=threads) as (r, c):
            xs = alloc((NB, block), F32)
            us = alloc((NB, block), F32)
            mag = alloc((NB, block), I32)
            qb = alloc((NB, block), U8)
            amax = alloc((NB,), I32)
            sexp = alloc((NB,), I32)
            ge = MI[r]
            if T.And(ge >= 0, ge < G):
                w = W[r]
                for b, j in par(NB, block):
                    if even or c * NB + b < KB:
                        xs[b, j] = _to_f32(GU[r, (c * NB + b) * block + j], cpu)
                        us[b, j] = _to_f32(GU[r, I + (c * NB + b) * block + j], cpu)
                    else:
                        xs[b, j] = T.float32(0)
                        us[b, j] = T.float32(0)
                if clamp:
                    for b, j in par(NB, block):
                        xs[b, j] = _clamp_gate(xs[b, j], limit)
                        us[b, j] = _clamp_up(us[b, j], limit)
                for b, j in par(NB, block):
                    xs[b, j] = _silu_mul(xs[b, j], us[b, j], w)
                for b, j in par(NB, block):
                    xs[b, j] = _bf16_rne(xs[b, j])
                _quantise_chunk(xs, mag, qb, amax, sexp, Q, S, r, c, I, block, NB, fnuz, cpu)()

    return swiglu_quant_kernel


@functools.lru_cache(maxsize=None)
def _compiled(target: str, maker: str, *params):
    """One compile per (target, kernel, compile-time parameters); target "c" builds the one-thread C-target
    form of the same source (cpu=True) for CPU tensors."""
    make = {"quant": make_quant_kernel, "swiglu": make_swiglu_quant_kernel}[maker]
    cpu = target == "c"
    func = make(*params, threads=1, cpu=True) if cpu else make(*params)
    return tilelang.compile(func, target=target)


def _target(t: torch.Tensor) -> str:
    if t.device.type == "cpu":
        return "c"
    return platform.tilelang_target(t)


def _need(cond: bool, name: str, expected: str, got) -> None:
    if not cond:
        raise ValueError(f"{name}: expected {expected}, got {got}")


def _check_fmt_block(block, fmt) -> None:
    _need(fmt in FMT_MAX, "fmt", "'e4m3fn' or 'e4m3fnuz'", repr(fmt))
    _need(isinstance(block, int) and block in BLOCKS, "block", "32 or 128", repr(block))


def quantize_fp8(x: torch.Tensor, block: int, fmt: str, rows: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] bf16 or fp32, contiguous, K % block == 0 -> (q [R, K] float8 of fmt, scale [R, K / block]
    fp32): quantize_fp8_blockwise(x, block, fmt) bit for bit (R = T), as triton_quant.quantize_fp8.
    rows [R] int32 (optional): output row r quantises x[rows[r]]; rows[r] outside [0, T) (-1 padding)
    gives zero bytes and scale 0 and reads nothing. One launch, no host sync."""
    _check_fmt_block(block, fmt)
    _need(x.dim() == 2 and x.dtype in IN_DTYPES and x.is_contiguous(), "x", "a contiguous 2-D bf16 or fp32 tensor",
          f"{x.dim()}-D {x.dtype}{'' if x.is_contiguous() else ' non-contiguous'}")
    n, K = x.shape
    _need(K > 0 and K % block == 0, "x", f"K (x.shape[1]) a positive multiple of block {block}", K)
    if rows is not None:
        _need(rows.dim() == 1 and rows.dtype == torch.int32 and rows.is_contiguous(), "rows",
              "a contiguous 1-D int32 tensor", f"{rows.dim()}-D {rows.dtype}")
        _need(rows.device == x.device, "rows", f"on x's device {x.device}", rows.device)
    R = n if rows is None else rows.shape[0]
    q = torch.empty((R, K), dtype=torch.uint8, device=x.device)
    s = torch.empty((R, K // block), dtype=torch.float32, device=x.device)
    if R:
        target = _target(x)
        kernel = _compiled(target, "quant", K, block, fmt, IN_DTYPES[x.dtype], rows is not None)
        xv = x.view(torch.int16) if target == "c" and x.dtype == torch.bfloat16 else x
        if rows is None:
            kernel(xv, q, s)
        else:
            kernel(xv, rows, q, s)
    return q.view(FP8_DTYPE[fmt]), s


def swiglu_quant(gu: torch.Tensor, m_indices: torch.Tensor, row_w: torch.Tensor, G: int, block: int, fmt: str,
                 swiglu_limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """gu [M, 2I] bf16, m_indices [M] int32, row_w [M] fp32 -> (q [M, I] uint8 FP8 bytes of fmt, s
    [M, I / block] fp32), as triton_quant.swiglu_quant: rows of padding (m outside [0, G)) are left
    unwritten. One launch, no host sync."""
    _check_fmt_block(block, fmt)
    _need(gu.dim() == 2 and gu.dtype == torch.bfloat16 and gu.is_contiguous(), "gu", "a contiguous 2-D bf16 tensor",
          f"{gu.dim()}-D {gu.dtype}{'' if gu.is_contiguous() else ' non-contiguous'}")
    M, two_i = gu.shape
    _need(two_i > 0 and two_i % (2 * block) == 0, "gu", f"2I (gu.shape[1]) a positive multiple of 2 * block {2 * block}",
          two_i)
    for name, t, dtype in (("m_indices", m_indices, torch.int32), ("row_w", row_w, torch.float32)):
        _need(t.dim() == 1 and t.dtype == dtype and t.is_contiguous() and t.shape[0] == M, name,
              f"a contiguous [{M}] {dtype} tensor", f"{tuple(t.shape)} {t.dtype}")
        _need(t.device == gu.device, name, f"on gu's device {gu.device}", t.device)
    inter = two_i // 2
    q = torch.empty((M, inter), dtype=torch.uint8, device=gu.device)
    s = torch.empty((M, inter // block), dtype=torch.float32, device=gu.device)
    if M:
        target = _target(gu)
        kernel = _compiled(target, "swiglu", inter, block, fmt, swiglu_limit > 0)
        kernel(gu.view(torch.int16) if target == "c" else gu, m_indices, row_w, int(G), float(swiglu_limit), q, s)
    return q, s


# One spec per target and kernel; together both models' sizes, both blocks, both encodings, the gather and
# the plain x quantisation, the clamp compiled in and out. (label, K or I, block, gather / clamp); gfx942
# compiles e4m3fnuz (its native encoding), the others e4m3fn. The default codegen run builds sm_90a and
# gfx942, which between them hold the gather, the clamp on and off and both encodings.
CODEGEN_QUANT = {
    "sm_90a": ("x-flash-K4096-b128-gather", 4096, 128, True),
    "sm_100a": ("x-pro-K7168-b32-gather", 7168, 32, True),
    "gfx942": ("x-pro-K7168-b32-gather-fnuz", 7168, 32, True),
    "gfx950": ("x-flash-K4096-b128", 4096, 128, False),
}
CODEGEN_SWIGLU = {
    "sm_90a": ("h-flash-I2048-b32-clamp", 2048, 32, True),
    "sm_100a": ("h-pro-I3072-b128-clamp", 3072, 128, True),
    "gfx942": ("h-pro-I3072-b128-noclamp-fnuz", 3072, 128, False),
    "gfx950": ("h-flash-I2048-b32-noclamp", 2048, 32, False),
}


def _fmt_of(target) -> str:
    return "e4m3fnuz" if target.name == "gfx942" else "e4m3fn"


def codegen_quantize_fp8(target) -> list:
    from dsv4_kernels.codegen import TileLangKernel
    label, K, block, gather = CODEGEN_QUANT[target.name]
    return [TileLangKernel(make_quant_kernel(K, block, _fmt_of(target), BF16, gather), label=label)]


def codegen_swiglu_quant(target) -> list:
    from dsv4_kernels.codegen import TileLangKernel
    label, inter, block, clamp = CODEGEN_SWIGLU[target.name]
    return [TileLangKernel(make_swiglu_quant_kernel(inter, block, _fmt_of(target), clamp), label=label)]
