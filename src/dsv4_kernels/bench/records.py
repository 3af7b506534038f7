"""Result records: the run's environment, JSON lines on disk, and the comparison of two runs.

One record per (case, implementation or peer); the keys are listed in bench/README.md. `compare` matches
two runs by (op, impl, label, chip) and flags a slowdown beyond the threshold or a case that went from
correct to incorrect.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform as _pyplatform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv4_kernels import toolchains
from dsv4_kernels.platform import DeviceInfo

__all__ = ["SCHEMA", "REQUIRED_KEYS", "checkout_root", "git_commit", "environment", "default_out_dir",
           "slug", "result_path", "write_jsonl", "read_jsonl", "Change", "compare", "format_changes"]

SCHEMA = 1
REQUIRED_KEYS = (
    "schema", "run", "date", "commit", "chip", "device_name", "backend", "arch", "driver", "torch", "triton",
    "tilelang", "dsv4_kernels", "timer", "cache_flush_bytes", "op", "family", "impl", "language", "label",
    "model", "phase", "tokens", "variant", "shape", "dispatched", "status", "us", "p10", "p90", "iters",
    "first_call_us", "warmup_us", "bytes", "flops", "compute", "gbps", "tflops", "pct_peak", "bound",
    "peak_chip", "peak_tbps", "peak_tflops", "speedup_vs_reference", "speedup_vs_compiled", "reference_us",
    "compiled_us", "compiled_first_call_us", "compiled_status", "correct", "reason", "call_us", "graph_us",
    "host_overhead_us", "graph_status",
)
KEY = ("op", "impl", "label", "chip")


def checkout_root() -> Path | None:
    """The source checkout this package runs from (editable install), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "dsv4_kernels").is_dir() else None


def _git_dir(root: Path) -> Path | None:
    dot = root / ".git"
    if dot.is_dir():
        return dot
    if dot.is_file():  # a worktree or submodule: "gitdir: <path>"
        text = dot.read_text().strip()
        if text.startswith("gitdir:"):
            path = Path(text.split(":", 1)[1].strip())
            return path if path.is_absolute() else (root / path).resolve()
    return None


def git_commit(root: Path | None = None) -> str:
    """HEAD's commit of the checkout, read from the .git directory (what `git rev-parse HEAD` prints,
    without needing git), else DSV4K_COMMIT (set by whoever copied a working tree without its .git to a
    device machine), else "unknown"."""
    commit = _git_head(root if root is not None else checkout_root())
    if commit == "unknown" and re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", os.environ.get("DSV4K_COMMIT", "")):
        return os.environ["DSV4K_COMMIT"]
    return commit


def _git_head(root: Path | None) -> str:
    git = _git_dir(root) if root else None
    if git is None or not (git / "HEAD").is_file():
        return "unknown"
    head = (git / "HEAD").read_text().strip()
    if not head.startswith("ref:"):
        return head if re.fullmatch(r"[0-9a-f]{40}", head) else "unknown"
    ref = head.split(":", 1)[1].strip()
    common = git
    if (git / "commondir").is_file():
        common = (git / (git / "commondir").read_text().strip()).resolve()
    for base in (git, common):
        if (base / ref).is_file():
            return (base / ref).read_text().strip()
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref:
                return parts[0]
    return "unknown"


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return _pyplatform.processor() or _pyplatform.machine()


def _driver(device: DeviceInfo) -> str:
    if device.backend == "cpu":
        return "cpu"
    if device.backend == "rocm":
        return f"hip {torch.version.hip}"
    if device.backend == "ascend":
        return f"torch_npu {toolchains.version('torch_npu')}"
    text = f"cuda {torch.version.cuda}"
    try:
        import pynvml
        pynvml.nvmlInit()
        text += f", driver {pynvml.nvmlSystemGetDriverVersion()}"
    except Exception:  # pynvml is optional: the CUDA runtime version alone is recorded
        pass
    return text


def environment(device: DeviceInfo) -> dict:
    """Run-level fields shared by every record of a run on `device`."""
    from dsv4_kernels import __version__
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    commit = git_commit()
    name = device.name
    if device.backend == "cpu":
        name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    return {
        "schema": SCHEMA,
        "run": f"{now:%Y%m%dT%H%M%SZ}-{commit[:8]}",
        "date": now.isoformat(),
        "commit": commit,
        "chip": device.name,
        "device_name": name,
        "backend": device.backend,
        "arch": device.arch,
        "driver": _driver(device),
        "torch": torch.__version__,
        "triton": toolchains.version("triton"),
        "tilelang": toolchains.version("tilelang"),
        "dsv4_kernels": __version__,
    }


