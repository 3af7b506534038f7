"""The bodies of the kit's steps, each run in its own process by kit.py:

    python -m dsv4_kernels.devicekit.steps STEP --out DIR --work DIR --budget-s S [--dry-run] [--op OP ...]

A step writes its result to WORK/STEP.json (and its output files to OUT) and stops by itself at its
deadline: loops check it before each op or case, subprocesses get it as their timeout.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

__all__ = ["Context", "DRY_RUN_OPS", "DRY_RUN_TESTS", "parse_junit", "quick_cases", "STEP_FUNCTIONS", "main"]

# The dry run's ops and tests: small enough for CI, and covering a reference-only op, a Triton kernel
# with a TileLang twin, and the demo op with all three languages.
DRY_RUN_OPS = ("sigmoid_gate", "mhc_sinkhorn", "mhc_post")
DRY_RUN_TESTS = ("tests/sigmoid_gate/test_sigmoid_gate.py",)


@dataclass(frozen=True)
class Context:
    out: Path
    work: Path
    deadline: float            # time.monotonic() at which the step must be done
    dry_run: bool
    ops: tuple[str, ...] | None
    tests: Path
    partial: dict = field(default_factory=dict)   # what a step has so far, reported if it is interrupted

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _device():
    import torch
    from dsv4_kernels import platform
    info = platform.machine_device()
    if info.backend in ("cuda", "rocm"):
        return torch.device("cuda")
    return torch.device("cpu")


def _selected_ops(ctx: Context) -> list[str]:
    import dsv4_kernels  # noqa: F401
    from dsv4_kernels import dispatch
    ops = ctx.ops or (DRY_RUN_OPS if ctx.dry_run else None)
    return [op for op in dispatch.ops() if not ops or op in ops]


def step_machine(ctx: Context) -> dict:
    from dsv4_kernels.devicekit import machine, summary
    facts = machine.run(_device(), ctx.dry_run)
    for line in summary.env_lines(facts, ctx.dry_run):
        print(line, flush=True)
    return {"status": "pass", **facts}


def _numerics(ctx: Context, languages: tuple[str, ...]) -> dict:
    from dsv4_kernels import dispatch, ladder, platform
    device = _device()
    backend = platform.device_info(device).backend
    results = ctx.partial.setdefault("results", {})
    ops = _selected_ops(ctx)   # ops with kernels first: a short budget checks them before reference-only ops
    ops.sort(key=lambda op: all(i.language == "reference" for i in dispatch.implementations(op)))
    for op in ops:
        for impl in dispatch.implementations(op):
            if impl.language not in languages or not impl.serves(backend):
                continue
            key = f"{op}/{impl.name}"
            if ctx.left() <= 0:
                results[key] = {"status": "skip", "reason": "time budget reached"}
                continue
            reason = impl.available(backend)
            if reason:
                results[key] = {"status": "skip", "reason": reason}
                continue
            start = time.monotonic()
            try:
                results[key] = {"status": "pass", "reason": ladder.run_cases(op, impl.name, device)}
            except LookupError as exc:
                results[key] = {"status": "skip", "reason": str(exc)}
            except Exception as exc:  # a failing kernel is a result, not a crash of the kit
                results[key] = {"status": "fail", "reason": f"{type(exc).__name__}: {str(exc)[:500]}"}
            results[key]["seconds"] = round(time.monotonic() - start, 2)
            print(f"numerics {key} on {backend}: {results[key]['status']}", flush=True)
    bad = [k for k, r in results.items() if r["status"] == "fail"]
    return {"status": "fail" if bad else "pass", "backend": backend, "results": results,
            "reason": f"failed: {', '.join(bad)}" if bad else ""}


def step_numerics(ctx: Context) -> dict:
    return _numerics(ctx, ("reference", "triton"))


def step_tilelang(ctx: Context) -> dict:
    from dsv4_kernels import platform, toolchains
    backend = platform.device_info(_device()).backend
    reason = toolchains.tilelang_available(backend)
    if reason:
        if not toolchains.importable("tilelang"):
            reason += "; carry the wheels of scripts/fetch-device-wheels.sh (README: device kit)"
        return {"status": "skipped", "reason": reason, "results": {}}
    return _numerics(ctx, ("tilelang",))


def parse_junit(path: Path) -> dict:
    """Counts of a pytest junit XML, per file too, and the ids of failed tests."""
    root = ET.parse(path).getroot()
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    per_file: dict[str, dict] = {}
    failed = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        file = case.get("file") or case.get("classname", "").rsplit(".", 1)[0]
        outcome = "passed"
        if case.find("failure") is not None:
            outcome = "failed"
        elif case.find("error") is not None:
            outcome = "errors"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        counts["tests"] += 1
        counts[outcome] += 1
        row = per_file.setdefault(file, {"passed": 0, "failed": 0, "errors": 0, "skipped": 0})
        row[outcome] += 1
        if outcome in ("failed", "errors"):
            failed.append(name)
    return {**counts, "per_file": per_file, "failed_ids": failed}


def _run_until(cmd: list[str], deadline: float, log_prefix: str) -> tuple[int | None, bool]:
    """Run cmd, streaming its output; SIGINT at the deadline (pytest then writes its report), SIGKILL
    10 s later. (exit code or None, whether the deadline stopped it)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    stopped = False
    import threading

    def pump():
        for line in proc.stdout:
            print(f"{log_prefix}{line}", end="", flush=True)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stopped = True
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    return proc.returncode, stopped


