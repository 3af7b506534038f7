"""Pieces the engine adapters share: leading-dimension views, engine-named argument checks, the mHC
calls both SGLang and vLLM make with the same argument list, and the one-time int32 copy of an int64
token-to-expert table.

Nothing here copies a tensor on the call path except where a docstring says so: shapes change through
views of contiguous tensors, and a non-contiguous tensor is refused (ValueError naming the argument), never
made contiguous behind the caller's back.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import weakref

import torch

import dsv4_kernels as dk
from dsv4_kernels.ops import _checks

HC_MULT = 4
HC_POST_MULT = 2.0  # the post gate is 2 * sigmoid(...) in DeepSeek-V4 and in our mhc_pre


MHC_PRE_NAMES = {"x": "residual", "hc_fn": "fn", "iters": "sinkhorn_repeat", "eps": "hc_sinkhorn_eps",
                 "norm_eps": "rms_eps"}
MHC_POST_NAMES = {"f": "x", "x": "residual", "post": "post_layer_mix", "comb": "comb_res_mix"}


@contextlib.contextmanager
def engine_names(op: str, names: dict[str, str]):
    """Re-raise an op's ValueError under the engine's name of the argument it names: SGLang's and vLLM's
    `x` is the sublayer output where dsv4_kernels.mhc_post's `x` is the residual."""
    try:
        yield
    except ValueError as err:
        head, sep, rest = str(err).partition(":")
        if not sep or head not in names:
            raise
        raise ValueError(f"{names[head]}:{rest} (dsv4_kernels.{op} calls it {head})") from None


def tensor(name: str, x, dtypes=None, min_ndim: int = 1) -> torch.Tensor:
    """A contiguous tensor of at least min_ndim dimensions (leading dimensions are flattened by a view)."""
    _checks.tensor(name, x, dtypes, contiguous=True)
    if x.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got {x.dim()} (shape {tuple(x.shape)})")
    return x


def flat(name: str, x: torch.Tensor, trailing: int) -> torch.Tensor:
    """View x [..., *tail] (tail = its last `trailing` dims) as [N, *tail]; x must be contiguous."""
    tensor(name, x, min_ndim=trailing + 1)
    return x.view(math.prod(lead(x, trailing)), *x.shape[x.dim() - trailing:])  # -1 fails for 0 tokens


def lead(x: torch.Tensor, trailing: int) -> tuple[int, ...]:
    return tuple(x.shape[:x.dim() - trailing])


def equal_float(name: str, value, expected: float, why: str) -> None:
    """A real number equal to `expected` (a knob the engine exposes that our op fixes)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value == expected:
        raise ValueError(f"{name}: expected {expected!r} ({why}), got {value!r}")


def same_eps(pre_name: str, pre_eps, sinkhorn_name: str, sinkhorn_eps) -> float:
    """Our mhc_pre adds one eps to the pre gate and inside Sinkhorn; engines pass it twice."""
    _checks.positive_float(pre_name, pre_eps)
    _checks.positive_float(sinkhorn_name, sinkhorn_eps)
    if pre_eps != sinkhorn_eps:
        raise ValueError(f"{pre_name}: expected the value of {sinkhorn_name} ({sinkhorn_eps!r}; DeepSeek-V4 passes "
                         f"hc_eps for both and dsv4_kernels.mhc_pre takes one eps), got {pre_eps!r}")
    return float(pre_eps)


def split_knob(name: str, value) -> None:
    """A split-K tuning knob of an engine's kernel: an int >= 1, accepted and not used (our dispatcher
    and tuned tables choose the split)."""
    _checks.integer(name, value, minimum=1)


def no_fused_norm(norm_weight) -> None:
    if norm_weight is not None:
        raise ValueError("norm_weight: expected None (dsv4_kernels.mhc_pre does not fuse the sublayer's RMSNorm: "
                         f"apply it to layer_input), got a {type(norm_weight).__name__}")


def post_gates(name: str, post: torch.Tensor) -> torch.Tensor:
    """The engines' post gate [..., 4, 1] (or [..., 4]) as our [T, 4], by a view."""
    tensor(name, post, min_ndim=2)
    if post.shape[-1] == 1 and post.dim() >= 3 and post.shape[-2] == HC_MULT:
        return post.view(math.prod(lead(post, 2)), HC_MULT)
    if post.shape[-1] == HC_MULT:
        return post.view(math.prod(lead(post, 1)), HC_MULT)
    raise ValueError(f"{name}: expected shape (..., {HC_MULT}, 1) or (..., {HC_MULT}), got {tuple(post.shape)}")


