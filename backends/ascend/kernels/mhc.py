"""The five mHC ops on Ascend 950 (TileLang Ascend dialect): launch sequences, supports(), codegen specs.

| op | launches (mhc_kernels.py) |
|---|---|
| mhc_sinkhorn | sinkhorn (Vector) |
| mhc_pre | mix (Cube, 24 rows) -> gates (Vector: sum of squares, gates, Sinkhorn) -> y (Vector) |
| mhc_head | mix (Cube, 4 rows) -> gates (head: pre only) -> y |
| mhc_post | post (Vector) |
| mhc_post_pre | post -> mix -> gates -> y on X' (not fused on Ascend: X' goes through GM) |

The entry points need torch_npu and CANN (bisheng) and run only on an NPU; on any other machine they are
compiled to Ascend C source by codegen only. torch_npu is never imported here: the tensors arrive on an
"npu" device, which only exists once the caller's process has imported it. The hc_fn split into bf16
parts (hi, mid, lo; rows padded to 16) and the packed scale/base vector are small device-side torch ops
before the launches; T = 0 returns empty outputs before any of them.
"""
from __future__ import annotations

import functools

import torch

from dsv4_kernels.backends.ascend.kernels import mhc_plan as plan
from dsv4_kernels.kernels import mhc as shared

HC, MIX = plan.HC, plan.MIX
SERVED_ARCH = "ascend950"  # dav-3510: the only chip TileLang's Ascend backend generates code for
MAX_TOKENS = 2**31 // (HC * 8192)  # T below it: every GM offset of x (T * 4 * dim elements) fits int32


def chip_reason(t: torch.Tensor) -> str | None:
    """None on an Ascend 950; the reason on any other NPU (910B / Atlas A2, 910C / Atlas A3: their AI
    cores are dav-2201, for which the dialect has no code generator; the dispatcher falls back, logged,
    to the next candidate, the reference)."""
    from dsv4_kernels import platform
    info = platform.device_info(t.device)  # the dispatcher's own (cached) view of the device
    if info.backend != "ascend" or info.arch.startswith(SERVED_ARCH):
        return None  # not an NPU: the dispatcher's backend check has already refused it
    arch = info.arch
    return (f"TileLang's Ascend dialect targets Ascend 950 (dav-3510) only; {arch} (910B/A2 and 910C/A3 are "
            f"dav-2201) is not served by these kernels")


def _shape_reason(x: torch.Tensor) -> str | None:
    dim = x.shape[-1]
    if dim % plan.DIM_TILE:
        return f"the Ascend kernels tile dim by {plan.DIM_TILE}: dim {dim} is not a multiple"
    if x.shape[0] >= MAX_TOKENS:
        return f"the Ascend kernels index with int32: T = {x.shape[0]} exceeds {MAX_TOKENS}"
    return None


def supports_mhc_sinkhorn(mixes, hc_scale, hc_base, hc_mult=4, iters=20, eps=1e-6):
    reason = shared.supports_mhc_sinkhorn(mixes, hc_scale, hc_base, hc_mult, iters, eps)
    if reason is None and mixes.shape[0] * MIX >= 2**31:
        reason = f"the Ascend kernel indexes with int32: T = {mixes.shape[0]} x {MIX} mixes exceed it"
    return reason or chip_reason(mixes)


def supports_mhc_pre(x, hc_fn, hc_scale, hc_base, iters=20, eps=1e-6, norm_eps=1e-6):
    return shared.supports_mhc_pre(x, hc_fn, hc_scale, hc_base, iters) or _shape_reason(x) or chip_reason(x)


def supports_mhc_head(x, hc_fn, hc_scale, hc_base, eps=1e-6, norm_eps=1e-6):
    return shared.supports_mhc_head(x, hc_fn, hc_scale, hc_base) or _shape_reason(x) or chip_reason(x)


def supports_mhc_post(f, x, post, comb):
    return shared.supports_mhc_post(f, x, post, comb) or _shape_reason(x) or chip_reason(x)


def supports_mhc_post_pre(f, x, post, comb, hc_fn, hc_scale, hc_base, iters=20, eps=1e-6, norm_eps=1e-6):
    return (shared.supports_mhc_post_pre(f, x, post, comb, hc_fn, hc_scale, hc_base, iters)
            or _shape_reason(x) or chip_reason(x))


@functools.lru_cache(maxsize=256)
def _compiled(kind: str, *params):
    import tilelang
    from dsv4_kernels.backends.ascend.kernels import mhc_kernels as K
    make = {"mix": K.make_mix_kernel, "gates": K.make_gates_kernel, "sinkhorn": K.make_sinkhorn_kernel,
            "y": K.make_y_kernel, "post": K.make_post_kernel}[kind]
    return tilelang.compile(make(*params), target="ascend")


def split_parts(hc_fn: torch.Tensor) -> torch.Tensor:
    """[3 * padded rows, K] bf16: hi, mid, lo with hi + mid + lo == hc_fn exactly (each remainder is exact
    in fp32; the last has at most 8 significant bits); padded rows are zero."""
    rows, K = hc_fn.shape
    npad = plan.padded_rows(rows)
    out = torch.zeros(3, npad, K, dtype=torch.bfloat16, device=hc_fn.device)
    rest = hc_fn.float()
    for p in range(3):
        out[p, :rows] = rest.to(torch.bfloat16)
        rest = rest - out[p, :rows].float()
    return out.view(3 * npad, K)


def packed_params(hc_scale: torch.Tensor, hc_base: torch.Tensor) -> torch.Tensor:
    """[32] fp32: scale in 0..2 (the head: 0), base from 3."""
    par = torch.zeros(32, dtype=torch.float32, device=hc_scale.device)
    par[:hc_scale.numel()] = hc_scale
    par[3:3 + hc_base.numel()] = hc_base
    return par


