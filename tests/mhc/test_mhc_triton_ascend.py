"""The Triton mHC kernels lowered by triton-ascend (scripts/triton-ascend-lower.sh, backends/ascend/TRITON.md).

- marked `triton_ascend`: runs the lowering of every launched specialisation for both Ascend targets in
  its own process with the python of the triton-ascend virtual environment, and checks the run against
  TRITON.md's table: each row still reaches its documented stage, and one that stops there stops for
  the documented reason. Skips, saying how to build it, when that environment is absent (the default
  state of CI: building it costs a minute and 1.2 GB);
- always: the table of TRITON.md covers exactly the specialisations the ops launch, and the script's
  table, comparison and argument handling, with no triton-ascend (the script's helpers import neither
  triton nor torch).
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "triton_ascend_lower.py"
WRAPPER = ROOT / "scripts" / "triton-ascend-lower.sh"
VENV_ENV = "DSV4K_TRITON_ASCEND_VENV"


def _load_script():
    spec = importlib.util.spec_from_file_location("triton_ascend_lower", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lower = _load_script()


def _venv_python() -> pathlib.Path:
    venv = os.environ.get(VENV_ENV) or str(pathlib.Path.home() / ".cache" / "dsv4k" / "triton-ascend-venv")
    return pathlib.Path(venv) / "bin" / "python"


def _clean_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest turns it on for this process
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return env


def _documented() -> dict:
    return lower.parse_table(lower.DOC.read_text())


@pytest.mark.triton_ascend
def test_documented_kernels_still_lower(tmp_path):
    python = _venv_python()
    if not python.exists():
        pytest.skip(f"no triton-ascend virtual environment at {python.parent.parent} (${VENV_ENV}): build it with "
                    "`scripts/triton-ascend-lower.sh setup` (about a minute, 1.2 GB)")
    out = tmp_path / "records.json"
    run = subprocess.run([str(python), str(SCRIPT), "--json", str(out)], cwd=ROOT, env=_clean_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    if run.returncode == 2 and "no triton-ascend" in run.stderr:
        pytest.skip(f"{python} has no triton-ascend: {run.stderr.strip()}")
    assert run.returncode == 0, f"the lowering failed:\n{run.stderr[-4000:]}"
    result = json.loads(out.read_text())
    assert result["kernels_without_spec"] == []
    problems = lower.compare(_documented(), result["records"])
    assert not problems, "the run contradicts backends/ascend/TRITON.md:\n" + "\n".join(problems)


def test_table_covers_the_launched_specialisations():
    # Every specialisation the codegen jobs compile has a row, for each Ascend target, and no other row:
    # a new or renamed spec needs the lowering rerun (scripts/triton-ascend-lower.sh --update-doc).
    specs = lower.collect_specs()
    launched = {(op, spec.label, t) for op, spec in specs for t in lower.TARGETS}
    documented = set(_documented())
    assert documented == launched, (f"missing rows: {sorted(launched - documented)}; "
                                    f"stale rows: {sorted(documented - launched)}")
    kernels = {lower.kernel_name(spec.fn) for _, spec in specs}
    assert kernels == {"sinkhorn_kernel", "mix_kernel", "out_kernel", "post_kernel"}


def _record(last="ttadapter", stop="npubin", cls="cann", op="mhc_pre", label="mix-decode-dim4096", target="a2a3"):
    return {"op": op, "kernel": "mix_kernel", "label": label, "target": target, "last_stage": last,
            "stop_stage": stop, "stop_class": cls, "facts": {"mix_mode": "mix", "matmuls": ["f32 16x128*128x32"],
                                                              "discrete_accesses": 1, "local_buffers_kib": 20.0,
                                                              "largest_tensor_kib": 16.0}}


def test_table_round_trip_and_compare():
    records = [_record(), _record(target="910_95"), _record(op="mhc_post", label="post-dim4096", last="ttir",
                                                            stop="ttadapter", cls="error")]
    doc = f"intro\n{lower.TABLE_START}\nold\n{lower.TABLE_END}\nrest\n"
    new = lower.update_doc(doc, lower.markdown(records))
    assert new.startswith("intro\n") and new.endswith("rest\n") and "old" not in new
    table = lower.parse_table(new)
    assert table[("mhc_pre", "mix-decode-dim4096", "a2a3")] == ("ttadapter", "npubin", "cann")
    assert ("mhc_post", "post-dim4096", "910_95") not in table  # no record: "-" in the table
    assert lower.compare(table, records) == []
    assert "1 x f32 16x128*128x32" in new
    # regressions: an earlier stop, another reason at the documented stop, a lost or a new row
    worse = [_record(last="ttir", stop="ttadapter", cls="error"), *records[1:]]
    assert any("reached ttir" in p for p in lower.compare(table, worse))
    other = [_record(cls="error"), *records[1:]]
    assert any("for error; documented cann" in p for p in lower.compare(table, other))
    assert any("not lowered" in p for p in lower.compare(table, records[1:]))
    assert any("missing from the table" in p for p in lower.compare(table, [*records, _record(label="new")]))
    # getting further (CANN installed) is progress, not a mismatch
    assert lower.compare(table, [_record(last="npubin", stop=None, cls=None), *records[1:]]) == []


def test_stop_classes_and_mlir_facts():
    assert lower.stop_class("OSError: ASCEND_HOME_PATH is not set, source <ascend-toolkit>/set_env.sh first") == "cann"
    assert lower.stop_class("FileNotFoundError: [Errno 2] No such file or directory: 'npuc'") == "cann"
    assert lower.stop_class("CalledProcessError: triton-adapter-opt failed") == "error"
    mlir = ('func.func @k(%arg0: memref<?xf32>) attributes {mix_mode = "mix"} {\n'
            "  %alloc = memref.alloc() : memref<128x32xf32>\n"
            "  %1 = linalg.matmul {input_precison = \"ieee\"} ins(%a, %b : tensor<16x128xbf16>, tensor<128x32xbf16>) "
            "outs(%c : tensor<16x32xf32>) -> tensor<16x32xf32>\n"
            "  scf.for %i = %c0 to %c128 step %c1 {\n  } {ExtractedLoadOrStore, hivm.parallel_loop}\n}\n")
    assert lower.mlir_facts(mlir) == {"mix_mode": "mix", "matmuls": ["bf16 16x128*128x32"], "discrete_accesses": 1,
                                      "local_buffers_kib": 16.0, "largest_tensor_kib": 8.0}
    with pytest.raises(ValueError, match="table cell"):
        lower.parse_cell("reached ttadapter")


def test_script_refuses_a_python_without_triton_ascend(tmp_path):
    # The project's python has upstream triton: the script says so and exits 2 before importing anything.
    run = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=_clean_env(tmp_path), capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "has no triton-ascend" in run.stderr, run.stderr
    bad = subprocess.run([sys.executable, str(SCRIPT), "--target", "ascend310"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'ascend310'" in bad.stderr, bad.stderr


def test_wrapper_help_builds_nothing(tmp_path):
    env = {**_clean_env(tmp_path), VENV_ENV: str(tmp_path / "venv")}
    run = subprocess.run(["bash", str(WRAPPER), "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and "triton-ascend replaces the `triton` package" in run.stdout
    assert not (tmp_path / "venv").exists()
