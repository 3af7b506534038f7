"""The `dsv4k` command: info, check, codegen, demo, bench, device-check."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from dsv4_kernels import __version__, dispatch, platform, toolchains

BACKEND_CHOICES = ("cuda", "rocm", "ascend")


def cmd_info(args) -> int:
    from dsv4_kernels.backends import all_backends
    import torch
    dev = platform.machine_device()
    print(f"dsv4-kernels {__version__}")
    print(f"torch {torch.__version__} (cuda {torch.version.cuda}, hip {getattr(torch.version, 'hip', None)})")
    for dist in ("triton", "tilelang", "apache-tvm-ffi", "torch_npu"):
        print(f"{dist:<15} {toolchains.version(dist) or 'not installed'}")
    print(f"triton interpreter: {'on' if toolchains.interpreter_active() else 'off'}")
    print(f"device: {dev.backend} {dev.arch} {dev.name} (fp8 {dev.fp8_encoding})")
    for b in all_backends():
        absent = b.device_present()
        print(f"backend {b.name:<7} device: {'present' if absent is None else absent}; "
              f"targets: {', '.join(t.name for t in b.targets)}")
    print(f"DSV4K_IMPL: {dispatch.env_choices() or 'unset'}; DSV4K_STRICT: {'on' if dispatch.strict() else 'off'}")
    print("ops: " + ", ".join(f"{op} [{', '.join(i.name for i in dispatch.implementations(op))}]" for op in dispatch.ops()))
    return 0


_NO_CPU_RUN = "never run: {language} kernels have no CPU path here (numerics need the device)"


def _cell(recs, notes: dict) -> str:
    """pass / FAIL / not run [footnote] / - (the level does not apply) for the records of one level."""
    if not recs:
        return "-"
    if any(r.status == "fail" for r in recs):
        return "FAIL"
    if all(r.status == "pass" for r in recs):
        return "pass"
    reason = next(r.reason for r in recs if r.status == "skip")
    return f"not run [{notes.setdefault(reason, len(notes) + 1)}]"


def _codegen_cell(recs, notes: dict) -> str:
    """binary TARGETS / source TARGETS [why no binary] / FAIL / - ."""
    if not recs:
        return "-"
    if any(r.status == "fail" for r in recs):
        return "FAIL"
    binary = sorted(r.target for r in recs if r.level == "codegen-binary" and r.status == "pass")
    source = sorted(r.target for r in recs if r.level == "codegen-source" and r.status == "pass")
    why = sorted({notes.setdefault(r.reason, len(notes) + 1) for r in recs if r.status == "skip"})
    parts = ([f"binary {','.join(binary)}"] if binary else []) + ([f"source {','.join(source)}"] if source else [])
    return "; ".join(parts) + "".join(f" [{n}]" for n in why) if parts else "not run"


def _highest(numerics_ok: bool, codegen: list, device_ok: bool, perf_ok: bool) -> str:
    """The highest level L such that every level below L passed (ladder order; codegen only where the
    implementation compiles). A kernel that has never run numerically anywhere shows "not run", whatever it
    compiles to; one compiled to source only stops at codegen-source."""
    if not (numerics_ok or device_ok):
        return "not run"
    best = "cpu-numerics" if numerics_ok else "device-numerics"
    if codegen:
        if any(r.status == "fail" for r in codegen) or not any(r.status == "pass" for r in codegen):
            return best
        binary = {r.target for r in codegen if r.level == "codegen-binary" and r.status == "pass"}
        if binary != {r.target for r in codegen}:
            return "codegen-source"
        if not device_ok:
            return "codegen-binary"
        best = "device-numerics"
    if device_ok and perf_ok:
        best = "device-perf"
    return best


def _table(records) -> str:
    """One row per (op, impl, backend) with one column per level: numerics (on this row's device, else
    the CPU interpreter run of the same implementation), codegen (binary or source, per target), device
    numerics and perf; skip reasons as numbered footnotes, failures in full. "highest level" never goes
    past a level that did not pass: a kernel that has only been compiled shows "not run"."""
    rows: dict = {}
    for r in records:
        rows.setdefault((r.op, r.impl, r.language, r.backend), []).append(r)
    cpu_numerics = {(op, impl): [r for r in recs if r.level == "cpu-numerics"]
                    for (op, impl, _, backend), recs in rows.items() if backend == "cpu"}
    notes: dict[str, int] = {}
    head = (f"{'op':<22} {'impl':<16} {'language':<9} {'backend':<7} {'numerics':<13} {'codegen':<26} "
            f"{'device':<12} {'perf':<12} {'highest level':<15} notes")
    lines = [head, "-" * len(head)]
    for (op, impl, lang, backend), recs in sorted(rows.items()):
        level = {lvl: [r for r in recs if r.level == lvl] for lvl in ("device-numerics", "device-perf")}
        codegen = [r for r in recs if r.level.startswith("codegen")]
        cpu = cpu_numerics.get((op, impl), [])
        device_ok = bool(level["device-numerics"]) and all(r.status == "pass" for r in level["device-numerics"])
        numerics_ok = bool(cpu) and all(r.status == "pass" for r in cpu)
        if device_ok:
            numerics = "pass (device)"
        elif cpu:
            numerics = _cell(cpu, notes) + (" (cpu)" if backend != "cpu" and numerics_ok else "")
        else:
            reason = _NO_CPU_RUN.format(language=lang)
            numerics = f"not run [{notes.setdefault(reason, len(notes) + 1)}]"
        perf_ok = bool(level["device-perf"]) and all(r.status == "pass" for r in level["device-perf"])
        fails = [f"{r.level}/{r.target}: {r.reason}" for r in recs if r.status == "fail"]
        lines.append(f"{op:<22} {impl:<16} {lang:<9} {backend:<7} {numerics:<13} {_codegen_cell(codegen, notes):<26} "
                     f"{_cell(level['device-numerics'], notes):<12} {_cell(level['device-perf'], notes):<12} "
                     f"{_highest(numerics_ok, codegen, device_ok, perf_ok):<15} "
                     + ("FAIL " + " | ".join(fails) if fails else ""))
    if notes:
        lines.append("")
        lines += [f"[{n}] {reason}" for reason, n in notes.items()]
    return "\n".join(line.rstrip() for line in lines)


def cmd_check(args) -> int:
    from dsv4_kernels import ladder
    # A DSV4K_IMPL that names no op or implementation would change what an engine runs: refuse it here
    # rather than report a ladder that ignores it.
    dispatch.env_choices()
    backends = tuple(args.backend) if args.backend else BACKEND_CHOICES
    records = ladder.run(backends, ops=tuple(args.op) if args.op else None)
    if args.json:
        for r in records:
            print(json.dumps(asdict(r)))
    else:
        print(_table(records))
        counts = {s: sum(r.status == s for r in records) for s in ("pass", "fail", "skip")}
        print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped "
              f"({len(records)} checks over levels {', '.join(ladder.LEVELS)})")
    return 1 if any(r.status == "fail" for r in records) else 0


def cmd_codegen(args) -> int:
    from dsv4_kernels.codegen import compile_many
    result = compile_many([{"op": args.op, "impl": args.impl, "target": args.target}])[0]
    if not result["ok"]:
        print(f"dsv4k codegen: {result['error']}", file=sys.stderr)
        return 1
    arts = result["artifacts"]
    text = "\n".join(f"// ===== {a['op']}/{a['impl']} {a['label']} for {a['target']} ({a['kind']}); "
                     f"resources: {json.dumps(a['resources'])}\n{a['text']}" for a in arts)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {len(arts)} kernel(s) to {args.output}")
    else:
        print(text)
    return 0


def cmd_demo(args) -> int:
    from dsv4_kernels import demo
    return demo.main(args.prefill, args.decode, args.seed)


def cmd_bench(args) -> int:
    from dsv4_kernels.bench import command
    return command.main(args)


def cmd_device_check(args) -> int:
    from dsv4_kernels import devicekit
    return devicekit.main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv4k", description="DeepSeek-V4 kernels: inspect, verify, compile.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends present, toolchains and versions, device").set_defaults(fn=cmd_info)
    c = sub.add_parser("check", help="the verification ladder for every op and implementation on this machine")
    c.add_argument("--json", action="store_true", help="one JSON record per (op, impl, backend, target, level)")
    c.add_argument("--backend", action="append", choices=BACKEND_CHOICES, help="limit codegen/device levels")
    c.add_argument("--op", action="append", help="only these ops")
    c.set_defaults(fn=cmd_check)
    g = sub.add_parser("codegen", help="print or write the generated source of one implementation for a target")
    g.add_argument("op")
    g.add_argument("--impl", required=True)
    g.add_argument("--target", required=True, help="sm_90a, sm_100a, gfx942, gfx950, ascend950")
    g.add_argument("-o", "--output", help="write to this file instead of stdout")
    g.set_defaults(fn=cmd_codegen)
    d = sub.add_parser("demo", help="a tiny DeepSeek-V4 block through the dispatcher, against the all-reference run")
    d.add_argument("--prefill", type=int, default=250, help="prefill tokens")
    d.add_argument("--decode", type=int, default=8, help="decode steps after the prefill")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_demo)
    from dsv4_kernels.bench.command import add_arguments as bench_arguments
    b = sub.add_parser("bench", help="benchmark every op family: us, GB/s, TFLOP/s, %% of peak, speedups; "
                                     "JSON lines, PNG charts, --compare of two runs")
    bench_arguments(b)
    b.set_defaults(fn=cmd_bench)
    from dsv4_kernels.devicekit.kit import add_arguments as kit_arguments
    k = sub.add_parser("device-check", help="all device work of a short GPU lease in one run: device tests, "
                                            "sanitizer, TileLang runtime, quick benchmark; results to --out")
    kit_arguments(k)
    k.set_defaults(fn=cmd_device_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, dispatch.ImplementationUnavailable) as exc:
        print(f"dsv4k {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head and the like
        return 0


if __name__ == "__main__":
    sys.exit(main())
