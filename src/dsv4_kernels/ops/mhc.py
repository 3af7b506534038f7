"""mHC ops (SPEC 4, SPEC 7 "mHC"): mhc_sinkhorn, mhc_pre, mhc_post, mhc_head, and mhc_post_pre (the
fused post + pre of consecutive sites used at decode).

The residual state X is [T, 4, dim] bf16 (hc_mult = 4 streams); a mixing site has hc_fn [24, 4 * dim],
hc_scale [3] and hc_base [24], all fp32 (the head site: [4, 4 * dim], [1], [4]). Implementations: the
PyTorch reference, Triton (kernels/mhc/triton.py) and TileLang (kernels/mhc/tilelang.py); both kernel
languages serve hc_mult 4 and dim % 256 == 0 up to 8192 (kernels/mhc/README.md). On Ascend 950 NPUs,
TileLang's Ascend dialect (backends/ascend/kernels/mhc.py, dim % 1024 == 0; backends/ascend/README.md).
"""
from __future__ import annotations

import math

import torch

from dsv4_kernels import dispatch, toolchains
from dsv4_kernels.ladder import OpCheck, register_check
from dsv4_kernels.oracles import mhc as oracle
from dsv4_kernels.ops import _library
from dsv4_kernels.ops._spec import ArgSpec, Int, PosFloat, Tensor
from dsv4_kernels.testing import assert_bf16_close, assert_close

HC_MULT = 4
MIX_ROWS = (2 + HC_MULT) * HC_MULT  # 24: pre gates, post gates, the 4 x 4 comb logits
OPS = ("mhc_sinkhorn", "mhc_pre", "mhc_post", "mhc_head", "mhc_post_pre")

# Sinkhorn outputs (pre, post, comb) are fp32: SPEC 6 gives atol 2e-5 + rtol 1e-4. Twenty fp32 row and
# column normalisations of 4-term sums drift by a few fp32 ulps per step; one normalisation step more
# or less is far outside this.
SK_ATOL, SK_RTOL = 2e-5, 1e-4
# bf16 outputs (y, X'): SPEC 6 gives two bf16 ulps of the expected value. The outputs are sums of 4 or
# 5 fp32 products of gates and bf16 values; where the terms cancel, implementations differ by the fp32
# rounding of gates and products, a few 2^-24 of sum |terms| (at most about 4 * max|y|). The floor
# 2^-16 * max|expected| covers that with margin and only loosens elements below max|expected| / 512,
# where two bf16 ulps are smaller than the floor.
BF16_ULPS, BF16_FLOOR = 2, 2.0 ** -16


F32, BF16 = (torch.float32,), (torch.bfloat16,)
_X = Tensor("x", BF16, ("T", HC_MULT, "dim"))
_GATES = (Tensor("post", F32, ("T", HC_MULT)), Tensor("comb", F32, ("T", HC_MULT, HC_MULT)))
_SITE = (Tensor("hc_fn", F32, (MIX_ROWS, f"{HC_MULT}*dim")), Tensor("hc_scale", F32, (3,)),
         Tensor("hc_base", F32, (MIX_ROWS,)))
_HEAD_SITE = (Tensor("hc_fn", F32, (HC_MULT, f"{HC_MULT}*dim")), Tensor("hc_scale", F32, (1,)),
              Tensor("hc_base", F32, (HC_MULT,)))
_SINKHORN_SCALARS = (Int("iters", minimum=1), PosFloat("eps"))
# One declarative spec per op (signature order): validation and the generated refusal test both come
# from it (tests/mhc/test_mhc_ops.py).
SPECS = {
    "mhc_sinkhorn": ArgSpec("mhc_sinkhorn", (Tensor("mixes", F32, ("T", MIX_ROWS)), *_SITE[1:],
                                             Int("hc_mult", choices=(HC_MULT,)), *_SINKHORN_SCALARS)),
    "mhc_pre": ArgSpec("mhc_pre", (_X, *_SITE, *_SINKHORN_SCALARS, PosFloat("norm_eps")), minimum={"dim": 1}),
    "mhc_post": ArgSpec("mhc_post", (Tensor("f", BF16, ("T", "dim")), _X, *_GATES), device_of="x",
                        minimum={"dim": 1}),
    "mhc_head": ArgSpec("mhc_head", (_X, *_HEAD_SITE, PosFloat("eps"), PosFloat("norm_eps")), minimum={"dim": 1}),
    "mhc_post_pre": ArgSpec("mhc_post_pre", (Tensor("f", BF16, ("T", "dim")), _X, *_GATES, *_SITE,
                                             *_SINKHORN_SCALARS, PosFloat("norm_eps")),
                            device_of="x", minimum={"dim": 1}),
}


