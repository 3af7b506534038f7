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


def _check_targets(args, backends: tuple[str, ...]) -> tuple[str, ...] | None:
    """The codegen targets of a check: every target with --all-targets, else the first (the oldest chip)
    of each backend, which keeps the default run to a couple of minutes."""
    if args.all_targets:
        return None
    from dsv4_kernels.backends import all_backends
    return tuple(b.targets[0].name for b in all_backends() if b.name in backends and b.targets)


def cmd_check(args) -> int:
    import time
    from dsv4_kernels import check_report, ladder
    # A DSV4K_IMPL that names no op or implementation would change what an engine runs: refuse it here
    # rather than report a ladder that ignores it.
    dispatch.env_choices()
    backends = tuple(args.backend) if args.backend else BACKEND_CHOICES
    ops = tuple(args.op) if args.op else None
    targets = _check_targets(args, backends)
    selected = ladder._selected(ops)
    table = check_report.Table(selected, [i.name for op in selected for i in dispatch.implementations(op)])
    if not args.json:
        print("\n".join(table.header()), flush=True)
    start, records = time.perf_counter(), []
    for _, recs in ladder.stream(backends, ops=ops, targets=targets):
        records += recs
        if args.json:
            for r in recs:
                print(json.dumps(asdict(r)), flush=True)
        else:
            print("\n".join(table.rows(recs)), flush=True)
    if not args.json:
        print("\n".join(table.footer()))
        counts = {s: sum(r.status == s for r in records) for s in ("pass", "fail", "skip")}
        print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped "
              f"({len(records)} checks over levels {', '.join(ladder.LEVELS)}) in {time.perf_counter() - start:.0f} s")
        if targets is not None:
            print(f"codegen targets: {', '.join(targets)} (the first of each backend; --all-targets adds the others)")
        print("narrow it: --op NAME (repeatable), --backend cuda|rocm|ascend; --json for one record per level")
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
    import os
    import subprocess
    from dsv4_kernels import demo
    use_interpreter = args.interpreter
    if use_interpreter is None:   # on a machine with no GPU, run the Triton kernels through the interpreter
        use_interpreter = platform.machine_device().backend == "cpu" and toolchains.importable("triton")
    if use_interpreter and not toolchains.interpreter_active():
        # TRITON_INTERPRET must be set before triton is imported: run the demo in a child process
        code = (f"import sys; from dsv4_kernels import demo; "
                f"sys.exit(demo.main({args.prefill}, {args.decode}, {args.seed}))")
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        print("running the Triton kernels through the interpreter (about a minute; --no-interpreter: references "
              "only)", flush=True)
        return subprocess.run([sys.executable, "-c", code], env=env).returncode
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
    c.add_argument("--all-targets", action="store_true",
                   help="codegen for every target (default: the first target of each backend)")
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
    d.add_argument("--interpreter", action=argparse.BooleanOptionalAction, default=None,
                   help="run the Triton kernels through the interpreter (default: on a machine with no GPU)")
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
