"""PNG charts of a run (matplotlib, Agg backend; imported only when a chart is drawn).

- roofline-<chip>.png: achieved TFLOP/s against arithmetic intensity (FLOPs per byte) for every correct
  measured (case, implementation), with the chip's memory roofline and one compute ceiling per format
  of its peak table; the attainable point of a case is the ceiling above its intensity.
- latency-<op>.png: median latency (p10-p90 bars) against decode batch size and prefill token count,
  one line per (implementation, model, variant).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from dsv4_kernels.bench.records import slug

__all__ = ["MATPLOTLIB_HINT", "require_matplotlib", "write_plots", "roofline_chart", "latency_chart"]

MATPLOTLIB_HINT = "dsv4k bench --plot needs matplotlib: pip install 'dsv4-kernels[bench]' (or pip install matplotlib)"
MARKERS = {"reference": "o", "triton": "^", "tilelang": "s", "peer": "x"}


def require_matplotlib():
    """The matplotlib module with the Agg backend selected; ValueError with the install hint if absent."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError(MATPLOTLIB_HINT) from None
    matplotlib.use("Agg")
    return matplotlib


def _figure(width: float, height: float):
    require_matplotlib()
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=110)


def _plotted(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "measured" and r.get("correct") is True and r.get("us")]


def roofline_chart(records: list[dict], chip: str, path: Path) -> Path:
    fig = _figure(10, 6.5)
    ax = fig.add_subplot(1, 1, 1)
    rows = [r for r in _plotted(records) if r["flops"] > 0 and r["bytes"] > 0]
    ops = sorted({r["op"] for r in rows})
    import matplotlib
    palette = matplotlib.colormaps["tab20"]
    colors = {op: palette(i % 20) for i, op in enumerate(ops)}
    for r in rows:
        ax.scatter(r["flops"] / r["bytes"], r["tflops"], color=colors[r["op"]],
                   marker=MARKERS.get(r["language"], "D"), s=22, alpha=0.8)
    x = [r["flops"] / r["bytes"] for r in rows] or [1.0]
    lo, hi = min(x) / 4, max(x) * 4
    first = rows[0] if rows else (records[0] if records else {})
    bw = first.get("peak_tbps")
    title = f"Roofline: {chip}"
    if bw:
        ceilings = {f: first.get(f"peak_{f}_tflops") for f in ("bf16", "fp8", "fp4") if first.get(f"peak_{f}_tflops")}
        top = max(ceilings.values(), default=None)
        hi = max(hi, 4 * top / bw) if top else hi
        ridge = top / bw if top else hi
        ax.plot([lo, ridge], [bw * lo, bw * ridge], color="black", lw=1.2, label=f"HBM {bw:g} TB/s")
        for fmt, tf in ceilings.items():     # each format's roof: flat from its ridge point on
            ax.plot([tf / bw, hi], [tf, tf], ls="--", lw=1.0, color="grey")
            ax.text(hi, tf, f"{fmt} {tf:g} TFLOP/s ", va="bottom", ha="right", fontsize=8)
        title += f" (peaks: {first.get('peak_chip')})"
    else:
        title += " - CPU or unlisted chip: no peak table, achieved points only"
    for op in ops:
        ax.scatter([], [], color=colors[op], marker="o", label=op)
    for lang, marker in MARKERS.items():
        ax.scatter([], [], color="black", marker=marker, label=lang)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    return path


def latency_chart(records: list[dict], op: str, path: Path) -> Path:
    rows = _plotted(records)
    phases = [p for p in ("decode", "prefill") if any(r["phase"] == p for r in rows)] or ["decode"]
    fig = _figure(6 * len(phases) + 3, 5)
    cpu = any(r.get("timer") == "cpu-wall" for r in rows)
    for i, phase in enumerate(phases):
        ax = fig.add_subplot(1, len(phases), i + 1)
        series = defaultdict(list)
        for r in rows:
            if r["phase"] == phase:
                series[(r["impl"], r["model"], r["variant"])].append(r)
        for (impl, model, variant), pts in sorted(series.items()):
            pts.sort(key=lambda r: r["tokens"])
            xs = [r["tokens"] for r in pts]
            ys = [r["us"] for r in pts]
            err = [[r["us"] - r["p10"] for r in pts], [r["p90"] - r["us"] for r in pts]]
            ax.errorbar(xs, ys, yerr=err, marker=MARKERS.get(pts[0]["language"], "D"), ms=4, capsize=2, lw=1,
                        label=f"{impl} {model} {variant}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (sequences)" if phase == "decode" else "prefill tokens")
        ax.set_ylabel("median latency (us)" + (", CPU wall clock" if cpu else ""))
        ax.set_title(f"{op}: {phase}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _with_peaks(records: list[dict]) -> list[dict]:
    """Attach the chip's per-format peaks (for the ceilings) to the records of one chip."""
    from dsv4_kernels.backends import all_backends
    by_chip = {p.chip: p for b in all_backends() for p in b.peaks}
    out = []
    for r in records:
        peak = by_chip.get(r.get("peak_chip"))
        extra = {f"peak_{f}_tflops": getattr(peak, f"{f}_tflops") for f in ("bf16", "fp8", "fp4")} if peak else {}
        out.append({**r, **extra})
    return out


def write_plots(records: list[dict], out_dir: Path) -> list[Path]:
    """One roofline chart per chip and one latency chart per op, as PNG files in out_dir."""
    require_matplotlib()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    by_chip = defaultdict(list)
    by_op = defaultdict(list)
    for r in _with_peaks(records):
        if r.get("status") == "measured":
            by_chip[r["chip"]].append(r)
            by_op[r["op"]].append(r)
    for chip, rows in sorted(by_chip.items()):
        written.append(roofline_chart(rows, chip, out_dir / f"roofline-{slug(chip)}.png"))
    for op, rows in sorted(by_op.items()):
        written.append(latency_chart(rows, op, out_dir / f"latency-{op}.png"))
    return written
