"""mHC (manifold-constrained hyper-connection) references (SPEC 4): Sinkhorn, pre, post, head.

The residual X is [T, m, dim] bf16 with m = hc_mult streams (4 in V4). Per mixing site the
projection hc_fn maps the flattened X to (2 + m) * m mixes (24 for m = 4): m pre gates, m post
gates and an m x m combination matrix C, read row-major, C[i, j] with i = source stream and
j = destination stream.

Precision: the two long reductions of the RMS-scaled projection (xf @ hc_fn.T over m*dim and the
mean of xf^2) accumulate in fp64 and are rounded once to fp32; everything after (sigmoids,
softmax, Sinkhorn, the stream sums) is fp32 as SPEC 4 writes it. bf16 outputs are the fp32
result rounded to nearest.
"""
from __future__ import annotations

import torch

__all__ = ["mhc_sinkhorn", "mhc_pre", "mhc_post", "mhc_head", "mhc_post_pre"]


def _rms_mixes(x: torch.Tensor, hc_fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """(xf @ hc_fn.T) * rsqrt(mean(xf^2) + norm_eps) with xf = x.flatten(-2): [T, rows] fp32."""
    xf = x.flatten(-2).double()
    proj = xf @ hc_fn.double().T
    inv_rms = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + norm_eps)
    return (proj * inv_rms).float()