def mhc_pre(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
            sinkhorn_repeat, norm_weight, impl):
    """(post [..., 4, 1], comb [..., 4, 4], layer_input [..., dim]) from dsv4_kernels.mhc_pre."""
    x = flat("residual", residual, 2)
    outer = lead(residual, 2)
    eps = same_eps("hc_pre_eps", hc_pre_eps, "hc_sinkhorn_eps", hc_sinkhorn_eps)
    equal_float("hc_post_mult_value", hc_post_mult_value, HC_POST_MULT, "DeepSeek-V4's post gate 2 * sigmoid")
    no_fused_norm(norm_weight)
    _checks.positive_float("rms_eps", rms_eps)
    with engine_names("mhc_pre", MHC_PRE_NAMES):
        y, post, comb = dk.mhc_pre(x, fn, hc_scale, hc_base, sinkhorn_repeat, eps, float(rms_eps), impl=impl)
    return post.view(*outer, HC_MULT, 1), comb.view(*outer, HC_MULT, HC_MULT), y.view(*outer, y.shape[-1])


def mhc_post(x, residual, post_layer_mix, comb_res_mix, impl):
    """The new residual [..., 4, dim] from dsv4_kernels.mhc_post(f=x, x=residual, ...)."""
    res = flat("residual", residual, 2)
    f = flat("x", x, 1)
    post = post_gates("post_layer_mix", post_layer_mix)
    comb = flat("comb_res_mix", comb_res_mix, 2)
    with engine_names("mhc_post", MHC_POST_NAMES):
        return dk.mhc_post(f, res, post, comb, impl=impl).view(residual.shape)


def mhc_head(x, hc_fn, hc_scale, hc_base, rms_eps, hc_eps, impl, x_name="x", rms_name="rms_eps"):
    """dsv4_kernels.mhc_head with the engines' (rms eps, hc eps) order turned into ours (eps, norm_eps)."""
    xf = flat(x_name, x, 2)
    _checks.positive_float(rms_name, rms_eps)
    _checks.positive_float("hc_eps", hc_eps)
    with engine_names("mhc_head", {"x": x_name, "eps": "hc_eps", "norm_eps": rms_name}):
        y = dk.mhc_head(xf, hc_fn, hc_scale, hc_base, eps=float(hc_eps), norm_eps=float(rms_eps), impl=impl)
    return y.view(*lead(x, 2), y.shape[-1])


def scoring(value) -> None:
    if value != "sqrtsoftplus":
        raise ValueError(f"scoring_func: expected 'sqrtsoftplus' (DeepSeek-V4's router; other scoring functions "
                         f"are not served by dsv4_kernels), got {value!r}")


# tid2eid tables arrive as int64 in some engines (vLLM's MegaMoE path); our routing kernels read int32.
# The table is frozen, so it is converted once and the int32 copy is kept while the table lives and is not
# modified in place (its version counter is part of the key).
_TABLES: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
INT32_MAX = 2 ** 31 - 1


def int32_table(name: str, table: torch.Tensor) -> torch.Tensor:
    """table [V, k] int32 as is; int64 -> an int32 copy made once per table (entries outside int32 become
    -1, an invalid expert, so nothing wraps into a valid id). Cost of the first call: one read of the
    int64 table and one write of the int32 copy (V4: 129280 x 6 entries, 6.2 MB + 3.1 MB); later calls
    with the same, unmodified table pay a dict lookup. A first conversion inside CUDA-graph capture
    allocates in the graph's pool: call once before capturing."""
    _checks.tensor(name, table, (torch.int32, torch.int64), ndim=2)
    if table.dtype == torch.int32:
        return table
    key = id(table)
    hit = _TABLES.get(key)
    if hit is not None and hit[0]() is table and hit[1] == table._version:
        return hit[2]
    inside = (table >= -INT32_MAX - 1) & (table <= INT32_MAX)
    converted = torch.where(inside, table, -1).to(torch.int32)
    _TABLES[key] = (weakref.ref(table, lambda _, k=key: _TABLES.pop(k, None)), table._version, converted)
    return converted


def optional_rsf(value) -> float:
    """SGLang passes routed_scaling_factor=None for "no factor" (1.0)."""
    if value is None:
        return 1.0
    _checks.positive_float("routed_scaling_factor", value)
    return float(value)


def zero(name: str, value, why: str) -> None:
    """A real number equal to 0 (NaN and infinities are not; no math.isfinite, which cannot read the
    symbolic float torch.compile(dynamic=True) may pass)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != 0:
        raise ValueError(f"{name}: expected 0.0 ({why}), got {value!r}")
