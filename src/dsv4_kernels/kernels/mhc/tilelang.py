"""TileLang (GPU dialect) sources of the mHC ops (SPEC 4): one source per kernel for CUDA and ROCm.

Kernels:
- `sinkhorn`: one thread per token: split, sigmoids, row softmax and the Sinkhorn iterations with the
  4 x 4 matrix in registers.
- `project`: the RMS-scaled projection as a deterministic split-K GEMV/GEMM. Grid (token tiles, splits);
  a split owns a contiguous run of 256-wide K units of xf = x.flatten(-2) and writes, per token, its
  partial `xf @ hc_fn.T` and partial `sum(xf^2)` to an fp32 workspace [splits, T, cols] (column `rows`
  holds the sum of squares). fp32 FMAs on CUDA/ROCm cores, no tensor cores (no tf32). The fused
  post + pre variant first builds x_new = mhc_post(...) for its unit, stores it as bf16 and projects the
  rounded value.
- `finalize`: grid (T, dim blocks): reduces the splits in a fixed order, applies rsqrt(mean + norm_eps),
  the gates, and y = sum_i pre_i * x_i; block 0 of each token also runs the Sinkhorn and writes post
  and comb (the head variant has no Sinkhorn).
- `post`: grid (T, dim blocks): X'_j = post_j * F + sum_i comb[i, j] * X_i.

mhc_pre, mhc_head and mhc_post_pre are two launches (project, finalize); mhc_post and mhc_sinkhorn one.
dim is a compile-time constant (any multiple of 256 up to 8192); the token count and the split count
are symbolic, so one compile per (kernel, dim, config) serves every T. Scalars (iters, eps, norm_eps)
are kernel arguments: nothing is read back to the host and every launch is CUDA-graph safe.
"""

import functools
import math

import torch
import tilelang
import tilelang.language as T

from dsv4_kernels import dispatch, platform
from dsv4_kernels.kernels import mhc as shared
from dsv4_kernels.kernels.mhc import DIM_MULTIPLE, MAX_DIM

HC = shared.HC_MULT    # 4 residual streams
MIX = shared.MIX_ROWS  # 24 mixes per token: 4 pre, 4 post, 16 comb logits
VEC = 8                # bf16 elements per 16-byte access
UNIT = 32 * VEC        # K elements one 32-lane warp covers per step; dim % 256 == 0 keeps a unit in one stream
MAX_TOKENS = 2**30     # the token count is an int32 kernel argument; headroom for tile arithmetic near it
MAX_ITERS = 2**31 - 1  # iters is an int32 kernel argument
FLASH_DIM, PRO_DIM = 4096, 7168

DEFAULTS = {
    # threads: tokens per block (one thread per token).
    "mhc_sinkhorn": {"threads": 128},
    # Projection: a block has ROW_GROUPS x TOKEN_GROUPS warps; warp (rg, tg) accumulates rows
    # [rg * rows / ROW_GROUPS, ...) for TOKENS tokens, so a block covers TOKEN_GROUPS * TOKENS tokens.
    # TARGET_BLOCKS: the host picks the split count so that token tiles x splits reaches about this
    # many blocks (two per SM on H100). threads: the finalize kernel (8 elements of dim per thread).
    "mhc_pre": {"ROW_GROUPS": 4, "TOKEN_GROUPS": 2, "TOKENS": 8, "TARGET_BLOCKS": 264, "threads": 128},
    "mhc_head": {"ROW_GROUPS": 1, "TOKEN_GROUPS": 4, "TOKENS": 8, "TARGET_BLOCKS": 264, "threads": 128},
    # A decode op: 4 tokens per warp keeps the fused kernel near 130-150 registers (8: 200-245).
    "mhc_post_pre": {"ROW_GROUPS": 4, "TOKEN_GROUPS": 2, "TOKENS": 4, "TARGET_BLOCKS": 264, "threads": 128},
    # threads: 8 elements of dim per thread, grid (T, ceil(dim / (8 * threads))).
    "mhc_post": {"threads": 128},
}

F32, BF16 = "float32", "bfloat16"


def _check_threads(threads: int) -> None:
    if threads % 32 or not 32 <= threads <= 1024:
        raise ValueError(f"threads must be a multiple of 32 in [32, 1024], got {threads}")