def step_pytest(ctx: Context) -> dict:
    from dsv4_kernels import platform
    junit = ctx.out / "junit.xml"
    info = platform.machine_device()
    if ctx.dry_run or info.backend == "cpu":
        select = ["--backend=cpu", *(str(ctx.tests.parent / t) for t in DRY_RUN_TESTS)]
    else:
        select = [f"--backend={info.backend}", "-m", "device", str(ctx.tests)]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit2",
           f"--junitxml={junit}", "-rfE", *select]
    rc, stopped = _run_until(cmd, ctx.deadline - 5, "pytest| ")
    result = {"command": " ".join(cmd[1:]), "selection": " ".join(select), "exit": rc, "stopped_at_budget": stopped}
    if junit.is_file():
        result["junit"] = parse_junit(junit)
    else:
        junit.write_text('<?xml version="1.0" encoding="utf-8"?><testsuites/>\n')
        result["junit"] = None
    counts = result["junit"] or {}
    ok = rc == 0 and not stopped and counts.get("failed", 1) == 0 and counts.get("errors", 1) == 0
    status = "pass" if ok else ("timeout" if stopped else "fail")
    return {"status": status, **result,
            "reason": "" if ok else ("stopped at the budget" if stopped else f"pytest exit {rc}")}


def step_sanitizer(ctx: Context) -> dict:
    from dsv4_kernels.devicekit import sanitizer
    ops = tuple(_selected_ops(ctx)) if (ctx.ops or ctx.dry_run) else None
    return sanitizer.run(ctx.work, ctx.out / "sanitizer.log", ctx.deadline, _device().type, ops)


def quick_cases(cases: list, kernel_ops: set[str]) -> list:
    """Per op: the smallest decode case of each model and the smallest prefill case; ops that have a
    kernel implementation first, so that a short budget measures them before the reference-only ops."""
    chosen = {}
    for c in cases:
        keys = [(c.op, "decode", c.model)] if c.phase == "decode" else [(c.op, "prefill")]
        for key in keys:
            if key not in chosen or c.tokens < chosen[key].tokens:
                chosen[key] = c
    picked = [c for c in cases if c in chosen.values()]
    return sorted(picked, key=lambda c: (c.op not in kernel_ops, c.op))


