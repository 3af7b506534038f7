"""Host overhead of one public call, on the CPU: what the layers in front of an implementation cost.

    python -m dsv4_kernels.bench.host [--calls N] [--impl reference]

Times, per call (the fastest of 7 runs of N calls: the least disturbed by other work): the public op
(validation, torch.library, dispatcher, implementation), dispatch.call (dispatcher and implementation),
dispatch.select (the selection alone, impl= named and automatic), the cached selection a repeated call
pays (dispatch.selection), and the implementation called directly. Public op minus direct call is the
host overhead in front of a kernel launch; on a GPU the launch itself comes on top. The inputs are small
(T = 1, dim 256; sigmoid_gate: the demo op, one multiply) so that the implementation's work stays small.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch


def per_call_us(fn: Callable[[], object], calls: int, repeats: int = 7) -> float:
    """The fastest over `repeats` runs of the mean wall time of `calls` back-to-back calls, in
    microseconds (on a shared machine the minimum is the run least disturbed by others)."""
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return min(runs)


def _cases(device: torch.device) -> dict[str, tuple[tuple, dict]]:
    T, dim = 1, 256
    x = torch.randn(T, 4, dim, device=device).to(torch.bfloat16)
    f = torch.randn(T, dim, device=device).to(torch.bfloat16)
    post, comb = torch.rand(T, 4, device=device), torch.rand(T, 4, 4, device=device)
    return {"mhc_post": ((f, x, post, comb), {}),
            "sigmoid_gate": ((f, f), {})}


def measure(impl: str = "reference", calls: int = 2000, device: str = "cpu") -> list[dict]:
    """One row per op: us per call of the public op, dispatch.call, dispatch.select (impl= named and
    automatic), the cached selection and the direct call; overhead_us = public - direct."""
    import dsv4_kernels
    from dsv4_kernels import dispatch
    rows = []
    for op, (args, kwargs) in _cases(torch.device(device)).items():
        public = getattr(dsv4_kernels, op)
        direct = dispatch.get(op, impl)
        row = {"op": op, "impl": impl,
               "public_us": per_call_us(lambda: public(*args, impl=impl, **kwargs), calls),
               "dispatch_call_us": per_call_us(lambda: dispatch.call(op, *args, impl=impl, **kwargs), calls),
               "select_us": per_call_us(lambda: dispatch.select(op, args, kwargs, impl=impl), calls),
               "select_auto_us": per_call_us(lambda: dispatch.select(op, args, kwargs), calls),
               "cached_us": (per_call_us(lambda: dispatch.selection(op, args, kwargs), calls)
                             if hasattr(dispatch, "selection") else float("nan")),
               "direct_us": per_call_us(lambda: direct(*args, **kwargs), calls)}
        row["overhead_us"] = row["public_us"] - row["direct_us"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv4_kernels.bench.host", description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--impl", default="reference")
    args = p.parse_args(argv)
    cols = ("public_us", "dispatch_call_us", "select_us", "select_auto_us", "cached_us", "direct_us", "overhead_us")
    print(f"{'op':<13} " + " ".join(f"{c:>16}" for c in cols))
    for row in measure(args.impl, args.calls):
        print(f"{row['op']:<13} " + " ".join(f"{row[c]:>16.1f}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