def ws_cols(rows: int) -> int:
    """Workspace columns per (split, token): the `rows` partial mixes, then the sum of squares."""
    return 32 if rows == MIX else 8


def split_count(tokens: int, dim: int, block_tokens: int, target_blocks: int) -> int:
    """K splits of the projection for `tokens` tokens: enough blocks to fill the GPU, no empty split.

    The 4 * dim / 256 units are dealt out in runs of ceil(units / splits); the result is the smallest
    split count with that run length, so every split owns at least one unit. Fixed for a given
    (tokens, dim, config): the fp32 summation order, and so the result, does not depend on the device.
    """
    units = HC * dim // UNIT
    tiles = max(1, math.ceil(tokens / block_tokens))
    want = max(1, min(units, math.ceil(target_blocks / tiles)))
    per = math.ceil(units / want)
    return math.ceil(units / per)


@T.macro
def _pre_gates(m, scale, base, g, eps):
    # pre = sigmoid(mixes[0:4] * scale[0] + base[0:4]) + eps
    for i in T.unroll(HC):
        g[i] = T.sigmoid(m[i] * scale[0] + base[i]) + eps


@T.macro
def _post_gates_and_logits(m, scale, base, g, c):
    # post = 2 * sigmoid(mixes[4:8] * scale[1] + base[4:8]); C = mixes[8:24] * scale[2] + base[8:24]
    for i in T.unroll(HC):
        g[HC + i] = 2.0 * T.sigmoid(m[HC + i] * scale[1] + base[HC + i])
    for i in T.unroll(HC * HC):
        c[i] = m[2 * HC + i] * scale[2] + base[2 * HC + i]


@T.macro
def _normalise_rows(c, s, eps):
    # C = C / (C.sum(-1) + eps)
    for r in T.unroll(HC):
        s[r] = c[4 * r] + c[4 * r + 1] + c[4 * r + 2] + c[4 * r + 3] + eps
    for r in T.unroll(HC):
        for j in T.unroll(HC):
            c[4 * r + j] = c[4 * r + j] / s[r]


@T.macro
def _normalise_columns(c, s, eps):
    # C = C / (C.sum(-2) + eps)
    for j in T.unroll(HC):
        s[j] = c[j] + c[4 + j] + c[8 + j] + c[12 + j] + eps
    for r in T.unroll(HC):
        for j in T.unroll(HC):
            c[4 * r + j] = c[4 * r + j] / s[j]


@T.macro
def _sinkhorn(c, s, iters, eps):
    # C = softmax(C, -1) + eps; columns; then iters - 1 times rows, columns. c: [16] row-major, registers.
    for r in T.unroll(HC):
        s[0] = T.max(T.max(c[4 * r], c[4 * r + 1]), T.max(c[4 * r + 2], c[4 * r + 3]))
        for j in T.unroll(HC):
            c[4 * r + j] = T.exp(c[4 * r + j] - s[0])
        s[1] = c[4 * r] + c[4 * r + 1] + c[4 * r + 2] + c[4 * r + 3]
        for j in T.unroll(HC):
            c[4 * r + j] = c[4 * r + j] / s[1] + eps
    _normalise_columns(c, s, eps)
    for _ in T.serial(iters - 1):
        _normalise_rows(c, s, eps)
        _normalise_columns(c, s, eps)


@T.macro
def _store_post_comb(g, c, POST, COMB, t):
    for v in T.vectorized(HC):
        POST[t, v] = g[HC + v]
    for r in T.unroll(HC):
        for v in T.vectorized(HC):
            COMB[t, r, v] = c[4 * r + v]


