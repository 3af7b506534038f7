"""Comparisons shared by tests, `dsv4k check` and the benchmarks (SPEC section 6 tolerances).

Each helper raises AssertionError with the worst offending position and values, so a failing
check says where and by how much.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["calc_diff", "assert_calc_diff", "assert_same_nonfinite", "assert_close", "assert_bf16_close", "bf16_ulp",
           "bf16_error_stats", "poison_", "guard_bands", "GuardBands", "GuardedBuffer", "CANARY_BYTE"]


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


def bf16_error_stats(actual: torch.Tensor, expected: torch.Tensor, floor: float = 2.0 ** -16,
                     ulps: float = 2) -> dict:
    """Rounding statistics of a bf16 result against its bf16 reference (same shape), in bf16 ulps of the
    expected value, over the finite elements where the ulp bound is not swamped by the cancellation floor
    (ulps * ulp(e) >= floor * max|e|; there the rounding of an fp32 sum no longer says anything about the
    final rounding step).

    Returns {"count": elements counted, "exact": fraction bit-identical to the reference, "mean_ulps":
    mean of (a - e) / ulp(e), "toward_zero_ulps": mean of sign(e) * (a - e) / ulp(e)}. A correct round
    to nearest even differs from the reference only where the two fp32 values straddle a rounding
    boundary: exact near 1, both means near 0. Truncation (round toward zero) loses half an ulp on
    average: exact about 1/2, toward_zero_ulps about -1/2. Rounding toward -inf shows in mean_ulps.
    """
    a, e = actual.float(), expected.float()
    fin = e.isfinite() & a.isfinite()
    if not fin.any():
        return {"count": 0, "exact": 1.0, "mean_ulps": 0.0, "toward_zero_ulps": 0.0}
    ulp = bf16_ulp(e).double()
    scale = float(e[fin].abs().max())
    keep = fin & (ulps * ulp >= floor * scale)
    n = int(keep.sum())
    if n == 0:
        return {"count": 0, "exact": 1.0, "mean_ulps": 0.0, "toward_zero_ulps": 0.0}
    a_bf, e_bf = actual[keep].to(torch.bfloat16), expected[keep].to(torch.bfloat16)
    exact = float((a_bf.view(torch.int16) == e_bf.view(torch.int16)).double().mean())
    err = (a[keep].double() - e[keep].double()) / ulp[keep]
    return {"count": n, "exact": exact, "mean_ulps": float(err.mean()),
            "toward_zero_ulps": float((torch.sign(e[keep].double()) * err).mean())}


# Defaults of the rounding statistics in assert_bf16_close (see there): what a correct round to nearest
# even passes with margin on the project's test data, and truncation fails by far.
BF16_MIN_EXACT = 0.9
BF16_MAX_BIAS = 0.1
BF16_MIN_COUNT = 64


def assert_bf16_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 2, floor: float = 2.0 ** -16,
                      what: str = "output", *, min_exact: float = BF16_MIN_EXACT, max_bias: float = BF16_MAX_BIAS,
                      min_count: int = BF16_MIN_COUNT) -> None:
    """A bf16 result against its bf16 reference, three checks:

    1. bound: |a - e| <= ulps bf16 ulps of e + floor * max|e| on finite positions; non-finite positions
       must match. The floor covers fp32 cancellation in elements far below the tensor's scale.
    2. exact fraction: at least `min_exact` of the counted elements (bf16_error_stats) are bit-identical
       to the reference.
    3. bias: |mean signed error| and |mean error toward zero| are at most `max_bias` ulps.
    A kernel that rounds to nearest even from a slightly different fp32 value passes 2 and 3; one that
    truncates (or rounds in one direction) stays inside the 2-ulp bound of 1 but fails 2 and 3 on any
    tensor of a few dozen elements. Checks 2 and 3 run only when at least `min_count` elements are
    counted (fewer cannot tell a bias from chance); min_exact=0 and max_bias=inf switch them off.
    Defaults BF16_MIN_EXACT, BF16_MAX_BIAS and BF16_MIN_COUNT: the measured margins are in
    tests/test_harness.py.
    """
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
    stats = bf16_error_stats(actual, expected, floor, ulps)
    if stats["count"] < min_count:
        return
    summary = (f"{stats['count']} elements counted: {stats['exact']:.3f} bit-exact, mean error "
               f"{stats['mean_ulps']:+.3f} ulps, toward zero {stats['toward_zero_ulps']:+.3f} ulps")
    if stats["exact"] < min_exact:
        raise AssertionError(f"{what}: only {stats['exact']:.3f} of the elements are bit-identical to the "
                             f"reference, expected at least {min_exact} ({summary}; a truncating or "
                             f"otherwise wrong fp32->bf16 rounding?)")
    for key, label in (("mean_ulps", "mean signed error"), ("toward_zero_ulps", "mean error toward zero")):
        if abs(stats[key]) > max_bias:
            raise AssertionError(f"{what}: {label} {stats[key]:+.3f} bf16 ulps exceeds {max_bias} in magnitude "
                                 f"({summary}; rounding biased in one direction?)")


_POISON_INT = {torch.uint8: 0xA5, torch.int8: -91, torch.int16: -23131, torch.int32: -1515870811,
               torch.int64: -6510615555426900571}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill t in place with a value no correct kernel leaves behind: NaN (floats), True (bool), 0xA5 bytes
    (integers). Other dtypes (fp8, fp4 storage) are left as they are."""
    if t.numel() == 0:
        return t
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    if t.dtype in _POISON_INT:
        return t.fill_(_POISON_INT[t.dtype])
    return t


