"""Compile every registered Triton kernel spec for every GPU target with the triton that is first on
sys.path, and print one line per spec (scripts/triton36-codegen.sh puts triton 3.6, the GPU image's
version, there). Exit status 1 when a job fails to compile or a codegen claim does not hold."""
from __future__ import annotations

import sys

import triton

import dsv4_kernels  # noqa: F401  (registers every op)
from dsv4_kernels import dispatch
from dsv4_kernels.codegen import compile_many, targets_for


def main() -> int:
    jobs = [{"op": op, "impl": impl.name, "target": t.name}
            for op in dispatch.ops() for impl in dispatch.implementations(op) if impl.language == "triton"
            for t in targets_for(impl)]
    print(f"triton {triton.__version__}: {len(jobs)} jobs", flush=True)
    failed = 0
    for r in compile_many(jobs):
        head = f"{r['op']}/{r['impl']} {r['target']}"
        if not r["ok"]:
            failed += 1
            print(f"FAIL {head}: {r.get('error', '')[-600:]}")
            continue
        for a in r["artifacts"]:
            bad = [f"{k}: {v['evidence']}" for k, v in a.get("claims", {}).items() if not v["ok"]]
            failed += bool(bad)
            print(f"{'FAIL' if bad else 'ok  '} {head} {a.get('label')}" + (f" ({'; '.join(bad)})" if bad else ""))
    print(f"triton {triton.__version__}: {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
