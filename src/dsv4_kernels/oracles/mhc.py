"""fp64 oracles for mHC (SPEC 4), written independently of reference/mhc.py.

Sinkhorn runs token by token on Python floats, entry by entry (a max-shifted softmax per row, then
2 * iters - 1 alternating column and row divisions). The RMS-scaled projection is one fp64 dot product
per (token, row); the stream sums and the post mixing add one fp64 term per stream. The *_fp64
functions return fp64 values (the stream sums also return sum |term| for magnitude-aware
tolerances); mhc_sinkhorn, mhc_pre, mhc_post, mhc_head and mhc_post_pre take the ops' signatures and
return the reference's outputs and dtypes (fp64 rounded once to fp32 or bf16), for the verification
ladder.
"""
from __future__ import annotations

import math

import torch

__all__ = ["sigmoid", "sinkhorn_fp64", "mixes_fp64", "stream_sum_fp64", "post_fp64", "head_fp64",
           "mhc_sinkhorn", "mhc_pre", "mhc_post", "mhc_head", "mhc_post_pre"]


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def sinkhorn_fp64(mixes, hc_scale, hc_base, m=4, iters=20, eps=1e-6):
    """(pre, post, comb) in fp64 from Python floats, token by token, entry by entry."""
    scale, base = [float(v) for v in hc_scale], [float(v) for v in hc_base]
    pres, posts, combs = [], [], []
    for row in mixes.double().tolist():
        pres.append([sigmoid(row[i] * scale[0] + base[i]) + eps for i in range(m)])
        posts.append([2.0 * sigmoid(row[m + i] * scale[1] + base[m + i]) for i in range(m)])
        c = [[row[2 * m + i * m + j] * scale[2] + base[2 * m + i * m + j] for j in range(m)] for i in range(m)]
        for i in range(m):
            top = max(c[i])
            e = [math.exp(v - top) for v in c[i]]
            total = sum(e)
            c[i] = [v / total + eps for v in e]
        for step in range(2 * iters - 1):
            if step % 2 == 0:
                for j in range(m):
                    col = sum(c[i][j] for i in range(m)) + eps
                    for i in range(m):
                        c[i][j] /= col
            else:
                for i in range(m):
                    r = sum(c[i]) + eps
                    c[i] = [v / r for v in c[i]]
        combs.append(c)
    T = mixes.shape[0]
    return (torch.tensor(pres, dtype=torch.float64).view(T, m),
            torch.tensor(posts, dtype=torch.float64).view(T, m),
            torch.tensor(combs, dtype=torch.float64).view(T, m, m))


def mixes_fp64(x, hc_fn, norm_eps=1e-6):
    """RMS-scaled projection, one fp64 dot product per (token, row)."""
    T, rows = x.shape[0], hc_fn.shape[0]
    out = torch.zeros(T, rows, dtype=torch.float64)
    fn = hc_fn.double()
    for t in range(T):
        xf = x[t].reshape(-1).double()
        inv_rms = 1.0 / math.sqrt(float(torch.dot(xf, xf)) / xf.numel() + norm_eps)
        for r in range(rows):
            out[t, r] = float(torch.dot(xf, fn[r])) * inv_rms
    return out


def stream_sum_fp64(x, pre):
    """y[t] = sum_i pre[t, i] * x[t, i, :] in fp64, and sum_i |pre[t, i] * x[t, i, :]| for tolerances."""
    xd = x.double()
    y = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float64)
    mag = torch.zeros_like(y)
    for i in range(x.shape[1]):
        term = pre[:, i:i + 1].double() * xd[:, i]
        y += term
        mag += term.abs()
    return y, mag


def post_fp64(f, x, post, comb):
    """X'[t, j] = post[t, j] * F[t] + sum_i comb[t, i, j] * X[t, i] in fp64, and the term magnitudes."""
    T, m, dim = x.shape
    xd, fd = x.double(), f.double()
    out = torch.zeros(T, m, dim, dtype=torch.float64)
    mag = torch.zeros_like(out)
    for j in range(m):
        terms = [post[:, j:j + 1].double() * fd] + [comb[:, i, j:j + 1].double() * xd[:, i] for i in range(m)]
        for term in terms:
            out[:, j] += term
            mag[:, j] += term.abs()
    return out, mag


def head_fp64(x, hc_fn, hc_scale, hc_base, eps=1e-6, norm_eps=1e-6):
    """mhc_head in fp64: (y [T, dim], sum_i |pre_i x_i| [T, dim])."""
    mixes = mixes_fp64(x, hc_fn, norm_eps)
    scale, base = float(hc_scale[0]), [float(v) for v in hc_base]
    pre = torch.tensor([[sigmoid(v * scale + base[i]) + eps for i, v in enumerate(row)] for row in mixes.tolist()],
                       dtype=torch.float64).view(x.shape[0], x.shape[1])
    return stream_sum_fp64(x, pre)


def mhc_sinkhorn(mixes, hc_scale, hc_base, hc_mult=4, iters=20, eps=1e-6):
    """The op's signature and outputs: (pre [T, m], post [T, m], comb [T, m, m]) fp32."""
    pre, post, comb = sinkhorn_fp64(mixes.cpu(), hc_scale.cpu(), hc_base.cpu(), m=hc_mult, iters=iters, eps=eps)
    return pre.float(), post.float(), comb.float()


def mhc_pre(x, hc_fn, hc_scale, hc_base, iters=20, eps=1e-6, norm_eps=1e-6):
    """The op's signature and outputs: (y [T, dim] bf16, post [T, m] fp32, comb [T, m, m] fp32)."""
    x = x.cpu()
    mixes = mixes_fp64(x, hc_fn.cpu(), norm_eps)
    pre, post, comb = sinkhorn_fp64(mixes, hc_scale.cpu(), hc_base.cpu(), m=x.shape[1], iters=iters, eps=eps)
    return stream_sum_fp64(x, pre)[0].to(torch.bfloat16), post.float(), comb.float()


def mhc_post(f, x, post, comb):
    """The op's signature and output: X' [T, m, dim] bf16."""
    return post_fp64(f.cpu(), x.cpu(), post.cpu(), comb.cpu())[0].to(torch.bfloat16)


def mhc_head(x, hc_fn, hc_scale, hc_base, eps=1e-6, norm_eps=1e-6):
    """The op's signature and output: y [T, dim] bf16."""
    return head_fp64(x.cpu(), hc_fn.cpu(), hc_scale.cpu(), hc_base.cpu(), eps, norm_eps)[0].to(torch.bfloat16)


def mhc_post_pre(f, x, post, comb, hc_fn, hc_scale, hc_base, iters=20, eps=1e-6, norm_eps=1e-6):
    """The op's signature and outputs: (x_new bf16, y bf16, post_new fp32, comb_new fp32); the pre stage
    reads x_new after its rounding to bf16, as SPEC 4 chains the two sites."""
    x_new = mhc_post(f, x, post, comb)
    return (x_new, *mhc_pre(x_new, hc_fn, hc_scale, hc_base, iters=iters, eps=eps, norm_eps=norm_eps))
