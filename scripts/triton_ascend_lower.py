"""Lower the portable Triton mHC kernels with triton-ascend, as far as it goes without CANN.

Run by scripts/triton-ascend-lower.sh with the python of the triton-ascend virtual environment
(triton-ascend replaces the `triton` package, so it never shares the project's environment). The
project is not installed there: it is imported from this checkout (the package mapping of setup.py).

For every specialisation the mHC ops launch (the list the codegen jobs compile: the codegen specs of
the ops' Triton implementations, both phases and the batch-invariant mode, hidden 4096 and 7168) and
each Ascend target, triton-ascend's own stages run one after the other:

  ttir       Triton IR after the backend's generic passes (inliner, combine, canonicalize, loop unroll)
  ttadapter  linalg + hivm MLIR from the bundled triton-adapter-opt: the input of CANN's bishengir-compile
  npubin     bishengir-compile: the kernel binary (needs CANN; absent here, so the expected end)

Each record keeps the last stage reached, why the next one stopped, and a few facts of the ttadapter
MLIR (cube matmuls, discrete accesses, local buffer sizes). backends/ascend/TRITON.md holds the table.

This module's top level imports neither triton nor torch: tests import it for the table helpers.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.abc
import importlib.util
import io
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRITON_ASCEND_VERSION = "3.2.0"
STAGES = ("ttir", "ttadapter", "npubin")
# Target key -> (arch, options). "a2a3": the backend's default A2/A3 path; "910_95": its compile_on_910_95
# path (arch from the backend's list of valid TRITON_ASCEND_ARCH names).
TARGETS = {"a2a3": ("Ascend910B3", {}), "910_95": ("Ascend910_9599", {"compile_on_910_95": True})}
TARGET_TITLES = {"a2a3": "A2/A3 (Ascend910B3)", "910_95": "910_95 (Ascend910_9599)"}
DOC = REPO / "backends" / "ascend" / "TRITON.md"
TABLE_START = "<!-- triton-ascend-lower table: start (scripts/triton-ascend-lower.sh --update-doc) -->"
TABLE_END = "<!-- triton-ascend-lower table: end -->"
_BYTES = {"f64": 8, "i64": 8, "f32": 4, "i32": 4, "bf16": 2, "f16": 2, "i16": 2, "i8": 1, "i1": 1}


# ---------------------------------------------------------------- stop reasons and facts (no triton needed)

def stop_class(message: str) -> str:
    """"cann" when a stage stopped because CANN is not installed, else "error"."""
    if "ASCEND_HOME_PATH is not set" in message or re.search(r"No such file or directory: '(npuc|bishengir-compile)'",
                                                              message):
        return "cann"
    return "error"


def _nbytes(shape: str, ty: str) -> int:
    n = _BYTES.get(ty, 0)
    for s in shape.split("x"):
        n *= int(s)
    return n


def mlir_facts(text: str) -> dict:
    """What the ttadapter MLIR says about the kernel on Ascend: its core mix (aiv: vector cores only; mix:
    cube and vector), the cube matmuls (operand type and shape), the loads or stores split into per-row
    copies (discrete accesses: ExtractedLoadOrStore loops), the local buffers (memref.alloc, KiB) and the
    largest tensor value (KiB)."""
    mode = re.search(r'mix_mode\s*=\s*"([^"]+)"', text)
    matmuls = re.findall(r"linalg\.matmul\b[^\n]*?ins\([^:]*:\s*tensor<([0-9x]+)x(\w+)>,\s*tensor<([0-9x]+)x\w+>", text)
    allocs = re.findall(r"memref\.alloc\(\)\s*:\s*memref<([0-9x]+)x(\w+)>", text)
    tensors = set(re.findall(r"tensor<([0-9x]+)x(\w+)>", text))
    return {
        "mix_mode": mode.group(1) if mode else None,
        "matmuls": [f"{ty} {a}*{b}" for a, ty, b in matmuls],
        "discrete_accesses": text.count("ExtractedLoadOrStore"),
        "local_buffers_kib": round(sum(_nbytes(s, t) for s, t in allocs) / 1024, 1),
        "largest_tensor_kib": round(max((_nbytes(s, t) for s, t in tensors), default=0) / 1024, 1),
    }


def cell(record: dict) -> str:
    """The table cell of one (specialisation, target): the last stage reached, then how the next stopped."""
    out = record["last_stage"] or "none"
    if record["stop_stage"]:
        out += f"; stop {record['stop_stage']}: {record['stop_class']}"
    return out


_CELL = re.compile(r"^(?P<last>\w+)(?:; stop (?P<stage>\w+): (?P<cls>\w+))?$")


def parse_cell(text: str) -> tuple[str, str | None, str | None]:
    m = _CELL.match(text.strip())
    if m is None:
        raise ValueError(f"table cell: expected '<stage>' or '<stage>; stop <stage>: <class>', got {text!r}")
    return m.group("last"), m.group("stage"), m.group("cls")


def _matmul_cell(facts: dict | None) -> str:
    if not facts:
        return "-"
    mm = facts["matmuls"]
    if not mm:
        return "0"
    kinds = sorted(set(mm))
    return ", ".join(f"{mm.count(k)} x {k}" for k in kinds)


def markdown(records: list[dict]) -> str:
    """One row per specialisation: its op, kernel and label, the stage cell per target, and the facts of the
    ttadapter MLIR of the first target that reached it."""
    targets = [t for t in TARGETS if any(r["target"] == t for r in records)]
    rows: dict[tuple, dict] = {}
    for r in records:
        rows.setdefault((r["op"], r["kernel"], r["label"]), {})[r["target"]] = r
    head = ["op", "kernel", "specialisation", *(TARGET_TITLES[t] for t in targets), "core mix", "cube matmuls",
            "discrete accesses", "local buffers KiB", "largest tensor KiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, kernel, label), by_target in rows.items():
        facts = next((by_target[t]["facts"] for t in targets if t in by_target and by_target[t]["facts"]), None)
        lines.append("| " + " | ".join([
            op, kernel, label, *(cell(by_target[t]) if t in by_target else "-" for t in targets),
            (facts or {}).get("mix_mode") or "-", _matmul_cell(facts),
            str(facts["discrete_accesses"]) if facts else "-",
            str(facts["local_buffers_kib"]) if facts else "-",
            str(facts["largest_tensor_kib"]) if facts else "-"]) + " |")
    return "\n".join(lines) + "\n"


def parse_table(doc: str) -> dict[tuple[str, str, str], tuple[str, str | None, str | None]]:
    """{(op, label, target): (last stage, stop stage, stop class)} from the marked table of TRITON.md."""
    if TABLE_START not in doc or TABLE_END not in doc:
        raise ValueError(f"TRITON.md: the table markers are missing ({TABLE_START!r} ... {TABLE_END!r})")
    body = doc.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    lines = [ln.strip() for ln in body.splitlines() if ln.strip().startswith("|")]
    if len(lines) < 3:
        raise ValueError("TRITON.md: the marked table has no rows")
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    titles = {title: key for key, title in TARGET_TITLES.items()}
    out = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(head):
            raise ValueError(f"TRITON.md: row {ln!r} has {len(cells)} cells, the header {len(head)}")
        row = dict(zip(head, cells))
        for title, key in titles.items():
            if title in row and row[title] != "-":
                out[(row["op"], row["specialisation"], key)] = parse_cell(row[title])
    return out


def compare(documented: dict, records: list[dict]) -> list[str]:
    """What a run contradicts in the documented table: a row without a run or a run without a row, a
    specialisation that stops at an earlier stage than documented, or one that stops at the documented
    stage for another reason. Getting further (CANN installed) is no mismatch."""
    actual = {(r["op"], r["label"], r["target"]): (r["last_stage"], r["stop_stage"], r["stop_class"])
              for r in records}
    problems = [f"{k}: documented, not lowered by this run" for k in documented if k not in actual]
    problems += [f"{k}: lowered, missing from the table (rerun with --update-doc)" for k in actual
                 if k not in documented]
    rank = {s: i for i, s in enumerate(("none", *STAGES))}
    for key in sorted(documented.keys() & actual.keys()):
        (d_last, _, d_cls), (a_last, a_stage, a_cls) = documented[key], actual[key]
        if rank.get(a_last, -1) < rank.get(d_last, 99):
            problems.append(f"{key}: reached {a_last} (stop {a_stage}: {a_cls}); documented {d_last}")
        elif a_last == d_last and a_cls != d_cls:
            problems.append(f"{key}: stops after {a_last} for {a_cls}; documented {d_cls}")
    return problems


def update_doc(doc: str, table: str) -> str:
    if TABLE_START not in doc or TABLE_END not in doc:
        raise ValueError("TRITON.md: the table markers are missing")
    before, rest = doc.split(TABLE_START, 1)
    after = rest.split(TABLE_END, 1)[1]
    return f"{before}{TABLE_START}\n{table}{TABLE_END}{after}"


# ---------------------------------------------------------------- the project, imported from this checkout

def _roots() -> dict[str, Path]:
    """setup.py's package mapping ({"dsv4_kernels": "src/dsv4_kernels", ...}), read, not executed."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ROOTS" for t in node.targets):
            return {k: REPO / v for k, v in ast.literal_eval(node.value).items()}
    raise RuntimeError("setup.py: no ROOTS mapping")


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Imports the packages of setup.py's mapping from this checkout (nothing installed)."""

    def __init__(self, roots: dict[str, Path]):
        self.roots = roots

    def find_spec(self, name, path, target=None):
        root = self.roots.get(name)
        if root is None:
            return None
        return importlib.util.spec_from_file_location(name, root / "__init__.py",
                                                      submodule_search_locations=[str(root)])


