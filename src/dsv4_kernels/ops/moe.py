"""FP4 grouped MoE ops (SPEC 5, SPEC 7 "FP4 MoE"): `mxfp4_grouped_gemm` (FP8 activations times MXFP4
expert weights, rows grouped by expert) and `fp4_grouped_moe` (the routed experts of one MoE layer:
gate/up GEMM, clamped SwiGLU with the routing weight, down GEMM, routed sum). Implementations: the
reference, Triton and TileLang for both (kernels/moe/README.md, kernels/moe/tilelang.py).

Bad values (issue 11). Default path: an id outside its range is invalid and masked on the device (that
row or slot contributes nothing and reads nothing), never wrapped; NaN in, NaN out (a non-finite
activation block quantises to a NaN scale, SPEC "Number formats"). Checked mode (DSV4K_CHECK=1, see
ops/_values.py) refuses ids outside their range other than the -1 sentinel, with one host sync; it does
not refuse non-finite values."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv4_kernels import dispatch, platform
from dsv4_kernels.ladder import OpCheck, register_check
from dsv4_kernels.ops import _checks, _library, _values
from dsv4_kernels.oracles import moe as oracle
from dsv4_kernels.reference.formats import quantize_fp8_blockwise
from dsv4_kernels.testing import assert_calc_diff, assert_same_nonfinite, bf16_ulp

__all__ = ["mxfp4_grouped_gemm", "fp4_grouped_moe", "ACT_BLOCK_SIZES", "ACT_FMTS", "WEIGHT_BLOCK", "CALC_DIFF_LIMIT",
           "compare_gemm", "compare_moe", "MODELS", "gemm_inputs", "moe_inputs", "GEMM_LABELS", "MOE_LABELS"]

OP_GEMM = "mxfp4_grouped_gemm"
OP_MOE = "fp4_grouped_moe"
ACT_BLOCK_SIZES = (32, 128)   # SPEC 5: DeepGEMM quantises activations per 32, the reference granularity is 128
WEIGHT_BLOCK = 32             # MXFP4: one ue8m0 scale per 32 weights along K
ACT_FMTS = ("e4m3fn", "e4m3fnuz")  # SPEC 5 act_fmt: OCP FP8 (max 448), gfx942's FNUZ FP8 (max 240)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def _act_block(act_block_size) -> int:
    value = _checks.integer("act_block_size", act_block_size)
    _checks.one_of("act_block_size", value, ACT_BLOCK_SIZES)
    return value


def validate_gemm(a, a_scale, b, b_scale, m_indices, act_block_size) -> None:
    """Metadata checks of mxfp4_grouped_gemm (no tensor value is read: CUDA-graph safe)."""
    block = _act_block(act_block_size)
    _checks.tensor("a", a, FP8_DTYPES, ndim=2)
    M, K = a.shape
    if K < 1 or K % block:
        raise ValueError(f"a: expected shape (M, K) with K a positive multiple of act_block_size {block}, "
                         f"got {tuple(a.shape)}")
    _checks.tensor("a_scale", a_scale, torch.float32)
    _checks.shape("a_scale", a_scale, (M, K // block))
    _checks.tensor("b", b, torch.uint8, ndim=3)
    _checks.shape("b", b, (None, None, K // 2))
    G, N = b.shape[0], b.shape[1]
    if G < 1 or N < 1:
        raise ValueError(f"b: expected shape (G, N, K/2) with G >= 1 groups and N >= 1 rows, got {tuple(b.shape)}")
    _checks.tensor("b_scale", b_scale, torch.uint8)
    _checks.shape("b_scale", b_scale, (G, N, K // WEIGHT_BLOCK))
    _checks.tensor("m_indices", m_indices, torch.int32)
    _checks.shape("m_indices", m_indices, (M,))
    _checks.same_device(a=a, a_scale=a_scale, b=b, b_scale=b_scale, m_indices=m_indices)


def resolve_act_fmt(act_fmt, x: torch.Tensor) -> str:
    """act_fmt checked ("e4m3fn", "e4m3fnuz" or None); None gives the native FP8 encoding of x's device
    (e4m3fnuz on gfx942, e4m3fn elsewhere, the CPU included)."""
    if act_fmt is None:
        return platform.device_info(x).fp8_encoding
    if not isinstance(act_fmt, str):
        raise ValueError(f"act_fmt: expected one of e4m3fn, e4m3fnuz or None, got {type(act_fmt).__name__} "
                         f"{act_fmt!r}")
    _checks.one_of("act_fmt", act_fmt, ACT_FMTS)
    return act_fmt


def validate_moe(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, act_block_size, swiglu_limit,
                 expert_map=None, act_fmt=None) -> None:
    """Metadata checks of fp4_grouped_moe (no tensor value is read: CUDA-graph safe)."""
    block = _act_block(act_block_size)
    _checks.tensor("x", x, torch.bfloat16, ndim=2)
    T, dim = x.shape
    if dim < 1 or dim % block:
        raise ValueError(f"x: expected shape (T, dim) with dim a positive multiple of act_block_size {block}, "
                         f"got {tuple(x.shape)}")
    _checks.tensor("topk_ids", topk_ids, torch.int32, ndim=2)
    _checks.shape("topk_ids", topk_ids, (T, None))
    k = topk_ids.shape[1]
    if k < 1:
        raise ValueError(f"topk_ids: expected shape (T, k) with k >= 1, got {tuple(topk_ids.shape)}")
    _checks.tensor("topk_weights", topk_weights, torch.float32)
    _checks.shape("topk_weights", topk_weights, (T, k))
    _checks.tensor("w13", w13, torch.uint8, ndim=3)
    _checks.shape("w13", w13, (None, None, dim // 2))
    E, two_i = w13.shape[0], w13.shape[1]
    if E < 1:
        raise ValueError(f"w13: expected shape (E, 2I, dim/2) with E >= 1 experts, got {tuple(w13.shape)}")
    if two_i < 2 or two_i % (2 * block):
        raise ValueError(f"w13: expected shape (E, 2I, dim/2) with I a positive multiple of act_block_size "
                         f"{block}, got {tuple(w13.shape)}")
    inter = two_i // 2
    _checks.tensor("w13_scale", w13_scale, torch.uint8)
    _checks.shape("w13_scale", w13_scale, (E, two_i, dim // WEIGHT_BLOCK))
    _checks.tensor("w2", w2, torch.uint8)
    _checks.shape("w2", w2, (E, dim, inter // 2))
    _checks.tensor("w2_scale", w2_scale, torch.uint8)
    _checks.shape("w2_scale", w2_scale, (E, dim, inter // WEIGHT_BLOCK))
    _checks.finite_float("swiglu_limit", swiglu_limit, note=" (<= 0 disables the clamp)")
    resolve_act_fmt(act_fmt, x)
    tensors = dict(x=x, topk_ids=topk_ids, topk_weights=topk_weights, w13=w13, w13_scale=w13_scale, w2=w2,
                   w2_scale=w2_scale)
    if expert_map is not None:
        _checks.tensor("expert_map", expert_map, torch.int32, ndim=1)
        if expert_map.shape[0] < 1:
            raise ValueError(f"expert_map: expected shape (E_global,) with E_global >= 1, got {tuple(expert_map.shape)}")
        tensors["expert_map"] = expert_map
    _checks.same_device(**tensors)


@dataclass(frozen=True)
class GroupsContiguous(_values.Rule):
    """A 1-d group id list whose rows of one group form one run: no group reappears after another
    group's rows (rows of `padding` may sit anywhere, also inside a run). The offending element is the
    first row of a group's second run. A local rule kind (ops/_values.py has none for runs)."""

    padding: int = -1

    def bad(self, x):
        keep = (x != self.padding).nonzero().squeeze(1)          # checked mode only: it syncs anyway
        v = x[keep]
        start = torch.ones_like(v, dtype=torch.bool)
        start[1:] = v[1:] != v[:-1]
        run_values, run_pos = v[start], keep[start]
        values, order = torch.sort(run_values, stable=True)
        again = torch.zeros_like(run_values, dtype=torch.bool)
        again[order[1:]] = values[1:] == values[:-1]
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask[run_pos[again]] = True
        return mask

    @property
    def expected(self) -> str:
        return f"the rows of each group contiguous ({self.padding} padding rows may sit anywhere)"


