"""Comparisons shared by tests, `dsv4k check` and the benchmarks (SPEC section 6 tolerances).

Each helper raises AssertionError with the worst offending position and values, so a failing
check says where and by how much.
"""
from __future__ import annotations

import torch

__all__ = ["calc_diff", "assert_calc_diff", "assert_same_nonfinite", "assert_close", "assert_bf16_close", "bf16_ulp"]


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2<x,y> / (|x|^2 + |y|^2) in fp64 (SPEC 5). 0 for identical tensors, including empty or all-zero ones."""
    x = x.double().flatten()
    y = y.double().flatten()
    denom = (x * x).sum() + (y * y).sum()
    if denom == 0:
        return 0.0
    return float(1.0 - 2.0 * (x * y).sum() / denom)


def assert_calc_diff(actual: torch.Tensor, expected: torch.Tensor, limit: float, what: str = "output") -> None:
    """calc_diff(actual, expected) < limit; the check SPEC 5 prescribes for FP4 GEMMs."""
    d = calc_diff(actual, expected)
    if not d < limit:
        raise AssertionError(f"{what}: calc_diff {d:.3e} is not below {limit:.1e}")


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, what: str = "output") -> None:
    """+inf, -inf and NaN sit at exactly the same positions in both tensors."""
    a, e = actual.float(), expected.float()
    for name, fa, fe in (("NaN", a.isnan(), e.isnan()),
                         ("+inf", a == float("inf"), e == float("inf")),
                         ("-inf", a == float("-inf"), e == float("-inf"))):
        bad = fa != fe
        if bad.any():
            pos = tuple(int(i) for i in bad.nonzero()[0])
            raise AssertionError(f"{what}: {name} positions differ, first at {pos}: "
                                 f"actual {a[pos].item()} expected {e[pos].item()}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                 what: str = "output") -> None:
    """|a - e| <= atol + rtol * |e| elementwise on finite positions; non-finite positions must match."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    assert_same_nonfinite(actual, expected, what)
    a, e = actual.double(), expected.double()
    finite = e.isfinite()
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bound = atol + rtol * e.abs()
    bad = finite & (err > bound)
    if bad.any():
        ratio = torch.where(bad, err / bound, torch.zeros_like(err))
        pos = tuple(int(i) for i in (ratio == ratio.max()).nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements out of tolerance "
                             f"(atol {atol:g}, rtol {rtol:g}); worst at {pos}: actual {a[pos].item():.8g} "
                             f"expected {e[pos].item():.8g}")


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |x| (fp32): 2^(exponent(x) - 7); the smallest normal spacing below 2^-126."""
    mag = x.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def assert_bf16_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 2, floor: float = 2.0 ** -16,
                      what: str = "output") -> None:
    """|a - e| <= ulps bf16 ulps of e + floor * max|e| on finite positions; non-finite positions must match.
    The floor covers fp32 cancellation in elements far below the tensor's scale."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    assert_same_nonfinite(actual, expected, what)
    a, e = actual.double(), expected.double()
    finite = e.isfinite()
    if not finite.any():
        return
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bound = ulps * bf16_ulp(expected).double() + floor * e[finite].abs().max()
    bad = finite & (err > bound)
    if bad.any():
        ratio = torch.where(bad, err / bound, torch.zeros_like(err))
        pos = tuple(int(i) for i in (ratio == ratio.max()).nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements beyond {ulps} bf16 ulps; worst "
                             f"at {pos}: actual {a[pos].item():.8g} expected {e[pos].item():.8g}")
