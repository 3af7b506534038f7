"""TileLang pieces shared by the compressor decode (tilelang.py) and prefill (tilelang_prefill.py) kernels:
the bf16 rounding and e4m3fn encoding by integer ops, the precise exp, the pooling row plan and the fused
tail (RMSNorm + RoPE of one entry over a block's row group 0, then its SPEC 1.2 FP8 cache bytes).

Thread layout of the tail: thread t of row group 0 (t < d / 4) owns entry channels [4 t, 4 t + 4) in the
fp32 registers y; the RMSNorm sum of squares is reduced by xor shuffles within each warp, then across the
WARPS = max(1, d / 128) warps of row group 0 in shared memory `red` after a barrier that every thread of
the block reaches (callers run the tail in block-uniform control flow).
"""
import tilelang.language as T

VEC = 4                        # fp32 channels per thread per access (16 bytes)
ROPE_DIM = 64
CACHE_D, TOKEN_BYTES, DATA_BYTES, NOPE = 512, 584, 576, 448  # SPEC 1.2: 7 x 64 e4m3 + 64 bf16, 8 scale bytes
E4M3_MAX = 448.0
SCALE_FLOOR = 1e-4
F32, BF16, I64, I32, U32, U8 = "float32", "bfloat16", "int64", "int32", "uint32", "uint8"