CANARY_BYTE = 0x5A  # the guard bands' byte: 0x5A5A5A5A is a finite fp32 (1.5e16), bf16 1.5e16, int 1515870810
GUARD_ALIGN = 256   # guard bands are whole multiples of this many bytes: the view keeps the buffer's alignment
GUARD_MAX = 1 << 20  # bytes per band at most


@dataclass
class GuardedBuffer:
    """One buffer handed out inside guard_bands(): `view` (what the caller got) sits in `flat`
    between two bands of `band` elements filled with CANARY_BYTE."""

    flat: torch.Tensor
    view: torch.Tensor
    band: int
    origin: str

    def corrupted(self) -> str | None:
        """None while both bands hold CANARY_BYTE, else where the first changed element is."""
        n, size = self.view.numel(), self.flat.element_size()
        raw = self.flat.detach().view(torch.uint8)
        for side, lo, hi in (("before", 0, self.band), ("after", self.band + n, 2 * self.band + n)):
            bad = (raw[lo * size:hi * size] != CANARY_BYTE).nonzero()
            if bad.numel():
                offset = lo + int(bad[0, 0]) // size - self.band  # element offset from the view's first element
                return (f"guard band {side} the {self.origin} buffer of shape {tuple(self.view.shape)} "
                        f"{self.view.dtype} was overwritten: first changed element at offset {offset} "
                        f"(valid offsets 0..{n - 1})")
        return None


class GuardBands:
    """The buffers handed out so far (in allocation order); check() raises on the first corrupted one."""

    def __init__(self) -> None:
        self.buffers: list[GuardedBuffer] = []

    def check(self) -> None:
        for buf in self.buffers:
            problem = buf.corrupted()
            if problem:
                raise AssertionError(problem)


def _band_elements(numel: int, element_size: int) -> int:
    """Elements per guard band: the buffer's own size (an off-by-one on the outermost dimension writes a
    whole row past the end), at least GUARD_ALIGN and at most GUARD_MAX bytes, in whole GUARD_ALIGN units."""
    nbytes = min(max(numel * element_size, GUARD_ALIGN), GUARD_MAX)
    nbytes = -(-nbytes // GUARD_ALIGN) * GUARD_ALIGN
    return max(1, nbytes // element_size)


@contextlib.contextmanager
def guard_bands():
    """Inside the block, torch.empty and torch.empty_like return poisoned (poison_) views into larger
    buffers with a guard band before and after, filled with CANARY_BYTE. On a normal exit every band is
    checked and the first overwritten one raises AssertionError naming the buffer's shape, dtype and the
    element offset of the first change (negative: before the start). Kernel outputs and workspaces
    allocated inside are guarded; a store that runs past a mask (t <= T instead of t < T) or before the
    start lands in a band and fails the check deterministically, whatever the memory around it held.

    Only contiguous results of the plain forms are guarded (an `out=` call, a preserved non-contiguous
    layout or pinned memory is returned as torch made it). Yields a GuardBands (`.buffers`, `.check()`).
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like
    bands = GuardBands()

    def guarded(template: torch.Tensor, origin: str) -> torch.Tensor:
        if not template.is_contiguous() or template.is_pinned() or template.layout != torch.strided:
            return poison_(template)
        n = template.numel()
        band = _band_elements(n, template.element_size())
        flat = real_empty(n + 2 * band, dtype=template.dtype, device=template.device)
        flat.view(torch.uint8).fill_(CANARY_BYTE)
        view = flat[band:band + n].view(template.shape)
        poison_(view)
        if template.requires_grad:
            view.requires_grad_(True)
        bands.buffers.append(GuardedBuffer(flat, view, band, origin))
        return view

    def empty(*args, **kwargs):
        if "out" in kwargs or kwargs.get("memory_format", torch.contiguous_format) != torch.contiguous_format:
            return poison_(real_empty(*args, **kwargs))
        return guarded(real_empty(*args, **kwargs), "torch.empty")

    def empty_like(*args, **kwargs):
        return guarded(real_empty_like(*args, **kwargs), "torch.empty_like")

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield bands
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like
    bands.check()
