"""TileLang (GPU dialect) source of sparse MQA (SPEC 1, 1.2, 1.3): `sparse_mqa` on the bf16 pool and
`sparse_mqa_fp8` on the paged FP8 cache (one cache or two read in place), decode and prefill, one source
for sm_90a, sm_100a, gfx942 and gfx950. Semantics and numerics are those of triton.py (README.md); the
tile plan is this file's own.

attend_kernel, grid (head tiles, splits, T): block (g, s, t) holds heads [g*H_TILE, (g+1)*H_TILE) of query
t (rows past H are zero and never stored) and walks blocks [s*bps, (s+1)*bps) of BLOCK_N entries of t's
index list (with two caches the second list's blocks follow the first's, so no block mixes caches). Per
block of entries:
1. the BLOCK_N indices go to shared memory as row numbers, or -1 for an entry past the list's used length
   min(max(topk_length[t], 0), K) or outside [0, rows): such an entry reads nothing (guarded loads, never
   wrapped) and its logits are -inf;
2. the BLOCK_N rows are gathered once into shared memory as bf16 [BLOCK_N, 512] for all H_TILE heads:
   bf16 rows as they are, FP8 rows staged as uint32 words and decoded (e4m3fn code through a 256-entry
   fp32 table built by integer ops once per block, times the ue8m0 scale from its bits: exact in fp32 and
   bf16; the 64 rope values are the two bf16 halves of their words);
3. S = Q K^T (T.gemm, Q [H_TILE, 512] bf16 in shared memory, fp32 accumulator), times the scale, masked;
4. online softmax in fp32: m' = max(m, rowmax S), alpha = e^(m - m'), P = e^(S - m') (an all-masked row
   keeps m = -inf through m_safe = 0), l = l alpha + rowsum P;
5. O = O alpha + P V with P split into hi = bf16(P) and lo = bf16(P - hi), two T.gemm into the fp32
   accumulator [H_TILE, 512] (triton.py's accuracy: P carried to ~2^-16).
With one split (prefill) the block finishes in place (sink, bf16 out by integer round to nearest even,
lse); otherwise it writes [O | m | l] to a workspace [T, splits, H, 514] fp32 and merge_kernel, grid
(T, H), folds the splits with a running max and the sink.

H_TILE = 64 (the tensor-core M of one warpgroup): one block serves 64 heads, so V4-Flash (H = 64) reads
each gathered row once per query token and V4-Pro (H = 128) in two blocks side by side (the head tile is
the fastest grid dimension: the second read comes from L2). A block of all 128 heads would hold a
[128, 512] fp32 accumulator, 256 registers per thread at 256 threads: it does not fit a multiprocessor.

H, T, K, K2, N, the page counts and strides, the scale and the split plan are run-time, so one compile
per form (FP8, two caches, lengths, split, tile, block_size) serves every shape; nothing is read back to
the host (CUDA-graph capturable). Cache offsets are int64. On AMD the tile shrinks to the LDS (tiles()).
"""

import functools

import torch
import tilelang
import tilelang.language as T

from dsv4_kernels import dispatch, platform
from dsv4_kernels.kernels import sparse_mqa as shared
from dsv4_kernels.kernels.compressor.tilelang_common import BF16, F32, I32, I64, U32, _exp

D_MODEL = 512
NOPE = 448            # e4m3 nope dims per token
TOKEN_DATA = 576      # [448 e4m3 | 64 bf16] bytes per token at the start of a page
SCALE_BYTES = 8       # 7 ue8m0 scales + 1 pad per token, after block_size * 576 bytes
WS_COLS = D_MODEL + 2  # workspace row: [O (512) | m | l]
MERGE_THREADS = 128    # merge: one block per (t, h), 4 channels per thread
ROW_WORDS = TOKEN_DATA // 4  # a token's [nope | rope] bytes as 144 little-endian uint32 words

# H_TILE heads x BLOCK_N entries per step, `threads` per block; the index list is split over enough blocks
# to fill the device (PROGRAMS, 0 = two per multiprocessor), at most MAX_SPLITS. Must equal the op file's
# TILELANG_DEFAULTS (tests/sparse_mqa/test_sparse_mqa_tilelang.py checks it).
DEFAULTS = {"H_TILE": 64, "BLOCK_N": 64, "threads": 256, "PROGRAMS": 0, "MAX_SPLITS": 32}


def _log(x):
    return T.call_pure_extern(F32, "logf", x)   # the precise logf (T.log may lower to the fast one)