def gemm_rules(b: torch.Tensor, m_indices: torch.Tensor) -> tuple[_values.Rule, ...]:
    """Checked-mode rules of mxfp4_grouped_gemm: m_indices in [0, G) or -1 (padding), and the rows of one
    group contiguous."""
    return (_values.InRange("m_indices", m_indices, 0, b.shape[0], what=f"groups of b, G = {b.shape[0]}",
                            allow=(-1,)),
            GroupsContiguous("m_indices", m_indices))


def moe_rules(topk_ids: torch.Tensor, w13: torch.Tensor,
              expert_map: torch.Tensor | None = None) -> tuple[_values.Rule, ...]:
    """Checked-mode rules of fp4_grouped_moe: topk_ids in [0, E) or -1 (a dropped slot); with an
    expert_map, topk_ids in [0, E_global) or -1 and expert_map in [0, E) or -1 (a remote expert)."""
    E = w13.shape[0]
    if expert_map is None:
        return (_values.InRange("topk_ids", topk_ids, 0, E, what=f"experts of w13, E = {E}", allow=(-1,)),)
    G = expert_map.shape[0]
    return (_values.InRange("topk_ids", topk_ids, 0, G, what=f"global experts of expert_map, E_global = {G}",
                            allow=(-1,)),
            _values.InRange("expert_map", expert_map, 0, E, what=f"local experts of w13, E = {E}", allow=(-1,)))


