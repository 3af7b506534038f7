"""A numpy replay of the Ascend mHC kernels' tile decomposition (mhc_plan + the loops of mhc_kernels.py).

Not the Ascend code: the same work items, token tiles (short last tile, rows past T never stored), K
splits and steps, bf16 parts of hc_fn, lane-strided sum of squares, in-order split and lane sums, and the
gates / Sinkhorn steps, in fp32. tests/mhc/test_mhc_ascend.py compares it with the reference, so a wrong
decomposition in the plan (a tile that misses or repeats columns, a wrong tail, a dropped split) shows on
the CPU. Each store asserts it stays inside its tile, as the copy engine's clip does.
"""
from __future__ import annotations

import numpy as np
import torch

from dsv4_kernels.backends.ascend.kernels import mhc_plan as plan

HC, MIX = plan.HC, plan.MIX
f32 = np.float32


def _bf16(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=f32)).to(torch.bfloat16).float().numpy()


def parts(hc_fn: np.ndarray) -> np.ndarray:
    """[3, padded rows, K]: hi, mid, lo (the wrapper's split_parts), rows past `rows` zero."""
    rows, K = hc_fn.shape
    out = np.zeros((3, plan.padded_rows(rows), K), f32)
    rest = hc_fn.astype(f32)
    for p in range(3):
        out[p, :rows] = _bf16(rest)
        rest = (rest - out[p, :rows]).astype(f32)
    return out


