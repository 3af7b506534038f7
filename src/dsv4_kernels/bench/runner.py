"""Run benchmark cases: every implementation that can run here, the compiled reference, the peers.

Per case: inputs are made once; every implementation, the reference first, runs on its own copy of
the arguments the op writes in place. Its first call is timed on the host (JIT compile included) and
checked with the op's OpCheck.compare against the reference's first call; then warm-up and the
measured iterations (timing.measure). Speedups over the eager reference and over torch.compile(reference) are reported
only for a correct result.
"""
from __future__ import annotations

import importlib
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from dsv4_kernels import dispatch, ladder, platform, toolchains
from dsv4_kernels.bench import peers as peers_mod
from dsv4_kernels.bench import timing
from dsv4_kernels.bench.case import Case, public_op
from dsv4_kernels.backends import Peak
from dsv4_kernels.bench.roofline import find_peak, roofline

__all__ = ["Options", "CompiledReferences", "run_case", "run", "MEASURED", "BUDGET_REACHED", "format_header",
           "format_row"]

MEASURED = "measured"
REFERENCE = "reference"


@dataclass(frozen=True)
class Options:
    """device: where to run. impls: only these implementations (the reference always runs: it is the
    baseline of the speedups). compile: also time torch.compile(reference), spending at most about
    compile_budget_s seconds per op on compilation (see CompiledReferences). peers: measure peers.
    interpreter: time Triton kernels through the interpreter on the CPU (slow; off by default).
    call_timing: for decode-path cases also time back-to-back public-op calls and their CUDA-graph
    replay (timing.call_and_graph). peak: the ceilings to place results against, instead of the
    datasheet entry of the chip (the device kit passes the bandwidth and bf16 rate it measured)."""

    device: torch.device
    impls: tuple[str, ...] | None = None
    compile: bool = False
    compile_budget_s: float = 120.0
    peers: bool = True
    interpreter: bool = False
    settings: timing.Settings | None = None
    call_timing: bool = True
    peak: Peak | None = None


