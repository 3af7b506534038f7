"""Triton source of the mHC ops (SPEC 4): one source for sm_90a, sm_100a, gfx942 and gfx950.

Launches per op: mhc_sinkhorn 1 (sinkhorn_kernel); mhc_post 1 (post_kernel); mhc_pre and mhc_head 2
(mix_kernel: split-K RMS projection into an fp32 workspace; out_kernel: reduce the splits, gates,
Sinkhorn, y = sum_i pre_i X_i); mhc_post_pre 2 (mix_kernel with the post of the previous sublayer fused
in front, then out_kernel). The hidden size is a compile-time parameter (one specialisation per model),
the token count is not. Block sizes come from dispatch.config, one config per phase (decode below
PREFILL_MIN_T tokens, prefill from there: kernels.mhc.phase_config); README.md has the derivations.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dsv4_kernels import dispatch, platform, toolchains
from dsv4_kernels.kernels._triton_util import FP_FUSION, bf16_rne
from dsv4_kernels.kernels.mhc import HC_MULT, MIX_ROWS, PHASES, cdiv, launch_plan, phase_config

CODEGEN_DIMS = (4096, 7168)  # V4-Flash, V4-Pro


@triton.jit
def _sinkhorn(logits, eps, iters):
    # [BT, 4, 4] comb logits C[t, i, j] (i = source, j = destination), kept in registers throughout
    c = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    c = c / tl.sum(c, axis=2)[:, :, None] + eps          # C = softmax(C, dim=-1) + eps
    c = c / (tl.sum(c, axis=1)[:, None, :] + eps)        # C = C / (C.sum(dim=-2) + eps)
    for _ in range(iters - 1):
        c = c / (tl.sum(c, axis=2)[:, :, None] + eps)    # rows
        c = c / (tl.sum(c, axis=1)[:, None, :] + eps)    # columns
    return c


@triton.jit
def _pre_gate(mix, scale_ptr, base_ptr, eps):
    # [BT, 4]: pre = sigmoid(mixes[0:4] * scale[0] + base[0:4]) + eps (the head site's only gate)
    return tl.sigmoid(mix * tl.load(scale_ptr) + tl.load(base_ptr + tl.arange(0, 4))[None, :]) + eps


@triton.jit
def _post_and_comb(mix_post, mix_comb, scale_ptr, base_ptr, iters, eps, post_ptr, comb_ptr, t, mask_t):
    # mix_post [BT, 4], mix_comb [BT, 4, 4] -> stores post = 2 * sigmoid(mixes[4:8] * scale[1] + base[4:8])
    # and comb = Sinkhorn(mixes[8:24] * scale[2] + base[8:24])
    q = tl.arange(0, 4)
    post = 2 * tl.sigmoid(mix_post * tl.load(scale_ptr + 1) + tl.load(base_ptr + 4 + q)[None, :])
    comb_base = tl.load(base_ptr + 8 + q[:, None] * 4 + q[None, :])  # [4, 4]
    comb = _sinkhorn(mix_comb * tl.load(scale_ptr + 2) + comb_base[None, :, :], eps, iters)
    tl.store(post_ptr + t[:, None] * 4 + q[None, :], post, mask=mask_t[:, None])
    offs = t[:, None, None] * 16 + q[None, :, None] * 4 + q[None, None, :]
    tl.store(comb_ptr + offs, comb, mask=mask_t[:, None, None])


@triton.jit
def _split_sum(ws_ptr, t, mask_t, T, splits, ROWS: tl.constexpr, COL: tl.constexpr, WIDTH: tl.constexpr,
               SPLITS_POW2: tl.constexpr):
    # [BT, WIDTH] = sum over s of ws[s, t, COL:COL + WIDTH]: all splits in one load, summed by one tl.sum
    # over a fixed SPLITS_POW2-lane tree (lanes past `splits` are 0): deterministic, no serial chain.
    c = tl.arange(0, WIDTH)
    s = tl.arange(0, SPLITS_POW2)  # [SP]
    row = s[None, :].to(tl.int64) * T + t[:, None]  # [BT, SP]: (split, token)
    mask = (mask_t[:, None] & (s < splits)[None, :])[:, :, None]
    return tl.sum(tl.load(ws_ptr + row[:, :, None] * ROWS + COL + c[None, None, :], mask=mask, other=0.0), axis=1)


@triton.jit
def _dot_bf16x3(xb, w, acc, UPCAST: tl.constexpr):
    # acc + xb @ w, xb [BT, K] bf16 (exact), w [K, RP] fp32 = hi + mid + lo, three bf16 parts (each the
    # remainder of the last, exact in fp32, so the sum is w: 3 x 8 significand bits = fp32's 24).
    # x * part is exact in fp32; the dots accumulate in fp32, smallest part first.
    hi = w.to(tl.bfloat16)
    rest = w - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 inputs give the same exact products
        xf = xb.to(tl.float32)
        acc = tl.dot(xf, lo.to(tl.float32), acc, input_precision="ieee")
        acc = tl.dot(xf, mid.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(xf, hi.to(tl.float32), acc, input_precision="ieee")
    acc = tl.dot(xb, lo, acc)
    acc = tl.dot(xb, mid, acc)
    return tl.dot(xb, hi, acc)


@triton.jit
def _load_post_inputs(post_ptr, comb_ptr, t, mask_t):
    # post [BT, 4] and the rows C[:, i, :] [BT, 4] of comb, i = source stream
    q = tl.arange(0, 4)[None, :]
    m = mask_t[:, None]
    rows = comb_ptr + t[:, None] * 16 + q  # [BT, 4]: C[:, 0, :]
    return (tl.load(post_ptr + t[:, None] * 4 + q, mask=m, other=0.0), tl.load(rows, mask=m, other=0.0),
            tl.load(rows + 4, mask=m, other=0.0), tl.load(rows + 8, mask=m, other=0.0),
            tl.load(rows + 12, mask=m, other=0.0))


@triton.jit
def _post_streams(f_ptr, x_ptr, post, c0, c1, c2, c3, t, d, m, DIM: tl.constexpr):
    # X'[t, j, d] = post[t, j] * F[t, d] + sum_i comb[t, i, j] * X[t, i, d]   -> [BT, 4, BD] fp32; m: [BT, BD] mask
    f = tl.load(f_ptr + t[:, None] * DIM + d[None, :], mask=m, other=0.0).to(tl.float32)
    xs = x_ptr + t[:, None] * (4 * DIM) + d[None, :]  # [BT, BD], stream 0
    mixed = c0[:, :, None] * tl.load(xs, mask=m, other=0.0).to(tl.float32)[:, None, :]
    mixed += c1[:, :, None] * tl.load(xs + DIM, mask=m, other=0.0).to(tl.float32)[:, None, :]
    mixed += c2[:, :, None] * tl.load(xs + 2 * DIM, mask=m, other=0.0).to(tl.float32)[:, None, :]
    mixed += c3[:, :, None] * tl.load(xs + 3 * DIM, mask=m, other=0.0).to(tl.float32)[:, None, :]
    return post[:, :, None] * f[:, None, :] + mixed


@triton.jit
def sinkhorn_kernel(mixes_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, T, iters, eps,
                    BLOCK_T: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    mask_t = t < T
    q = tl.arange(0, 4)
    row = mixes_ptr + t[:, None] * 24  # [BT, 1]
    mix_pre = tl.load(row + q[None, :], mask=mask_t[:, None], other=0.0)
    tl.store(pre_ptr + t[:, None] * 4 + q[None, :], _pre_gate(mix_pre, scale_ptr, base_ptr, eps), mask=mask_t[:, None])
    mix_post = tl.load(row + 4 + q[None, :], mask=mask_t[:, None], other=0.0)
    mix_comb = tl.load(row[:, :, None] + 8 + q[None, :, None] * 4 + q[None, None, :], mask=mask_t[:, None, None],
                       other=0.0)
    _post_and_comb(mix_post, mix_comb, scale_ptr, base_ptr, iters, eps, post_ptr, comb_ptr, t, mask_t)


@triton.jit
def mix_kernel(x_ptr, fn_ptr, ws_ptr, sq_ptr, f_ptr, post_ptr, comb_ptr, xo_ptr, T, tiles_per_split,
               DIM: tl.constexpr, ROWS: tl.constexpr, ROWS_PAD: tl.constexpr, FUSE_POST: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BF16X3: tl.constexpr, UPCAST: tl.constexpr):
    # grid (token blocks, splits). Split s: dim tiles [s * tiles_per_split, ...) of all 4 streams, i.e. the
    # K columns i * DIM + d of xf = X.flatten(-2). Writes ws[s, t, r] = sum_k xf[t, k] * hc_fn[r, k] and
    # sq[s, t] = sum_k xf[t, k]^2 over its columns. FUSE_POST: xf is X' = post(F, X), computed here,
    # stored (bf16) to xo and projected after its rounding to bf16. Tiles never run past DIM (asserted),
    # so only tokens and the padded rows are masked. BF16X3: three bf16 x bf16 -> fp32 tensor-core dots
    # (hc_fn = hi + mid + lo, exact), else one fp32 dot; UPCAST (interpreter only) feeds them as fp32.
    tl.static_assert(DIM % BLOCK_D == 0)
    split = tl.program_id(1)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    mask_t = t < T
    q = tl.arange(0, 4)
    r = tl.arange(0, ROWS_PAD)
    dd = tl.arange(0, BLOCK_D)
    kk = tl.arange(0, 4 * BLOCK_D)  # tile-local k: stream kk // BLOCK_D, column kk % BLOCK_D
    x_offs = t[:, None, None] * (4 * DIM) + q[None, :, None] * DIM + dd[None, None, :]  # [BT, 4, BD], tile 0
    fn_ptrs = fn_ptr + ((kk // BLOCK_D) * DIM + kk % BLOCK_D)[:, None] + r[None, :].to(tl.int64) * (4 * DIM)
    mask_r = (r < ROWS)[None, :]
    mask = mask_t[:, None, None]
    if FUSE_POST:
        post, c0, c1, c2, c3 = _load_post_inputs(post_ptr, comb_ptr, t, mask_t)
    acc = tl.zeros([BLOCK_T, ROWS_PAD], dtype=tl.float32)
    sq = tl.zeros([BLOCK_T], dtype=tl.float32)
    first = split * tiles_per_split
    for tile in range(first, tl.minimum(first + tiles_per_split, DIM // BLOCK_D)):
        d0 = tile * BLOCK_D
        if FUSE_POST:
            xb = bf16_rne(_post_streams(f_ptr, x_ptr, post, c0, c1, c2, c3, t, d0 + dd, mask_t[:, None], DIM))
            tl.store(xo_ptr + x_offs + d0, xb, mask=mask)
        else:
            xb = tl.load(x_ptr + x_offs + d0, mask=mask, other=0.0)
        xk = tl.reshape(xb.to(tl.float32), (BLOCK_T, 4 * BLOCK_D))  # [BT, 4 * BD], k = i * BD + d (row-major)
        sq += tl.sum(xk * xk, axis=1)
        w = tl.load(fn_ptrs + d0, mask=mask_r, other=0.0)  # [4 * BD, RP] = hc_fn.T
        if BF16X3:
            acc = _dot_bf16x3(tl.reshape(xb, (BLOCK_T, 4 * BLOCK_D)), w, acc, UPCAST)
        else:
            acc += tl.dot(xk, w, input_precision="ieee")  # xf @ hc_fn.T, fp32 products and sums
    base = split.to(tl.int64) * T
    tl.store(ws_ptr + (base + t[:, None]) * ROWS + r[None, :], acc, mask=mask_t[:, None] & (r < ROWS)[None, :])
    tl.store(sq_ptr + base + t, sq, mask=mask_t)


@triton.jit
def out_kernel(ws_ptr, sq_ptr, x_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr, T, splits, iters, eps,
               norm_eps, DIM: tl.constexpr, HEAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
               SPLITS_POW2: tl.constexpr):
    # grid (token blocks, dim blocks). Every program reduces the sums of squares and the pre mixes of its
    # tokens (a few hundred bytes; it saves a launch); dim block 0 also the post and comb mixes, runs the
    # Sinkhorn and stores post and comb. HEAD: 4 rows, the pre gate only.
    ROWS: tl.constexpr = 4 if HEAD else 24
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    mask_t = t < T
    q = tl.arange(0, 4)
    sq = _split_sum(sq_ptr, t, mask_t, T, splits, 1, 0, 1, SPLITS_POW2)  # [BT, 1]
    inv_rms = tl.math.rsqrt(sq / (4 * DIM) + norm_eps)  # rsqrt(mean(xf^2) + norm_eps)
    mix_pre = _split_sum(ws_ptr, t, mask_t, T, splits, ROWS, 0, 4, SPLITS_POW2) * inv_rms  # mixes[0:4]
    pre = _pre_gate(mix_pre, scale_ptr, base_ptr, eps)
    if not HEAD:
        if tl.program_id(1) == 0:
            mix_post = _split_sum(ws_ptr, t, mask_t, T, splits, ROWS, 4, 4, SPLITS_POW2) * inv_rms
            mix_comb = _split_sum(ws_ptr, t, mask_t, T, splits, ROWS, 8, 16, SPLITS_POW2) * inv_rms
            _post_and_comb(mix_post, tl.reshape(mix_comb, (BLOCK_T, 4, 4)), scale_ptr, base_ptr, iters, eps,
                           post_ptr, comb_ptr, t, mask_t)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    mask_d = d < DIM
    offs = t[:, None, None] * (4 * DIM) + q[None, :, None] * DIM + d[None, None, :]  # [BT, 4, BD]
    xt = tl.load(x_ptr + offs, mask=mask_t[:, None, None] & mask_d[None, None, :], other=0.0).to(tl.float32)
    y = tl.sum(pre[:, :, None] * xt, axis=1)  # y = sum_i pre_i * X[:, i, :]
    tl.store(y_ptr + t[:, None] * DIM + d[None, :], bf16_rne(y), mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def post_kernel(f_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, T, DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_D: tl.constexpr):
    # grid (token blocks, dim blocks)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    mask_t = t < T
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    mask_d = d < DIM
    q = tl.arange(0, 4)
    post, c0, c1, c2, c3 = _load_post_inputs(post_ptr, comb_ptr, t, mask_t)
    xt = _post_streams(f_ptr, x_ptr, post, c0, c1, c2, c3, t, d, mask_t[:, None] & mask_d[None, :], DIM)
    offs = t[:, None, None] * (4 * DIM) + q[None, :, None] * DIM + d[None, None, :]
    tl.store(out_ptr + offs, bf16_rne(xt), mask=mask_t[:, None, None] & mask_d[None, None, :])


PRECISIONS = ("ieee", "bf16x3")
BATCH_INVARIANT_ENV = "DSV4K_BATCH_INVARIANT"


def batch_invariant() -> bool:
    """DSV4K_BATCH_INVARIANT=1, read at every call: mhc_pre / mhc_head / mhc_post_pre use the fixed
    "invariant" split plan (kernels.mhc.launch_plan), so a token's outputs do not depend on its batch."""
    value = os.environ.get(BATCH_INVARIANT_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{BATCH_INVARIANT_ENV}: expected 0 or 1, got {value!r}")
    return value == "1"


def _config(op: str, x: torch.Tensor) -> dict:
    """The op's config for x's device (both phases), each phase checked."""
    cfg = dispatch.config(dispatch.get(op, "triton"), platform.device_info(x))
    for phase in (*PHASES, "invariant"):
        run = phase_config(cfg, phase)
        if run.get("MIX_BLOCK_T", 16) < 16:
            raise ValueError(f"{op}/triton ({phase}): MIX_BLOCK_T must be >= 16 (tl.dot), got {run['MIX_BLOCK_T']}")
        if 256 % run.get("MIX_BLOCK_D", 256):
            raise ValueError(f"{op}/triton ({phase}): MIX_BLOCK_D must divide 256 (every supported dim), "
                             f"got {run['MIX_BLOCK_D']}")
        if run.get("MIX_PRECISION", "ieee") not in PRECISIONS:
            raise ValueError(f"{op}/triton ({phase}): MIX_PRECISION must be one of {PRECISIONS}, "
                             f"got {run['MIX_PRECISION']!r}")
    return cfg


def _mix_constexprs(dim: int, rows: int, run: dict, fuse_post: bool, upcast: bool) -> dict:
    return {"DIM": dim, "ROWS": rows, "ROWS_PAD": max(16, triton.next_power_of_2(rows)), "FUSE_POST": fuse_post,
            "BLOCK_T": run["MIX_BLOCK_T"], "BLOCK_D": run["MIX_BLOCK_D"],
            "BF16X3": run.get("MIX_PRECISION", "ieee") == "bf16x3", "UPCAST": upcast}


def _project(x, hc_fn, rows: int, cfg: dict, post_of=None):
    """mix_kernel: (ws [splits, T, rows], sq [splits, T]) fp32 and the phase config it ran with. post_of =
    (f, post, comb, x_out) fuses mhc_post in front (x_out receives X')."""
    T, _, dim = x.shape
    run, splits, per = launch_plan(T, dim, cfg, batch_invariant())
    ws = torch.empty((splits, T, rows), dtype=torch.float32, device=x.device)
    sq = torch.empty((splits, T), dtype=torch.float32, device=x.device)
    f, post, comb, x_out = post_of if post_of is not None else (x, ws, ws, x)
    grid = (cdiv(T, run["MIX_BLOCK_T"]), splits)
    mix_kernel[grid](x, hc_fn, ws, sq, f, post, comb, x_out, T, per,
                     **_mix_constexprs(dim, rows, run, post_of is not None, toolchains.interpreter_active()),
                     num_warps=run["MIX_WARPS"], num_stages=run["MIX_STAGES"], enable_fp_fusion=FP_FUSION)
    return ws, sq, run


def _finish(ws, sq, x, hc_scale, hc_base, y, post, comb, iters: int, eps: float, norm_eps: float, run: dict,
            head: bool) -> None:
    T, _, dim = x.shape
    grid = (cdiv(T, run["OUT_BLOCK_T"]), cdiv(dim, run["OUT_BLOCK_D"]))
    out_kernel[grid](ws, sq, x, hc_scale, hc_base, y, post, comb, T, ws.shape[0], iters, eps, norm_eps, DIM=dim,
                     HEAD=head, BLOCK_T=run["OUT_BLOCK_T"], BLOCK_D=run["OUT_BLOCK_D"],
                     SPLITS_POW2=triton.next_power_of_2(ws.shape[0]), num_warps=run["OUT_WARPS"],
                     enable_fp_fusion=FP_FUSION)


def _gates_like(x: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((T, HC_MULT), dtype=torch.float32, device=x.device),
            torch.empty((T, HC_MULT, HC_MULT), dtype=torch.float32, device=x.device))


def mhc_sinkhorn(mixes, hc_scale, hc_base, hc_mult=4, iters=20, eps=1e-6):
    T = mixes.shape[0]
    pre = torch.empty((T, HC_MULT), dtype=torch.float32, device=mixes.device)
    post, comb = _gates_like(mixes, T)
    if T == 0:
        return pre, post, comb
    cfg = _config("mhc_sinkhorn", mixes)
    sinkhorn_kernel[(cdiv(T, cfg["BLOCK_T"]),)](mixes, hc_scale, hc_base, pre, post, comb, T, iters, eps,
                                               BLOCK_T=cfg["BLOCK_T"], num_warps=cfg["num_warps"],
                                               enable_fp_fusion=FP_FUSION)
    return pre, post, comb


def mhc_pre(x, hc_fn, hc_scale, hc_base, iters=20, eps=1e-6, norm_eps=1e-6):
    T, _, dim = x.shape
    y = torch.empty((T, dim), dtype=torch.bfloat16, device=x.device)
    post, comb = _gates_like(x, T)
    if T == 0:
        return y, post, comb
    cfg = _config("mhc_pre", x)
    ws, sq, run = _project(x, hc_fn, MIX_ROWS, cfg)
    _finish(ws, sq, x, hc_scale, hc_base, y, post, comb, iters, eps, norm_eps, run, head=False)
    return y, post, comb


def mhc_head(x, hc_fn, hc_scale, hc_base, eps=1e-6, norm_eps=1e-6):
    T, _, dim = x.shape
    y = torch.empty((T, dim), dtype=torch.bfloat16, device=x.device)
    if T == 0:
        return y
    cfg = _config("mhc_head", x)
    ws, sq, run = _project(x, hc_fn, HC_MULT, cfg)
    _finish(ws, sq, x, hc_scale, hc_base, y, ws, ws, 1, eps, norm_eps, run, head=True)
    return y


def mhc_post(f, x, post, comb):
    T, _, dim = x.shape
    out = torch.empty_like(x)
    if T == 0:
        return out
    cfg = _config("mhc_post", x)
    grid = (cdiv(T, cfg["BLOCK_T"]), cdiv(dim, cfg["BLOCK_D"]))
    post_kernel[grid](f, x, post, comb, out, T, DIM=dim, BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"],
                      num_warps=cfg["num_warps"], enable_fp_fusion=FP_FUSION)
    return out


def mhc_post_pre(f, x, post, comb, hc_fn, hc_scale, hc_base, iters=20, eps=1e-6, norm_eps=1e-6):
    T, _, dim = x.shape
    x_new = torch.empty_like(x)
    y = torch.empty((T, dim), dtype=torch.bfloat16, device=x.device)
    post_new, comb_new = _gates_like(x, T)
    if T == 0:
        return x_new, y, post_new, comb_new
    cfg = _config("mhc_post_pre", x)
    ws, sq, run = _project(x, hc_fn, MIX_ROWS, cfg, post_of=(f, post, comb, x_new))
    _finish(ws, sq, x_new, hc_scale, hc_base, y, post_new, comb_new, iters, eps, norm_eps, run, head=False)
    return x_new, y, post_new, comb_new


_MIX_SIG = {"x_ptr": "*bf16", "fn_ptr": "*fp32", "ws_ptr": "*fp32", "sq_ptr": "*fp32", "f_ptr": "*bf16",
            "post_ptr": "*fp32", "comb_ptr": "*fp32", "xo_ptr": "*bf16", "T": "i32", "tiles_per_split": "i32"}
_OUT_SIG = {"ws_ptr": "*fp32", "sq_ptr": "*fp32", "x_ptr": "*bf16", "scale_ptr": "*fp32", "base_ptr": "*fp32",
            "y_ptr": "*bf16", "post_ptr": "*fp32", "comb_ptr": "*fp32", "T": "i32", "splits": "i32", "iters": "i32",
            "eps": "fp32", "norm_eps": "fp32"}


def _specs(op: str, rows: int, fuse_post: bool, head: bool) -> list:
    """Both phases' kernels at both model dims, as they launch on a GPU (no interpreter upcast)."""
    from dsv4_kernels.codegen import TritonKernel
    cfg = dispatch.get(op, "triton").defaults
    specs = []
    for phase in (*PHASES, "invariant"):
        run = phase_config(cfg, phase)
        first_T = cfg["PREFILL_MIN_T"] if phase == "prefill" else 1
        for dim in CODEGEN_DIMS:
            most_splits = launch_plan(first_T, dim, cfg, phase == "invariant")[1]  # the phase's most splits
            # The ieee phase must compile without tensor-core instructions, bf16x3 with them (its point).
            tensor_cores = run.get("MIX_PRECISION", "ieee") == "bf16x3"
            specs.append(TritonKernel(mix_kernel, _MIX_SIG, _mix_constexprs(dim, rows, run, fuse_post, False),
                                      num_warps=run["MIX_WARPS"], num_stages=run["MIX_STAGES"],
                                      label=f"mix-{phase}-dim{dim}",
                                      expects={"reduced_precision_mma": tensor_cores}))
            specs.append(TritonKernel(out_kernel, _OUT_SIG, {
                "DIM": dim, "HEAD": head, "BLOCK_T": run["OUT_BLOCK_T"], "BLOCK_D": run["OUT_BLOCK_D"],
                "SPLITS_POW2": triton.next_power_of_2(most_splits)}, num_warps=run["OUT_WARPS"],
                label=f"out-{phase}-dim{dim}"))
    # A phase that launches the same specialisation as another (batch-invariant and prefill mix kernels)
    # is compiled once: codegen time is CI time.
    unique = {}
    for spec in specs:
        unique.setdefault((spec.fn, tuple(sorted(spec.constexprs.items())), spec.num_warps, spec.num_stages), spec)
    return list(unique.values())


def codegen_mhc_sinkhorn(target) -> list:
    from dsv4_kernels.codegen import TritonKernel
    cfg = dispatch.get("mhc_sinkhorn", "triton").defaults
    sig = {"mixes_ptr": "*fp32", "scale_ptr": "*fp32", "base_ptr": "*fp32", "pre_ptr": "*fp32", "post_ptr": "*fp32",
           "comb_ptr": "*fp32", "T": "i32", "iters": "i32", "eps": "fp32"}
    return [TritonKernel(sinkhorn_kernel, sig, {"BLOCK_T": cfg["BLOCK_T"]}, num_warps=cfg["num_warps"],
                         label="sinkhorn")]


def codegen_mhc_pre(target) -> list:
    return _specs("mhc_pre", MIX_ROWS, fuse_post=False, head=False)


def codegen_mhc_head(target) -> list:
    return _specs("mhc_head", HC_MULT, fuse_post=False, head=True)


def codegen_mhc_post_pre(target) -> list:
    return _specs("mhc_post_pre", MIX_ROWS, fuse_post=True, head=False)


def codegen_mhc_post(target) -> list:
    from dsv4_kernels.codegen import TritonKernel
    cfg = dispatch.get("mhc_post", "triton").defaults
    sig = {"f_ptr": "*bf16", "x_ptr": "*bf16", "post_ptr": "*fp32", "comb_ptr": "*fp32", "out_ptr": "*bf16",
           "T": "i32"}
    return [TritonKernel(post_kernel, sig, {"DIM": dim, "BLOCK_T": cfg["BLOCK_T"], "BLOCK_D": cfg["BLOCK_D"]},
                         num_warps=cfg["num_warps"], label=f"post-dim{dim}") for dim in CODEGEN_DIMS]