def default_out_dir() -> Path:
    """Where a run's records go unless --out says: $DSV4K_BENCH_DIR, else the user's cache folder
    ($XDG_CACHE_HOME or ~/.cache)/dsv4k/bench. Never the checkout: bench/results/ holds the device runs
    that were committed on purpose (dsv4k check reads them as device-perf), so copying a result there
    is a choice, made with --out."""
    if os.environ.get("DSV4K_BENCH_DIR"):
        return Path(os.environ["DSV4K_BENCH_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "dsv4k" / "bench"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def result_path(out_dir: Path, env: dict) -> Path:
    return Path(out_dir) / f"{env['run']}-{slug(env['chip'])}.jsonl"


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def read_jsonl(path: Path | str) -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not a JSON record: {exc}") from None
    return rows


@dataclass(frozen=True)
class Change:
    key: tuple
    before_us: float | None
    after_us: float | None
    change: float | None          # relative: +0.25 means 25% slower
    regression: str | None        # why this is a regression, or None
    unmeasured: str | None = None  # why the pair was not compared (a side without a measurement)


def compare(before: list[dict], after: list[dict], threshold: float = 0.10) -> tuple[list[Change], list, list]:
    """(changes of matched records, keys only in `before`, keys only in `after`).

    A matched record regresses when its median (or, on the decode path, its CUDA-graph replay time) grew
    by more than `threshold` (relative), or when it was correct before and is not now. Peers (impl "peer:...") are shown but never fail the comparison.
    """
    a = {tuple(r.get(k) for k in KEY): r for r in before}
    b = {tuple(r.get(k) for k in KEY): r for r in after}
    changes = []
    for key in sorted(set(a) & set(b), key=str):
        ra, rb = a[key], b[key]
        us_a, us_b = ra.get("us"), rb.get("us")
        if us_a is None or us_b is None:   # a peer not installed, a skipped case: nothing to compare
            side = [f"{name}: {r.get('status') or 'no time'}" + (f" ({r['reason']})" if r.get("reason") else "")
                    for name, r in (("first", ra), ("second", rb)) if r.get("us") is None]
            regressed = None
            if ra.get("correct") is True and not str(key[1]).startswith("peer:"):
                regressed = f"was measured and correct, now not measured: {rb.get('reason') or rb.get('status')}"
            changes.append(Change(key, us_a, us_b, None, regressed, "; ".join(side)))
            continue
        rel = (us_b - us_a) / us_a if us_a else None
        why = None
        if not str(key[1]).startswith("peer:"):
            if ra.get("correct") is True and rb.get("correct") is not True:
                why = f"was correct, now incorrect: {rb.get('reason') or rb.get('status')}"
            elif rel is not None and rel > threshold:
                why = f"{100 * rel:.1f}% slower (threshold {100 * threshold:.0f}%)"
            elif ra.get("graph_us") and rb.get("graph_us") is not None:
                graph_rel = (rb["graph_us"] - ra["graph_us"]) / ra["graph_us"]
                if graph_rel > threshold:
                    why = (f"CUDA-graph replay {100 * graph_rel:.1f}% slower "
                           f"({ra['graph_us']:.1f} -> {rb['graph_us']:.1f} us; threshold {100 * threshold:.0f}%)")
        changes.append(Change(key, us_a, us_b, rel, why))
    only_a = sorted(set(a) - set(b), key=str)
    only_b = sorted(set(b) - set(a), key=str)
    return changes, only_a, only_b


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def format_changes(changes: list[Change], only_before: list, only_after: list) -> str:
    head = f"{'op':<24} {'label':<40} {'impl':<16} {'before us':>10} {'after us':>10} {'change':>8}  verdict"
    lines = [head, "-" * len(head)]
    for c in changes:
        op, impl, label, _chip = c.key
        pct = "-" if c.change is None else f"{100 * c.change:+.1f}%"
        verdict = ("REGRESSION: " + c.regression if c.regression
                   else f"not compared ({c.unmeasured})" if c.unmeasured else "ok")
        lines.append(f"{op:<24} {label:<40} {impl:<16} {_us(c.before_us):>10} {_us(c.after_us):>10} {pct:>8}  "
                     f"{verdict}")
    bad = sum(c.regression is not None for c in changes)
    unmeasured = sum(c.unmeasured is not None for c in changes)
    lines.append("")
    lines.append(f"{len(changes) - unmeasured} matched, {bad} regressed, {unmeasured} not measured in both runs "
                 f"(peers not installed, skipped cases), {len(only_before)} only in the first run, "
                 f"{len(only_after)} only in the second")
    return "\n".join(lines)