# Triton block sizes per op (compile-time; a tuned table per arch overrides them, see dispatch.config).
# MIX_*: the split-K projection (tl.dot needs MIX_BLOCK_T >= 16; MIX_PROGRAMS is the grid size the split
# plan aims at; MIX_PRECISION "ieee" = one fp32 dot on the FMA units, "bf16x3" = three bf16 tensor-core
# dots on hc_fn split into exact bf16 parts); OUT_*: the gates + Sinkhorn + stream-sum kernel. Two
# phases (kernels.mhc.phase_config): decode below PREFILL_MIN_T tokens, hc_fn-read-bound, keeps the fp32
# dot over many splits; prefill (each PREFILL_<KEY> replaces <KEY>) is FLOP-bound (5.6 GFLOP at T = 4096,
# V4-Pro) and runs bf16x3. Chosen for no register spills on the four targets (codegen: bf16x3 at 32 or
# 64 tokens per block spills on sm_90a, so prefill keeps 16); kernels/mhc/README.md explains them.
# INVARIANT_<KEY>: batch-invariant mode (DSV4K_BATCH_INVARIANT=1): one split plan for every T, the plan
# of one token block under INVARIANT_MIX_PROGRAMS (V4-Pro: 32 splits of 7 tiles), bf16x3.
_PHASE_KEYS = {"PREFILL_MIN_T": 256, "PREFILL_MIX_PRECISION": "bf16x3", "PREFILL_OUT_BLOCK_T": 8,
            "INVARIANT_MIX_PROGRAMS": 32, "INVARIANT_MIX_PRECISION": "bf16x3"}
_TWO_STAGE = {"MIX_BLOCK_T": 16, "MIX_BLOCK_D": 32, "MIX_PROGRAMS": 256, "MIX_WARPS": 4, "MIX_STAGES": 2,
              "MIX_PRECISION": "ieee", "OUT_BLOCK_T": 4, "OUT_BLOCK_D": 512, "OUT_WARPS": 4,
              **_PHASE_KEYS}
TRITON_DEFAULTS = {"mhc_sinkhorn": {"BLOCK_T": 32, "num_warps": 4}, "mhc_pre": _TWO_STAGE, "mhc_head": _TWO_STAGE,
                   "mhc_post": {"BLOCK_T": 1, "BLOCK_D": 1024, "num_warps": 4},
                   "mhc_post_pre": {**_TWO_STAGE, "MIX_BLOCK_D": 16, "PREFILL_MIX_BLOCK_D": 16}}
# TileLang block sizes: the same values as kernels/mhc/tilelang.py's DEFAULTS (a test keeps them equal),
# repeated here so that registering the ops does not import tilelang.
TILELANG_DEFAULTS = {
    "mhc_sinkhorn": {"threads": 128},
    "mhc_pre": {"ROW_GROUPS": 4, "TOKEN_GROUPS": 2, "TOKENS": 8, "TARGET_BLOCKS": 264, "threads": 128},
    "mhc_head": {"ROW_GROUPS": 1, "TOKEN_GROUPS": 4, "TOKENS": 8, "TARGET_BLOCKS": 264, "threads": 128},
    "mhc_post": {"threads": 128},
    "mhc_post_pre": {"ROW_GROUPS": 4, "TOKEN_GROUPS": 2, "TOKENS": 4, "TARGET_BLOCKS": 264, "threads": 128},
}


# Both kernel languages serve the shapes of kernels.mhc.supports_<op>; TileLang adds its own limits (int32
# token count, 16-byte aligned pointers).
for _op in OPS:
    dispatch.register_family_op(_op, "mhc", triton=TRITON_DEFAULTS[_op], tilelang=TILELANG_DEFAULTS[_op])
    # Ascend 950 (TileLang Ascend dialect, backends/ascend/kernels/mhc.py): the tiling is the plan of
    # mhc_plan.py (no tunable defaults yet). supports() refuses 910B/A2 and 910C/A3 NPUs (dav-2201), dims
    # not a multiple of 1024, and the shapes the GPU kernels refuse; the dispatcher then falls back, logged.
    dispatch.register(dispatch.Implementation(
        _op, "tilelang_ascend", "tilelang", ("ascend",), entry=f"dsv4_kernels.backends.ascend.kernels.mhc:{_op}",
        priority=10, available=toolchains.tilelang_ascend_available,
        supports=dispatch.imported_on_use(f"dsv4_kernels.backends.ascend.kernels.mhc:supports_{_op}"),
        codegen=f"dsv4_kernels.backends.ascend.kernels.mhc:codegen_{_op}"))


