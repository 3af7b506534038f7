"""The verification ladder behind `dsv4k check`: per (op, impl, backend, target), the levels
cpu-numerics -> codegen-source -> codegen-binary -> device-numerics -> device-perf, each with status
pass / fail / skip and a reason.

- cpu-numerics: the implementation on CPU tensors (Triton through its interpreter, in a subprocess with
  TRITON_INTERPRET=1) against the reference on the op's sample cases; the reference itself against the
  op's independent fp64 oracle.
- codegen-source / codegen-binary: the implementation compiled for each target of its backends
  (codegen.py), as far as this machine's compilers go: "binary" when every kernel became a cubin or
  hsaco (what the driver loads), "source" when only HIP, CUDA or Ascend C source could be produced (then
  codegen-binary is a skip with the missing compiler as its reason). The artifacts' claims (no local
  memory, vector loads, no reduced-precision MMA, codegen.DEFAULT_EXPECTS) must hold, or the level fails.
- device-numerics: the sample cases on the backend's device against the reference on the CPU.
- device-perf: a measured, correct benchmark result for this chip recorded under bench/results/.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from dsv4_kernels import dispatch, platform

LEVELS = ("cpu-numerics", "codegen-source", "codegen-binary", "device-numerics", "device-perf")
CODEGEN_LEVELS = ("codegen-source", "codegen-binary")


@dataclass(frozen=True)
class OpCheck:
    """How the ladder checks one op: sample cases on a device, the comparison, and for the reference
    an independent oracle (a differently written fp64 formula), or None when the op has none.

    compare: one comparison (actual, expected) for every output, or a tuple of them, one per output in
    order (an op whose outputs differ in kind: compressor_prefill's entries and exact states)."""

    op: str
    cases: Callable[[torch.device], list[tuple[str, tuple, dict]]]
    compare: Callable[[torch.Tensor, torch.Tensor], None] | tuple[Callable[[torch.Tensor, torch.Tensor], None], ...]
    oracle: Callable | None = None

    def comparison(self, index: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
        return self.compare[index] if isinstance(self.compare, tuple) else self.compare


_CHECKS: dict[str, OpCheck] = {}


def register_check(check: OpCheck) -> None:
    _CHECKS[check.op] = check


def get_check(op: str) -> OpCheck:
    if op not in _CHECKS:
        raise ValueError(f"op {op!r} registered no OpCheck; expected one of {', '.join(sorted(_CHECKS))}")
    return _CHECKS[op]


@dataclass
class Record:
    op: str
    impl: str
    language: str
    backend: str
    target: str
    level: str
    status: str   # "pass", "fail", "skip"
    reason: str


def _outputs(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _copy_to_cpu(x):
    """A CPU copy that shares no storage with x: in-place ops must not change the expected side's inputs."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_copy_to_cpu(v) for v in x)
    if isinstance(x, dict):
        return {k: _copy_to_cpu(v) for k, v in x.items()}
    return x


def run_cases(op: str, impl_name: str, device: torch.device) -> str:
    """Run the op's sample cases with one implementation on `device`; raises AssertionError on a mismatch.
    A case the implementation's supports() refuses (a kernel built for dim % 256 == 0 given dim 100) is
    not run and is named with the reason; LookupError when it refuses every case. Returns a short summary."""
    check = get_check(op)
    impl = dispatch.get(op, impl_name)
    torch.manual_seed(0)
    labels, refused, heavy = [], [], []
    interpreted = impl.language != "reference" and device.type == "cpu"
    for label, args, kwargs in check.cases(device):
        reason = impl.supports(*args, **kwargs)
        if reason:
            refused.append(f"{label} ({reason})")
            continue
        size = _input_bytes(args, kwargs)
        if interpreted and size > INTERPRETER_CASE_BYTES:
            heavy.append(f"{label} ({size / 2**20:.0f} MiB of inputs)")
            continue
        cpu_args, cpu_kwargs = _copy_to_cpu(args), _copy_to_cpu(kwargs)  # before an in-place op runs
        out = _outputs(dispatch.call(op, *args, impl=impl_name, **kwargs))
        if impl.language == "reference" and device.type == "cpu":
            if check.oracle is None:
                raise LookupError("no independent oracle is registered for this op")
            expected = _outputs(check.oracle(*cpu_args, **cpu_kwargs))
        else:
            expected = _outputs(dispatch.get(op, "reference")(*cpu_args, **cpu_kwargs))
        for i, (o, e) in enumerate(zip(out, expected)):
            try:
                check.comparison(i)(o.cpu(), e)
            except AssertionError as exc:
                raise AssertionError(f"case {label}, output {i}: {exc}") from None
        labels.append(label)
    if (refused or heavy) and not labels:
        raise LookupError(f"{impl_name} ran no sample case: refused {'; '.join(refused) or 'none'}; too large for "
                          f"the interpreter {'; '.join(heavy) or 'none'}")
    summary = f"{len(labels)} cases match: {', '.join(labels)}"
    if heavy:
        summary += f"; left to the device (too large for the interpreter): {'; '.join(heavy)}"
    return summary + (f"; refused by supports(): {'; '.join(refused)}" if refused else "")


INTERPRETER_CASE_BYTES = 8 * 2**20   # a sample case with more input bytes is not run through the interpreter


def _input_bytes(args: tuple, kwargs: dict) -> int:
    return sum(a.numel() * a.element_size() for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))


def _selected(ops: tuple[str, ...] | None) -> list[str]:
    """The registered ops, or those named (an unknown name raises ValueError with the expected names)."""
    if not ops:
        return dispatch.ops()
    for op in ops:
        dispatch.implementations(op)
    return sorted(set(ops))


def cpu_numerics(ops: tuple[str, ...] | None = None) -> list[Record]:
    """cpu-numerics records of every (op, impl) that serves the CPU, in this process."""
    records = []
    for op in _selected(ops):
        for impl in dispatch.implementations(op):
            if not impl.serves("cpu"):
                continue
            rec = Record(op, impl.name, impl.language, "cpu", "cpu", "cpu-numerics", "pass", "")
            reason = impl.available("cpu")
            if reason:
                rec.status, rec.reason = "skip", reason
            else:
                try:
                    rec.reason = run_cases(op, impl.name, torch.device("cpu"))
                except LookupError as exc:
                    rec.status, rec.reason = "skip", str(exc)
                except Exception as exc:
                    rec.status, rec.reason = "fail", f"{type(exc).__name__}: {exc}"
            records.append(rec)
    return records


_OP_MARK = "dsv4k-ladder-op "


def _numerics_worker(ops: list[str], stderr) -> subprocess.Popen:
    """The cpu-numerics subprocess (Triton interpreter on): one marked JSON line per op as it finishes;
    stderr to a file (a pipe nobody reads would fill up and stall it)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.Popen([sys.executable, "-c", "import sys; from dsv4_kernels.ladder import main; sys.exit(main())",
                             *ops], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)


def cpu_numerics_in_interpreter(ops: tuple[str, ...] | None = None) -> list[Record]:
    """cpu-numerics in a subprocess with the Triton interpreter on, so Triton kernels run on the CPU."""
    return [r for _, recs in stream(levels=("cpu-numerics",), ops=ops) for r in recs]


def _summary(artifacts: list) -> str:
    parts = []
    for a in artifacts:
        res = ", ".join(f"{k} {v}" for k, v in a.resources.items() if k != "note")
        note = a.resources.get("note")
        what = a.kind + (f"+{a.binary_kind}" if a.binary_kind else "")
        claims = ", ".join(f"{k}={c['expected']}" for k, c in a.claims.items())
        parts.append(f"{a.label}: {what}" + (f" ({res})" if res else "") + (f" [{note}]" if note else "")
                     + (f" claims held: {claims}" if claims else ""))
    return "; ".join(parts)


def codegen_level_records(op: str, impl: dispatch.Implementation, target, result: dict) -> list[Record]:
    """The codegen records of one compile result: codegen-binary pass when every artifact is a binary;
    codegen-source pass plus a codegen-binary skip (the missing compiler) when some are source only; a
    failed compile or a failed claim fails the level it reached (codegen-source when nothing compiled)."""
    from dsv4_kernels.codegen import Artifact

    def rec(level: str, status: str, reason: str) -> Record:
        return Record(op, impl.name, impl.language, target.backend, target.name, level, status, reason)
    if not result["ok"]:
        return [rec("codegen-source", "fail", result["error"])]
    arts = [Artifact.from_json(a) for a in result["artifacts"]]
    level = "codegen-binary" if all(a.level == "binary" for a in arts) else "codegen-source"
    broken = [f"{a.label}: {msg}" for a in arts for msg in a.failed_claims()]
    if broken:
        return [rec(level, "fail", "claims not met: " + "; ".join(broken))]
    records = [rec(level, "pass", _summary(arts))]
    if level == "codegen-source":
        notes = sorted({a.resources.get("note", "no binary built") for a in arts if a.level == "source"})
        records.append(rec("codegen-binary", "skip", "; ".join(notes)))
    return records


def codegen_records(backends: tuple[str, ...], ops: tuple[str, ...] | None = None) -> list[Record]:
    from dsv4_kernels.codegen import compile_many
    jobs = codegen_jobs(backends, ops)
    results = compile_many([{"op": op, "impl": impl.name, "target": t.name} for op, impl, t in jobs])
    return [r for (op, impl, t), res in zip(jobs, results) for r in codegen_level_records(op, impl, t, res)]


def _bench_results_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "bench" / "results"


def _perf_record(op: str, impl: dispatch.Implementation, device: platform.DeviceInfo) -> Record:
    rec = Record(op, impl.name, impl.language, device.backend, device.arch, "device-perf", "skip", "")
    folder = _bench_results_dir()
    rows = []
    if folder.is_dir():
        for path in sorted(folder.rglob("*.jsonl")):
            for line in path.read_text().splitlines():
                row = json.loads(line) if line.strip() else {}
                if (row.get("op") == op and row.get("impl") == impl.name and row.get("chip") == device.name
                        and row.get("status") == "measured" and row.get("correct") is True):
                    rows.append(path.name)
    if rows:
        rec.status, rec.reason = "pass", f"benchmark results for {device.name} in {', '.join(sorted(set(rows)))}"
    else:
        rec.reason = f"no benchmark result for {device.name} under bench/results/ (run dsv4k bench on this device)"
    return rec


def device_records(backends: tuple[str, ...], ops: tuple[str, ...] | None = None) -> list[Record]:
    records = []
    for op in _selected(ops):
        for impl in dispatch.implementations(op):
            for backend in impl.backends:
                if backend == "cpu" or backend not in backends:
                    continue
                absent = platform.device_present(backend)
                rec = Record(op, impl.name, impl.language, backend, "device", "device-numerics", "skip", "")
                if absent:
                    rec.reason = absent
                    records.append(rec)
                    records.append(Record(op, impl.name, impl.language, backend, "device", "device-perf", "skip", absent))
                    continue
                info = platform.machine_device()
                rec.target = info.arch
                reason = impl.available(backend)
                if reason:
                    rec.reason = reason
                else:
                    try:
                        rec.status, rec.reason = "pass", run_cases(op, impl.name, torch.device("cuda" if backend in ("cuda", "rocm") else "npu"))
                    except Exception as exc:
                        rec.status, rec.reason = "fail", f"{type(exc).__name__}: {exc}"
                records.append(rec)
                records.append(_perf_record(op, impl, info))
    return records


def codegen_jobs(backends: tuple[str, ...], ops: tuple[str, ...] | None = None,
                 targets: tuple[str, ...] | None = None) -> list[tuple[str, dispatch.Implementation, object]]:
    """(op, impl, target) for every implementation's targets on these backends (only `targets` if given)."""
    from dsv4_kernels.codegen import targets_for
    return [(op, impl, t) for op in _selected(ops) for impl in dispatch.implementations(op)
            for t in targets_for(impl) if t.backend in backends and (targets is None or t.name in targets)]


def stream(backends: tuple[str, ...] = ("cuda", "rocm", "ascend"), levels: tuple[str, ...] = LEVELS,
           ops: tuple[str, ...] | None = None, targets: tuple[str, ...] | None = None):
    """The ladder op by op: yields (op, records) in the order of the ops as soon as each op's levels are
    done. CPU numerics run in an interpreter subprocess while the compilers work on the codegen levels
    (codegen.compile_many's workers), so the first ops report while the others are still running.
    targets: only these codegen targets (None: all of the backends')."""
    import queue
    import threading
    import dsv4_kernels  # noqa: F401  (registers the ops)
    from dsv4_kernels.codegen import compile_many
    selected = _selected(ops)
    events: queue.Queue = queue.Queue()
    numerics: dict[str, list[Record]] = {}
    failure: list[str] = []
    proc = None
    if "cpu-numerics" in levels:
        import tempfile
        err = tempfile.TemporaryFile(mode="w+")
        proc = _numerics_worker(selected, err)

        def read_numerics():
            for line in proc.stdout:
                if line.startswith(_OP_MARK):
                    op, recs = json.loads(line[len(_OP_MARK):])
                    events.put(("numerics", op, [Record(**r) for r in recs]))
            if proc.wait() != 0:
                err.seek(0)
                failure.append(f"cpu-numerics subprocess failed (exit {proc.returncode}):\n{err.read()[-4000:]}")
            err.close()
            events.put(("numerics-done", None, None))
        threading.Thread(target=read_numerics, daemon=True).start()
    jobs = codegen_jobs(backends, ops, targets) if set(CODEGEN_LEVELS) & set(levels) else []
    pending = {op: sum(1 for j in jobs if j[0] == op) for op in selected}
    codegen: dict[str, list[Record]] = {op: [] for op in selected}
    if jobs:
        def on_result(i: int, result: dict) -> None:
            op, impl, target = jobs[i]
            events.put(("codegen", op, [r for r in codegen_level_records(op, impl, target, result)
                                        if r.level in levels]))

        def compile_all():
            try:
                compile_many([{"op": op, "impl": impl.name, "target": t.name} for op, impl, t in jobs],
                             on_result=on_result)
            except Exception as exc:  # noqa: BLE001  (reported as the run's failure)
                failure.append(f"codegen failed: {type(exc).__name__}: {exc}")
                events.put(("codegen-failed", None, None))
        threading.Thread(target=compile_all, daemon=True).start()
    numerics_done = proc is None
    for op in selected:
        while not ((numerics_done or op in numerics) and pending[op] == 0):
            kind, name, recs = events.get()
            if kind == "numerics":
                numerics[name] = recs
            elif kind == "numerics-done":
                numerics_done = True
            elif kind == "codegen":
                codegen[name] += recs
                pending[name] -= 1
            if failure:
                raise RuntimeError(failure[0])
        records = numerics.get(op, []) + codegen[op]
        if "device-numerics" in levels or "device-perf" in levels:
            records += [r for r in device_records(backends, (op,)) if r.level in levels]
        yield op, records


def run(backends: tuple[str, ...] = ("cuda", "rocm", "ascend"), levels: tuple[str, ...] = LEVELS,
        ops: tuple[str, ...] | None = None, targets: tuple[str, ...] | None = None) -> list[Record]:
    """The ladder for these backends and ops (None: all), as one list (see stream)."""
    return [r for _, recs in stream(backends, levels, ops, targets) for r in recs]


def main() -> int:
    """Subprocess entry of the cpu-numerics worker: one marked JSON line per op, as each finishes."""
    import dsv4_kernels  # noqa: F401
    for op in _selected(tuple(sys.argv[1:]) or None):
        print(_OP_MARK + json.dumps([op, [asdict(r) for r in cpu_numerics((op,))]]), flush=True)
    return 0
