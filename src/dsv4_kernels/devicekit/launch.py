"""The program compute-sanitizer runs: one small launch of every kernel implementation of a language.

For each op with an implementation in that language, the smallest sample case of its OpCheck that the
implementation supports and that has tokens (a case of T = 0 launches nothing) is run once and the
device synchronised. Results go to a JSON file: per op, the case, "ok" or the error. A sanitizer
finding is attributed to ops through the kernel names of each implementation's codegen specs.

    python -m dsv4_kernels.devicekit.launch --language triton --json OUT.json [--op OP ...]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

__all__ = ["smallest_case", "kernel_names", "launch_all", "main"]


def _elements(args: tuple, kwargs: dict) -> int:
    return sum(a.numel() for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))


def _empty_first(args: tuple) -> bool:
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return first is not None and first.numel() == 0


def smallest_case(op: str, impl, device: torch.device):
    """(label, args, kwargs) of the smallest non-empty sample case impl supports, or None."""
    from dsv4_kernels import ladder
    best = None
    for label, args, kwargs in ladder.get_check(op).cases(device):
        if _empty_first(args) or impl.supports(*args, **kwargs):
            continue
        size = _elements(args, kwargs)
        if best is None or size < best[0]:
            best = (size, label, args, kwargs)
    return None if best is None else best[1:]


def kernel_names(op: str, impl) -> list[str]:
    """Names of the device kernels an implementation launches, from its codegen specs (CUDA target)."""
    from dsv4_kernels.backends import find_target
    names = []
    for spec in impl.codegen_specs(find_target("sm_90a")):
        fn = getattr(spec, "fn", None)
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", None)
        if name is None and hasattr(spec, "func"):
            name = getattr(spec.func, "__name__", None) or spec.label
        if name and name not in names:
            names.append(name)
    return names


def launch_all(language: str, device: torch.device, ops: tuple[str, ...] | None = None) -> dict:
    import dsv4_kernels  # noqa: F401  (registers the ops)
    from dsv4_kernels import dispatch, platform
    backend = platform.device_info(device).backend
    results = {}
    for op in dispatch.ops():
        if ops and op not in ops:
            continue
        for impl in dispatch.implementations(op):
            if impl.language != language or not impl.serves(backend):
                continue
            key = f"{op}/{impl.name}"
            entry = {"kernels": kernel_names(op, impl)}
            reason = impl.available(backend)
            case = None if reason else smallest_case(op, impl, device)
            if reason or case is None:
                entry.update(status="skipped", reason=reason or "no sample case this implementation supports")
            else:
                label, args, kwargs = case
                entry["case"] = label
                try:
                    dispatch.call(op, *args, impl=impl.name, **kwargs)
                    if device.type != "cpu":
                        torch.cuda.synchronize(device)
                    entry["status"] = "ok"
                except Exception as exc:  # recorded per op: one bad kernel must not hide the others
                    entry.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            results[key] = entry
            print(f"launched {key}: {entry['status']}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv4_kernels.devicekit.launch")
    p.add_argument("--language", default="triton")
    p.add_argument("--json", required=True)
    p.add_argument("--device", default=None)
    p.add_argument("--op", action="append")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = launch_all(a.language, device, tuple(a.op) if a.op else None)
    with open(a.json, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