# Triton (kernels/moe/README.md): BLOCK_M rows per program (BLOCK_M_PREFILL once the GEMM has more than
# PREFILL_ROWS rows; BLOCK_M_SCALED with num_warps_scaled there on a chip whose MXFP4 scaled MMA needs 128-row
# tiles, sm_100a: 4 warps spill with the bf16 fallback compiled beside it), BLOCK_N output columns, BLOCK_K
# reduction step; the CPU interpreter uses larger tiles.
TRITON_DEFAULTS = {"BLOCK_M": 16, "BLOCK_M_PREFILL": 64, "BLOCK_M_SCALED": 128, "num_warps_scaled": 8,
                   "PREFILL_ROWS": 256, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 8}
# TileLang grouped GEMM (kernels/moe/tilelang.py): BLOCK_M x BLOCK_N output tile per block,
# BLOCK_K reduction step, threads per block, num_stages of the K loop's copy pipeline; the same values as
# that file's DEFAULTS (a test keeps them equal), repeated so that registering the op does not import tilelang.
TILELANG_DEFAULTS = {OP_GEMM: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "threads": 128, "num_stages": 1}}
dispatch.register_family_op(OP_GEMM, "moe", triton=TRITON_DEFAULTS, tilelang=TILELANG_DEFAULTS[OP_GEMM])
# TileLang fp4_grouped_moe (kernels/moe/tilelang.py): its GEMMs take mxfp4_grouped_gemm's TileLang tiles, its
# other kernels (tilelang_quant.py, tilelang_route.py) have fixed shapes: no defaults of its own.
dispatch.register_family_op(OP_MOE, "moe", triton=TRITON_DEFAULTS, tilelang={})


@_library.custom_op("dsv4::mxfp4_grouped_gemm", mutates_args=())
def _mxfp4_grouped_gemm_op(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                           m_indices: torch.Tensor, act_block_size: int, impl: str) -> torch.Tensor:
    return dispatch.call(OP_GEMM, a, a_scale, b, b_scale, m_indices, act_block_size, impl=impl or None)


