"""`dsv4k bench`: run the benchmark cases, write JSON lines (and PNG charts), or compare two runs."""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

__all__ = ["add_arguments", "main"]

CPU_NOTE = ("CPU run: wall-clock timings (time.perf_counter) of the implementations that run on this CPU. "
            "These are CPU numbers, not GPU performance; % of peak is not applicable (no CPU peak table).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dsv4_kernels.bench.case import FAMILIES, FAMILY_ALIASES
    p.add_argument("--op", action="append", help="only this op (repeatable)")
    p.add_argument("--family", action="append", choices=FAMILIES + tuple(FAMILY_ALIASES),
                   help="only this op family (repeatable)")
    p.add_argument("--grid", choices=("cpu", "full"),
                   help="shape grid: 'full' (GPU sizes) or 'cpu' (small token counts); default: cpu on the CPU, "
                        "full on a GPU")
    p.add_argument("--device", help="torch device to run on (cpu, cuda, cuda:1, npu); default: this machine's "
                                    "accelerator, else the CPU")
    p.add_argument("--impl", action="append", help="only this implementation (repeatable; the reference always runs "
                                                   "as the baseline)")
    p.add_argument("--max-cases", type=int, metavar="N", help="at most N cases per op")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile(reference) (default: on for GPUs, off on the CPU, where each op "
                        "costs ~20 s to compile)")
    p.add_argument("--compile-budget", type=float, default=120.0, metavar="SECONDS",
                   help="compilation time per op after which its remaining cases skip the compiled reference "
                        "(default 120)")
    p.add_argument("--no-peers", action="store_true", help="do not look for peer libraries")
    p.add_argument("--interpreter", action="store_true",
                   help="on the CPU, also time Triton kernels through the interpreter (slow, not a perf number)")
    p.add_argument("--out", type=Path, help="folder for the results (default: $DSV4K_BENCH_DIR, else ~/.cache/dsv4k/bench; "
                        "bench/results/<chip>/... of the checkout to commit a device run)")
    p.add_argument("--plot", action="store_true", help="also write PNG charts next to the JSON")
    p.add_argument("--from", dest="from_file", type=Path, metavar="JSONL",
                   help="do not run: print (and with --plot, chart) an existing results file")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.jsonl", "B.jsonl"),
                   help="print the change from run A to run B; exit 1 on a regression")
    p.add_argument("--threshold", type=float, default=0.10,
                   help="relative slowdown counted as a regression by --compare (default 0.10)")
    p.add_argument("--list", action="store_true", help="list the cases that would run, then stop")


def _compare(args) -> int:
    from dsv4_kernels.bench import records
    changes, only_a, only_b = records.compare(records.read_jsonl(args.compare[0]), records.read_jsonl(args.compare[1]),
                                              args.threshold)
    print(records.format_changes(changes, only_a, only_b))
    return 1 if any(c.regression for c in changes) else 0


def _plot(rows: list[dict], jsonl: Path) -> None:
    from dsv4_kernels.bench.plots import write_plots
    folder = jsonl.with_name(jsonl.stem + "-plots")
    for path in write_plots(rows, folder):
        print(f"wrote {path}")


def _device(name: str | None):
    import torch
    from dsv4_kernels import platform
    if name:
        return torch.device(name)
    info = platform.machine_device()
    return torch.device({"cuda": "cuda", "rocm": "cuda", "ascend": "npu"}.get(info.backend, "cpu"))


def _select_cases(args, grid):
    from dsv4_kernels.bench.case import FAMILIES, all_cases
    families = tuple(dict.fromkeys(args.family)) if args.family else FAMILIES
    cases = all_cases(grid, families)
    if args.op:
        known = {c.op for c in cases}
        unknown = [op for op in args.op if op not in known]
        if unknown:
            raise ValueError(f"--op: no benchmark cases for {', '.join(unknown)}; expected one of "
                             f"{', '.join(sorted(known))}")
        cases = [c for c in cases if c.op in args.op]
    if args.max_cases is not None:
        if args.max_cases < 1:
            raise ValueError(f"--max-cases: expected N >= 1, got {args.max_cases}")
        seen = Counter()
        kept = []
        for c in cases:
            seen[c.op] += 1
            if seen[c.op] <= args.max_cases:
                kept.append(c)
        cases = kept
    return cases