def environment_problem() -> str | None:
    """Why this python cannot lower (None: it can): it must have triton-ascend, under no interpreter."""
    from importlib import metadata
    try:
        version = metadata.version("triton-ascend")
    except metadata.PackageNotFoundError:
        return (f"this python ({sys.executable}) has no triton-ascend; run scripts/triton-ascend-lower.sh, "
                "which builds its own virtual environment")
    if version != TRITON_ASCEND_VERSION:
        return f"triton-ascend {TRITON_ASCEND_VERSION} expected, this python has {version}"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: the kernels would be interpreted, not compiled"
    return None


def collect_specs(ops: list[str] | None = None) -> list[tuple[str, object]]:
    """[(op, TritonKernel)] of the mHC ops' Triton implementations, as the codegen jobs compile them."""
    if "dsv4_kernels" not in sys.modules:
        sys.meta_path.insert(0, _CheckoutFinder(_roots()))
    from dsv4_kernels import dispatch
    from dsv4_kernels.ops.mhc import OPS
    unknown = sorted(set(ops or ()) - set(OPS))
    if unknown:
        raise ValueError(f"--op: expected some of {OPS}, got {unknown}")
    return [(op, spec) for op in OPS if not ops or op in ops
            for spec in dispatch.get(op, "triton").codegen_specs(None)]