@_mxfp4_grouped_gemm_op.register_fake
def _(a, a_scale, b, b_scale, m_indices, act_block_size, impl):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16)


@_library.custom_op("dsv4::fp4_grouped_moe", mutates_args=())
def _fp4_grouped_moe_op(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                        w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, act_block_size: int,
                        swiglu_limit: float, expert_map: torch.Tensor | None, act_fmt: str,
                        impl: str) -> torch.Tensor:
    return dispatch.call(OP_MOE, x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, act_block_size,
                         swiglu_limit, expert_map, act_fmt, impl=impl or None)


@_fp4_grouped_moe_op.register_fake
def _(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, act_block_size, swiglu_limit, expert_map, act_fmt,
      impl):
    return x.new_empty(x.shape, dtype=torch.bfloat16)


def mxfp4_grouped_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                       m_indices: torch.Tensor, act_block_size: int = 128, *,
                       impl: str | None = None) -> torch.Tensor:
    """Grouped GEMM of FP8 activations and MXFP4 weights: c[m] = dequant(a[m]) @ dequant(b[g])^T with
    g = m_indices[m], fp32 accumulation, bf16 result (SPEC 5 fp4_gemm, SPEC 7).

    Args:
        a: [M, K] torch.float8_e4m3fn or torch.float8_e4m3fnuz (gfx942's encoding), contiguous: FP8
            activations (e.g. quantize_fp8_blockwise(x, act_block_size, fmt)); the bytes are read in the
            encoding of the dtype. M may be 0. K is a positive multiple of act_block_size (hence of 32).
        a_scale: [M, K / act_block_size] fp32, contiguous: the activations' block scales (powers of two
            from quantize_fp8_blockwise; other positive values are multiplied in as they are).
        b: [G, N, K / 2] uint8, contiguous: MXFP4 weights of G experts (groups), N output rows each, two
            e2m1 codes per byte along K (low nibble = even k). G >= 1, N >= 1.
        b_scale: [G, N, K / 32] uint8 ue8m0 bytes, contiguous.
        m_indices: [M] int32, contiguous: the group of each row. Rows of one group must be contiguous
            (-1 padding rows may sit anywhere): kernels may rely on it, checked mode refuses a group
            that reappears after another group's rows; the reference does not need it (each row uses
            its own group, whatever the order). -1, or any value outside
            [0, G) (negative values never wrap around), marks a padding row: its output is 0 and
            nothing of it is read (NaN in a padding row of a does not show). Checked mode
            (DSV4K_CHECK=1) refuses values outside [0, G) other than -1.
        act_block_size: 32 or 128, the activation block along K.
        impl: run this implementation ("reference", "triton", "tilelang") or raise; None lets the dispatcher choose.
    Returns:
        c: [M, N] bf16: the reference computes the exact product sum, rounds it once to fp32 (an fp32
        accumulator without rounding error) and then to bf16; kernels accumulate in fp32 in their own
        order (tolerance: calc_diff < 0.01, SPEC 5). NaN in, NaN out: a weight scale byte 255 makes its
        columns NaN in the rows of that group; a NaN FP8 byte or a NaN a_scale (quantize_fp8_blockwise's
        mark of a non-finite block) makes its whole row NaN. Non-finite values are never an error,
        in checked mode neither.
    Raises:
        ValueError naming the argument, the expected and the actual value for a wrong dtype (a must be
        float8_e4m3fn or float8_e4m3fnuz), rank, shape relation (K / 2,
        K / act_block_size, K / 32, [G, N], [M]), act_block_size not in {32, 128}, device or layout;
        in checked mode also for an m_indices value outside [0, G) other than -1, or a group split by
        another group's rows (naming the position).
    """
    args = (a, a_scale, b, b_scale, m_indices, act_block_size)
    known = _mxfp4_grouped_gemm_op.known(args, impl)
    if known is None:
        validate_gemm(*args)
        if _values.enabled():
            _values.check(*gemm_rules(b, m_indices))
    return _mxfp4_grouped_gemm_op.run(known, args, impl, a, a_scale, b, b_scale, m_indices, int(act_block_size))


