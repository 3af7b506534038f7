"""mHC kernels in TileLang's Ascend dialect (Ascend 950, dav-3510): built from mhc_plan's tiling.

- `make_mix_kernel` (Cube): partial projections P[s, t, :] = xf[t, K_s] @ parts[:, K_s].T, three bf16
  GEMMs (hi, mid, lo of hc_fn) per 256-wide K step into one fp32 L0C tile; L0C is drained to the two
  Vector cores' UB and stored. Work items: token blocks x K splits, strided over the blocks.
- `make_gates_kernel` (Vector): per token block, the splits summed in order, the sum of squares over the
  4 streams (LANES partial sums per token, then one in-order sum), mixes = proj * rsqrt(sumsq / K +
  norm_eps), the gates and (not at the head) the Sinkhorn; writes pre, post, comb.
- `make_sinkhorn_kernel` (Vector): the same gates + Sinkhorn from given mixes.
- `make_y_kernel` (Vector): y = sum_i pre_i x_i per (token block, dim tile).
- `make_post_kernel` (Vector): X'_j = post_j F + sum_i comb[i, j] X_i per (token block, dim tile).
All Vector math is fp32 in SIMT vector functions; one bf16 rounding per stored element. The kernels are
specialised per token count (the copy engine clips the last token tile; rows past T are never stored).
"""
import tilelang.ascend.language as T

from dsv4_kernels.backends.ascend.kernels import mhc_plan as plan

HC, MIX = plan.HC, plan.MIX
BF16, F32 = "bfloat16", "float32"


