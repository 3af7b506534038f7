"""The report step: summary.md (one screen) and roofline.png (kit.py then writes kit.json).

summary.md has one row per (op, implementation): device numerics, sanitizer, and from the benchmark
the representative decode case (V4-Pro where there is one) and the prefill case: median us with a cold
L2, CUDA-graph replay us and host overhead per call (back to back, warm), % of the measured roofline,
and the speedups over the eager and the compiled reference. Case labels are listed below the table.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["env_lines", "table_rows", "render", "write_all"]


def _short(text: str, n: int = 48) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _numerics_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    return {"pass": "pass", "fail": "FAIL"}.get(r["status"], f"skip: {_short(r.get('reason', ''), 30)}")


def _pick(rows: list[dict], phase: str) -> dict | None:
    rows = [r for r in rows if r["phase"] == phase and r["status"] == "measured"]
    pro = [r for r in rows if r["model"] == "pro"]
    return (pro or rows or [None])[0]


def table_rows(steps: dict, bench: list[dict]) -> tuple[list[dict], dict]:
    """(rows, labels): one row per op/impl; labels maps op -> (decode label, prefill label)."""
    numerics = {**(steps.get("numerics") or {}).get("results", {}), **(steps.get("tilelang") or {}).get("results", {})}
    sanit = (steps.get("sanitizer") or {}).get("per_impl", {})
    by_key: dict[str, list[dict]] = {}
    for r in bench:
        if not r["impl"].startswith("peer:"):
            by_key.setdefault(f"{r['op']}/{r['impl']}", []).append(r)
    keys = sorted(set(numerics) | set(by_key), key=lambda k: (k.split("/")[0], k.split("/")[1] != "reference", k))
    rows, labels = [], {}
    for key in keys:
        op, impl = key.split("/", 1)
        runs = by_key.get(key, [])
        dec, pre = _pick(runs, "decode"), _pick(runs, "prefill")
        main = dec or pre
        known = labels.setdefault(op, [None, None])
        known[0], known[1] = known[0] or (dec and dec["label"]), known[1] or (pre and pre["label"])
        errors = [r for r in runs if r["status"] != "measured" or r.get("correct") is False]
        rows.append({
            "op": op, "impl": impl, "numerics": _numerics_cell(numerics.get(key)),
            "sanitizer": _short(sanit.get(key, "-"), 34),
            "decode_us": dec and dec["us"], "graph_us": dec and dec.get("graph_us"),
            "host_us": dec and dec.get("host_overhead_us"), "prefill_us": pre and pre["us"],
            "pct": main and main.get("pct_peak"), "x_ref": main and main.get("speedup_vs_reference"),
            "x_comp": main and main.get("speedup_vs_compiled"),
            "bench": "FAIL " + _short(errors[0].get("reason") or errors[0]["status"], 40) if errors else "",
        })
    return rows, labels


def env_lines(machine: dict, dry_run: bool) -> list[str]:
    v, dev, meas, sheet = (machine.get(k) or {} for k in ("versions", "device", "measured", "datasheet"))
    lines = [f"- versions: python {v.get('python')}, torch {v.get('torch')} (cuda {v.get('torch_cuda')}, hip "
             f"{v.get('torch_hip')}), triton {v.get('triton')}, tilelang {v.get('tilelang') or 'absent'}, "
             f"driver {v.get('driver')}, dsv4-kernels {v.get('dsv4_kernels')} at {str(v.get('commit'))[:12]}",
             f"- device: {dev.get('name')} ({dev.get('backend')} {dev.get('arch')}, fp8 {dev.get('fp8_encoding')}"
             + (f", {dev['multiprocessors']} SMs, {dev['memory_gib']} GiB, L2 {dev['l2_mib']} MiB" if "l2_mib" in dev else "")
             + ")"]
    if meas:
        ref = (f" (datasheet {sheet.get('chip')}: {sheet.get('hbm_tbps')} TB/s, {sheet.get('bf16_tflops')} TFLOP/s)"
               if sheet else " (no datasheet entry)")
        lines.append(f"- measured ceilings: copy {meas['copy_tbps']:.3g} TB/s ({meas['copy_bytes'] >> 20} MiB), "
                     f"bf16 matmul {meas['bf16_tflops']:.3g} TFLOP/s (n = {meas['matmul_n']}){ref}")
    for when in ("clocks_before", "clocks_after"):
        c = machine.get(when) or {}
        if c.get("status") == "read":
            lines.append(f"- clocks {when[7:]}: SM {c.get('clocks.sm')} / {c.get('clocks.max.sm')} MHz, memory "
                         f"{c.get('clocks.mem')} / {c.get('clocks.max.mem')} MHz, {c.get('power.draw')} W, "
                         f"{c.get('temperature.gpu')} C")
        elif c:
            lines.append(f"- clocks {when[7:]}: {c.get('status')}")
    if dry_run:
        lines.append("- DRY RUN on the CPU: Triton through the interpreter, CPU wall-clock times; no number "
                     "here is a GPU result")
    return lines


def render(steps: dict, bench: list[dict], dry_run: bool, elapsed_s: float) -> str:
    machine = steps.get("machine") or {}
    dev = (machine.get("device") or {}).get("name", "unknown device")
    date = next((r["date"] for r in bench if r.get("date")), "")
    commit = str((machine.get("versions") or {}).get("commit", ""))[:12]
    out = [f"# dsv4k device-check: {dev}{' (dry run)' if dry_run else ''}, {date or 'no benchmark date'}, "
           f"commit {commit}", ""]
    out += env_lines(machine, dry_run)
    out += ["", f"Steps ({elapsed_s:.0f} s in all):", "", "| step | status | s / budget | note |", "|---|---|---|---|"]
    for name, s in steps.items():
        out.append(f"| {name} | {s.get('status')} | {_num(s.get('seconds'), '.0f')} / {_num(s.get('budget_s'), '.0f')} "
                   f"| {_short(s.get('reason', ''), 70)} |")
    junit = (steps.get("pytest") or {}).get("junit")
    if junit:
        out += ["", f"pytest {steps['pytest'].get('selection', '')}: {junit['passed']} passed, "
                    f"{junit['failed']} failed, {junit['errors']} errors, {junit['skipped']} skipped"]
        out += [f"- FAILED {f}" for f in junit["failed_ids"][:8]]
    rows, labels = table_rows(steps, bench)
    out += ["", "| op | impl | numerics | sanitizer | decode us | graph us | host us | prefill us | %roof | x ref "
                "| x comp | bench |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['op']} | {r['impl']} | {r['numerics']} | {r['sanitizer']} | {_num(r['decode_us'], '.1f')} "
                   f"| {_num(r['graph_us'], '.1f')} | {_num(r['host_us'], '.1f')} | {_num(r['prefill_us'], '.1f')} "
                   f"| {_num(r['pct'], '.0f')} | {_num(r['x_ref'], '.2f')} | {_num(r['x_comp'], '.2f')} | {r['bench']} |")
    out += ["", "Cases: " + "; ".join(f"{op}: {d or '-'} / {p or '-'}" for op, (d, p) in sorted(labels.items()))]
    out += ["", "decode us / prefill us: median, cold L2; graph us: CUDA-graph replay, host us: call minus replay "
                "(both back to back, warm); %roof: of the measured ceilings; files: kit.json has everything."]
    return "\n".join(out) + "\n"


def _roofline(out: Path, bench: list[dict], steps: dict) -> str:
    from dsv4_kernels.bench.plots import require_matplotlib, roofline_chart
    try:
        require_matplotlib()
    except ValueError as exc:
        return str(exc)
    peak = (steps.get("bench") or {}).get("peak") or {}
    rows = [{**r, **{f"peak_{f}_tflops": peak.get(f"{f}_tflops") for f in ("bf16", "fp8", "fp4")}} for r in bench]
    plotted = [r for r in rows if r.get("status") == "measured" and r.get("correct") and r.get("flops")]
    if plotted:
        roofline_chart(rows, plotted[0]["device_name"], out / "roofline.png")
        return ""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 2), dpi=80)
    fig.text(0.5, 0.5, "no measured, correct benchmark record to plot (see summary.md)", ha="center")
    fig.savefig(out / "roofline.png")
    return ""


def write_all(out: Path, steps: dict, dry_run: bool, elapsed_s: float) -> dict:
    from dsv4_kernels.bench import records
    bench_path = out / "bench.jsonl"
    bench = records.read_jsonl(bench_path) if bench_path.is_file() else []
    problems = []
    if not bench_path.is_file():
        bench_path.write_text("")
    for name, step in (("junit.xml", "pytest"), ("sanitizer.log", "sanitizer")):
        if not (out / name).is_file():
            (out / name).write_text(f"step {step} did not run\n" if name == "sanitizer.log"
                                    else '<?xml version="1.0"?><testsuites/>\n')
            if step in steps:
                problems.append(f"{name} was not produced by step {step}")
    note = _roofline(out, bench, steps)
    if note:
        problems.append(note)
    (out / "summary.md").write_text(render(steps, bench, dry_run, elapsed_s))
    return {"status": "fail" if problems else "pass", "reason": "; ".join(problems)}