def fp4_grouped_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                    w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, act_block_size: int = 128,
                    swiglu_limit: float = 10.0, expert_map: torch.Tensor | None = None,
                    act_fmt: str | None = None, *, impl: str | None = None) -> torch.Tensor:
    """The routed experts of one MoE layer with FP8 activations and MXFP4 weights (SPEC 5); the shared
    expert is not included.

    For each (token t, slot j) whose expert e = topk_ids[t, j] is valid:
        xq    = FP8 block quantisation of x[t] in act_fmt (block act_block_size along dim)
        g, u  = xq @ W1_e^T, xq @ W3_e^T   (fp32 accumulation, each rounded to bf16)
        u     = clamp(u, -swiglu_limit, swiglu_limit);  g = clamp(g, max=swiglu_limit)  (one-sided)
        h     = silu(g) * u * topk_weights[t, j]      (fp32; the weight is applied BEFORE the down GEMM)
        y_e   = FP8 block quantisation of h.to(bf16) in act_fmt (block act_block_size along I) @ W2_e^T,
                to bf16
    y[t] = the sum of its y_e in fp32, cast to bf16.

    Args:
        x: [T, dim] bf16, contiguous; T may be 0; dim a positive multiple of act_block_size (V4-Flash
            4096, V4-Pro 7168).
        topk_ids: [T, k] int32, contiguous, k >= 1 (6 in V4). -1 (a dropped slot), or any id outside
            [0, E) ([0, E_global) with an expert_map; negative ids never wrap around), contributes
            nothing: neither its weight nor any expert is read for it. Checked mode (DSV4K_CHECK=1)
            refuses such ids other than -1. A duplicate id in a row counts once per occurrence.
        topk_weights: [T, k] fp32, contiguous: the routing weights (score_topk / hash_topk output). A
            NaN or infinite weight of a valid slot makes the token's whole output row NaN (NaN in, NaN
            out; never an error, in checked mode neither); the weight of an invalid slot is not read.
        w13: [E, 2I, dim / 2] uint8 MXFP4, contiguous; rows [0, I) are the gate W1, rows [I, 2I) the up
            projection W3. E >= 1 (256 V4-Flash, 384 V4-Pro); I a positive multiple of act_block_size
            (2048 V4-Flash, 3072 V4-Pro).
        w13_scale: [E, 2I, dim / 32] uint8 ue8m0.
        w2: [E, dim, I / 2] uint8 MXFP4 down projection.
        w2_scale: [E, dim, I / 32] uint8 ue8m0.
        act_block_size: 32 (DeepGEMM's granularity) or 128 (the SPEC's reference granularity).
        swiglu_limit: a finite float (10.0 in V4). A value <= 0 disables both clamps (the reference's
            convention: 0 means "no clamp", not "clamp to 0").
        expert_map: None, or [E_global] int32, contiguous, on x's device, E_global >= 1 (expert
            parallelism, SPEC 5): topk_ids are then global ids in [0, E_global) and slot (t, j) uses the
            local expert expert_map[topk_ids[t, j]] of this rank's weights. A map entry -1 (the expert
            lives on another rank), or any entry outside [0, E), makes such slots contribute nothing, as
            does a global id outside [0, E_global) (neither wraps around). Checked mode refuses topk_ids
            outside [0, E_global) and map entries outside [0, E), -1 excepted.
        act_fmt: the FP8 encoding of both activation quantisations: "e4m3fn" (OCP, max 448) or "e4m3fnuz"
            (gfx942, max 240; the block scale rule then divides by 240). None (default): the native encoding
            of x's device, e4m3fnuz on gfx942 and e4m3fn elsewhere (CUDA, gfx950, CPU). Either encoding
            runs on any device (the reference follows the parameter, kernels encode the bytes themselves).
        impl: run this implementation ("reference", "triton", "tilelang") or raise; None lets the dispatcher choose.
    Returns:
        y: [T, dim] bf16. A token whose slots are all invalid gets 0 (even if its x holds NaN); T = 0
        gives a [0, dim] tensor. A NaN or infinity in x[t] gives NaN in its activation block's scale,
        hence an all-NaN y[t] when the token has a valid slot. Only the experts named by valid ids are
        read, so other experts' weights may hold anything.
    Raises:
        ValueError naming the argument, the expected and the actual value for a wrong dtype, rank, shape
        relation ([T, k] ids and weights, [E, 2I, dim/2], [E, 2I, dim/32], [E, dim, I/2], [E, dim, I/32]),
        act_block_size not in {32, 128}, act_fmt not in {e4m3fn, e4m3fnuz, None}, a non-finite swiglu_limit, device or layout, an expert_map that is
        not a non-empty 1-d int32 tensor; in checked mode also for a topk_ids value outside [0, E) (or
        [0, E_global)) or an expert_map entry outside [0, E), -1 excepted (naming position and value).
    """
    args = (x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, act_block_size, swiglu_limit, expert_map,
            act_fmt)
    known = _fp4_grouped_moe_op.known(args, impl)
    if known is None:
        validate_moe(*args)
        if _values.enabled():
            _values.check(*moe_rules(topk_ids, w13, expert_map))
    return _fp4_grouped_moe_op.run(known, args, impl, x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale,
                                   int(act_block_size), float(swiglu_limit), expert_map, resolve_act_fmt(act_fmt, x))


