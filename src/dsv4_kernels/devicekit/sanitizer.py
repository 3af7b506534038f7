"""The sanitizer step: compute-sanitizer memcheck, then racecheck, over launch.py's small launches.

racecheck only inspects shared-memory accesses, so running it over every kernel covers exactly the
kernels that use shared memory and costs little for the others. A finding names the kernel
("... at mix_kernel+0x1f0"); findings are attributed to every op/impl whose kernels carry that name.
Without a CUDA device or without compute-sanitizer the launches still run (unsanitised) so that the
launcher cannot rot, and every op/impl is reported as skipped with the reason.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["find_sanitizer", "parse_log", "attribute", "run", "TOOLS", "ERROR_EXIT"]

TOOLS = ("memcheck", "racecheck")
ERROR_EXIT = 86
_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+error", re.I)
_RACE_SUMMARY = re.compile(r"RACECHECK SUMMARY:\s*(\d+)\s+hazard", re.I)
_KERNEL = re.compile(r"\bat\s+(?:0x[0-9a-f]+\s+in\s+)?([A-Za-z_][A-Za-z0-9_]*)")
_SEARCH = ("/usr/local/cuda/bin/compute-sanitizer", "/opt/cuda/bin/compute-sanitizer")


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    return next((p for p in _SEARCH if os.access(p, os.X_OK)), None)


def parse_log(text: str) -> dict:
    """{"errors": N or None (no summary line), "kernels": names the findings point at}."""
    m = _SUMMARY.search(text) or _RACE_SUMMARY.search(text)
    kernels = []
    for line in text.splitlines():
        if line.startswith("=========") and " at " in line:
            km = _KERNEL.search(line)
            if km and km.group(1) not in kernels:
                kernels.append(km.group(1))
    return {"errors": int(m.group(1)) if m else None, "kernels": kernels}


def attribute(tool: str, parsed: dict, rc: int | None, launches: dict) -> dict:
    """Per op/impl of the launch: "clean", "N findings in <kernels>", or why the tool gave no verdict."""
    out = {}
    for key, entry in launches.items():
        if entry.get("status") != "ok":
            out[key] = f"not launched: {entry.get('reason', entry.get('status'))}"
        elif parsed["errors"] is None:
            out[key] = f"no verdict ({tool} exit {rc}, no summary line; see sanitizer.log)"
        elif parsed["errors"] == 0:
            out[key] = "clean"
        else:
            hit = [k for k in entry.get("kernels", []) if k in parsed["kernels"]]
            out[key] = (f"{parsed['errors']} findings in run; in this op's kernels: {', '.join(hit)}" if hit
                        else "clean (findings of the run are in other kernels)")
    return out


def _launch_cmd(json_path: Path, ops: tuple[str, ...] | None) -> list[str]:
    cmd = [sys.executable, "-m", "dsv4_kernels.devicekit.launch", "--language", "triton", "--json", str(json_path)]
    for op in ops or ():
        cmd += ["--op", op]
    return cmd


def run(work: Path, log_path: Path, deadline: float, device_type: str, ops: tuple[str, ...] | None) -> dict:
    """Returns {"status", "reason", "tools": {tool: {"rc", "errors", "kernels", "per_impl"}}, "launches"}."""
    sanitizer = find_sanitizer()
    reason = None
    if device_type != "cuda":
        reason = f"no CUDA device ({device_type} run): compute-sanitizer needs one"
    elif sanitizer is None:
        reason = "compute-sanitizer not found on PATH or under /usr/local/cuda/bin"
    if reason:
        json_path = work / "launch-plain.json"
        proc = subprocess.run(_launch_cmd(json_path, ops), capture_output=True, text=True,
                              timeout=max(5.0, deadline - time.monotonic()))
        launches = json.loads(json_path.read_text()) if json_path.is_file() else {}
        log_path.write_text(f"sanitizer skipped: {reason}\nunsanitised launches (exit {proc.returncode}):\n"
                            f"{proc.stdout}{proc.stderr[-3000:]}")
        return {"status": "skipped", "reason": reason, "tools": {}, "launches": launches,
                "per_impl": {k: f"skipped: {reason}" for k in launches}}
    tools, launches, logs = {}, {}, []
    for i, tool in enumerate(TOOLS):
        left = deadline - time.monotonic()
        if left < 20:
            tools[tool] = {"rc": None, "errors": None, "kernels": [], "status": "skipped: time budget reached"}
            continue
        budget = left * (0.6 if i == 0 else 1.0)
        json_path, tool_log = work / f"launch-{tool}.json", work / f"sanitizer-{tool}.txt"
        cmd = [sanitizer, "--tool", tool, "--error-exitcode", str(ERROR_EXIT), "--print-limit", "50",
               "--log-file", str(tool_log), *_launch_cmd(json_path, ops)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out = None, f"timed out after {budget:.0f} s\n{exc.stdout or ''}"
        text = tool_log.read_text(errors="replace") if tool_log.is_file() else ""
        logs.append(f"===== compute-sanitizer --tool {tool} (exit {rc})\n{text}\n----- program output\n{out[-4000:]}")
        parsed = parse_log(text)
        launched = json.loads(json_path.read_text()) if json_path.is_file() else {}
        launches = launches or launched
        tools[tool] = {"rc": rc, **parsed, "status": "ran", "per_impl": attribute(tool, parsed, rc, launched)}
    log_path.write_text("\n".join(logs) or "no sanitizer run fitted in the budget\n")
    per_impl = {}
    for key in launches:
        per_impl[key] = "; ".join(f"{tool} {t['per_impl'].get(key, t['status'])}" if "per_impl" in t
                                  else f"{tool} {t['status']}" for tool, t in tools.items())
    bad = any(t.get("errors") for t in tools.values()) or any(
        e.get("status") == "error" for e in launches.values())
    return {"status": "fail" if bad else "pass", "reason": "", "tools": tools, "launches": launches,
            "per_impl": per_impl}