def _fake_gates(like: torch.Tensor, T, m) -> tuple[torch.Tensor, torch.Tensor]:
    return like.new_empty((T, m), dtype=torch.float32), like.new_empty((T, m, m), dtype=torch.float32)


@_library.custom_op("dsv4::mhc_sinkhorn", mutates_args=())
def _mhc_sinkhorn_op(mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc_mult: int, iters: int,
                     eps: float, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch.call("mhc_sinkhorn", mixes, hc_scale, hc_base, hc_mult, iters, eps, impl=impl or None)


@_mhc_sinkhorn_op.register_fake
def _(mixes, hc_scale, hc_base, hc_mult, iters, eps, impl):
    T = mixes.shape[0]
    return (mixes.new_empty((T, hc_mult), dtype=torch.float32), *_fake_gates(mixes, T, hc_mult))


@_library.custom_op("dsv4::mhc_pre", mutates_args=())
def _mhc_pre_op(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, iters: int,
                eps: float, norm_eps: float, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch.call("mhc_pre", x, hc_fn, hc_scale, hc_base, iters, eps, norm_eps, impl=impl or None)


@_mhc_pre_op.register_fake
def _(x, hc_fn, hc_scale, hc_base, iters, eps, norm_eps, impl):
    T, m, dim = x.shape
    return (x.new_empty((T, dim), dtype=torch.bfloat16), *_fake_gates(x, T, m))


@_library.custom_op("dsv4::mhc_post", mutates_args=())
def _mhc_post_op(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, impl: str) -> torch.Tensor:
    return dispatch.call("mhc_post", f, x, post, comb, impl=impl or None)


@_mhc_post_op.register_fake
def _(f, x, post, comb, impl):
    return x.new_empty(x.shape)


@_library.custom_op("dsv4::mhc_head", mutates_args=())
def _mhc_head_op(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, eps: float,
                 norm_eps: float, impl: str) -> torch.Tensor:
    return dispatch.call("mhc_head", x, hc_fn, hc_scale, hc_base, eps, norm_eps, impl=impl or None)


@_mhc_head_op.register_fake
def _(x, hc_fn, hc_scale, hc_base, eps, norm_eps, impl):
    return x.new_empty((x.shape[0], x.shape[2]), dtype=torch.bfloat16)


@_library.custom_op("dsv4::mhc_post_pre", mutates_args=())
def _mhc_post_pre_op(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, hc_fn: torch.Tensor,
                     hc_scale: torch.Tensor, hc_base: torch.Tensor, iters: int, eps: float, norm_eps: float,
                     impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch.call("mhc_post_pre", f, x, post, comb, hc_fn, hc_scale, hc_base, iters, eps, norm_eps,
                         impl=impl or None)


@_mhc_post_pre_op.register_fake
def _(f, x, post, comb, hc_fn, hc_scale, hc_base, iters, eps, norm_eps, impl):
    T, m, dim = x.shape
    return (x.new_empty(x.shape),
            x.new_empty((T, dim), dtype=torch.bfloat16), *_fake_gates(x, T, m))


def mhc_sinkhorn(mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc_mult: int = 4,
                 iters: int = 20, eps: float = 1e-6, *,
                 impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the mixes into the pre and post gates and the Sinkhorn-normalised combination matrix.

    mixes: [T, 24] fp32, contiguous: the RMS-scaled projection of a site (4 pre, 4 post, 16 comb
        logits, the comb block row-major). T may be 0.
    hc_scale: [3] fp32, contiguous, same device: scales of the pre, post and comb parts.
    hc_base: [24] fp32, contiguous, same device: biases, laid out like mixes.
    hc_mult: the number of residual streams; only 4 (V4) is supported.
    iters: int >= 1: 1 softmax, `iters` column and `iters - 1` row normalisations, ending on a column
        step (20 in V4).
    eps: positive finite float (hc_eps, 1e-6 in V4).
    impl: run this implementation ("reference", "triton", "tilelang", "tilelang_ascend") or raise.
    Returns (pre [T, 4], post [T, 4], comb [T, 4, 4]), all fp32:
        pre = sigmoid(mixes[:, 0:4] * hc_scale[0] + hc_base[0:4]) + eps;
        post = 2 * sigmoid(mixes[:, 4:8] * hc_scale[1] + hc_base[4:8]);
        comb[t, i, j] (i = source stream, j = destination): the row softmax of the comb logits plus eps,
            then alternating column and row divisions by (sum + eps). comb >= 0 and its columns sum to
            1 within about eps; rows only approach 1.
    Edge cases: T = 0 gives empty outputs. Values are not checked (no host read-back); NaN propagates.
    Raises ValueError for a wrong dtype, shape, device or layout, hc_mult other than 4, iters < 1 or a
    non-positive or non-finite eps.
    """
    args = (mixes, hc_scale, hc_base, hc_mult, iters, eps)
    known = _mhc_sinkhorn_op.known(args, impl)
    if known is None:
        SPECS["mhc_sinkhorn"].validate(*args)
    return _mhc_sinkhorn_op.run(known, args, impl, mixes, hc_scale, hc_base, hc_mult, iters, float(eps))


def mhc_pre(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, iters: int = 20,
            eps: float = 1e-6, norm_eps: float = 1e-6, *,
            impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduce the 4 residual streams to one sublayer input, and give the gates for mhc_post.

    x: [T, 4, dim] bf16, contiguous: the residual state (dim = 4096 V4-Flash, 7168 V4-Pro; any dim >= 1
        for the reference, dim % 256 == 0 up to 8192 for the kernels, which refuse other dims). T may be 0.
    hc_fn: [24, 4 * dim] fp32, contiguous, same device: the site's projection.
    hc_scale: [3] fp32; hc_base: [24] fp32: as in mhc_sinkhorn.
    iters, eps: as in mhc_sinkhorn.
    norm_eps: positive finite float added to mean(xf^2) before the rsqrt (1e-6).
    impl: run this implementation ("reference", "triton", "tilelang", "tilelang_ascend") or raise.
    Returns:
        y [T, dim] bf16 = sum_i pre[:, i] * x[:, i, :] (fp32, rounded once);
        post [T, 4] fp32 and comb [T, 4, 4] fp32: mhc_sinkhorn of
            mixes = (xf @ hc_fn.T) * rsqrt(mean(xf^2) + norm_eps), xf = x.flatten(-2).float().
    Edge cases: T = 0 gives empty outputs; an all-zero token has mixes 0 (norm_eps keeps the rsqrt
    finite), gates from the biases alone and y = 0.
    Batch invariance: by default the Triton kernel's split-K plan (and with it the fp32 summation order
    of the projection) depends on T, so a token's bits may differ between batches (within tolerance).
    DSV4K_BATCH_INVARIANT=1 (read at every call; also for mhc_head and mhc_post_pre) fixes the plan for
    every T: a token's y, post and comb bits are then the same whatever batch it is in, at the cost of
    fewer programs at decode and more split-K workspace at prefill (kernels/mhc/README.md).
    Raises ValueError for a wrong dtype, shape (x.shape[1] != 4, dim = 0, hc_fn not [24, 4 * dim], ...),
    device or layout, iters < 1, or a non-positive or non-finite eps or norm_eps.
    """
    args = (x, hc_fn, hc_scale, hc_base, iters, eps, norm_eps)
    known = _mhc_pre_op.known(args, impl)
    if known is None:
        SPECS["mhc_pre"].validate(*args)
    return _mhc_pre_op.run(known, args, impl, x, hc_fn, hc_scale, hc_base, iters, float(eps), float(norm_eps))


def mhc_post(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, *,
             impl: str | None = None) -> torch.Tensor:
    """Write a sublayer output back into the 4 residual streams.

    f: [T, dim] bf16, contiguous: the sublayer output F. T may be 0.
    x: [T, 4, dim] bf16, contiguous: the residual state the sublayer's mhc_pre read.
    post: [T, 4] fp32 and comb: [T, 4, 4] fp32, contiguous: the gates mhc_pre returned;
        comb[t, i, j] with i = source stream, j = destination stream.
    All on one device. impl: run this implementation ("reference", "triton", "tilelang", "tilelang_ascend") or
    raise.
    Returns: X' [T, 4, dim] bf16, X'[:, j] = post[:, j] * F + sum_i comb[:, i, j] * X[:, i] in fp32,
        rounded once. A new tensor (x is not updated in place).
    Edge cases: T = 0 gives an empty output; comb = identity and post = 0 return x unchanged.
    Raises ValueError for a wrong dtype, shape, device or layout.
    """
    args = (f, x, post, comb)
    known = _mhc_post_op.known(args, impl)
    if known is None:
        SPECS["mhc_post"].validate(*args)
    return _mhc_post_op.run(known, args, impl, *args)


def mhc_head(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, eps: float = 1e-6,
             norm_eps: float = 1e-6, *, impl: str | None = None) -> torch.Tensor:
    """Collapse the 4 streams once, before the final norm and the LM head (and in the MTP layer).

    x: [T, 4, dim] bf16, contiguous. T may be 0.
    hc_fn: [4, 4 * dim] fp32; hc_scale: [1] fp32; hc_base: [4] fp32; contiguous, same device.
    eps: positive finite float added to the sigmoid gate (1e-6).
    norm_eps: positive finite float added to mean(xf^2) before the rsqrt (1e-6).
    impl: run this implementation ("reference", "triton", "tilelang", "tilelang_ascend") or raise.
    Returns: y [T, dim] bf16 = sum_i pre[:, i] * x[:, i, :], pre = sigmoid(mixes * hc_scale[0] + hc_base)
        + eps with mixes the RMS-scaled projection of mhc_pre; no Sinkhorn.
    Edge cases: T = 0 gives an empty output; an all-zero token gives y = 0.
    Raises ValueError for a wrong dtype, shape, device or layout, or a non-positive or non-finite eps
    or norm_eps.
    """
    args = (x, hc_fn, hc_scale, hc_base, eps, norm_eps)
    known = _mhc_head_op.known(args, impl)
    if known is None:
        SPECS["mhc_head"].validate(*args)
    return _mhc_head_op.run(known, args, impl, x, hc_fn, hc_scale, hc_base, float(eps), float(norm_eps))


def mhc_post_pre(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, hc_fn: torch.Tensor,
                 hc_scale: torch.Tensor, hc_base: torch.Tensor, iters: int = 20, eps: float = 1e-6,
                 norm_eps: float = 1e-6, *,
                 impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused decode step: mhc_post of the previous sublayer, then mhc_pre of the next site.

    f, x, post, comb: the inputs of mhc_post (shapes and dtypes there).
    hc_fn [24, 4 * dim], hc_scale [3], hc_base [24], iters, eps, norm_eps: the site inputs of mhc_pre for
        the next sublayer. All tensors contiguous and on one device. T may be 0.
    impl: run this implementation ("reference", "triton", "tilelang", "tilelang_ascend") or raise.
    Returns (x_new [T, 4, dim] bf16, y [T, dim] bf16, post_new [T, 4] fp32, comb_new [T, 4, 4] fp32):
        x_new = mhc_post(f, x, post, comb); (y, post_new, comb_new) = mhc_pre(x_new, hc_fn, ...), reading
        x_new after its rounding to bf16, so the result equals the two ops applied in turn.
    Edge cases: as mhc_post and mhc_pre.
    Raises ValueError for any argument mhc_post or mhc_pre would refuse.
    """
    args = (f, x, post, comb, hc_fn, hc_scale, hc_base, iters, eps, norm_eps)
    known = _mhc_post_pre_op.known(args, impl)
    if known is None:
        SPECS["mhc_post_pre"].validate(*args)
    return _mhc_post_pre_op.run(known, args, impl, f, x, post, comb, hc_fn, hc_scale, hc_base, iters, float(eps),
                                float(norm_eps))


def _compare(out: torch.Tensor, expected: torch.Tensor) -> None:
    if out.dtype != expected.dtype:
        raise AssertionError(f"dtype {out.dtype} != expected {expected.dtype}")
    if expected.dtype == torch.bfloat16:
        assert_bf16_close(out, expected, BF16_ULPS, BF16_FLOOR, "bf16 output")
    else:
        assert_close(out, expected, SK_ATOL, SK_RTOL, "fp32 gates")


FLASH_DIM, PRO_DIM, ODD_DIM = 4096, 7168, 100
SHAPES = (("flash", FLASH_DIM, 0), ("flash", FLASH_DIM, 3), ("pro", PRO_DIM, 1), ("pro", PRO_DIM, 3),
          ("odd", ODD_DIM, 3))


def _site_weights(dim: int, device, rows: int = MIX_ROWS, comb_scale: float = 2.0):
    """hc_fn rows of unit norm, so the RMS-scaled mixes are of order 1, as in the model."""
    hc_fn = torch.randn(rows, HC_MULT * dim, device=device) / math.sqrt(HC_MULT * dim)
    hc_scale = torch.tensor([0.5, 0.5, comb_scale] if rows == MIX_ROWS else [0.8], device=device)
    return hc_fn, hc_scale, 0.5 * torch.randn(rows, device=device)


def _residual_state(T: int, dim: int, device) -> torch.Tensor:
    return torch.randn(T, HC_MULT, dim, device=device).to(torch.bfloat16)


def _sinkhorn_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    # V4-Flash and V4-Pro share this op's shape (hc_mult 4, 20 iterations, hc_eps 1e-6).
    cases = []
    base = 0.5 * torch.randn(MIX_ROWS, device=device)
    for T in (0, 1, 3, 100):
        cases.append((f"v4-T{T}", (torch.randn(T, MIX_ROWS, device=device),
                                   torch.tensor([0.5, 0.5, 2.0], device=device), base), {}))
    mixes = torch.randn(5, MIX_ROWS, device=device)
    cases.append(("large-comb-logits-T5", (mixes, torch.tensor([0.5, 0.5, 10.0], device=device), base), {}))
    cases.append(("iters1-T5", (mixes, torch.tensor([1.0, 1.0, 3.0], device=device), base), {"iters": 1}))
    cases.append(("iters7-eps1e-3-T5", (mixes, torch.tensor([1.0, 1.0, 3.0], device=device), base),
                  {"iters": 7, "eps": 1e-3}))
    return cases


def _pre_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    cases = [(f"{model}-dim{dim}-T{T}", (_residual_state(T, dim, device), *_site_weights(dim, device)), {})
             for model, dim, T in SHAPES]
    cases.append(("flash-T3-iters7-eps", (_residual_state(3, FLASH_DIM, device), *_site_weights(FLASH_DIM, device)),
                  {"iters": 7, "eps": 1e-5, "norm_eps": 1e-4}))
    return cases


def _gate_inputs(T: int, dim: int, device) -> tuple[torch.Tensor, ...]:
    f = torch.randn(T, dim, device=device).to(torch.bfloat16)
    post = 2 * torch.rand(T, HC_MULT, device=device)
    comb = torch.rand(T, HC_MULT, HC_MULT, device=device)
    return f, _residual_state(T, dim, device), post, comb / comb.sum(dim=1, keepdim=True)


def _post_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    return [(f"{model}-dim{dim}-T{T}", _gate_inputs(T, dim, device), {}) for model, dim, T in SHAPES]


def _head_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    return [(f"{model}-dim{dim}-T{T}", (_residual_state(T, dim, device), *_site_weights(dim, device, rows=HC_MULT)),
             {}) for model, dim, T in SHAPES]


def _post_pre_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    # y depends on the bf16 rounding of x_new: an implementation whose fp32 sum lands on the other side
    # of a rounding boundary moves y by pre_i * ulp(x_new_i), beyond two ulps of a small y. Inputs here
    # are dyadic (f, x: k/16 with |k| <= 128; post: k/32; comb: k/64), so every product and sum of
    # mhc_post is exact in fp32 and x_new is the same for every correct implementation.
    cases = []
    for model, dim, T in SHAPES:
        f, x, post, comb = _gate_inputs(T, dim, device)
        f = ((f.float() * 16).round().clamp(-128, 128) / 16).to(torch.bfloat16)
        x = ((x.float() * 16).round().clamp(-128, 128) / 16).to(torch.bfloat16)
        post, comb = (post * 32).round() / 32, (comb * 64).round() / 64
        cases.append((f"{model}-dim{dim}-T{T}", (f, x, post, comb, *_site_weights(dim, device)), {}))
    return cases


for _op, _cases in zip(OPS, (_sinkhorn_cases, _pre_cases, _post_cases, _head_cases, _post_pre_cases)):
    register_check(OpCheck(_op, _cases, _compare, oracle=getattr(oracle, _op)))
