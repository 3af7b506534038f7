"""Benchmark cases of mHC (SPEC 4): mhc_sinkhorn, mhc_pre, mhc_post, mhc_head, mhc_post_pre.

Both models (dim 4096 / 7168, hc_mult 4, 20 Sinkhorn iterations), decode batches and prefill token
counts. Inputs are realistic: hc_fn rows of unit norm, so the RMS-scaled mixes are of order 1.

Byte model (m = 4 streams, T tokens): the residual state x [T, m, dim] bf16 read (and written by
mhc_post / mhc_post_pre), the sublayer output f [T, dim] bf16, the site weights hc_fn [rows, m * dim] fp32
(read once per call), hc_scale and hc_base, the gates post [T, m] and comb [T, m, m] fp32, mixes [T, 24]
fp32 (sinkhorn), the layer input y [T, dim] bf16. The fused post + pre keeps its new state on chip: it
writes x_new once and does not read it back.
FLOP model per token: the projection 2 * rows * m * dim, the sum of squares 2 * m * dim, the RMS scaling
rows + 2, the weighted stream sum 2 * m * dim (y), and the Sinkhorn part `sinkhorn_flops`:
12 m (2 m gates: scale, bias, sigmoid as exp + add + divide, then + eps or * 2), 2 m^2 (comb logits),
4 m^2 (row softmax: subtract max, exp, sum, divide), m^2 (+ eps), and 2 m^2 per normalisation
(sum, divide), of which there are 2 * iters - 1. mhc_head has m gates of 6 FLOPs and no Sinkhorn.
mhc_post: m + 1 multiply-adds per output element, 2 (m + 1) m dim per token.

Those are the minimum bytes (each tensor moved once). `kernel_bytes` counts what the Triton kernels
(kernels/mhc/triton.py, the registered default config of the phase T selects) really move, recorded
next to the minimum as shape["kernel_bytes"]: mix_kernel reads x (or F and X for post_pre) once and
hc_fn once per token block (cdiv(T, MIX_BLOCK_T) times; from L2 after the first, but issued), and
writes the split-K workspace (splits x T x (rows + 1) fp32); out_kernel reads x a second time, and
every (token block, dim block) program re-reads the sum of squares and the 4 pre partials of its
tokens from every split (dim block 0 also the post and comb partials), then writes y, post and comb.
The fused post_pre reads post and comb in every split program and writes x_new once. mhc_post reads
post and comb once per dim block. The site scales and biases are counted once.
"""
from __future__ import annotations

import math

import torch

from dsv4_kernels.bench.case import Case, generator, seed_of
from dsv4_kernels.kernels import mhc as plans
from dsv4_kernels.shapes import MODELS, Grid, ModelConfig

FAMILY = "mhc"
OPS = ("mhc_sinkhorn", "mhc_pre", "mhc_post", "mhc_head", "mhc_post_pre")
M = 4
MIX_ROWS = (2 + M) * M          # 24
ITERS = 20


def sinkhorn_flops(iters: int = ITERS, m: int = M) -> int:
    """Per token: gates, comb logits, row softmax, + eps, and 2 * iters - 1 normalisations."""
    return 12 * m + 2 * m * m + 4 * m * m + m * m + (2 * iters - 1) * 2 * m * m


def _site_bytes(dim: int, rows: int, scales: int, m: int = M) -> int:
    return rows * m * dim * 4 + scales * 4 + rows * 4


def _gates_bytes(tokens: int, m: int = M) -> int:
    return tokens * (m + m * m) * 4


def _mix_flops(dim: int, rows: int, m: int = M) -> int:
    """Projection, sum of squares, RMS scaling of the mixes, and the weighted stream sum y."""
    return 2 * rows * m * dim + 2 * m * dim + rows + 2 + 2 * m * dim


def sinkhorn_bytes(tokens: int, m: int = M) -> int:
    return tokens * MIX_ROWS * 4 + 3 * 4 + MIX_ROWS * 4 + tokens * (m + m + m * m) * 4


def pre_bytes(tokens: int, dim: int, m: int = M) -> int:
    x = tokens * m * dim * 2
    y = tokens * dim * 2
    return x + _site_bytes(dim, MIX_ROWS, 3, m) + y + _gates_bytes(tokens, m)


def pre_flops(tokens: int, dim: int, iters: int = ITERS, m: int = M) -> int:
    return tokens * (_mix_flops(dim, MIX_ROWS, m) + sinkhorn_flops(iters, m))


def post_bytes(tokens: int, dim: int, m: int = M) -> int:
    return tokens * dim * 2 + 2 * tokens * m * dim * 2 + _gates_bytes(tokens, m)


def post_flops(tokens: int, dim: int, m: int = M) -> int:
    return tokens * 2 * (m + 1) * m * dim


def head_bytes(tokens: int, dim: int, m: int = M) -> int:
    return tokens * m * dim * 2 + _site_bytes(dim, m, 1, m) + tokens * dim * 2


def head_flops(tokens: int, dim: int, m: int = M) -> int:
    return tokens * (_mix_flops(dim, m, m) + 6 * m)