def mix(x2: np.ndarray, w: np.ndarray, dim: int) -> np.ndarray:
    """The Cube kernel: P[s, t, :] over the plan's work items and K steps (lo, mid, hi per step)."""
    n = x2.shape[0]
    m, BK = plan.cube_m(n), plan.CUBE_K
    splits, per = plan.split_k(n, dim)
    P = np.full((splits, n, w.shape[1]), np.nan, f32)
    items = plan.cdiv(n, m) * splits
    for block in plan.block_items(items):
        for item in block:
            t0, s = (item // splits) * m, item % splits
            k0 = s * per * BK
            xt = np.zeros((m, BK * per), f32)
            rows = x2[t0:t0 + m, k0:k0 + per * BK]  # the copy engine clips rows past T; L1 is zero-filled
            xt[:rows.shape[0]] = rows
            acc = np.zeros((m, w.shape[1]), f32)
            for kk in range(per):
                xs = xt[:, kk * BK:(kk + 1) * BK]
                for p in (2, 1, 0):
                    acc = (acc + xs @ w[p][:, k0 + kk * BK:k0 + (kk + 1) * BK].T).astype(f32)
            valid = min(m, n - t0)
            assert valid > 0, (item, t0, n)
            P[s, t0:t0 + valid] = acc[:valid]
    return P


def _sinkhorn(comb: np.ndarray, iters: int, eps: float) -> np.ndarray:
    c = comb.reshape(-1, HC, HC)
    c = (c / (c.sum(axis=1, keepdims=True) + f32(eps))).astype(f32)
    for _ in range(iters - 1):
        c = (c / (c.sum(axis=2, keepdims=True) + f32(eps))).astype(f32)
        c = (c / (c.sum(axis=1, keepdims=True) + f32(eps))).astype(f32)
    return c


def gates_from_z(z: np.ndarray, iters: int, eps: float, head: bool):
    sig = (f32(1) / (f32(1) + np.exp(-z[:, :2 * HC]))).astype(f32)
    pre = (sig[:, :HC] + f32(eps)).astype(f32)
    if head:
        return pre, None, None
    post = (2 * sig[:, HC:2 * HC]).astype(f32)
    logits = z[:, 2 * HC:MIX].reshape(-1, HC, HC)
    e = np.exp(logits - logits.max(axis=2, keepdims=True)).astype(f32)
    comb = (e / e.sum(axis=2, keepdims=True) + f32(eps)).astype(f32)
    return pre, post, _sinkhorn(comb, iters, eps)


def _z(mixes: np.ndarray, scale: np.ndarray, base: np.ndarray) -> np.ndarray:
    rows = mixes.shape[1]
    s = np.array([scale[min(r // HC, 2)] for r in range(rows)], f32)
    return (mixes * s + base[:rows]).astype(f32)


def sumsq(x4: np.ndarray, t0: int, bt: int, dim: int) -> np.ndarray:
    """The gates kernel's sum of squares of one token tile: lane l of token t adds, per dim tile and step
    c, x[4t + c % 4, dd * DT + (c // 4) * L + l]^2; then the lanes are summed in order."""
    DT, L = plan.DIM_TILE, plan.LANES
    steps = plan.trips("gates", 1, dim)["lane_steps"]
    part = np.zeros((bt, L), f32)
    seen = np.zeros((bt * HC, dim), np.int32)
    for dd in range(dim // DT):
        tile = np.zeros((HC * bt, DT), f32)
        rows = x4[HC * t0:HC * (t0 + bt), dd * DT:(dd + 1) * DT]
        tile[:rows.shape[0]] = rows
        for c in range(steps):
            cols = (c // HC) * L + np.arange(L)
            v = tile[HC * np.arange(bt)[:, None] + c % HC, cols[None, :]]
            part = (part + v * v).astype(f32)
            np.add.at(seen, (HC * np.arange(bt)[:, None] + c % HC, dd * DT + cols[None, :]), 1)
    assert (seen == 1).all(), "the lanes do not cover every element of the tile exactly once"
    out = np.zeros(bt, f32)
    for lane in range(L):
        out = (out + part[:, lane]).astype(f32)
    return out


def pre_gates(x: np.ndarray, hc_fn: np.ndarray, scale, base, iters: int, eps: float, norm_eps: float):
    """mhc_pre / mhc_head as the three launches compute them: (y, pre, post, comb)."""
    n, _, dim = x.shape
    rows, K = hc_fn.shape
    head = rows == HC
    x2, x4 = x.reshape(n, HC * dim), x.reshape(n * HC, dim)
    P = mix(x2, parts(hc_fn), dim)
    bt = plan.VEC_TOKENS["gates"]
    pre = np.full((n, HC), np.nan, f32)
    post = np.full((n, HC), np.nan, f32)
    comb = np.full((n, HC, HC), np.nan, f32)
    for t0, valid in plan.token_tiles(n, bt):
        proj = P[0, t0:t0 + valid].copy()
        for s in range(1, P.shape[0]):
            proj = (proj + P[s, t0:t0 + valid]).astype(f32)
        sq = sumsq(x4, t0, bt, dim)[:valid]
        inv = (f32(1) / np.sqrt(sq / f32(K) + f32(norm_eps))).astype(f32)
        g = gates_from_z(_z((proj[:, :rows] * inv[:, None]).astype(f32), scale, base), iters, eps, head)
        pre[t0:t0 + valid] = g[0]
        if not head:
            post[t0:t0 + valid], comb[t0:t0 + valid] = g[1], g[2]
    y = np.full((n, dim), np.nan, f32)
    bty, DT = plan.VEC_TOKENS["y"], plan.DIM_TILE
    for t0, valid in plan.token_tiles(n, bty):
        for d0 in range(0, dim, DT):
            xs = x[t0:t0 + valid, :, d0:d0 + DT]
            y[t0:t0 + valid, d0:d0 + DT] = _bf16((pre[t0:t0 + valid, :, None] * xs).sum(axis=1, dtype=f32))
    return y, pre, post, comb


def sinkhorn(mixes: np.ndarray, scale, base, iters: int, eps: float):
    return gates_from_z(_z(mixes.astype(f32), scale, base), iters, eps, head=False)


def post(f: np.ndarray, x: np.ndarray, post_g: np.ndarray, comb: np.ndarray) -> np.ndarray:
    n, _, dim = x.shape
    out = np.full(x.shape, np.nan, f32)
    bt, DT = plan.VEC_TOKENS["post"], plan.DIM_TILE
    for t0, valid in plan.token_tiles(n, bt):
        for d0 in range(0, dim, DT):
            sl = slice(d0, d0 + DT)
            mixed = (comb[t0:t0 + valid, :, :, None] * x[t0:t0 + valid, :, None, sl]).sum(axis=1, dtype=f32)
            out[t0:t0 + valid, :, sl] = _bf16(post_g[t0:t0 + valid, :, None] * f[t0:t0 + valid, None, sl] + mixed)
    return out