def _summary(rows: list[dict], cases, grid, elapsed: float) -> str:
    from dsv4_kernels import dispatch
    from dsv4_kernels.bench.case import all_cases
    not_landed = sorted({r["op"] for r in rows if r["status"].endswith("is not in dsv4_kernels yet")})
    covered = {c.op for c in all_cases(grid)}
    lines = [f"{len(cases)} cases, {sum(r['status'] == 'measured' for r in rows)} measurements in {elapsed:.1f} s"]
    if not_landed:
        lines.append(f"not in dsv4_kernels yet (definitions ready, skipped): {', '.join(not_landed)}")
    uncovered = sorted(set(dispatch.ops()) - covered)
    if uncovered:
        lines.append(f"registered ops without benchmark definitions: {', '.join(uncovered)}")
    bad = [r for r in rows if not r["impl"].startswith("peer:") and (r["status"].startswith("error")
                                                                     or r["correct"] is False)]
    if bad:
        lines.append(f"{len(bad)} implementation results FAILED (no speedup reported for them):")
        lines += [f"  {r['op']} {r['label']} {r['impl']}: {r['reason']}" for r in bad]
    return "\n".join(lines)


def _print_rows(rows: list[dict]) -> None:
    from dsv4_kernels.bench.runner import format_row
    for r in rows:
        print(format_row(r), flush=True)


def main(args) -> int:
    if args.compare:
        return _compare(args)
    if args.plot:
        from dsv4_kernels.bench.plots import require_matplotlib
        require_matplotlib()
    from dsv4_kernels.bench import records, runner
    if args.from_file:
        rows = records.read_jsonl(args.from_file)
        print(runner.format_header())
        _print_rows(rows)
        if args.plot:
            _plot(rows, args.from_file)
        return 0

    import dsv4_kernels  # noqa: F401  (registers the ops)
    from dsv4_kernels import platform
    from dsv4_kernels.shapes import get_grid
    device = _device(args.device)
    info = platform.device_info(device)
    grid = get_grid(args.grid or ("cpu" if device.type == "cpu" else "full"))
    cases = _select_cases(args, grid)
    if args.list:
        for c in cases:
            print(f"{c.op:<24} {c.label:<44} bytes {c.bytes:<14} flops {c.flops}")
        print(f"{len(cases)} cases on grid {grid.name}")
        return 0
    compile_ref = args.compile if args.compile is not None else device.type != "cpu"
    opts = runner.Options(device=device, impls=tuple(args.impl) if args.impl else None, compile=compile_ref,
                          compile_budget_s=args.compile_budget, peers=not args.no_peers,
                          interpreter=args.interpreter)
    env = records.environment(info)
    print(f"dsv4k bench: {len(cases)} cases on grid {grid.name}, device {env['device_name']} ({info.backend} "
          f"{info.arch}), commit {env['commit'][:12]}; torch.compile(reference): {'on' if compile_ref else 'off'}")
    if device.type == "cpu":
        print(CPU_NOTE)
    print("* marks the implementation the dispatcher chooses; x ref / x comp: speedup over the eager and the "
          "compiled reference")
    print(runner.format_header(), flush=True)
    start = time.perf_counter()
    rows = runner.run(cases, opts, env, on_case=_print_rows)
    elapsed = time.perf_counter() - start
    kept = [r for r in rows if not r["status"].startswith("skipped")]
    path = records.result_path(args.out or records.default_out_dir(), env)
    records.write_jsonl(path, kept)
    print()
    print(_summary(rows, cases, grid, elapsed))
    print(f"wrote {len(kept)} records to {path}")
    if args.plot:
        _plot(kept, path)
    failed = any(not r["impl"].startswith("peer:") and (r["status"].startswith("error") or r["correct"] is False)
                 for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="dsv4k bench")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
