"""The table `dsv4k check` prints: one row per (op, implementation), streamed as each op finishes.

Columns: numerics (the CPU run: Triton through its interpreter, the reference against its fp64 oracle),
codegen (binary or source, per target, over every backend checked), device (device numerics on the
backends whose device is present), perf (a benchmark result under bench/results/ for this chip) and the
highest level reached, which never goes past a level that did not pass: a kernel that has only been
compiled shows "not run". An implementation's rows for several backends fold into one: a level that
did not run on any of them shows "not run" with the reasons as numbered footnotes, printed at the end.
"""
from __future__ import annotations

from dsv4_kernels.ladder import Record

_NO_CPU_RUN = "never run: {language} kernels have no CPU path here (numerics need the device)"


class Notes:
    """Footnotes: each distinct reason gets a number the first time it is cited."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def cite(self, reason: str) -> int:
        return self.numbers.setdefault(reason, len(self.numbers) + 1)

    def lines(self) -> list[str]:
        return [f"[{n}] {reason}" for reason, n in self.numbers.items()]


def _cell(recs: list[Record], notes: Notes) -> str:
    """pass [backends] / FAIL / not run [footnotes] / - (the level does not apply)."""
    if not recs:
        return "-"
    if any(r.status == "fail" for r in recs):
        return "FAIL"
    passed = sorted({r.backend for r in recs if r.status == "pass"})
    if passed:
        return "pass" + ("" if passed == ["cpu"] else f" {','.join(passed)}")
    return f"not run [{notes.cite('; '.join(sorted({r.reason for r in recs})))}]"  # one note per set of reasons


def _codegen_cell(recs: list[Record], notes: Notes) -> str:
    """binary TARGETS / source TARGETS [why no binary] / FAIL / - ."""
    if not recs:
        return "-"
    if any(r.status == "fail" for r in recs):
        return "FAIL"
    binary = sorted(r.target for r in recs if r.level == "codegen-binary" and r.status == "pass")
    source = sorted(r.target for r in recs if r.level == "codegen-source" and r.status == "pass")
    why = sorted({notes.cite(r.reason) for r in recs if r.status == "skip"})
    parts = ([f"binary {','.join(binary)}"] if binary else []) + ([f"source {','.join(source)}"] if source else [])
    return "; ".join(parts) + "".join(f" [{n}]" for n in why) if parts else "not run"


def highest(numerics_ok: bool, codegen: list[Record], device_ok: bool, perf_ok: bool) -> str:
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


class Table:
    """Rows for the ops named at construction, column widths fixed from their names up front so the
    rows can be printed as they come."""

    def __init__(self, ops: list[str], impls: list[str]) -> None:
        self.notes = Notes()
        self.op_width = max([len("op")] + [len(op) for op in ops])
        self.impl_width = max([len("impl")] + [len(i) for i in impls])

    def header(self) -> list[str]:
        head = (f"{'op':<{self.op_width}} {'impl':<{self.impl_width}} {'numerics':<12} {'codegen':<34} "
                f"{'device':<12} {'perf':<12} {'highest level':<15} notes")
        return [head, "-" * len(head)]

    def rows(self, records: list[Record]) -> list[str]:
        """The rows of one op's records, one per implementation (in the order they appear)."""
        by_impl: dict[str, list[Record]] = {}
        for r in records:
            by_impl.setdefault(r.impl, []).append(r)
        lines = []
        for impl, recs in by_impl.items():
            level = {lvl: [r for r in recs if r.level == lvl] for lvl in ("cpu-numerics", "device-numerics",
                                                                            "device-perf")}
            codegen = [r for r in recs if r.level.startswith("codegen")]
            cpu = level["cpu-numerics"]
            if cpu:
                numerics = _cell(cpu, self.notes)
            else:
                numerics = f"not run [{self.notes.cite(_NO_CPU_RUN.format(language=recs[0].language))}]"
            numerics_ok = bool(cpu) and all(r.status == "pass" for r in cpu)
            device_ok = any(r.status == "pass" for r in level["device-numerics"]) and not any(
                r.status == "fail" for r in level["device-numerics"])
            perf_ok = any(r.status == "pass" for r in level["device-perf"])
            # perf is a level above device numerics: where those did not run, its cell says nothing more
            perf = _cell(level["device-perf"], self.notes) if device_ok or perf_ok else "-"
            fails = [f"{r.level}/{r.target}: {r.reason}" for r in recs if r.status == "fail"]
            line = (f"{recs[0].op:<{self.op_width}} {impl:<{self.impl_width}} {numerics:<12} "
                    f"{_codegen_cell(codegen, self.notes):<34} {_cell(level['device-numerics'], self.notes):<12} "
                    f"{perf:<12} "
                    f"{highest(numerics_ok, codegen, device_ok, perf_ok):<15} "
                    + ("FAIL " + " | ".join(fails) if fails else ""))
            lines.append(line.rstrip())
        return lines

    def footer(self) -> list[str]:
        return ([""] + self.notes.lines()) if self.notes.numbers else []


def table(records: list[Record]) -> str:
    """The whole table of a list of records (rows grouped by op, in the order of the records)."""
    ops = list(dict.fromkeys(r.op for r in records))
    t = Table(ops, [r.impl for r in records])
    lines = t.header()
    for op in ops:
        lines += t.rows([r for r in records if r.op == op])
    return "\n".join(lines + t.footer())