# Tolerances. Against the reference (kernels, device runs): SPEC 5, calc_diff < 0.01 with one FP4 operand
# (the FP8 activations of both sides are the same bytes; kernels differ by their fp32 accumulation order,
# which moves a bf16 rounding of g/u or y by an ulp and an FP8 rounding of h by a step: noise far below
# 1e-2, while wrong weight rows or a missing clamp give ~1e-1 to 1; a routing weight applied after the
# down GEMM differs only through roundings, which the exact hand case of the tests catches). Non-finite
# positions must agree.
# Reference against the fp64 oracle (the ladder's CPU check): the oracle attaches its unrounded fp64
# result as `expected.oracle_fp64`, and compare then also bounds every element:
#   - grouped GEMM: both sides sum exact FP8 x FP4 products in fp64 (exact for realistic data) and round
#     to fp32 then bf16, so |c - exact| <= half a bf16 ulp of exact plus the fp32 rounding, 2^-24 |exact|
#     (bound 0.5 ulp + 2^-23 |exact|);
#   - MoE: both sides share every rounding point up to the last (the bf16 g/u and y_e, the fp32 h, its
#     bf16 and FP8 roundings); the reference sums the bf16 y_e in fp32 (exact unless the k terms span
#     more than 16 binades) and rounds to bf16 (half an ulp): bound one bf16 ulp of the exact sum.
CALC_DIFF_LIMIT = 0.01