def post_pre_bytes(tokens: int, dim: int, m: int = M) -> int:
    return post_bytes(tokens, dim, m) + _site_bytes(dim, MIX_ROWS, 3, m) + tokens * dim * 2 + _gates_bytes(tokens, m)


def post_pre_flops(tokens: int, dim: int, iters: int = ITERS, m: int = M) -> int:
    return post_flops(tokens, dim, m) + pre_flops(tokens, dim, iters, m)


def _triton_defaults(op: str) -> dict:
    from dsv4_kernels.ops.mhc import TRITON_DEFAULTS
    return TRITON_DEFAULTS[op]


def kernel_bytes(op: str, tokens: int, dim: int, m: int = M) -> int:
    """Bytes the Triton kernels of `op` move at `tokens` x `dim` under the registered default config
    (the phase `tokens` selects; see the module docstring). 0 tokens: no launch, 0 bytes."""
    if tokens == 0:
        return 0
    if op == "mhc_sinkhorn":
        return sinkhorn_bytes(tokens, m)
    cfg = _triton_defaults(op)
    gates = _gates_bytes(tokens, m)
    x = tokens * m * dim * 2
    if op == "mhc_post":
        dim_blocks = plans.cdiv(dim, cfg["BLOCK_D"])
        return tokens * dim * 2 + 2 * x + dim_blocks * gates
    rows = m if op == "mhc_head" else MIX_ROWS
    run, splits, _ = plans.launch_plan(tokens, dim, cfg)
    token_blocks = plans.cdiv(tokens, run["MIX_BLOCK_T"])
    mix = token_blocks * rows * m * dim * 4 + splits * tokens * (rows + 1) * 4
    if op == "mhc_post_pre":
        mix += tokens * dim * 2 + 2 * x + splits * gates  # F and X read, X' written, gates per split
    else:
        mix += x
    dim_blocks = plans.cdiv(dim, run["OUT_BLOCK_D"])
    partials = splits * tokens * 4 * ((1 + m) * dim_blocks + (0 if op == "mhc_head" else rows - m))
    out = partials + x + tokens * dim * 2 + (0 if op == "mhc_head" else gates)
    scales = 1 if op == "mhc_head" else 3
    return mix + out + scales * 4 + rows * 4


def _site(dim: int, rows: int, gen, device):
    hc_fn = torch.randn(rows, M * dim, generator=gen, device=device) / math.sqrt(M * dim)
    scale = [0.5, 0.5, 2.0] if rows == MIX_ROWS else [0.8]
    return hc_fn, torch.tensor(scale, device=device), 0.5 * torch.randn(rows, generator=gen, device=device)


def _gates(tokens: int, gen, device):
    post = 2 * torch.rand(tokens, M, generator=gen, device=device)
    comb = torch.rand(tokens, M, M, generator=gen, device=device)
    return post, comb / comb.sum(dim=1, keepdim=True)


def _inputs(op: str, model: ModelConfig, tokens: int, seed: int):
    def make(device):
        gen = generator(device, seed)
        dim = model.hidden
        if op == "mhc_sinkhorn":
            hc_scale = torch.tensor([0.5, 0.5, 2.0], device=device)
            return (torch.randn(tokens, MIX_ROWS, generator=gen, device=device), hc_scale,
                    0.5 * torch.randn(MIX_ROWS, generator=gen, device=device)), {}
        x = torch.randn(tokens, M, dim, generator=gen, device=device, dtype=torch.bfloat16)
        if op in ("mhc_pre", "mhc_head"):
            return (x, *_site(dim, MIX_ROWS if op == "mhc_pre" else M, gen, device)), {}
        f = torch.randn(tokens, dim, generator=gen, device=device, dtype=torch.bfloat16)
        gates = _gates(tokens, gen, device)
        if op == "mhc_post":
            return (f, x, *gates), {}
        return (f, x, *gates, *_site(dim, MIX_ROWS, gen, device)), {}
    return make


def _models(op: str, tokens: int, dim: int) -> tuple[int, int]:
    if op == "mhc_sinkhorn":
        return sinkhorn_bytes(tokens), tokens * sinkhorn_flops()
    if op == "mhc_pre":
        return pre_bytes(tokens, dim), pre_flops(tokens, dim)
    if op == "mhc_post":
        return post_bytes(tokens, dim), post_flops(tokens, dim)
    if op == "mhc_head":
        return head_bytes(tokens, dim), head_flops(tokens, dim)
    return post_pre_bytes(tokens, dim), post_pre_flops(tokens, dim)


def cases(grid: Grid) -> list[Case]:
    out = []
    sizes = [("decode", b) for b in grid.decode_batches] + [("prefill", t) for t in grid.prefill_tokens]
    for op in OPS:
        for model in MODELS:
            dim = model.hidden
            for phase, t in sizes:
                label = f"{model.name}-{phase}-dim{dim}-T{t}"
                nbytes, flops = _models(op, t, dim)
                shape = {"T": t, "dim": dim, "hc_mult": M, "iters": ITERS,
                         "kernel_bytes": kernel_bytes(op, t, dim)}
                out.append(Case(op, FAMILY, label, model.name, phase, t, f"dim{dim}", shape, bytes=nbytes,
                                flops=flops, compute="none", make_inputs=_inputs(op, model, t, seed_of(op, label))))
    return out