def step_bench(ctx: Context) -> dict:
    from dsv4_kernels import dispatch, platform
    from dsv4_kernels.backends import Peak
    from dsv4_kernels.bench import records, runner
    from dsv4_kernels.bench.case import all_cases
    from dsv4_kernels.bench.roofline import find_peak
    from dsv4_kernels.shapes import get_grid
    device = _device()
    info = platform.device_info(device)
    grid = get_grid("cpu" if device.type == "cpu" else "full")
    ops = set(_selected_ops(ctx))
    kernel_ops = {op for op in ops if any(i.language != "reference" for i in dispatch.implementations(op))}
    cases = quick_cases([c for c in all_cases(grid) if c.op in ops], kernel_ops)
    peak = None
    machine = ctx.work / "machine.json"
    if machine.is_file() and device.type != "cpu":
        m = json.loads(machine.read_text())
        sheet = find_peak(info)
        measured = m.get("measured") or {}
        if sheet and measured.get("copy_tbps"):
            peak = Peak(f"{sheet.chip} (measured)", sheet.arch, bf16_tflops=measured["bf16_tflops"],
                        fp8_tflops=sheet.fp8_tflops, fp4_tflops=sheet.fp4_tflops, hbm_tbps=measured["copy_tbps"],
                        source=f"dsv4k device-check: copy and bf16 matmul measured; fp8/fp4 from {sheet.source}")
    # torch.compile(reference) costs tens of seconds per op: spent only where it is the bar a kernel must
    # clear (ops with kernels); reference-only ops are timed eagerly, after the kernel ops.
    opts = runner.Options(device=device, compile=not ctx.dry_run, compile_budget_s=20.0, peers=True,
                          interpreter=ctx.dry_run, peak=peak)
    env = records.environment(info)
    print(runner.format_header(), flush=True)
    done = ctx.partial.setdefault("rows", [])

    def show(case_rows):
        done.extend(r for r in case_rows if not r["status"].startswith("skipped"))
        for r in case_rows:
            print(runner.format_row(r), flush=True)
    ctx.partial["write"] = lambda: records.write_jsonl(ctx.out / "bench.jsonl", done)
    rows = runner.run([c for c in cases if c.op in kernel_ops], opts, env, on_case=show, deadline=ctx.deadline - 5)
    rows += runner.run([c for c in cases if c.op not in kernel_ops], replace(opts, compile=False), env,
                       on_case=show, deadline=ctx.deadline - 5)
    kept = [r for r in rows if not r["status"].startswith("skipped")]
    records.write_jsonl(ctx.out / "bench.jsonl", kept)
    unrun = sum(r["status"] == runner.BUDGET_REACHED for r in rows)
    bad = [f"{r['op']} {r['label']} {r['impl']}" for r in kept
           if not r["impl"].startswith("peer:") and (r["status"].startswith("error") or r["correct"] is False)]
    status = "fail" if bad else ("timeout" if unrun else "pass")
    return {"status": status, "cases": len(cases), "cases_not_run": unrun, "records": len(kept),
            "peak": asdict(peak) if peak else None, "grid": grid.name,
            "reason": f"failed: {'; '.join(bad[:10])}" if bad else (f"{unrun} cases not run (budget)" if unrun else "")}


STEP_FUNCTIONS = {"machine": step_machine, "numerics": step_numerics, "pytest": step_pytest,
                  "sanitizer": step_sanitizer, "tilelang": step_tilelang, "bench": step_bench}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv4_kernels.devicekit.steps")
    p.add_argument("step", choices=sorted(STEP_FUNCTIONS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--tests", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--op", action="append")
    a = p.parse_args(argv)
    start = time.monotonic()
    ctx = Context(a.out, a.work, start + a.budget_s, a.dry_run, tuple(a.op) if a.op else None, a.tests)
    try:
        result = STEP_FUNCTIONS[a.step](ctx)
    except KeyboardInterrupt:  # the orchestrator's stop at the budget: keep what was done
        if "write" in ctx.partial:
            ctx.partial.pop("write")()
        rows = ctx.partial.pop("rows", None)
        result = {"status": "timeout", "reason": "interrupted at the budget; partial results", **ctx.partial}
        if rows is not None:
            result["records"] = len(rows)
    except Exception as exc:  # the orchestrator reports it; the other steps still run
        import traceback
        traceback.print_exc()
        result = {"status": "fail", "reason": f"{type(exc).__name__}: {str(exc)[:500]}"}
    result["seconds"] = round(time.monotonic() - start, 2)
    (a.work / f"{a.step}.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
