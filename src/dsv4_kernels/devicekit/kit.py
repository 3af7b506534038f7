"""The orchestrator of `dsv4k device-check`: runs each step in its own process within its budget, logs
everything to run.log, then writes kit.json, summary.md and roofline.png (see the package docstring)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from dsv4_kernels.devicekit.budget import GRACE_S, STEP_NAMES, STEPS, step_budget

__all__ = ["OUTPUT_FILES", "add_arguments", "run_step_process", "main"]

OUTPUT_FILES = ("summary.md", "bench.jsonl", "junit.xml", "sanitizer.log", "roofline.png", "kit.json", "run.log")
DEFAULT_BUDGET_S = 450.0   # 7.5 min: with the wrapper's install, the whole call stays under 8


def add_arguments(p) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for the results (created; at most 8 files)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"wall-clock budget of the whole run in seconds (default {DEFAULT_BUDGET_S:g})")
    p.add_argument("--dry-run", action="store_true",
                   help="run every step on this CPU (Triton interpreter, a few small ops): CI's check of the kit")
    p.add_argument("--op", action="append", help="only these ops (repeatable; default: all, or the dry run's few)")
    p.add_argument("--steps", help=f"comma-separated subset of the steps ({','.join(STEP_NAMES)}); report always runs")
    p.add_argument("--tests", type=Path, default=Path("tests"), help="the test folder pytest runs (default ./tests)")


class _Log:
    """Lines to the terminal and to run.log, each prefixed with the seconds since the start."""

    def __init__(self, path: Path):
        self.start = time.monotonic()
        self.file = open(path, "w", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        text = f"[{time.monotonic() - self.start:6.1f}s] {line.rstrip()}"
        with self.lock:
            print(text, flush=True)
            self.file.write(text + "\n")

    def close(self) -> None:
        self.file.close()


def run_step_process(cmd: list[str], budget_s: float, log, env: dict | None = None) -> tuple[int | None, str]:
    """Run one step's process, streaming its output to log. At budget + GRACE_S it gets SIGINT, and
    SIGKILL GRACE_S later. Returns (exit code or None, "ok" | "stopped at the budget" | "killed")."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                            start_new_session=True)
    reader = threading.Thread(target=lambda: [log(line) for line in proc.stdout], daemon=True)
    reader.start()
    how = "ok"
    try:
        proc.wait(timeout=budget_s + GRACE_S)
    except subprocess.TimeoutExpired:
        how = "stopped at the budget"
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            how = "killed"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    return proc.returncode, how


def _selected_steps(text: str | None) -> tuple[str, ...]:
    if not text:
        return STEP_NAMES
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [n for n in names if n not in STEP_NAMES]
    if unknown:
        raise ValueError(f"--steps: unknown step(s) {', '.join(unknown)}; expected some of {', '.join(STEP_NAMES)}")
    return names


def main(args) -> int:
    """Run the kit. Exit 0 when every step that ran passed or was skipped with a reason, else 1."""
    if args.budget_s <= 0:
        raise ValueError(f"--budget-s: expected a positive number of seconds, got {args.budget_s:g}")
    if not args.tests.is_dir():
        raise ValueError(f"--tests: expected the repository's test folder, got {args.tests} (run from the checkout)")
    wanted = _selected_steps(args.steps)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dsv4k-kit-"))
    log = _Log(out / "run.log")
    start = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    log(f"dsv4k device-check: budget {args.budget_s:g} s{' (dry run on this CPU)' if args.dry_run else ''}; "
        f"steps {', '.join(wanted)}; out {out}")
    steps = {}
    try:
        to_run = [s for s in STEPS if s.name in wanted and s.name != "report"] + [STEPS[-1]]
        for i, step in enumerate(to_run[:-1]):
            budget = step_budget(args.budget_s - (time.monotonic() - start), step, to_run[i + 1:])
            log(f"== step {step.name} ({step.what}): budget {budget:.0f} s")
            if budget < 1:
                steps[step.name] = {"status": "timeout", "reason": "no time left in the budget", "seconds": 0}
                continue
            cmd = [sys.executable, "-m", "dsv4_kernels.devicekit.steps", step.name, "--out", str(out),
                   "--work", str(work), "--budget-s", f"{budget:.1f}", "--tests", str(args.tests)]
            cmd += ["--dry-run"] if args.dry_run else []
            for op in args.op or ():
                cmd += ["--op", op]
            t0 = time.monotonic()
            rc, how = run_step_process(cmd, budget, log, env)
            result_file = work / f"{step.name}.json"
            result = json.loads(result_file.read_text()) if result_file.is_file() else {
                "status": "timeout" if how != "ok" else "fail",
                "reason": f"the step's process ended ({how}, exit {rc}) without writing its result"}
            result.setdefault("seconds", round(time.monotonic() - t0, 2))
            result["budget_s"] = round(budget, 1)
            steps[step.name] = result
            log(f"== step {step.name}: {result['status']} in {result['seconds']:.0f} s"
                + (f": {result['reason']}" if result.get("reason") else ""))
        from dsv4_kernels.devicekit import summary
        report = summary.write_all(out, steps, args.dry_run, time.monotonic() - start)
        steps["report"] = report
        (out / "kit.json").write_text(json.dumps({"dry_run": args.dry_run, "budget_s": args.budget_s,
                                                  "elapsed_s": round(time.monotonic() - start, 1), "steps": steps},
                                                 indent=1, default=str))
        log(f"== step report: {report['status']}" + (f": {report['reason']}" if report.get("reason") else ""))
        log(f"done in {time.monotonic() - start:.0f} s; files: {', '.join(sorted(p.name for p in out.iterdir()))}")
    finally:
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(s["status"] in ("pass", "skipped") for s in steps.values()) else 1