def make_sinkhorn_kernel(threads: int):
    """mhc_sinkhorn: one thread per token, grid ceil(T / threads)."""
    _check_threads(threads)
    n = T.dynamic("n")

    @T.prim_func
    def mhc_sinkhorn_kernel(M: T.Tensor((n, MIX), F32), scale: T.Tensor((3,), F32), base: T.Tensor((MIX,), F32),
                            PRE: T.Tensor((n, HC), F32), POST: T.Tensor((n, HC), F32),
                            COMB: T.Tensor((n, HC, HC), F32), iters: T.int32, eps: T.float32):
        with T.Kernel(T.ceildiv(n, threads), threads=threads) as bx:
            t = bx * threads + T.get_thread_binding()
            m = T.alloc_local((MIX,), F32)
            g = T.alloc_local((2 * HC,), F32)
            c = T.alloc_local((HC * HC,), F32)
            s = T.alloc_local((HC,), F32)
            if t < n:
                for h in T.unroll(MIX // 4):
                    for v in T.vectorized(4):
                        m[4 * h + v] = M[t, 4 * h + v]
                _pre_gates(m, scale, base, g, eps)
                _post_gates_and_logits(m, scale, base, g, c)
                _sinkhorn(c, s, iters, eps)
                for v in T.vectorized(HC):
                    PRE[t, v] = g[v]
                _store_post_comb(g, c, POST, COMB, t)

    return mhc_sinkhorn_kernel


@T.macro
def _accumulate(xb, W, wv, acc, sq, k, row0, R, TT):
    # acc[t, r] += sum_v x[t, k + v] * hc_fn[row0 + r, k + v]; sq[t] += sum_v x[t, k + v]^2  (fp32 FMAs)
    for r in T.unroll(R):
        for h in T.unroll(2):
            for v in T.vectorized(4):
                wv[r, 4 * h + v] = W[row0 + r, k + 4 * h + v]
    for t in T.unroll(TT):
        for v in T.unroll(VEC):
            xf = T.cast(xb[t, v], F32)
            sq[t] += xf * xf
            for r in T.unroll(R):
                acc[t * R + r] += xf * wv[r, v]


@T.macro
def _reduce_and_store(acc, sq, WS, bs, tok0, n, lane, rg, R, TT, rows):
    # Butterfly over the 32 lanes of the warp (width 32: also two independent halves of a wave64), then
    # lane 0 stores: storing from lane r would make the compiler index `acc` by lane, in local memory.
    for i in T.unroll(TT * R):
        for o in T.unroll(5):
            acc[i] += T.shfl_xor(acc[i], 16 >> o, 32)
    for i in T.unroll(TT):
        for o in T.unroll(5):
            sq[i] += T.shfl_xor(sq[i], 16 >> o, 32)
    if lane == 0:
        for t in T.unroll(TT):
            if tok0 + t < n:
                for r in T.unroll(R):
                    WS[bs, tok0 + t, rg * R + r] = acc[t * R + r]
                if rg == 0:
                    WS[bs, tok0 + t, rows] = sq[t]


def make_project_kernel(dim: int, rows: int, row_groups: int, token_groups: int, tokens: int, fused: bool):
    """Split-K partials of xf @ hc_fn.T and sum(xf^2) into WS [splits, T, ws_cols(rows)].

    Grid (ceil(T / (token_groups * tokens)), splits), 32 * row_groups * token_groups threads. Split s owns
    units [s * per, min((s + 1) * per, units)) with per = ceil(units / splits); lane l of a warp covers
    K elements [u * 256 + 8 l, + 8) of unit u. fused: X is the residual the previous sublayer read and
    the kernel first forms x_new = post_i * F + sum_j comb[j, i] * X_j for its unit (stream i), stores
    it to XN as bf16 (row group 0 only) and projects the rounded value.
    """
    if rows % row_groups or tokens < 1 or token_groups < 1 or 32 * row_groups * token_groups > 1024:
        raise ValueError(f"project kernel config: ROW_GROUPS must divide {rows} rows and ROW_GROUPS x "
                         f"TOKEN_GROUPS x 32 threads be <= 1024, got ROW_GROUPS={row_groups}, "
                         f"TOKEN_GROUPS={token_groups}, TOKENS={tokens}")
    K = HC * dim
    units = K // UNIT
    R, TT = rows // row_groups, tokens
    BT = token_groups * tokens
    WC = ws_cols(rows)
    threads = 32 * row_groups * token_groups
    n = T.dynamic("n")
    S = T.dynamic("nsplit")

    def warp_coords(bt, tx):
        # (lane, row group, first token of the warp, units per split)
        lane = tx % 32
        rg = (tx // 32) % row_groups
        tok0 = bt * BT + (tx // (32 * row_groups)) * TT
        per = T.ceildiv(units, S)
        return lane, rg, tok0, per

    if not fused:
        @T.prim_func
        def mhc_project_kernel(X: T.Tensor((n, K), BF16), W: T.Tensor((rows, K), F32),
                               WS: T.Tensor((S, n, WC), F32)):
            with T.Kernel(T.ceildiv(n, BT), S, threads=threads) as (bt, bs):
                lane, rg, tok0, per = warp_coords(bt, T.get_thread_binding())
                acc = T.alloc_local((TT * R,), F32)
                sq = T.alloc_local((TT,), F32)
                xb = T.alloc_local((TT, VEC), BF16)
                wv = T.alloc_local((R, VEC), F32)
                for i in T.unroll(TT * R):
                    acc[i] = 0.0
                for i in T.unroll(TT):
                    sq[i] = 0.0
                for u in T.serial(bs * per, T.min(bs * per + per, units)):
                    k = u * UNIT + lane * VEC
                    for t in T.unroll(TT):
                        if tok0 + t < n:
                            for v in T.vectorized(VEC):
                                xb[t, v] = X[tok0 + t, k + v]
                        else:
                            for v in T.vectorized(VEC):
                                xb[t, v] = T.cast(0, BF16)
                    _accumulate(xb, W, wv, acc, sq, k, rg * R, R, TT)
                _reduce_and_store(acc, sq, WS, bs, tok0, n, lane, rg, R, TT, rows)

        return mhc_project_kernel

    @T.prim_func
    def mhc_post_project_kernel(F: T.Tensor((n, dim), BF16), X: T.Tensor((n, K), BF16),
                                POST: T.Tensor((n, HC), F32), COMB: T.Tensor((n, HC, HC), F32),
                                W: T.Tensor((rows, K), F32), XN: T.Tensor((n, K), BF16),
                                WS: T.Tensor((S, n, WC), F32)):
        with T.Kernel(T.ceildiv(n, BT), S, threads=threads) as (bt, bs):
            lane, rg, tok0, per = warp_coords(bt, T.get_thread_binding())
            acc = T.alloc_local((TT * R,), F32)
            sq = T.alloc_local((TT,), F32)
            xb = T.alloc_local((TT, VEC), BF16)
            wv = T.alloc_local((R, VEC), F32)
            fb = T.alloc_local((VEC,), BF16)
            sb = T.alloc_local((HC, VEC), BF16)
            gc = T.alloc_local((HC + 1,), F32)
            for i in T.unroll(TT * R):
                acc[i] = 0.0
            for i in T.unroll(TT):
                sq[i] = 0.0
            for u in T.serial(bs * per, T.min(bs * per + per, units)):
                k = u * UNIT + lane * VEC
                stream = (u * UNIT) // dim
                d = k - stream * dim
                for t in T.unroll(TT):
                    tok = tok0 + t
                    if tok < n:
                        # x_new[i, d:d+8] = post_i * F + sum_j comb[j, i] * X_j   (i = this unit's stream)
                        gc[HC] = POST[tok, stream]
                        for j in T.unroll(HC):
                            gc[j] = COMB[tok, j, stream]
                        for v in T.vectorized(VEC):
                            fb[v] = F[tok, d + v]
                        for j in T.unroll(HC):
                            for v in T.vectorized(VEC):
                                sb[j, v] = X[tok, j * dim + d + v]
                        for v in T.unroll(VEC):
                            mixed = (gc[0] * T.cast(sb[0, v], F32) + gc[1] * T.cast(sb[1, v], F32)
                                     + gc[2] * T.cast(sb[2, v], F32) + gc[3] * T.cast(sb[3, v], F32))
                            xb[t, v] = T.cast(gc[HC] * T.cast(fb[v], F32) + mixed, BF16)
                        if rg == 0:
                            for v in T.vectorized(VEC):
                                XN[tok, k + v] = xb[t, v]
                    else:
                        for v in T.vectorized(VEC):
                            xb[t, v] = T.cast(0, BF16)
                _accumulate(xb, W, wv, acc, sq, k, rg * R, R, TT)
            _reduce_and_store(acc, sq, WS, bs, tok0, n, lane, rg, R, TT, rows)

    return mhc_post_project_kernel


def make_finalize_kernel(dim: int, threads: int, head: bool):
    """Reduce the projection partials, gates (+ Sinkhorn) and y = sum_i pre_i * x_i.

    Grid (T, ceil(dim / (8 * threads))). Every block of a token loads its 8 columns of the 4 streams, reduces
    the splits (fixed order: split
    s goes to accumulator (s // G) % 4 of warp s % G, G = threads / 32; then accumulators, then warps)
    and forms the 4 pre gates; block 0 also runs the Sinkhorn on thread 0 and writes post and comb.
    """
    _check_threads(threads)
    rows = HC if head else MIX
    K = HC * dim
    WC = ws_cols(rows)
    G = threads // 32
    BLOCK_D = threads * VEC
    n = T.dynamic("n")
    S = T.dynamic("nsplit")

    @T.macro
    def reduce_splits(WS, t, tx, red, tot, part):
        # tot[c] = sum_s WS[s, t, c] for c <= rows (mixes, then the sum of squares)
        col = tx % 32
        grp = tx // 32
        for j in T.unroll(4):
            part[j] = 0.0
        for it in T.serial(T.ceildiv(S, 4 * G)):
            for j in T.unroll(4):
                if (it * 4 + j) * G + grp < S and col <= rows:
                    part[j] += WS[(it * 4 + j) * G + grp, t, col]
        red[grp, col] = (part[0] + part[1]) + (part[2] + part[3])
        T.sync_threads()
        if tx < 32:
            part[0] = 0.0
            for w in T.unroll(G):
                part[0] += red[w, tx]
            tot[tx] = part[0]
        T.sync_threads()

    @T.macro
    def load_x(X, t, bd, tx, sb):
        # Issued before the split reduction so that its HBM latency overlaps the two barriers.
        d0 = bd * BLOCK_D + tx * VEC
        if d0 < dim:
            for i in T.unroll(HC):
                for v in T.vectorized(VEC):
                    sb[i, v] = X[t, i * dim + d0 + v]

    @T.macro
    def mixes_and_y(Y, scale, base, t, bd, tx, tot, m, g, sb, acc, eps, norm_eps):
        # mixes = (xf @ hc_fn.T) * rsqrt(mean(xf^2) + norm_eps); y = sum_i pre_i * X[:, i, :] -> bf16
        m[rows] = T.rsqrt(tot[rows] / K + norm_eps)
        for i in T.unroll(rows):
            m[i] = tot[i] * m[rows]
        _pre_gates(m, scale, base, g, eps)
        d0 = bd * BLOCK_D + tx * VEC
        if d0 < dim:
            for v in T.unroll(VEC):
                acc[v] = 0.0
            for i in T.unroll(HC):
                for v in T.unroll(VEC):
                    acc[v] += g[i] * T.cast(sb[i, v], F32)
            for v in T.unroll(VEC):
                sb[0, v] = T.cast(acc[v], BF16)
            for v in T.vectorized(VEC):
                Y[t, d0 + v] = sb[0, v]

    if head:
        @T.prim_func
        def mhc_head_finalize_kernel(X: T.Tensor((n, K), BF16), WS: T.Tensor((S, n, WC), F32),
                                     scale: T.Tensor((1,), F32), base: T.Tensor((HC,), F32),
                                     Y: T.Tensor((n, dim), BF16), eps: T.float32, norm_eps: T.float32):
            with T.Kernel(n, T.ceildiv(dim, BLOCK_D), threads=threads) as (t, bd):
                tx = T.get_thread_binding()
                red = T.alloc_shared((G, 32), F32)
                tot = T.alloc_shared((32,), F32)
                part = T.alloc_local((4,), F32)
                m = T.alloc_local((rows + 1,), F32)
                g = T.alloc_local((HC,), F32)
                sb = T.alloc_local((HC, VEC), BF16)
                acc = T.alloc_local((VEC,), F32)
                load_x(X, t, bd, tx, sb)
                reduce_splits(WS, t, tx, red, tot, part)
                mixes_and_y(Y, scale, base, t, bd, tx, tot, m, g, sb, acc, eps, norm_eps)

        return mhc_head_finalize_kernel

    @T.prim_func
    def mhc_pre_finalize_kernel(X: T.Tensor((n, K), BF16), WS: T.Tensor((S, n, WC), F32),
                                scale: T.Tensor((3,), F32), base: T.Tensor((MIX,), F32),
                                Y: T.Tensor((n, dim), BF16), POST: T.Tensor((n, HC), F32),
                                COMB: T.Tensor((n, HC, HC), F32), iters: T.int32, eps: T.float32,
                                norm_eps: T.float32):
        with T.Kernel(n, T.ceildiv(dim, BLOCK_D), threads=threads) as (t, bd):
            tx = T.get_thread_binding()
            red = T.alloc_shared((G, 32), F32)
            tot = T.alloc_shared((32,), F32)
            part = T.alloc_local((4,), F32)
            m = T.alloc_local((rows + 1,), F32)
            g = T.alloc_local((2 * HC,), F32)
            c = T.alloc_local((HC * HC,), F32)
            s = T.alloc_local((HC,), F32)
            sb = T.alloc_local((HC, VEC), BF16)
            acc = T.alloc_local((VEC,), F32)
            load_x(X, t, bd, tx, sb)
            reduce_splits(WS, t, tx, red, tot, part)
            mixes_and_y(Y, scale, base, t, bd, tx, tot, m, g, sb, acc, eps, norm_eps)
            if bd == 0 and tx == 0:
                _post_gates_and_logits(m, scale, base, g, c)
                _sinkhorn(c, s, iters, eps)
                _store_post_comb(g, c, POST, COMB, t)

    return mhc_pre_finalize_kernel


def make_post_kernel(dim: int, threads: int):
    """mhc_post: grid (T, ceil(dim / (8 * threads))); thread: 8 columns of all 4 destination streams."""
    _check_threads(threads)
    K = HC * dim
    BLOCK_D = threads * VEC
    n = T.dynamic("n")

    @T.prim_func
    def mhc_post_kernel(F: T.Tensor((n, dim), BF16), X: T.Tensor((n, K), BF16), POST: T.Tensor((n, HC), F32),
                        COMB: T.Tensor((n, HC, HC), F32), OUT: T.Tensor((n, K), BF16)):
        with T.Kernel(n, T.ceildiv(dim, BLOCK_D), threads=threads) as (t, bd):
            d0 = bd * BLOCK_D + T.get_thread_binding() * VEC
            g = T.alloc_local((HC + HC * HC,), F32)
            fb = T.alloc_local((VEC,), BF16)
            sb = T.alloc_local((HC, VEC), BF16)
            ob = T.alloc_local((VEC,), BF16)
            if d0 < dim:
                for v in T.vectorized(HC):
                    g[v] = POST[t, v]
                for i in T.unroll(HC):
                    for v in T.vectorized(HC):
                        g[HC + 4 * i + v] = COMB[t, i, v]
                for v in T.vectorized(VEC):
                    fb[v] = F[t, d0 + v]
                for i in T.unroll(HC):
                    for v in T.vectorized(VEC):
                        sb[i, v] = X[t, i * dim + d0 + v]
                for j in T.unroll(HC):
                    # X'_j = post_j * F + sum_i comb[i, j] * X_i
                    for v in T.unroll(VEC):
                        mixed = (g[HC + j] * T.cast(sb[0, v], F32) + g[HC + 4 + j] * T.cast(sb[1, v], F32)
                                 + g[HC + 8 + j] * T.cast(sb[2, v], F32) + g[HC + 12 + j] * T.cast(sb[3, v], F32))
                        ob[v] = T.cast(g[j] * T.cast(fb[v], F32) + mixed, BF16)
                    for v in T.vectorized(VEC):
                        OUT[t, j * dim + d0 + v] = ob[v]

    return mhc_post_kernel


_MAKERS = {"sinkhorn": make_sinkhorn_kernel, "project": make_project_kernel, "finalize": make_finalize_kernel,
           "post": make_post_kernel}


@functools.lru_cache(maxsize=None)
def _compiled(kind: str, target: str, *params):
    return tilelang.compile(_MAKERS[kind](*params), target=target)


def _config(op: str, t: torch.Tensor) -> dict:
    return dispatch.config(dispatch.get(op, "tilelang"), platform.device_info(t))


def _gates_out(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((n, HC), dtype=torch.float32, device=device),
            torch.empty((n, HC, HC), dtype=torch.float32, device=device))


def _project_args(cfg: dict, dim: int, rows: int, fused: bool) -> tuple:
    return (dim, rows, cfg["ROW_GROUPS"], cfg["TOKEN_GROUPS"], cfg["TOKENS"], fused)


def _workspace(n: int, dim: int, rows: int, cfg: dict, device) -> torch.Tensor:
    splits = split_count(n, dim, cfg["TOKEN_GROUPS"] * cfg["TOKENS"], cfg["TARGET_BLOCKS"])
    return torch.empty((splits, n, ws_cols(rows)), dtype=torch.float32, device=device)


def mhc_sinkhorn(mixes, hc_scale, hc_base, hc_mult=4, iters=20, eps=1e-6):
    n = mixes.shape[0]
    pre = torch.empty((n, HC), dtype=torch.float32, device=mixes.device)
    post, comb = _gates_out(n, mixes.device)
    if n == 0:
        return pre, post, comb
    cfg = _config("mhc_sinkhorn", mixes)
    kernel = _compiled("sinkhorn", platform.tilelang_target(mixes), cfg["threads"])
    kernel(mixes, hc_scale, hc_base, pre, post, comb, iters, float(eps))
    return pre, post, comb


def mhc_pre(x, hc_fn, hc_scale, hc_base, iters=20, eps=1e-6, norm_eps=1e-6):
    n, _, dim = x.shape
    y = torch.empty((n, dim), dtype=torch.bfloat16, device=x.device)
    post, comb = _gates_out(n, x.device)
    if n == 0:
        return y, post, comb
    cfg, target = _config("mhc_pre", x), platform.tilelang_target(x)
    xf = x.view(n, HC * dim)
    ws = _workspace(n, dim, MIX, cfg, x.device)
    _compiled("project", target, *_project_args(cfg, dim, MIX, False))(xf, hc_fn, ws)
    _compiled("finalize", target, dim, cfg["threads"], False)(
        xf, ws, hc_scale, hc_base, y, post, comb, iters, float(eps), float(norm_eps))
    return y, post, comb


def mhc_head(x, hc_fn, hc_scale, hc_base, eps=1e-6, norm_eps=1e-6):
    n, _, dim = x.shape
    y = torch.empty((n, dim), dtype=torch.bfloat16, device=x.device)
    if n == 0:
        return y
    cfg, target = _config("mhc_head", x), platform.tilelang_target(x)
    xf = x.view(n, HC * dim)
    ws = _workspace(n, dim, HC, cfg, x.device)
    _compiled("project", target, *_project_args(cfg, dim, HC, False))(xf, hc_fn, ws)
    _compiled("finalize", target, dim, cfg["threads"], True)(xf, ws, hc_scale, hc_base, y, float(eps), float(norm_eps))
    return y


def mhc_post(f, x, post, comb):
    n, _, dim = x.shape
    out = torch.empty((n, HC, dim), dtype=torch.bfloat16, device=x.device)
    if n == 0:
        return out
    cfg = _config("mhc_post", x)
    _compiled("post", platform.tilelang_target(x), dim, cfg["threads"])(f, x.view(n, HC * dim), post, comb, out.view(n, HC * dim))
    return out


def mhc_post_pre(f, x, post, comb, hc_fn, hc_scale, hc_base, iters=20, eps=1e-6, norm_eps=1e-6):
    n, _, dim = x.shape
    x_new = torch.empty((n, HC, dim), dtype=torch.bfloat16, device=x.device)
    y = torch.empty((n, dim), dtype=torch.bfloat16, device=x.device)
    post_new, comb_new = _gates_out(n, x.device)
    if n == 0:
        return x_new, y, post_new, comb_new
    cfg, target = _config("mhc_post_pre", x), platform.tilelang_target(x)
    xn = x_new.view(n, HC * dim)
    ws = _workspace(n, dim, MIX, cfg, x.device)
    _compiled("project", target, *_project_args(cfg, dim, MIX, True))(
        f, x.view(n, HC * dim), post, comb, hc_fn, xn, ws)
    _compiled("finalize", target, dim, cfg["threads"], False)(
        xn, ws, hc_scale, hc_base, y, post_new, comb_new, iters, float(eps), float(norm_eps))
    return x_new, y, post_new, comb_new


def _tokens_reason(n: int) -> str | None:
    if n > MAX_TOKENS:
        return f"{n} tokens exceed the int32 token count of the TileLang kernels ({MAX_TOKENS})"
    return None


def _iters_reason(iters) -> str | None:
    if iters > MAX_ITERS:
        return f"iters {iters} exceeds the int32 kernel argument ({MAX_ITERS})"
    return None


def _aligned_reason(**tensors) -> str | None:
    """TileLang emits 16-byte vector loads without an alignment check (Triton specialises instead)."""
    for name, t in tensors.items():
        if t.data_ptr() % 16:
            return (f"{name}: the TileLang kernels use 16-byte loads, data_ptr {t.data_ptr():#x} is not "
                    f"16-byte aligned")
    return None


def supports_mhc_sinkhorn(mixes, hc_scale, hc_base, hc_mult=4, iters=20, eps=1e-6) -> str | None:
    return (shared.supports_mhc_sinkhorn(mixes, hc_scale, hc_base, hc_mult, iters, eps)
            or _tokens_reason(mixes.shape[0]) or _iters_reason(iters) or _aligned_reason(mixes=mixes))


def supports_mhc_pre(x, hc_fn, hc_scale, hc_base, iters=20, eps=1e-6, norm_eps=1e-6) -> str | None:
    return (shared.supports_mhc_pre(x, hc_fn, hc_scale, hc_base, iters, eps, norm_eps)
            or _tokens_reason(x.shape[0]) or _iters_reason(iters) or _aligned_reason(x=x, hc_fn=hc_fn))


def supports_mhc_head(x, hc_fn, hc_scale, hc_base, eps=1e-6, norm_eps=1e-6) -> str | None:
    return (shared.supports_mhc_head(x, hc_fn, hc_scale, hc_base, eps, norm_eps)
            or _tokens_reason(x.shape[0]) or _aligned_reason(x=x, hc_fn=hc_fn))


def supports_mhc_post(f, x, post, comb) -> str | None:
    return (shared.supports_mhc_post(f, x, post, comb)
            or _tokens_reason(x.shape[0]) or _aligned_reason(f=f, x=x, post=post, comb=comb))


def supports_mhc_post_pre(f, x, post, comb, hc_fn, hc_scale, hc_base, iters=20, eps=1e-6,
                          norm_eps=1e-6) -> str | None:
    return (shared.supports_mhc_post_pre(f, x, post, comb, hc_fn, hc_scale, hc_base, iters, eps, norm_eps)
            or _tokens_reason(x.shape[0]) or _iters_reason(iters)
            or _aligned_reason(f=f, x=x, post=post, comb=comb, hc_fn=hc_fn))


CODEGEN_DIMS = (FLASH_DIM, PRO_DIM)


def _codegen_config(op: str) -> dict:
    return dict(dispatch.get(op, "tilelang").defaults)


def codegen_mhc_sinkhorn(target) -> list:
    from dsv4_kernels.codegen import TileLangKernel
    cfg = _codegen_config("mhc_sinkhorn")
    return [TileLangKernel(make_sinkhorn_kernel(cfg["threads"]), label="sinkhorn")]


def _two_launch_specs(op: str, rows: int, fused: bool, head: bool) -> list:
    from dsv4_kernels.codegen import TileLangKernel
    cfg = _codegen_config(op)
    specs = []
    for dim in CODEGEN_DIMS:
        specs.append(TileLangKernel(make_project_kernel(*_project_args(cfg, dim, rows, fused)),
                                    label=f"{'post_project' if fused else 'project'}-dim{dim}"))
        specs.append(TileLangKernel(make_finalize_kernel(dim, cfg["threads"], head), label=f"finalize-dim{dim}"))
    return specs


def codegen_mhc_pre(target) -> list:
    return _two_launch_specs("mhc_pre", MIX, fused=False, head=False)


def codegen_mhc_head(target) -> list:
    return _two_launch_specs("mhc_head", HC, fused=False, head=True)


def codegen_mhc_post_pre(target) -> list:
    return _two_launch_specs("mhc_post_pre", MIX, fused=True, head=False)


def codegen_mhc_post(target) -> list:
    from dsv4_kernels.codegen import TileLangKernel
    cfg = _codegen_config("mhc_post")
    return [TileLangKernel(make_post_kernel(dim, cfg["threads"]), label=f"post-dim{dim}") for dim in CODEGEN_DIMS]