def kernel_name(fn) -> str:
    return getattr(fn, "__name__", None) or fn.fn.__name__


# ---------------------------------------------------------------- lowering (triton-ascend only)

def lower(op: str, spec, target_key: str, dump: Path | None = None) -> dict:
    """Runs triton-ascend's stages on one specialisation for one target; returns its record."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import AttrsDescriptor, GPUTarget
    from triton.compiler import ASTSource, make_backend

    arch, extra = TARGETS[target_key]
    target = GPUTarget("npu", arch, 0)
    backend = make_backend(target)
    fn = spec.fn
    # What the JIT gives aligned tensors at launch: tt.divisibility 16 on every pointer (as codegen does).
    pointers = [fn.arg_names.index(name) for name, ty in spec.signature.items() if ty.startswith("*")]
    attrs = AttrsDescriptor.from_dict({"arg_properties": {"tt.divisibility": pointers},
                                       "cls": "AscendAttrsDescriptor"})
    src = ASTSource(fn, dict(spec.signature), dict(spec.constexprs), attrs)
    options = backend.parse_options({"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                     "enable_fp_fusion": True, **extra})
    stages: dict = {}
    backend.add_stages(stages, options)
    if tuple(stages) != STAGES:
        raise RuntimeError(f"triton-ascend's stages changed: {tuple(stages)}, expected {STAGES}")
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    metadata = {"hash": f"{op}-{spec.label}-{target_key}", "target": target, **options.__dict__}
    record = {"op": op, "kernel": kernel_name(fn), "label": spec.label, "target": target_key, "arch": arch,
              "constexprs": dict(spec.constexprs), "num_warps": spec.num_warps, "num_stages": spec.num_stages,
              "stages": [], "last_stage": None, "stop_stage": None, "stop_class": None, "stop_message": None,
              "facts": None, "seconds": 0.0}
    start = time.perf_counter()
    module = None
    for name in STAGES:
        noise = io.StringIO()  # the backend prints its probes of bishengir-compile; keep them with the record
        try:
            with contextlib.redirect_stdout(noise):
                if module is None:
                    module = src.make_ir(options, backend.get_codegen_implementation(), backend.get_module_map(),
                                         context)
                module = stages[name](module, metadata)
        except Exception as exc:  # the stage's own error is the finding
            detail = getattr(exc, "stderr", None)
            detail = detail.decode(errors="replace") if isinstance(detail, bytes) else (detail or "")
            message = f"{type(exc).__name__}: {exc}" + (f"\n{detail.strip()[-2000:]}" if detail.strip() else "")
            record.update(stop_stage=name, stop_message=message, stop_class=stop_class(message))
            break
        record["stages"].append(name)
        record["last_stage"] = name
        text = module if isinstance(module, str) else (None if isinstance(module, bytes) else str(module))
        if name == "ttadapter":
            record["facts"] = mlir_facts(text)
        if dump is not None and text is not None:
            dump.mkdir(parents=True, exist_ok=True)
            (dump / f"{op}.{spec.label}.{target_key}.{name}.mlir").write_text(text)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def check_coverage(specs: list[tuple[str, object]]) -> list[str]:
    """The @triton.jit kernels of kernels/mhc/triton.py that no spec lowers (every launched one must be)."""
    import triton
    from dsv4_kernels.kernels.mhc import triton as module
    kernels = {name for name, value in vars(module).items()
               if isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel")}
    return sorted(kernels - {kernel_name(spec.fn) for _, spec in specs})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/triton-ascend-lower.sh",
                                description="Lower the Triton mHC kernels with triton-ascend (no CANN needed).")
    p.add_argument("--target", action="append", choices=sorted(TARGETS),
                   help="Ascend target (repeatable; default: all)")
    p.add_argument("--op", action="append", help="only this mHC op (repeatable; default: all)")
    p.add_argument("--json", type=Path, help="write the records (one per specialisation and target) here")
    p.add_argument("--md", type=Path, help="write the markdown table here (default: print it)")
    p.add_argument("--update-doc", action="store_true", help=f"replace the marked table in {DOC.relative_to(REPO)}")
    p.add_argument("--dump", type=Path, help="write each stage's MLIR into this folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problem = environment_problem()
    if problem:
        print(f"triton-ascend-lower: {problem}", file=sys.stderr)
        return 2
    if args.update_doc and (args.op or args.target):
        print("triton-ascend-lower: --update-doc writes the whole table: drop --op and --target", file=sys.stderr)
        return 2
    import triton
    specs = collect_specs(args.op)
    missing = [] if args.op else check_coverage(specs)
    records = [lower(op, spec, t, args.dump) for op, spec in specs for t in (args.target or TARGETS)]
    table = markdown(records)
    summary = {"triton": triton.__version__, "triton_ascend": TRITON_ASCEND_VERSION, "records": records,
               "kernels_without_spec": missing}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    if args.md:
        args.md.write_text(table)
    if args.update_doc:
        DOC.write_text(update_doc(DOC.read_text(), table))
    if not (args.md or args.json or args.update_doc):
        sys.stdout.write(table)
    reached = sum(r["last_stage"] == "ttadapter" or r["last_stage"] == "npubin" for r in records)
    errors = [r for r in records if r["stop_class"] == "error"]
    print(f"triton-ascend-lower: {len(records)} lowerings, {reached} reached ttadapter or further, "
          f"{len(errors)} stopped by an error, {sum(r['seconds'] for r in records):.1f} s", file=sys.stderr)
    for r in errors:
        print(f"  {r['op']}/{r['label']}/{r['target']}: {r['stop_stage']}: {r['stop_message'][:300]}", file=sys.stderr)
    if missing:
        print(f"triton-ascend-lower: kernels no spec lowers: {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