def _rne(x):
    """fp32 x -> its bf16 value (round to nearest even by integer ops) as fp32; NaN stays a quiet NaN."""
    bits = T.reinterpret(x, U32)
    return T.reinterpret(T.if_then_else(T.isnan(x), (bits >> 16 | T.uint32(0x40)) << 16,
                                        ((bits + T.uint32(0x7FFF) + ((bits >> 16) & T.uint32(1))) >> 16) << 16), F32)


def _e4m3fn_value(code):
    """e4m3fn byte -> fp32 by integer ops: normal (e, m) -> bits (e + 120) << 23 | m << 20, subnormal
    m * 2^-9, 0x7F / 0xFF NaN, the sign from bit 7."""
    x = T.cast(code, U32)
    mag = x & T.uint32(0x7F)
    v = T.if_then_else(mag < T.uint32(8), T.cast(x & T.uint32(7), F32) * T.float32(0.001953125),
                       T.reinterpret((mag << 20) + T.uint32(120 << 23), F32))
    v = T.if_then_else(mag == T.uint32(0x7F), T.reinterpret(T.uint32(0x7FC00000), F32), v)
    return T.if_then_else(x >= T.uint32(0x80), -v, v)


def _ue8m0_value(byte):
    """ue8m0 byte b -> 2^(b - 127) fp32 by its bits; 0 -> 2^-127 (subnormal bits 0x00400000), 255 -> NaN."""
    x = T.cast(byte, U32)
    bits = T.if_then_else(x == T.uint32(0), T.uint32(0x00400000),
                          T.if_then_else(x == T.uint32(255), T.uint32(0x7FC00000), x << 23))
    return T.reinterpret(bits, F32)


def _byte(word, k):
    """Byte k (0 = the lowest address: little-endian) of a uint32 word."""
    return (word >> T.cast(8 * k, U32)) & T.uint32(0xFF)