def _check_bf16(out: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if out.dtype != expected.dtype or out.shape != expected.shape:
        raise AssertionError(f"{what}: got {out.dtype} {tuple(out.shape)}, expected {expected.dtype} "
                             f"{tuple(expected.shape)}")
    assert_same_nonfinite(out, expected, what)
    finite = expected.isfinite()
    assert_calc_diff(out[finite], expected[finite], CALC_DIFF_LIMIT, what)


def _within(out: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    a = out.double()
    finite = exact.isfinite()
    bad = finite & ((a - exact).abs() > bound)
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements beyond the oracle bound, first at "
                             f"{pos}: actual {a[pos].item():.8g}, exact {exact[pos].item():.8g}, bound "
                             f"{bound[pos].item():.3g}")


def compare_gemm(out: torch.Tensor, expected: torch.Tensor) -> None:
    """mxfp4_grouped_gemm output against the reference (calc_diff) or the oracle (also elementwise)."""
    _check_bf16(out, expected, OP_GEMM)
    exact = getattr(expected, "oracle_fp64", None)
    if exact is not None:
        bound = 0.5 * bf16_ulp(exact.float()).double() + 2.0 ** -23 * exact.abs()
        _within(out, exact, bound, OP_GEMM)


def compare_moe(out: torch.Tensor, expected: torch.Tensor) -> None:
    """fp4_grouped_moe output against the reference (calc_diff) or the oracle (also elementwise)."""
    _check_bf16(out, expected, OP_MOE)
    exact = getattr(expected, "oracle_fp64", None)
    if exact is not None:
        _within(out, exact, bf16_ulp(exact.float()).double(), OP_MOE)


MODELS = {"flash": (4096, 2048, 256), "pro": (7168, 3072, 384)}   # dim, I, routed experts (SPEC 0)


def random_weights(n_experts: int, rows: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniformly random FP4 codes (rms 2.93) with scale bytes around 2^round(log2(1 / (2.93 sqrt(k)))),
    so entries have the magnitude of N(0, 1/sqrt(k)) weights; cheap at V4-Pro sizes."""
    packed = torch.randint(0, 256, (n_experts, rows, k // 2), dtype=torch.uint8, device=device)
    base = 127 + round(math.log2(1 / (2.93 * math.sqrt(k))))
    scale = torch.randint(base - 1, base + 2, (n_experts, rows, k // WEIGHT_BLOCK), dtype=torch.uint8, device=device)
    return packed, scale


# Grouped GEMM cases: label -> (K, N, G, m_indices, act_block_size, FP8 encoding of a). V4 sizes: the
# gate/up GEMM has K = dim, N = 2I; the down GEMM K = I, N = dim. Few groups keep the weights small.
_GEMM_CASES = {
    "flash-w13-K4096-N4096-M3": (4096, 4096, 2, [0, 0, 1], 128, "e4m3fn"),
    "flash-w2-K2048-N4096-M1": (2048, 4096, 2, [1], 32, "e4m3fn"),
    "pro-w2-K3072-N7168-M3-padding": (3072, 7168, 2, [0, -1, -1], 32, "e4m3fn"),
    "pro-w13-K7168-N6144-M0": (7168, 6144, 2, [], 128, "e4m3fn"),
    "odd-K96-N63-M7-G3": (96, 63, 3, [0, 0, 2, 2, 2, -1, 3], 32, "e4m3fn"),
    "fnuz-K256-N64-M4-G2": (256, 64, 2, [1, 1, -1, 0], 128, "e4m3fnuz"),
}
GEMM_LABELS = tuple(_GEMM_CASES)


def gemm_inputs(label: str, device) -> tuple:
    """(a, a_scale, b, b_scale, m_indices, act_block_size) of a grouped GEMM case, on `device`. An id of G
    (one past the last group) joins the -1 padding rows in the odd case."""
    K, N, G, ids, block, fmt = _GEMM_CASES[label]
    x = torch.randn(len(ids), K, device=device) * torch.exp(torch.randn(len(ids), 1, device=device))
    a, a_scale = quantize_fp8_blockwise(x.to(torch.bfloat16), block, fmt)
    b, b_scale = random_weights(G, N, K, device)
    return a, a_scale, b, b_scale, torch.tensor(ids, dtype=torch.int32, device=device), block


# MoE cases: label -> (dim, I, E, T, act_block_size, x scale, experts the routing may use, act_fmt). Routing rows
# mix valid ids, -1 and an id E (invalid too). x scale 40 drives most gate/up values past the clamp. The
# V4-Pro token touches one of its two experts: decoding a V4-Pro expert costs about a second on a CPU.
_EP_CASE = "ep-E_global8-local3-dim256-I128-T4"   # expert parallelism: 8 global experts, 3 on this rank
_MOE_CASES = {
    "flash-E2-T3-b128": (4096, 2048, 2, 3, 128, 1.0, None, "e4m3fn"),
    "flash-E2-T0-b32": (4096, 2048, 2, 0, 32, 1.0, None, "e4m3fn"),
    "pro-E2-T1-b32": (7168, 3072, 2, 1, 32, 1.0, (1,), "e4m3fn"),
    "pro-E2-T0-b128": (7168, 3072, 2, 0, 128, 1.0, None, "e4m3fn"),
    "flash-true-E256-dim256-I128-T3": (256, 128, 256, 3, 128, 1.0, None, "e4m3fn"),
    "pro-true-E384-dim256-I128-T3": (256, 128, 384, 3, 32, 1.0, None, "e4m3fn"),
    "odd-dim160-I96-E3-T5-clamp": (160, 96, 3, 5, 32, 40.0, None, "e4m3fn"),
    _EP_CASE: (256, 128, 3, 4, 32, 1.0, None, "e4m3fn"),
    "fnuz-dim256-I128-E3-T3-b32-clamp": (256, 128, 3, 3, 32, 40.0, None, "e4m3fnuz"),
    "fnuz-dim256-I128-E2-T2-b128": (256, 128, 2, 2, 128, 1.0, None, "e4m3fnuz"),
}
# Global expert -> local expert of the EP case: 1, 4, 6 live here (as 2, 0, 1), the rest elsewhere (-1).
_EP_MAP = [-1, 2, -1, -1, 0, -1, 1, -1]
MOE_LABELS = tuple(_MOE_CASES)


def _routing(T: int, E: int, experts, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 6] ids: up to 5 distinct experts per row (from `experts`, default all; odd rows use the last
    one) in random slots, the other slots -1, and in the last row one slot E (one past the last expert,
    invalid too); weights are a softmax times 2.5 (V4-Pro's routed_scaling_factor)."""
    pool = torch.arange(E) if experts is None else torch.tensor(experts)
    rows = []
    for t in range(T):
        row = [-1] * 6
        chosen = pool[torch.randperm(len(pool))[:min(len(pool), 5)]].tolist()
        if t % 2 and int(pool[-1]) not in chosen:
            chosen[0] = int(pool[-1])
        for slot, e in zip(torch.randperm(6).tolist(), chosen):
            row[slot] = e
        if t == T - 1:
            row[row.index(-1)] = E
        rows.append(row)
    ids = torch.tensor(rows, dtype=torch.int32).reshape(T, 6)
    return ids.to(device), (torch.softmax(torch.randn(T, 6), dim=-1) * 2.5).to(device)


def moe_inputs(label: str, device) -> tuple:
    """(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, act_block_size, swiglu_limit,
    expert_map, act_fmt) on `device`; expert_map is None except in the expert-parallel case, whose ids
    are global (8 experts, an id 8 one past them); act_fmt is given explicitly (the fnuz cases use
    gfx942's encoding on any device)."""
    dim, inter, E, T, block, x_scale, experts, fmt = _MOE_CASES[label]
    x = (x_scale * torch.randn(T, dim, device=device)).to(torch.bfloat16)
    expert_map = None
    if label == _EP_CASE:
        expert_map = torch.tensor(_EP_MAP, dtype=torch.int32, device=device)
        ids, weights = _routing(T, len(_EP_MAP), None, device)
    else:
        ids, weights = _routing(T, E, experts, device)
    w13, w13_scale = random_weights(E, 2 * inter, dim, device)
    w2, w2_scale = random_weights(E, dim, inter, device)
    return x, ids, weights, w13, w13_scale, w2, w2_scale, block, 10.0, expert_map, fmt


def _gemm_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    return [(label, gemm_inputs(label, device), {}) for label in GEMM_LABELS]


def _moe_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    return [(label, moe_inputs(label, device), {}) for label in MOE_LABELS]


register_check(OpCheck(OP_GEMM, _gemm_cases, compare_gemm, oracle=oracle.mxfp4_grouped_gemm))
register_check(OpCheck(OP_MOE, _moe_cases, compare_moe, oracle=oracle.fp4_grouped_moe))