def make_mix_kernel(n: int, dim: int, rows: int, blocks: int = plan.BLOCKS):
    K, BK, npad, m = HC * dim, plan.CUBE_K, plan.padded_rows(rows), plan.cube_m(n)
    splits, per = plan.split_k(n, dim, blocks)
    items = plan.cdiv(n, m) * splits

    @T.prim_func
    def mhc_mix_kernel(X: T.Tensor((n, K), BF16), W: T.Tensor((3 * npad, K), BF16),
                       P: T.Tensor((splits, n, npad), F32)):
        with T.Kernel(blocks) as bx:
            x_l1 = T.alloc_l1((m, BK), BF16)
            w0 = T.alloc_l1((npad, BK), BF16)
            w1 = T.alloc_l1((npad, BK), BF16)
            w2 = T.alloc_l1((npad, BK), BF16)
            acc = T.alloc_l0c((m, npad), F32)
            acc_ub = T.alloc_shared((m // 2, npad), F32)
            for it in T.serial(T.ceildiv(items - bx, blocks)):
                item = it * blocks + bx
                t0, k0 = (item // splits) * m, (item % splits) * per * BK
                for kk in T.Pipelined(per, num_stages=2):
                    T.copy(X[t0, k0 + kk * BK], x_l1)
                    T.copy(W[0, k0 + kk * BK], w0)
                    T.copy(W[npad, k0 + kk * BK], w1)
                    T.copy(W[2 * npad, k0 + kk * BK], w2)
                    T.gemm(x_l1, w2, acc, transpose_B=True, clear_accum=(kk == 0))  # lo first: small terms
                    T.gemm(x_l1, w1, acc, transpose_B=True)
                    T.gemm(x_l1, w0, acc, transpose_B=True)
                T.dual_copy(acc, acc_ub)
                T.dual_copy(acc_ub, P[item % splits, t0:t0 + m, 0:npad])

    return mhc_mix_kernel


@T.macro
def _gates(z, gate, comb, t, eps):
    """z[t, 0:24] = mixes * scale + base: pre = sigmoid + eps, post = 2 sigmoid, comb = the row softmax
    of the 16 logits + eps (row-major, row i = source stream)."""
    for i in T.serial(HC):
        gate[t, i] = 1.0 / (1.0 + T.exp(-z[t, i])) + eps
        gate[t, HC + i] = 2.0 / (1.0 + T.exp(-z[t, HC + i]))
    for i in T.serial(HC):
        mx = T.alloc_var(F32)
        mx = z[t, 2 * HC + 4 * i]
        for j in T.serial(1, HC):
            mx = T.max(mx, z[t, 2 * HC + 4 * i + j])
        s = T.alloc_var(F32)
        s = 0.0
        for j in T.serial(HC):
            comb[t, 4 * i + j] = T.exp(z[t, 2 * HC + 4 * i + j] - mx)
            s += comb[t, 4 * i + j]
        for j in T.serial(HC):
            comb[t, 4 * i + j] = comb[t, 4 * i + j] / s + eps


@T.macro
def _columns(comb, t, eps):
    for j in T.serial(HC):
        s = T.alloc_var(F32)
        s = comb[t, j] + comb[t, 4 + j] + comb[t, 8 + j] + comb[t, 12 + j] + eps
        for i in T.serial(HC):
            comb[t, 4 * i + j] = comb[t, 4 * i + j] / s


@T.macro
def _rows(comb, t, eps):
    for i in T.serial(HC):
        s = T.alloc_var(F32)
        s = comb[t, 4 * i] + comb[t, 4 * i + 1] + comb[t, 4 * i + 2] + comb[t, 4 * i + 3] + eps
        for j in T.serial(HC):
            comb[t, 4 * i + j] = comb[t, 4 * i + j] / s


@T.macro
def _sinkhorn(comb, t, iters, eps):
    """SPEC 4: after the softmax, one column step, then iters - 1 (row, column) steps."""
    _columns(comb, t, eps)
    for _ in T.serial(iters - 1):
        _rows(comb, t, eps)
        _columns(comb, t, eps)


def make_sinkhorn_kernel(n: int, iters: int, eps: float, blocks: int = plan.BLOCKS):
    bt = plan.VEC_TOKENS["sinkhorn"]
    tiles = plan.cdiv(n, bt)

    @T.prim_func
    def mhc_sinkhorn_kernel(M: T.Tensor((n, MIX), F32), PAR: T.Tensor((32,), F32), G: T.Tensor((n, 2 * HC), F32),
                            C: T.Tensor((n, HC * HC), F32)):
        with T.Kernel(blocks) as bx:
            m_ub = T.alloc_shared((bt, MIX), F32)
            par = T.alloc_shared((32,), F32)
            gate = T.alloc_shared((bt, 2 * HC), F32)
            comb = T.alloc_shared((bt, HC * HC), F32)
            T.copy(PAR, par)
            for it in T.serial(T.ceildiv(tiles - bx, blocks)):
                t0 = (it * blocks + bx) * bt
                T.copy(M[t0, 0], m_ub)
                with T.SimtVF(threads=bt):
                    for t in T.Parallel(bt):
                        for r in T.serial(MIX):  # z = mixes * scale[part] + base, in place
                            m_ub[t, r] = m_ub[t, r] * par[T.min(r // HC, 2)] + par[3 + r]
                        _gates(m_ub, gate, comb, t, eps)
                        _sinkhorn(comb, t, iters, eps)
                T.copy(gate, G[t0:t0 + bt, 0:2 * HC])
                T.copy(comb, C[t0:t0 + bt, 0:HC * HC])

    return mhc_sinkhorn_kernel


def make_gates_kernel(n: int, dim: int, rows: int, splits: int, iters: int, eps: float, norm_eps: float,
                      blocks: int = plan.BLOCKS):
    """rows 24: pre, post, comb (G [n, 8], C [n, 16]); rows 4 (the head): pre only (G [n, 8], first 4)."""
    K, DT, L, bt, npad = HC * dim, plan.DIM_TILE, plan.LANES, plan.VEC_TOKENS["gates"], plan.padded_rows(rows)
    tiles, steps, head = plan.cdiv(n, bt), HC * plan.DIM_TILE // plan.LANES, rows == HC

    @T.prim_func
    def mhc_gates_kernel(X: T.Tensor((n * HC, dim), BF16), P: T.Tensor((splits, n, npad), F32),
                         PAR: T.Tensor((32,), F32), G: T.Tensor((n, 2 * HC), F32), C: T.Tensor((n, HC * HC), F32)):
        with T.Kernel(blocks) as bx:
            x_ub = T.alloc_shared((HC * bt, DT), BF16)
            part = T.alloc_shared((bt, L), F32)
            proj = T.alloc_shared((bt, npad), F32)
            p_ub = T.alloc_shared((bt, npad), F32)
            par = T.alloc_shared((32,), F32)
            gate = T.alloc_shared((bt, 2 * HC), F32)
            comb = T.alloc_shared((bt, HC * HC), F32)
            T.copy(PAR, par)
            for it in T.serial(T.ceildiv(tiles - bx, blocks)):
                t0 = (it * blocks + bx) * bt
                with T.SimtVF(threads=bt * L):
                    for t, lane in T.Parallel(bt, L):
                        part[t, lane] = 0.0
                for s in T.serial(splits):  # the split-K partials, summed in split order
                    T.copy(P[s, t0:t0 + bt, 0:npad], p_ub)
                    with T.SimtVF(threads=bt * npad):
                        for t, r in T.Parallel(bt, npad):
                            proj[t, r] = T.if_then_else(s == 0, p_ub[t, r], proj[t, r] + p_ub[t, r])
                for dd in T.Pipelined(dim // DT, num_stages=2):  # sum of squares: lane l owns columns l mod L
                    T.copy(X[HC * t0, dd * DT], x_ub)
                    with T.SimtVF(threads=bt * L):
                        for t, lane in T.Parallel(bt, L):
                            acc = T.alloc_var(F32)
                            acc = part[t, lane]
                            for c in T.serial(steps):
                                v = T.Cast(F32, x_ub[HC * t + c % HC, (c // HC) * L + lane])
                                acc += v * v
                            part[t, lane] = acc
                with T.SimtVF(threads=bt):
                    for t in T.Parallel(bt):
                        sq = T.alloc_var(F32)
                        sq = 0.0
                        for lane in T.serial(L):
                            sq += part[t, lane]
                        inv = T.rsqrt(sq / K + norm_eps)
                        for r in T.serial(rows):  # z = mixes * scale[part] + base, in place
                            proj[t, r] = proj[t, r] * inv * par[T.min(r // HC, 2)] + par[3 + r]
                        if head:
                            for i in T.serial(HC):
                                gate[t, i] = 1.0 / (1.0 + T.exp(-proj[t, i])) + eps
                        else:
                            _gates(proj, gate, comb, t, eps)
                            _sinkhorn(comb, t, iters, eps)
                T.copy(gate, G[t0:t0 + bt, 0:2 * HC])
                if not head:
                    T.copy(comb, C[t0:t0 + bt, 0:HC * HC])

    return mhc_gates_kernel


def make_y_kernel(n: int, dim: int, blocks: int = plan.BLOCKS):
    DT, bt = plan.DIM_TILE, plan.VEC_TOKENS["y"]
    dtiles = dim // DT
    items = plan.cdiv(n, bt) * dtiles

    @T.prim_func
    def mhc_y_kernel(X: T.Tensor((n * HC, dim), BF16), G: T.Tensor((n, 2 * HC), F32), Y: T.Tensor((n, dim), BF16)):
        with T.Kernel(blocks) as bx:
            x_ub = T.alloc_shared((HC * bt, DT), BF16)
            pre = T.alloc_shared((bt, HC), F32)
            y_ub = T.alloc_shared((bt, DT), BF16)
            for it in T.Pipelined(T.ceildiv(items - bx, blocks), num_stages=2):
                item = it * blocks + bx
                t0, d0 = (item // dtiles) * bt, (item % dtiles) * DT
                T.copy(G[t0:t0 + bt, 0:HC], pre)
                T.copy(X[HC * t0, d0], x_ub)
                with T.SimtVF(threads=bt * 128):
                    for t, d in T.Parallel(bt, DT):
                        y_ub[t, d] = T.Cast(BF16, pre[t, 0] * T.Cast(F32, x_ub[HC * t, d])
                                            + pre[t, 1] * T.Cast(F32, x_ub[HC * t + 1, d])
                                            + pre[t, 2] * T.Cast(F32, x_ub[HC * t + 2, d])
                                            + pre[t, 3] * T.Cast(F32, x_ub[HC * t + 3, d]))
                T.copy(y_ub, Y[t0:t0 + bt, d0:d0 + DT])

    return mhc_y_kernel


def make_post_kernel(n: int, dim: int, blocks: int = plan.BLOCKS):
    DT, bt = plan.DIM_TILE, plan.VEC_TOKENS["post"]
    dtiles = dim // DT
    items = plan.cdiv(n, bt) * dtiles

    @T.prim_func
    def mhc_post_kernel(F: T.Tensor((n, dim), BF16), X: T.Tensor((n * HC, dim), BF16), PG: T.Tensor((n, HC), F32),
                        CB: T.Tensor((n, HC * HC), F32), O: T.Tensor((n * HC, dim), BF16)):
        with T.Kernel(blocks) as bx:
            f_ub = T.alloc_shared((bt, DT), BF16)
            x_ub = T.alloc_shared((HC * bt, DT), BF16)
            g_ub = T.alloc_shared((bt, HC), F32)
            c_ub = T.alloc_shared((bt, HC * HC), F32)
            o_ub = T.alloc_shared((HC * bt, DT), BF16)
            for it in T.Pipelined(T.ceildiv(items - bx, blocks), num_stages=2):
                item = it * blocks + bx
                t0, d0 = (item // dtiles) * bt, (item % dtiles) * DT
                T.copy(PG[t0:t0 + bt, 0:HC], g_ub)
                T.copy(CB[t0:t0 + bt, 0:HC * HC], c_ub)
                T.copy(F[t0, d0], f_ub)
                T.copy(X[HC * t0, d0], x_ub)
                with T.SimtVF(threads=bt * 128):
                    for r, d in T.Parallel(HC * bt, DT):  # r = 4 * token + destination stream j
                        t, j = r // HC, r % HC
                        o_ub[r, d] = T.Cast(BF16, g_ub[t, j] * T.Cast(F32, f_ub[t, d])
                                            + c_ub[t, j] * T.Cast(F32, x_ub[HC * t, d])
                                            + c_ub[t, 4 + j] * T.Cast(F32, x_ub[HC * t + 1, d])
                                            + c_ub[t, 8 + j] * T.Cast(F32, x_ub[HC * t + 2, d])
                                            + c_ub[t, 12 + j] * T.Cast(F32, x_ub[HC * t + 3, d]))
                T.copy(o_ub, O[HC * t0:HC * t0 + HC * bt, d0:d0 + DT])

    return mhc_post_kernel