def pool_plan(rows: int, d: int, threads: int, chunk: int) -> tuple[int, int, int, int]:
    """(LANES, GROUPS, STEPS, CHUNK) of a pooling over `rows` memory rows: LANES = d / 4 channel lanes,
    GROUPS = threads / LANES row groups; group g pools rows g + GROUPS * k for k < STEPS * CHUNK (rows
    past the last are masked). CHUNK is clipped to the rows a group has."""
    lanes = d // VEC
    if threads % 32 or not 32 <= threads <= 1024 or threads % lanes:
        raise ValueError(f"threads must be a multiple of 32 in [32, 1024] and of d / 4 = {lanes}, got {threads}")
    if chunk < 1:
        raise ValueError(f"CHUNK must be >= 1, got {chunk}")
    groups = threads // lanes
    per_group = -(-rows // groups)
    chunk = min(chunk, per_group)
    return lanes, groups, -(-per_group // chunk), chunk


@T.macro
def _bf16_rne(x, out, i):
    # out[i] = the bf16 value of fp32 x[i], round to nearest even by integer ops, as fp32 (exactly
    # representable in bf16, so the cast at the store is exact on every vendor). NaN stays a quiet NaN.
    out[i] = T.reinterpret(T.if_then_else(
        T.isnan(x[i]), (T.reinterpret(x[i], U32) >> 16 | T.uint32(0x40)) << 16,
        ((T.reinterpret(x[i], U32) + T.uint32(0x7FFF) + ((T.reinterpret(x[i], U32) >> 16) & T.uint32(1)))
         >> 16) << 16), F32)


def _e4m3fn(v):
    """fp32 v, |v| <= 448 -> the e4m3fn code (uint32 < 256), round to nearest even, by integer ops;
    below 2^-6 the subnormal code in units of 2^-9; the sign from the IEEE bit (-0 gives 0x80)."""
    a = T.abs(v)
    abits = T.reinterpret(a, U32)
    rounded = abits + T.uint32(0x7FFFF) + ((abits >> 20) & T.uint32(1))         # keep 3 mantissa bits
    normal = ((T.max(rounded >> 23, T.uint32(121)) - T.uint32(120)) << 3) | ((rounded >> 20) & T.uint32(7))
    sub = T.cast(T.call_pure_extern(F32, "rintf", a * 512.0), U32)            # units of 2^-9, RNE (rintf:
    # the arithmetic (x + 2^23) - 2^23 would be folded to x by TVM's simplifier)
    code = T.if_then_else(a < 0.015625, sub, normal)
    return code | ((T.reinterpret(v, U32) >> 31) << 7)


def _exp(x):
    return T.call_pure_extern(F32, "expf", x)  # the precise expf on CUDA and HIP (T.exp is __expf on HIP)


def make_fused_tail(d: int, cache: bool, block_size: int, pages, warps: int):
    """(store_fp8, finish_fused) macros for entries of width d: finish_fused(..., b, ..., rpos, ...) writes
    the bf16 entry of row group 0's y at ENT[b] with RoPE at table row rpos and, with a cache, its FP8
    bytes at flat cache slot CSLOT[b]; `pages` is the kernel's symbolic cache page count."""
    BS, NP, WARPS = block_size, pages, warps
    ROPE_LANE0 = (d - ROPE_DIM) // VEC            # first lane of the rope dims

    @T.macro
    def store_fp8(KC, CSLOT, b, c0, y, tmp, q, sb):
        # SPEC 1.2 bytes of the bf16 entry y at flat cache slot CSLOT[b] (skipped outside the cache). Every
        # lane of the warp runs the shuffles: the tile's amax and NaN/inf flag over its 16 lanes.
        tmp[0] = T.max(T.max(T.abs(y[0]), T.abs(y[1])), T.max(T.abs(y[2]), T.abs(y[3])))
        sb[1] = T.cast(not (T.isfinite(y[0]) and T.isfinite(y[1]) and T.isfinite(y[2]) and T.isfinite(y[3])), U32)
        for o in T.unroll(4):
            tmp[0] = T.max(tmp[0], T.shfl_xor(tmp[0], 8 >> o, 32))
            sb[1] = T.max(sb[1], T.shfl_xor(sb[1], 8 >> o, 32))
        cslot = CSLOT[b]
        if cslot >= 0 and cslot < T.cast(NP, I64) * BS:
            page = cslot // BS
            row = cslot % BS
            if c0 < NOPE:
                # ue8m0 scale 2^ceil(log2(max(amax / 448, 1e-4))) from the fp32 bits; 1 / scale is exact
                tmp[1] = T.max(tmp[0] / E4M3_MAX, T.float32(SCALE_FLOOR))
                sb[0] = (T.reinterpret(tmp[1], U32) >> 23) + T.cast(
                    (T.reinterpret(tmp[1], U32) & T.uint32(0x7FFFFF)) != T.uint32(0), U32)
                tmp[2] = T.reinterpret((T.uint32(254) - T.min(sb[0], T.uint32(254))) << 23, F32)
                for v in T.unroll(VEC):
                    q[v] = T.if_then_else(sb[1] != 0, T.uint8(0x7F), T.cast(
                        _e4m3fn(T.min(T.max(y[v] * tmp[2], -E4M3_MAX), E4M3_MAX)), U8))
                for v in T.vectorized(VEC):
                    KC[page, row * DATA_BYTES + c0 + v] = q[v]
                if c0 % ROPE_DIM == 0:
                    KC[page, BS * DATA_BYTES + row * 8 + c0 // ROPE_DIM] = T.cast(
                        T.if_then_else(sb[1] != 0, T.uint32(255), sb[0]), U8)
            else:  # the rope dims as raw little-endian bf16, then the zero pad byte
                for v in T.unroll(VEC):
                    q[2 * v] = T.cast((T.reinterpret(y[v], U32) >> 16) & T.uint32(0xFF), U8)
                    q[2 * v + 1] = T.cast(T.reinterpret(y[v], U32) >> 24, U8)
                for v in T.vectorized(2 * VEC):
                    KC[page, row * DATA_BYTES + NOPE + 2 * (c0 - NOPE) + v] = q[v]
                if c0 == NOPE:
                    KC[page, BS * DATA_BYTES + row * 8 + 7] = T.uint8(0)

    @T.macro
    def finish_fused(ENT, NW, COS, SIN, KC, CSLOT, eps, b, tx, lane, grp, c0, rpos, y, tmp, acc, red, q, sb):
        # RMSNorm: the sum of squares over row group 0's d channels (xor shuffles, then across warps)
        if grp == 0:
            tmp[0] = y[0] * y[0] + y[1] * y[1] + y[2] * y[2] + y[3] * y[3]
            for o in T.unroll(5):
                tmp[0] = tmp[0] + T.shfl_xor(tmp[0], 16 >> o, 32)
            if tx % 32 == 0:
                red[tx // 32] = tmp[0]
        T.sync_threads()
        if grp == 0:
            tmp[1] = red[0]
            for w in T.unroll(1, WARPS):
                tmp[1] = tmp[1] + red[w]
            tmp[1] = T.rsqrt(tmp[1] / d + eps)
            for v in T.unroll(VEC):
                acc[v] = y[v] * tmp[1] * NW[c0 + v]
                _bf16_rne(acc, y, v)
            if lane >= ROPE_LANE0:  # pairs (y0, y1), (y2, y3) rotated in fp32 at position rpos
                for h in T.unroll(2):
                    tmp[2] = COS[rpos, (c0 - (d - ROPE_DIM)) // 2 + h]
                    tmp[3] = SIN[rpos, (c0 - (d - ROPE_DIM)) // 2 + h]
                    acc[2 * h] = y[2 * h] * tmp[2] - y[2 * h + 1] * tmp[3]
                    acc[2 * h + 1] = y[2 * h] * tmp[3] + y[2 * h + 1] * tmp[2]
                for v in T.unroll(VEC):
                    _bf16_rne(acc, y, v)
            for v in T.vectorized(VEC):
                ENT[b, c0 + v] = T.cast(y[v], BF16)
            if cache:
                store_fp8(KC, CSLOT, b, c0, y, tmp, q, sb)

    return store_fp8, finish_fused