def _gates_of_x(x, hc_fn, hc_scale, hc_base, iters, eps, norm_eps):
    n, _, dim = x.shape
    rows = hc_fn.shape[0]
    splits, _ = plan.split_k(n, dim)
    partial = torch.empty(splits, n, plan.padded_rows(rows), dtype=torch.float32, device=x.device)
    x2 = x.view(n, HC * dim)
    _compiled("mix", n, dim, rows)(x2, split_parts(hc_fn), partial)
    gate = torch.empty(n, 2 * HC, dtype=torch.float32, device=x.device)
    comb = torch.empty(n, HC * HC, dtype=torch.float32, device=x.device)
    _compiled("gates", n, dim, rows, splits, int(iters), float(eps), float(norm_eps))(
        x.view(n * HC, dim), partial, packed_params(hc_scale, hc_base), gate, comb)
    y = torch.empty(n, dim, dtype=torch.bfloat16, device=x.device)
    _compiled("y", n, dim)(x.view(n * HC, dim), gate, y)
    return y, gate, comb


def mhc_sinkhorn(mixes, hc_scale, hc_base, hc_mult=4, iters=20, eps=1e-6):
    n = mixes.shape[0]
    gate = torch.empty(n, 2 * HC, dtype=torch.float32, device=mixes.device)
    comb = torch.empty(n, HC * HC, dtype=torch.float32, device=mixes.device)
    if n:
        _compiled("sinkhorn", n, int(iters), float(eps))(mixes, packed_params(hc_scale, hc_base), gate, comb)
    return gate[:, :HC].contiguous(), gate[:, HC:].contiguous(), comb.view(n, HC, HC)


def mhc_pre(x, hc_fn, hc_scale, hc_base, iters=20, eps=1e-6, norm_eps=1e-6):
    n, _, dim = x.shape
    if n == 0:
        return (x.new_empty(0, dim), x.new_empty(0, HC, dtype=torch.float32),
                x.new_empty(0, HC, HC, dtype=torch.float32))
    y, gate, comb = _gates_of_x(x, hc_fn, hc_scale, hc_base, iters, eps, norm_eps)
    return y, gate[:, HC:].contiguous(), comb.view(n, HC, HC)


def mhc_head(x, hc_fn, hc_scale, hc_base, eps=1e-6, norm_eps=1e-6):
    n, _, dim = x.shape
    if n == 0:
        return x.new_empty(0, dim)
    return _gates_of_x(x, hc_fn, hc_scale, hc_base, 1, eps, norm_eps)[0]


def mhc_post(f, x, post, comb):
    n, _, dim = x.shape
    out = torch.empty_like(x)
    if n:
        _compiled("post", n, dim)(f, x.view(n * HC, dim), post, comb.view(n, HC * HC), out.view(n * HC, dim))
    return out


def mhc_post_pre(f, x, post, comb, hc_fn, hc_scale, hc_base, iters=20, eps=1e-6, norm_eps=1e-6):
    x_new = mhc_post(f, x, post, comb)
    return (x_new, *mhc_pre(x_new, hc_fn, hc_scale, hc_base, iters, eps, norm_eps))


# Codegen (tests/test_codegen.py compiles each op's list once for ascend950; about 2 s per kernel, the
# Cube kernel about 4 s): V4-Pro (7168) and V4-Flash (4096) dims, decode T = 3 (a short token tile; split-K
# over the cores) and prefill T = 301 for mhc_post_pre (64-token Cube tiles, a short last tile of 45 tokens;
# a last Vector tile of 1 token). Each kernel kind is compiled at least once at each dim across the five lists.
FLASH, PRO = 4096, 7168
CODEGEN_CASES = {
    "mhc_sinkhorn": (("sinkhorn", (5, 20, 1e-6)),),
    "mhc_pre": (("mix", (3, PRO, MIX)), ("gates", (3, PRO, MIX, plan.split_k(3, PRO)[0], 20, 1e-6, 1e-6)),
                ("y", (3, PRO))),
    "mhc_head": (("mix", (3, FLASH, HC)), ("gates", (3, FLASH, HC, plan.split_k(3, FLASH)[0], 1, 1e-6, 1e-6)),
                 ("y", (3, FLASH))),
    "mhc_post": (("post", (3, FLASH)), ("post", (3, PRO))),
    "mhc_post_pre": (("post", (301, FLASH)), ("mix", (301, FLASH, MIX))),
}


def label(kind: str, params: tuple) -> str:
    return f"{kind}-T{params[0]}" + (f"-dim{params[1]}" if kind != "sinkhorn" else f"-iters{params[1]}")


def _codegen(op: str):
    def codegen(target) -> list:
        from dsv4_kernels.codegen import TileLangKernel
        from dsv4_kernels.backends.ascend.kernels import mhc_kernels as K, mhc_source
        make = {"mix": K.make_mix_kernel, "gates": K.make_gates_kernel, "sinkhorn": K.make_sinkhorn_kernel,
                "y": K.make_y_kernel, "post": K.make_post_kernel}
        return [TileLangKernel(make[kind](*params), label=label(kind, params),
                               expects={"cube_mma": kind == "mix", "ub_budget": True},
                               source_check=functools.partial(mhc_source.problems, kind, params))
                for kind, params in CODEGEN_CASES[op]]
    return codegen


codegen_mhc_sinkhorn = _codegen("mhc_sinkhorn")
codegen_mhc_pre = _codegen("mhc_pre")
codegen_mhc_head = _codegen("mhc_head")
codegen_mhc_post = _codegen("mhc_post")
codegen_mhc_post_pre = _codegen("mhc_post_pre")