def _weighted_streams(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """y = sum_i pre[:, i] * x[:, i, :] in fp32, rounded to bf16: [T, dim]."""
    return (pre.unsqueeze(-1) * x.float()).sum(dim=1).to(torch.bfloat16)


def mhc_sinkhorn(mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
                 hc_mult: int = 4, iters: int = 20, eps: float = 1e-6):
    """Split the mixes into the pre and post gates and the Sinkhorn-normalised combination matrix.

    Args:
        mixes: [T, (2 + m) * m] fp32 with m = hc_mult ([T, 24] for m = 4). T may be 0.
        hc_scale: [3] fp32: scales of the pre, post and comb parts.
        hc_base: [(2 + m) * m] fp32: biases, laid out like mixes.
        hc_mult: m, the number of residual streams.
        iters: >= 1 Sinkhorn iterations: 1 softmax, `iters` column and `iters - 1` row
            normalisations, ending on a column step (20 = V4).
        eps: the hc_eps of the spec (1e-6 in V4).
    Returns:
        pre: [T, m] fp32 = sigmoid(mixes[:, :m] * hc_scale[0] + hc_base[:m]) + eps, in (eps, 1 + eps].
        post: [T, m] fp32 = 2 * sigmoid(mixes[:, m:2m] * hc_scale[1] + hc_base[m:2m]), in [0, 2].
        comb: [T, m, m] fp32, C[t, i, j] (i = source, j = destination): softmax over j of
            mixes[:, 2m:] * hc_scale[2] + hc_base[2m:] viewed row-major, plus eps; divided by its
            column sums plus eps; then iters - 1 times rows, then columns. C >= 0; columns sum to 1
            up to eps and rounding; rows only approach 1.
    """
    m = hc_mult
    mixes = mixes.float()
    scale = hc_scale.float()
    base = hc_base.float()
    pre = torch.sigmoid(mixes[:, :m] * scale[0] + base[:m]) + eps
    post = 2 * torch.sigmoid(mixes[:, m:2 * m] * scale[1] + base[m:2 * m])
    comb = (mixes[:, 2 * m:] * scale[2] + base[2 * m:]).view(mixes.shape[0], m, m)
    comb = torch.softmax(comb, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


def mhc_pre(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
            iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6):
    """Reduce the m residual streams to one sublayer input, and give the gates for mhc_post.

    Args:
        x: [T, m, dim] bf16 residual state (m = 4 in V4; m is read from x). T may be 0.
        hc_fn: [(2 + m) * m, m * dim] fp32 projection ([24, 4 * dim]).
        hc_scale: [3] fp32.
        hc_base: [(2 + m) * m] fp32.
        iters, eps: as in mhc_sinkhorn.
        norm_eps: added to mean(xf^2) before the rsqrt (1e-6).
    Returns:
        y: [T, dim] bf16 = sum_i pre[:, i] * x[:, i, :] (fp32 sum, rounded to bf16).
        post: [T, m] fp32 and comb: [T, m, m] fp32, from mhc_sinkhorn of
            mixes = (xf @ hc_fn.T) * rsqrt(mean(xf^2) + norm_eps), xf = x.flatten(-2).float().
    Edge cases: an all-zero token has mixes = 0 (the rsqrt is finite thanks to norm_eps), so its
    gates are those of the biases alone and its y is 0.
    """
    m = x.shape[1]
    mixes = _rms_mixes(x, hc_fn, norm_eps)
    pre, post, comb = mhc_sinkhorn(mixes, hc_scale, hc_base, hc_mult=m, iters=iters, eps=eps)
    return _weighted_streams(x, pre), post, comb


def mhc_post(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Write a sublayer output back into the m residual streams.

    Args:
        f: [T, dim] bf16 sublayer output F. T may be 0.
        x: [T, m, dim] bf16 residual state the sublayer's mhc_pre read.
        post: [T, m] fp32 post gates from mhc_pre.
        comb: [T, m, m] fp32, comb[t, i, j] with i = source stream, j = destination stream.
    Returns:
        [T, m, dim] bf16: X'[:, j] = post[:, j] * F + sum_i comb[:, i, j] * X[:, i], fp32 math,
        rounded to bf16. comb = identity and post = 0 return x unchanged.
    """
    xf = x.float()
    mixed = (comb.float().unsqueeze(-1) * xf.unsqueeze(2)).sum(dim=1)
    return (post.float().unsqueeze(-1) * f.float().unsqueeze(1) + mixed).to(torch.bfloat16)


def mhc_head(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
             eps: float = 1e-6, norm_eps: float = 1e-6) -> torch.Tensor:
    """Collapse the m streams once before the final norm and LM head (and in the MTP layer).

    Args:
        x: [T, m, dim] bf16 residual state. T may be 0.
        hc_fn: [m, m * dim] fp32 projection.
        hc_scale: [1] fp32.
        hc_base: [m] fp32.
        eps: added to the sigmoid gate (1e-6).
        norm_eps: added to mean(xf^2) before the rsqrt (1e-6).
    Returns:
        y: [T, dim] bf16 = sum_i pre[:, i] * x[:, i, :] with pre = sigmoid(mixes * hc_scale[0] +
        hc_base) + eps and mixes the RMS-scaled projection of mhc_pre; no Sinkhorn.
    """
    mixes = _rms_mixes(x, hc_fn, norm_eps)
    pre = torch.sigmoid(mixes * hc_scale.float()[0] + hc_base.float()) + eps
    return _weighted_streams(x, pre)


def mhc_post_pre(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                 hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
                 iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6):
    """Fused decode step: mhc_post of the previous sublayer, then mhc_pre of the next site.

    Args:
        f, x, post, comb: exactly the inputs of mhc_post (previous sublayer's output F, the residual
            it read, and its post gates and comb matrix).
        hc_fn, hc_scale, hc_base, iters, eps, norm_eps: exactly the site inputs of mhc_pre for the
            next sublayer.
    Returns:
        x_new: [T, m, dim] bf16 = mhc_post(f, x, post, comb), the new residual state.
        y: [T, dim] bf16, post_new: [T, m] fp32, comb_new: [T, m, m] fp32 = mhc_pre(x_new, ...).
        mhc_pre reads x_new after its rounding to bf16, exactly as the unfused pair does, so the
        fused op equals the composition of the two references.
    """
    x_new = mhc_post(f, x, post, comb)
    y, post_new, comb_new = mhc_pre(x_new, hc_fn, hc_scale, hc_base, iters=iters, eps=eps, norm_eps=norm_eps)
    return x_new, y, post_new, comb_new