def make_attend_kernel(fp8: bool, two: bool, has_len: bool, has_len2: bool, split: bool, h_tile: int,
                       block_n: int, threads: int, block_size: int = 64):
    """attend_kernel of one form (module docstring). Arguments, in order: Q [n, H, 512] bf16; the pool KV
    [N, 512] bf16, or (fp8) KC [L] int32 (the cache's bytes from its first page on as words), its page
    stride in bytes (int64) and row count (int32); IDX [n, K] int32; LEN [n] int32 (read with has_len); two:
    KC2, stride2, rows2, IDX2 [n, K2], LEN2 [n]; SINK [H] fp32; OUT [n, H, 512] bf16; LSE [n, H] fp32; WS
    [n, S, H, 514] fp32 (split; a 1-row dummy otherwise); the scale (fp32), bps (blocks per split) and
    nsplit (the grid's split count)."""
    if two and not fp8:
        raise ValueError("attend kernel: two caches are an FP8 form (SPEC 1.3)")
    if h_tile % 16 or not 16 <= h_tile <= 128 or block_n % 16 or not 16 <= block_n <= 128:
        raise ValueError(f"attend kernel: H_TILE and BLOCK_N must be multiples of 16 in [16, 128], got {h_tile}, "
                         f"{block_n}")
    if threads % 64 or not 64 <= threads <= 512:
        raise ValueError(f"attend kernel: threads must be a multiple of 64 in [64, 512], got {threads}")
    if block_size < 1:
        raise ValueError(f"attend kernel: block_size must be >= 1, got {block_size}")
    D, HT, BN, BS = D_MODEL, h_tile, block_n, block_size
    DECODE_ROWS = max(1, min(BN, 4 * threads // D))   # 4 values per thread per decode pass
    COPY_ROWS = 16                                    # 9 words per thread per copy pass at 256 threads
    NEG_INF = -T.infinity(F32)
    n = T.dynamic("n")
    H = T.dynamic("heads")
    K1 = T.dynamic("k1")
    K2 = T.dynamic("k2")
    S = T.dynamic("splits")
    N = T.dynamic("pool_rows")
    L1 = T.dynamic("cache_words", I64)
    L2 = T.dynamic("extra_cache_words", I64)

    @T.macro
    def gather(CACHE, stride, rows, IDX, LEN, Kn, b, t, idx_s, base_s, words_s, lut_s, kv_s):
        # step 1: the block's row numbers (-1: reads nothing), FP8: each row's word offsets; step 2: the rows
        # as bf16 into kv_s (FP8: the row's 146 words into words_s first, then decoded from there)
        for i in T.Parallel(BN):
            j = b * BN + i
            used = T.min(T.max(LEN[t], 0), Kn) if LEN is not None else Kn
            raw = T.if_then_else(j < used, IDX[t, T.min(j, Kn - 1)], -1)
            idx_s[i] = T.if_then_else(raw >= 0 and raw < rows, raw, -1)
            if fp8:  # token r: page r // bs, slot r % bs; [nope | rope] at slot * 576, scales at bs * 576 + slot * 8
                base_s[i, 0] = (T.cast(T.max(raw, 0) // BS, I64) * stride
                                + T.cast(T.max(raw, 0) % BS, I64) * TOKEN_DATA) // 4
                base_s[i, 1] = (T.cast(T.max(raw, 0) // BS, I64) * stride + BS * TOKEN_DATA
                                + T.cast(T.max(raw, 0) % BS, I64) * SCALE_BYTES) // 4
        if fp8:
            for r in T.serial(BN // COPY_ROWS):  # in passes of COPY_ROWS rows: few loads in flight per thread
                for i, w in T.Parallel(COPY_ROWS, ROW_WORDS):
                    words_s[r * COPY_ROWS + i, w] = T.if_then_else(
                        idx_s[r * COPY_ROWS + i] >= 0, T.reinterpret(CACHE[base_s[r * COPY_ROWS + i, 0] + w], U32),
                        T.uint32(0))
            for i, w in T.Parallel(BN, 2):
                words_s[i, ROW_WORDS + w] = T.if_then_else(idx_s[i] >= 0, T.reinterpret(CACHE[base_s[i, 1] + w], U32),
                                                            T.uint32(0))
            # code * scale is exact in fp32 and in bf16; an invalid row is all zero words: code 0 -> 0. The
            # rope value d - 448 is half (d % 2) of word 112 + (d - 448) // 2 = d // 2 - 112.
            for r in T.serial(BN // DECODE_ROWS):  # a few rows per pass: a short unrolled body, few registers
                for i, d in T.Parallel(DECODE_ROWS, D):
                    kv_s[r * DECODE_ROWS + i, d] = T.cast(T.if_then_else(
                        d < NOPE,
                        lut_s[_byte(words_s[r * DECODE_ROWS + i, T.min(d, NOPE - 1) // 4], d % 4)]
                        * _ue8m0_value(_byte(words_s[r * DECODE_ROWS + i, ROW_WORDS + T.min(d, NOPE - 1) // 256],
                                             (d // 64) % 4)),
                        T.reinterpret((words_s[r * DECODE_ROWS + i, T.max(d, NOPE) // 2 - NOPE // 4]
                                       >> T.cast(16 * (d % 2), U32)) << 16, F32)), BF16)
        else:
            for i, d in T.Parallel(BN, D):
                kv_s[i, d] = T.if_then_else(idx_s[i] >= 0, CACHE[T.max(idx_s[i], 0), d], T.bfloat16(0))

    @T.macro
    def step(q_s, kv_s, idx_s, ph_s, pl_s, acc_s, acc_o, m, m_blk, l, l_blk, alpha, scale):
        # steps 3-5 on the gathered block
        T.clear(acc_s)
        T.gemm(q_s, kv_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        for h, i in T.Parallel(HT, BN):
            acc_s[h, i] = T.if_then_else(idx_s[i] >= 0, acc_s[h, i] * scale, NEG_INF)
        T.reduce_max(acc_s, m_blk, dim=1, clear=True)
        for h in T.Parallel(HT):
            m_blk[h] = T.max(m[h], m_blk[h])                                    # m'
            alpha[h] = _exp(m[h] - T.if_then_else(m_blk[h] == NEG_INF, T.float32(0), m_blk[h]))
        for h, i in T.Parallel(HT, BN):                                         # masked: exactly 0
            acc_s[h, i] = _exp(acc_s[h, i] - T.if_then_else(m_blk[h] == NEG_INF, T.float32(0), m_blk[h]))
        T.reduce_sum(acc_s, l_blk, dim=1, clear=True)
        for h in T.Parallel(HT):
            l[h] = l[h] * alpha[h] + l_blk[h]
            m[h] = m_blk[h]
        for h, d in T.Parallel(HT, D):
            acc_o[h, d] = acc_o[h, d] * alpha[h]
        for h, i in T.Parallel(HT, BN):                                         # P = hi + lo, both bf16
            ph_s[h, i] = T.cast(_rne(acc_s[h, i]), BF16)
            pl_s[h, i] = T.cast(acc_s[h, i] - _rne(acc_s[h, i]), BF16)
        T.gemm(pl_s, kv_s, acc_o, policy=T.GemmWarpPolicy.FullRow)
        T.gemm(ph_s, kv_s, acc_o, policy=T.GemmWarpPolicy.FullRow)

    @T.macro
    def body(Q, C1, stride1, rows1, IDX1, LEN1, C2, stride2, rows2, IDX2, LEN2, SINK, OUT, LSE, WS, scale, bps, nsplit):
        with T.Kernel(T.ceildiv(H, HT), nsplit, n, threads=threads) as (g, sp, t):
            q_s = T.alloc_shared((HT, D), BF16)
            kv_s = T.alloc_shared((BN, D), BF16)
            ph_s = T.alloc_shared((HT, BN), BF16)
            pl_s = T.alloc_shared((HT, BN), BF16)
            idx_s = T.alloc_shared((BN,), I32)
            base_s = T.alloc_shared((BN, 2), I64) if fp8 else None
            words_s = T.alloc_shared((BN, ROW_WORDS + 2), U32) if fp8 else None
            lut_s = T.alloc_shared((256,), F32) if fp8 else None     # e4m3fn code -> fp32, built once
            acc_s = T.alloc_fragment((HT, BN), F32)
            acc_o = T.alloc_fragment((HT, D), F32)
            m = T.alloc_fragment((HT,), F32)
            m_blk = T.alloc_fragment((HT,), F32)
            l = T.alloc_fragment((HT,), F32)
            l_blk = T.alloc_fragment((HT,), F32)
            alpha = T.alloc_fragment((HT,), F32)
            h0 = g * HT
            for h, d in T.Parallel(HT, D):
                q_s[h, d] = T.if_then_else(h0 + h < H, Q[t, T.min(h0 + h, H - 1), d], T.bfloat16(0))
            if fp8:
                for c in T.Parallel(256):
                    lut_s[c] = _e4m3fn_value(c)
            T.fill(acc_o, 0)
            T.fill(l, 0)
            T.fill(m, NEG_INF)
            blocks1 = T.ceildiv(K1, BN)
            b0 = sp * bps
            b1 = T.min(b0 + bps, blocks1 + (T.ceildiv(K2, BN) if two else 0))
            for b in T.serial(b0, b1):  # two caches: the second list's blocks after the first's, one softmax
                if two:
                    if b < blocks1:
                        gather(C1, stride1, rows1, IDX1, LEN1, K1, b, t, idx_s, base_s, words_s, lut_s, kv_s)
                    else:
                        gather(C2, stride2, rows2, IDX2, LEN2, K2, b - blocks1, t, idx_s, base_s, words_s, lut_s,
                               kv_s)
                else:
                    gather(C1, stride1, rows1, IDX1, LEN1, K1, b, t, idx_s, base_s, words_s, lut_s, kv_s)
                step(q_s, kv_s, idx_s, ph_s, pl_s, acc_s, acc_o, m, m_blk, l, l_blk, alpha, scale)
            if split:  # this split's partial result: WS[t, sp, h] = [O | m | l]
                for h, d in T.Parallel(HT, D):
                    if h0 + h < H:
                        WS[t, sp, h0 + h, d] = acc_o[h, d]
                for h in T.Parallel(HT):
                    if h0 + h < H:
                        WS[t, sp, h0 + h, D] = m[h]
                        WS[t, sp, h0 + h, D + 1] = l[h]
            else:  # finish in place: alpha <- the output factor, m_blk <- lse
                for h in T.Parallel(HT):
                    sink = T.if_then_else(h0 + h < H, SINK[T.min(h0 + h, H - 1)], T.float32(0))
                    alpha[h] = _factor(m[h], l[h], sink)
                    m_blk[h] = _lse(m[h], l[h])
                for h, d in T.Parallel(HT, D):
                    if h0 + h < H:
                        OUT[t, h0 + h, d] = T.cast(_rne(acc_o[h, d] * alpha[h]), BF16)
                for h in T.Parallel(HT):
                    if h0 + h < H:
                        LSE[t, h0 + h] = m_blk[h]

    QS, OS = (n, H, D), (n, H, D)
    WSS = (T.dynamic("ws_tokens"), S, T.dynamic("ws_heads"), WS_COLS)   # a 1-row dummy without split
    if fp8 and two:
        @T.prim_func
        def attend_kernel(Q: T.Tensor(QS, BF16), KC: T.Tensor((L1,), I32), stride1: T.int64, rows1: T.int32,
                          IDX: T.Tensor((n, K1), I32), LEN: T.Tensor((n,), I32), KC2: T.Tensor((L2,), I32),
                          stride2: T.int64, rows2: T.int32, IDX2: T.Tensor((n, K2), I32), LEN2: T.Tensor((n,), I32),
                          SINK: T.Tensor((H,), F32), OUT: T.Tensor(OS, BF16), LSE: T.Tensor((n, H), F32),
                          WS: T.Tensor(WSS, F32), scale: T.float32, bps: T.int32, nsplit: T.int32):
            body(Q, KC, stride1, rows1, IDX, LEN if has_len else None, KC2, stride2, rows2, IDX2,
                 LEN2 if has_len2 else None, SINK, OUT, LSE, WS, scale, bps, nsplit)
    elif fp8:
        @T.prim_func
        def attend_kernel(Q: T.Tensor(QS, BF16), KC: T.Tensor((L1,), I32), stride1: T.int64, rows1: T.int32,
                          IDX: T.Tensor((n, K1), I32), LEN: T.Tensor((n,), I32), SINK: T.Tensor((H,), F32),
                          OUT: T.Tensor(OS, BF16), LSE: T.Tensor((n, H), F32), WS: T.Tensor(WSS, F32),
                          scale: T.float32, bps: T.int32, nsplit: T.int32):
            body(Q, KC, stride1, rows1, IDX, LEN if has_len else None, None, None, None, None, None, SINK, OUT,
                 LSE, WS, scale, bps, nsplit)
    else:
        @T.prim_func
        def attend_kernel(Q: T.Tensor(QS, BF16), KV: T.Tensor((N, D), BF16), IDX: T.Tensor((n, K1), I32),
                          LEN: T.Tensor((n,), I32), SINK: T.Tensor((H,), F32), OUT: T.Tensor(OS, BF16),
                          LSE: T.Tensor((n, H), F32), WS: T.Tensor(WSS, F32), scale: T.float32,
                          bps: T.int32, nsplit: T.int32):
            body(Q, KV, None, N, IDX, LEN if has_len else None, None, None, None, None, None, SINK, OUT, LSE, WS,
                 scale, bps, nsplit)
    return attend_kernel


def _factor(m, l, sink):
    """The multiplier of O of a finished (m, l): out = O e^(m - M) / (l e^(m - M) + e^(sink - M)), M =
    max(m, sink) (the sink joins the denominator once); an empty row (l == 0; a NaN l is not empty) gives 0."""
    m_safe = T.if_then_else(m == -T.infinity(F32), T.float32(0), m)
    big = T.max(m_safe, sink)
    return T.if_then_else(l == 0, T.float32(0), _exp(m_safe - big) / (l * _exp(m_safe - big) + _exp(sink - big)))


def _lse(m, l):
    """lse = m + log l (natural log, no sink); an empty row (l == 0) gives +inf."""
    m_safe = T.if_then_else(m == -T.infinity(F32), T.float32(0), m)
    return T.if_then_else(l == 0, T.infinity(F32), m_safe + _log(T.if_then_else(l == 0, T.float32(1), l)))


def make_merge_kernel():
    """merge_kernel, grid (T, H), 128 threads: thread x folds channels [4x, 4x + 4) of the splits'
    WS[t, :, h] with a running max, then the sink, as the one-split finish."""
    n = T.dynamic("n")
    H = T.dynamic("heads")
    S = T.dynamic("splits")
    VEC = D_MODEL // MERGE_THREADS
    NEG_INF = -T.infinity(F32)

    @T.prim_func
    def merge_kernel(WS: T.Tensor((n, S, H, WS_COLS), F32), SINK: T.Tensor((H,), F32),
                     OUT: T.Tensor((n, H, D_MODEL), BF16), LSE: T.Tensor((n, H), F32)):
        with T.Kernel(n, H, threads=MERGE_THREADS) as (t, h):
            tx = T.get_thread_binding()
            acc = T.alloc_local((VEC,), F32)
            m = T.alloc_local((1,), F32)
            l = T.alloc_local((1,), F32)
            w = T.alloc_local((2,), F32)      # e^(m - m'), e^(m_s - m')
            res = T.alloc_local((2,), F32)    # the output factor, lse
            m[0] = NEG_INF
            l[0] = 0.0
            for v in T.unroll(VEC):
                acc[v] = 0.0
            for s in T.serial(S):
                ms = WS[t, s, h, D_MODEL]
                mn = T.max(m[0], ms)
                w[0] = _exp(m[0] - T.if_then_else(mn == NEG_INF, T.float32(0), mn))
                w[1] = _exp(ms - T.if_then_else(mn == NEG_INF, T.float32(0), mn))
                l[0] = l[0] * w[0] + WS[t, s, h, D_MODEL + 1] * w[1]
                for v in T.unroll(VEC):
                    acc[v] = acc[v] * w[0] + WS[t, s, h, tx * VEC + v] * w[1]
                m[0] = mn
            res[0] = _factor(m[0], l[0], SINK[h])
            res[1] = _lse(m[0], l[0])
            for v in T.vectorized(VEC):
                OUT[t, h, tx * VEC + v] = T.cast(_rne(acc[v] * res[0]), BF16)
            if tx == 0:
                LSE[t, h] = res[1]

    return merge_kernel


# ---------------------------------------------------------------------------------------------- host side

# Shared memory per block the tile plan may use: H200 / B200 (227 KB opt-in), gfx950 (160 KB LDS), gfx942 (64 KB).
SHARED_LIMIT = {"sm_90a": 227 * 1024, "sm_100a": 227 * 1024, "gfx950": 160 * 1024, "gfx942": 64 * 1024}
INT32_MAX = 2**31 - 1


def shared_bytes(fp8: bool, h_tile: int, block_n: int) -> int:
    """Shared memory of attend_kernel's buffers (q, the gathered rows, P hi / lo, the indices; FP8: the
    staged words, byte offsets and the e4m3 table) plus 2 KB of reduction workspace."""
    total = 2 * h_tile * D_MODEL + 2 * block_n * D_MODEL + 2 * 2 * h_tile * block_n + 4 * block_n + 2048
    if fp8:
        total += 4 * block_n * (ROW_WORDS + 2) + 16 * block_n + 4 * 256
    return total


def tiles(cfg: dict, fp8: bool, arch: str) -> tuple[int, int, int]:
    """(H_TILE, BLOCK_N, threads) of the config on `arch` (a key of SHARED_LIMIT): the configured tile, with
    BLOCK_N halved down to 32, then H_TILE halved down to 16, then BLOCK_N down to 16, until the buffers fit
    the shared memory; on AMD the threads are then cut (in 64-lane waves) so that every wave holds at least
    one 16 x 16 MFMA tile of S [H_TILE, BLOCK_N]. CUDA keeps the threads (wgmma: warpgroups of 128). On
    sm_100a TileLang 0.1.15 lowers T.gemm to mma.sync (no tcgen05 here): the FP8 form at BLOCK_N 64 spills
    there (255 registers + 32 bytes of stack), at 32 it does not, so FP8 takes BLOCK_N <= 32 on sm_100a."""
    h_tile, block_n, threads = cfg["H_TILE"], cfg["BLOCK_N"], cfg["threads"]
    if fp8 and arch == "sm_100a":
        block_n = min(block_n, 32)
    limit = SHARED_LIMIT.get(arch, SHARED_LIMIT["gfx942"])
    while shared_bytes(fp8, h_tile, block_n) > limit and block_n > 32:
        block_n //= 2
    while shared_bytes(fp8, h_tile, block_n) > limit and h_tile > 16:
        h_tile //= 2
    while shared_bytes(fp8, h_tile, block_n) > limit and block_n > 16:
        block_n //= 2
    if not arch.startswith("sm"):
        threads = max(64, min(threads, 64 * (h_tile // 16) * (block_n // 16)))
    return h_tile, block_n, threads


def plan(T_: int, H: int, blocks: int, h_tile: int, cfg: dict, multiprocessors: int) -> tuple[int, int, int]:
    """(head tiles, splits, blocks per split) from shapes only: enough blocks to fill the device (PROGRAMS,
    0 = two per multiprocessor), at most MAX_SPLITS splits and never more than there are blocks of entries,
    re-balanced so that no split is empty; one split needs no workspace and no merge."""
    groups = -(-H // h_tile)
    target = cfg["PROGRAMS"] or 2 * multiprocessors
    splits = max(1, min(blocks, cfg["MAX_SPLITS"], -(-target // max(1, T_ * groups))))
    per_split = max(1, -(-blocks // splits))
    return groups, max(1, -(-blocks // per_split)), per_split


@functools.lru_cache(maxsize=None)
def _attend(target: str, *params):
    return tilelang.compile(make_attend_kernel(*params), target=target)


@functools.lru_cache(maxsize=None)
def _merge(target: str):
    return tilelang.compile(make_merge_kernel(), target=target)


@functools.lru_cache(maxsize=16)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=16)
def _device_arch(index: int, rocm: bool) -> str:
    props = torch.cuda.get_device_properties(index)
    if rocm:
        return "gfx950" if getattr(props, "gcnArchName", "").startswith("gfx950") else "gfx942"
    return "sm_100a" if props.major >= 10 else "sm_90a"


def _arch(t: torch.Tensor) -> str:
    return _device_arch(t.device.index or 0, platform.backend_of(t) == "rocm")


def _words(cache: torch.Tensor, block_size: int) -> torch.Tensor:
    """The bytes of a SPEC 1.2 cache from its first page up to the last read byte, as int32 words (a view,
    never a copy; the guards ask 8-byte aligned pages). No page: one zero word (nothing is read)."""
    pages = cache.shape[0]
    if pages == 0:
        return torch.zeros(2, dtype=torch.int32, device=cache.device)
    raw = cache if cache.dtype == torch.uint8 else cache.view(torch.uint8)
    span = (pages - 1) * raw.stride(0) + block_size * 584
    return raw.as_strided((span,), (1,)).view(torch.int32)


def _list(indices: torch.Tensor) -> torch.Tensor:
    # K = 0: one -1 column (an empty list), so that every kernel argument has a row
    return indices if indices.shape[1] else torch.full((indices.shape[0], 1), -1, dtype=torch.int32,
                                                       device=indices.device)


def _launch(op, q, attn_sink, softmax_scale, lists, fp8, block_size, pool=None):
    """lists: ((source, rows, page stride, indices, topk_length), ...), one or two; source is the bf16
    pool or the cache as int32 words."""
    T_, H, D = q.shape
    out = torch.empty((T_, H, D), dtype=torch.bfloat16, device=q.device)
    lse = torch.empty((T_, H), dtype=torch.float32, device=q.device)
    if T_ == 0:
        return out, lse
    if pool is not None and pool.shape[0] == 0:  # no row: every entry is invalid (shape-only decision)
        return out.zero_(), lse.fill_(float("inf"))
    cfg = dispatch.config(dispatch.get(op, "tilelang"), platform.device_info(q))
    arch = _arch(q)
    h_tile, block_n, threads = tiles(cfg, fp8, arch)
    blocks = sum(-(-max(1, lst[3].shape[1]) // block_n) for lst in lists)
    mps = _multiprocessors(q.device.index or 0)
    groups, splits, per_split = plan(T_, H, blocks, h_tile, cfg, mps)
    two = len(lists) == 2
    has_len = lists[0][4] is not None
    has_len2 = two and lists[1][4] is not None
    target = "cuda" if arch.startswith("sm") else "hip"
    kernel = _attend(target, fp8, two, has_len, has_len2, splits > 1, h_tile, block_n, threads, block_size)
    ws = (torch.empty((T_, splits, H, WS_COLS), dtype=torch.float32, device=q.device) if splits > 1
          else torch.empty((1, 1, 1, WS_COLS), dtype=torch.float32, device=q.device))
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    args = [q]
    for source, rows, stride, indices, lengths in lists:
        if fp8:
            args += [source, stride, rows]
        else:
            args.append(source)
        args.append(_list(indices))
        args.append(lengths if lengths is not None else torch.zeros(T_, dtype=torch.int32, device=q.device))
    args += [attn_sink, out, lse, ws, scale, per_split, splits]
    kernel(*args)
    if splits > 1:
        _merge(target)(ws, attn_sink, out, lse)
    return out, lse


def sparse_mqa(q, kv, indices, attn_sink, softmax_scale=None, topk_length=None):
    return _launch("sparse_mqa", q, attn_sink, softmax_scale, ((kv, kv.shape[0], 0, indices, topk_length),), False, 64,
                   pool=kv)


def sparse_mqa_fp8(q, kv_cache, indices, attn_sink, softmax_scale=None, topk_length=None, block_size=64,
                   extra_kv_cache=None, extra_indices=None, extra_topk_length=None):
    lists = [(_words(kv_cache, block_size), kv_cache.shape[0] * block_size, kv_cache.stride(0), indices, topk_length)]
    if extra_kv_cache is not None:
        lists.append((_words(extra_kv_cache, block_size), extra_kv_cache.shape[0] * block_size,
                      extra_kv_cache.stride(0), extra_indices, extra_topk_length))
    return _launch("sparse_mqa_fp8", q, attn_sink, softmax_scale, tuple(lists), True, block_size)


def _aligned(**tensors) -> str | None:
    for name, t in tensors.items():
        if t is not None and t.numel() and t.data_ptr() % 16:
            return (f"{name}: the TileLang kernel uses 16-byte accesses, data_ptr {t.data_ptr():#x} is not 16-byte "
                    f"aligned")
    return None


def _counts(q, indices, extra_indices=None) -> str | None:
    T_, H, _ = q.shape
    for name, count in (("token", T_), ("index", indices.shape[1]),
                        ("extra index", 0 if extra_indices is None else extra_indices.shape[1])):
        if count > INT32_MAX // max(1, H * WS_COLS if name == "token" else 1):
            return f"{count} {name}s exceed the int32 addressing of the TileLang kernel"
    return None


def supports_sparse_mqa(q, kv, indices, attn_sink, softmax_scale=None, topk_length=None) -> str | None:
    """What attend_kernel was built for on the bf16 pool: the shared guards (contiguous bf16 q and kv, H a
    multiple of 8 up to 128, contiguous int32 lists and fp32 sink), q and kv 16-byte aligned (their rows are
    read in 16-byte vectors), and int32 row and token counts."""
    reason = shared.supports_sparse_mqa(q, kv, indices, attn_sink, softmax_scale, topk_length)
    if reason:
        return reason
    if kv.shape[0] > INT32_MAX:
        return f"{kv.shape[0]} kv rows exceed the int32 row count of the TileLang kernel"
    return _aligned(q=q, kv=kv) or _counts(q, indices)


def supports_sparse_mqa_fp8(q, kv_cache, indices, attn_sink, softmax_scale=None, topk_length=None, block_size=64,
                            extra_kv_cache=None, extra_indices=None, extra_topk_length=None) -> str | None:
    """As supports_sparse_mqa, for the FP8 caches: the shared guards (pages of >= block_size * 584
    contiguous bytes, page strides and bases multiples of 8 bytes: the kernel reads the cache in 4-byte
    words), q 16-byte aligned, and int32 token counts (pages * block_size)."""
    reason = shared.supports_sparse_mqa_fp8(q, kv_cache, indices, attn_sink, softmax_scale, topk_length, block_size,
                                            extra_kv_cache, extra_indices, extra_topk_length)
    if reason:
        return reason
    for name, cache in (("kv_cache", kv_cache), ("extra_kv_cache", extra_kv_cache)):
        if cache is not None and cache.shape[0] * block_size > INT32_MAX:
            return f"{name}: {cache.shape[0] * block_size} tokens exceed the int32 row count of the TileLang kernel"
    return _aligned(q=q) or _counts(q, indices, extra_indices)


def _codegen_arch(target) -> str:
    return target.name if target.name in SHARED_LIMIT else ("sm_90a" if target.backend == "cuda" else "gfx942")


def _attend_spec(op: str, fp8: bool, two: bool, target, label: str):
    from dsv4_kernels.codegen import TileLangKernel
    cfg = dispatch.get(op, "tilelang").defaults
    h_tile, block_n, threads = tiles(cfg, fp8, _codegen_arch(target))
    return TileLangKernel(make_attend_kernel(fp8, two, True, two, True, h_tile, block_n, threads),
                          label=f"{label}-h{h_tile}-n{block_n}-t{threads}")


def codegen_sparse_mqa(target) -> list:
    """Decode as engines launch it: the split attend kernel over the bf16 pool with topk_length, and the merge
    kernel (shared by both ops). The one-split prefill form is the same source with the merge folded in."""
    from dsv4_kernels.codegen import TileLangKernel
    return [_attend_spec("sparse_mqa", False, False, target, "decode-bf16-split"),
            TileLangKernel(make_merge_kernel(), label="merge")]


def codegen_sparse_mqa_fp8(target) -> list:
    """V4 decode over the FP8 caches: two caches in one launch (SPEC 1.3), both topk_lengths, split."""
    return [_attend_spec("sparse_mqa_fp8", True, True, target, "decode-fp8-two-cache-split")]