def _outputs(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _mutated_names(op: str) -> set[str] | None:
    """Names of the arguments the op writes in place, from its torch.library schema; None if unknown."""
    try:
        schema = getattr(torch.ops.dsv4, op).default._schema
    except (AttributeError, RuntimeError):
        return None
    return {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}


def _copy_inputs(op: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Fresh copies of the arguments the op mutates (all tensors when that is unknown); others shared."""
    names = _mutated_names(op)
    positional = []
    if names is not None:
        schema = getattr(torch.ops.dsv4, op).default._schema
        positional = [a.name for a in schema.arguments]

    def copy(name, value):
        if isinstance(value, torch.Tensor) and (names is None or name in names):
            return value.clone()
        return value
    new_args = tuple(copy(positional[i] if i < len(positional) else None, v) for i, v in enumerate(args))
    return new_args, {k: copy(k, v) for k, v in kwargs.items()}


def _raw_reference(op: str) -> Callable:
    module, _, attr = dispatch.get(op, REFERENCE).entry.partition(":")
    return getattr(importlib.import_module(module), attr)


def _check(op: str, outputs: tuple, expected: tuple) -> tuple[bool | None, str]:
    """(correct, reason): the op's OpCheck comparison of every output; None when the op registered none."""
    try:
        check = ladder.get_check(op)
    except ValueError as exc:
        return None, f"not checked: {exc}"
    if len(outputs) != len(expected):
        return False, f"{len(outputs)} outputs, expected {len(expected)}"
    for i, (o, e) in enumerate(zip(outputs, expected)):
        try:
            check.comparison(i)(o, e)
        except AssertionError as exc:
            return False, f"output {i}: {exc}"
    return True, ""


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _case_fields(case: Case, env: dict, peak) -> dict:
    return {**env, "op": case.op, "family": case.family, "label": case.label, "model": case.model,
            "phase": case.phase, "tokens": case.tokens, "variant": case.variant, "shape": dict(case.shape),
            "bytes": case.bytes, "flops": case.flops, "compute": case.compute,
            "peak_chip": peak.chip if peak else None}


def _row(base: dict, impl: str, language: str, status: str, **fields) -> dict:
    row = {**base, "impl": impl, "language": language, "status": status, "dispatched": base.get("dispatched"),
           "timer": None, "cache_flush_bytes": None, "us": None, "p10": None, "p90": None, "iters": None,
           "first_call_us": None, "warmup_us": None, "gbps": None, "tflops": None, "pct_peak": None,
           "bound": None, "peak_tbps": None, "peak_tflops": None, "speedup_vs_reference": None,
           "speedup_vs_compiled": None, "reference_us": None, "compiled_us": None, "compiled_first_call_us": None,
           "compiled_status": None, "correct": None, "reason": "", "call_us": None, "graph_us": None,
           "host_overhead_us": None, "graph_status": None}
    row.update(fields)
    return row


def _measure(base: dict, impl: str, language: str, call: Callable, op: str, expected: tuple | None,
             opts: Options, peak, case: Case) -> tuple[dict, tuple | None]:
    """First call + check + timing of one callable: (row with status "measured" or "error: ...", the
    first call's outputs). expected None means this is the reference: its outputs become the expected."""
    try:
        with dispatch.recording() as counts:
            out, first_us = timing.first_call(call, opts.device)
        out = _outputs(out)
        if expected is None:
            correct, reason = True, "the reference (baseline)"
        else:
            correct, reason = _check(op, out, expected)
        ran = {name for (o, name) in counts if o == op}
        if language != "peer" and ran and impl not in ran:
            correct, reason = False, f"the call ran {', '.join(sorted(ran))}, not {impl}"
        t = timing.measure(call, opts.device, opts.settings, first_us)
        calls = {}
        if opts.call_timing and case.phase == "decode":
            ct = timing.call_and_graph(call, opts.device, t.stats.median)
            calls = {"call_us": ct.call_us, "graph_us": ct.graph_us, "host_overhead_us": ct.host_overhead_us,
                     "graph_status": ct.graph_status}
    except Exception as exc:  # a failing implementation is a result to report, not a crash of the run
        return _row(base, impl, language, f"error: {_error(exc)}", correct=False, reason=_error(exc)), None
    roof = roofline(case.bytes, case.flops, t.stats.median, peak, case.compute)
    timer = t.timer
    if opts.device.type == "cpu" and language == "triton" and toolchains.interpreter_active():
        timer += " (Triton interpreter)"
    return _row(base, impl, language, MEASURED, timer=timer, cache_flush_bytes=t.flush_bytes,
                us=t.stats.median, p10=t.stats.p10, p90=t.stats.p90, iters=t.stats.n, first_call_us=first_us,
                warmup_us=t.warmup_us, gbps=roof.gbps, tflops=roof.tflops, pct_peak=roof.pct_peak,
                bound=roof.bound, peak_tbps=roof.peak_tbps, peak_tflops=roof.peak_tflops, correct=correct,
                reason=reason, **calls), out


class CompiledReferences:
    """torch.compile(reference), one compiled function per op shared by all its cases of a run.

    Shapes change from case to case: dynamo recompiles once and then treats the changing sizes as
    dynamic (the recompile limit is raised so that it never silently falls back to eager). References
    with Python loops over tokens or experts compile slowly at prefill sizes, so each op gets a
    budget: once its first calls (which include the compilations) have taken budget_s seconds, its
    remaining cases report the compiled reference as skipped.
    """

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.fns: dict[str, Callable] = {}
        self.spent_s: dict[str, float] = defaultdict(float)

    def measure(self, op: str, args: tuple, kwargs: dict, opts: Options) -> dict:
        if not opts.compile:
            return {"compiled_status": "not measured (pass --compile)"}
        if self.spent_s[op] >= self.budget_s:
            return {"compiled_status": f"skipped: compiling this op took {self.spent_s[op]:.0f} s already "
                                       f"(--compile-budget {self.budget_s:g})"}
        import torch._dynamo.config as dynamo_config
        limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        try:
            with dynamo_config.patch(**{limit: 1024}):
                if op not in self.fns:
                    self.fns[op] = torch.compile(_raw_reference(op))
                fn = self.fns[op]
                a, k = _copy_inputs(op, args, kwargs)
                _, first_us = timing.first_call(lambda: fn(*a, **k), opts.device)
                self.spent_s[op] += first_us / 1e6
                t = timing.measure(lambda: fn(*a, **k), opts.device, opts.settings, first_us)
        except Exception as exc:  # compile failures are reported in the records
            return {"compiled_status": f"torch.compile failed: {_error(exc)}"}
        return {"compiled_status": MEASURED, "compiled_us": t.stats.median, "compiled_first_call_us": first_us}


def _skip_reason(impl: dispatch.Implementation, backend: str, args, kwargs, opts: Options) -> str | None:
    if opts.impls and impl.name not in opts.impls and impl.name != REFERENCE:
        return "not selected (--impl)"
    _stage, reason = impl.why_not(backend, args, kwargs)
    if reason:
        return reason
    if backend == "cpu" and impl.language == "triton" and toolchains.interpreter_active() and not opts.interpreter:
        return "the Triton interpreter is not a performance number (pass --interpreter to time it anyway)"
    return None


def run_case(case: Case, opts: Options, env: dict, compiled: CompiledReferences | None = None) -> list[dict]:
    """Every row of one case: measured implementations, skipped ones (with the reason), compiled
    reference fields, peers."""
    info = platform.device_info(opts.device)
    peak = opts.peak or find_peak(info)
    base = _case_fields(case, env, peak)
    fn = case.call or public_op(case.op)
    if fn is None or case.op not in dispatch.ops():
        return [_row(base, "-", "-", f"skipped: {case.op} is not in dsv4_kernels yet")]
    try:
        args, kwargs = case.make_inputs(opts.device)
    except Exception as exc:  # no inputs: nothing of this case can be measured
        return [_row(base, REFERENCE, REFERENCE, f"error: {_error(exc)}", correct=False, reason=_error(exc))]
    try:
        base["dispatched"] = dispatch.select(case.op, args, kwargs, report_fallback=False).chosen.name
    except (dispatch.ImplementationUnavailable, ValueError):
        base["dispatched"] = None    # every implementation's own row says why it cannot run

    rows = []
    expected = None
    impls = sorted(dispatch.implementations(case.op), key=lambda i: (i.name != REFERENCE, -i.priority))
    for impl in impls:    # the reference first: its first call's outputs are what the others must match
        reason = _skip_reason(impl, info.backend, args, kwargs, opts)
        if impl.name != REFERENCE and expected is None:
            reason = reason or "no reference output to check against (the reference failed)"
        if reason:
            rows.append(_row(base, impl.name, impl.language, f"skipped: {reason}"))
            continue
        a, k = _copy_inputs(case.op, args, kwargs)
        call = lambda a=a, k=k, name=impl.name: fn(*a, impl=name, **k)
        row, out = _measure(base, impl.name, impl.language, call, case.op, expected, opts, peak, case)
        rows.append(row)
        if impl.name == REFERENCE:
            expected = out
    compiled_fields = (compiled or CompiledReferences(opts.compile_budget_s)).measure(case.op, args, kwargs, opts)
    if opts.peers:
        for peer in peers_mod.peers_for(case.op):
            adapter, status = peers_mod.availability(peer, case.op)
            name = f"peer:{peer.name}"
            if adapter is None or expected is None:
                rows.append(_row(base, name, "peer", status if adapter is None else
                                 "skipped: no reference output to check against (the reference failed)"))
                continue
            a, k = _copy_inputs(case.op, args, kwargs)
            rows.append(_measure(base, name, "peer", lambda a=a, k=k: adapter(*a, **k), case.op, expected,
                                 opts, peak, case)[0])
    ref_us = next((r["us"] for r in rows if r["impl"] == REFERENCE and r["status"] == MEASURED), None)
    for r in rows:
        r.update(compiled_fields)
        r["reference_us"] = ref_us
        if r["status"] != MEASURED:
            continue
        if r["correct"] is not True:
            r["reason"] = r["reason"] or "correctness not checked"
            continue
        if ref_us:
            r["speedup_vs_reference"] = ref_us / r["us"]
        if r.get("compiled_us"):
            r["speedup_vs_compiled"] = r["compiled_us"] / r["us"]
    return rows


BUDGET_REACHED = "skipped: time budget reached"


def run(cases: list[Case], opts: Options, env: dict, on_case: Callable[[list[dict]], None] | None = None,
        deadline: float | None = None) -> list[dict]:
    """Every case in turn. deadline (time.monotonic()): cases not started by then get one row with
    status BUDGET_REACHED instead of running (a clean stop at a time budget)."""
    rows = []
    compiled = CompiledReferences(opts.compile_budget_s)
    for case in cases:
        if deadline is not None and time.monotonic() >= deadline:
            rows.append(_row(_case_fields(case, env, None), "-", "-", BUDGET_REACHED))
            continue
        case_rows = run_case(case, opts, env, compiled)
        if on_case:
            on_case(case_rows)
        rows += case_rows
    return rows


def _num(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


COLUMNS = (("op", 22), ("label", 38), ("impl", 18), ("us", 10), ("p10-p90", 17), ("first us", 10),
           ("graph us", 9), ("GB/s", 8), ("TFLOP/s", 8), ("%peak", 12), ("x ref", 7), ("x comp", 7), ("check", 0))


def format_header() -> str:
    head = " ".join(f"{name:<{w}}" if w else name for name, w in COLUMNS)
    return head + "\n" + "-" * len(head)


def format_row(r: dict) -> str:
    impl = r["impl"] + ("*" if r.get("dispatched") == r["impl"] else "")
    if r["status"] != MEASURED:
        return f"{r['op']:<22} {r['label']:<38} {impl:<18} {r['status']}"
    spread = f"{r['p10']:.1f}-{r['p90']:.1f}"
    pct = "n/a" if r["pct_peak"] is None else f"{r['pct_peak']:.1f} {r['bound'][:3]}"
    check = {True: "ok", False: "FAIL " + r["reason"], None: r["reason"]}[r["correct"]]
    return (f"{r['op']:<22} {r['label']:<38} {impl:<18} {r['us']:<10.1f} {spread:<17} "
            f"{_num(r['first_call_us'], '.0f'):<10} {_num(r.get('graph_us'), '.1f'):<9} {_num(r['gbps'], '.1f'):<8} {_num(r['tflops'], '.3f'):<8} "
            f"{pct:<12} {_num(r['speedup_vs_reference'], '.2f'):<7} {_num(r['speedup_vs_compiled'], '.2f'):<7} "
            f"{check}")
