"""Host overhead of one public call, on the CPU: what the layers in front of an implementation cost.

    python -m dsv4_kernels.bench.host [--calls N] [--op NAME ...]

For every op (its first ladder sample case), an implementation that does no work ("host-null": it returns
the reference's outputs, computed once) is registered for the CPU and timed three ways: the public op
(validation, the eager custom-op path, the dispatcher, the implementation), dispatch.call (the
dispatcher and the implementation) and the implementation called directly. Public op minus direct call
is the host time in front of a kernel launch; on a GPU the launch itself comes on top (the device kit's
bench measures that, as call_us - graph_us). Each figure is the fastest of 7 runs of N back-to-back calls:
the run least disturbed by other work on the machine. Checked mode (DSV4K_CHECK) is off.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch

NULL = "host-null"


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


def _register_null(op: str, outputs) -> None:
    """A CPU implementation of `op` that returns `outputs` (module attribute _null_<op>), never chosen
    automatically (priority below the reference's)."""
    from dsv4_kernels import dispatch
    setattr(sys.modules[__name__], f"_null_{op}", lambda *args, **kwargs: outputs)
    dispatch.register(dispatch.Implementation(op, NULL, "reference", ("cpu",), entry=f"{__name__}:_null_{op}",
                                              priority=-100))


def _case(op: str):
    from dsv4_kernels import ladder
    _, args, kwargs = ladder.get_check(op).cases(torch.device("cpu"))[0]
    return args, kwargs


def _fresh(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def measure(calls: int = 2000, ops: list[str] | None = None) -> list[dict]:
    """One row per op: us per call of the public op, dispatch.call and the direct call of the no-work
    implementation; overhead_us = public - direct."""
    import dsv4_kernels
    from dsv4_kernels import dispatch
    rows = []
    for op in ops or dispatch.ops():
        args, kwargs = _case(op)
        outputs = dispatch.get(op, "reference")(*_fresh(args), **kwargs)
        _register_null(op, outputs)
        public = getattr(dsv4_kernels, op)
        direct = dispatch.get(op, NULL)
        dispatch.clear_cache()
        row = {"op": op,
               "public_us": per_call_us(lambda: public(*args, impl=NULL, **kwargs), calls),
               "dispatch_call_us": per_call_us(lambda: dispatch.call(op, *args, impl=NULL, **kwargs), calls),
               "direct_us": per_call_us(lambda: direct(*args, **kwargs), calls)}
        row["overhead_us"] = row["public_us"] - row["direct_us"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv4_kernels.bench.host", description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--op", action="append", help="only these ops (repeatable)")
    args = p.parse_args(argv)
    cols = ("public_us", "dispatch_call_us", "direct_us", "overhead_us")
    rows = measure(args.calls, args.op)
    width = max(len(r["op"]) for r in rows)
    print(f"{'op':<{width}} " + " ".join(f"{c:>16}" for c in cols))
    for row in rows:
        print(f"{row['op']:<{width}} " + " ".join(f"{row[c]:>16.1f}" for c in cols))
    print(f"host overhead per call (public - direct): median {sorted(r['overhead_us'] for r in rows)[len(rows) // 2]:.1f}"
          f" us, max {max(r['overhead_us'] for r in rows):.1f} us over {len(rows)} ops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
