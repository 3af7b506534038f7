"""Every registered Triton and TileLang implementation compiles for every target of its backends."""
import sys
import warnings

import pytest

from dsv4_kernels import codegen, dispatch
from dsv4_kernels.codegen import Artifact, amdgcn_resources, targets_for


@pytest.mark.codegen
def test_compiles(codegen_job, codegen_results):
    result = codegen_results[codegen_job]
    assert result["ok"], result.get("error")
    if result.get("crash_retry"):
        warnings.warn(f"{'/'.join(codegen_job)} compiled on a second try; the first {result['crash_retry']}")
    arts = [Artifact.from_json(a) for a in result["artifacts"]]
    assert arts and all(a.text for a in arts)
    for a in arts:
        if a.binary_kind == "cubin":
            assert a.resources["reg"] > 0 and a.resources["local"] == 0, f"{a.label}: {a.resources} (spills?)"
        if a.kind == "amdgcn":
            assert a.resources["vgpr"] > 0 and a.resources["scratch"] == 0, f"{a.label}: {a.resources} (spills?)"


def test_every_kernel_implementation_has_targets():
    for op in dispatch.ops():
        for impl in dispatch.implementations(op):
            if impl.language != "reference":
                assert targets_for(impl), f"{op}/{impl.name} compiles for no target"
                assert impl.codegen, f"{op}/{impl.name} registers no codegen specs"


def test_amdgcn_resource_parser_on_a_hand_listing():
    asm = "; NumVgprs: 37\n; NumSgprs: 20\n; ScratchSize: 16\n; Occupancy: 8\n; LDSByteSize: 4096 bytes/workgroup\n"
    assert amdgcn_resources(asm) == {"vgpr": 37, "sgpr": 20, "scratch": 16, "lds": 4096, "occupancy": 8}


_FAKE_WORKER = r"""
import json, os, signal, sys
from pathlib import Path
mark = Path(sys.argv[1])
for r in json.loads(sys.stdin.read()):
    if r["op"] == "crash-always" or (r["op"] == "crash-once" and not mark.exists()):
        mark.touch()
        print("dying on", r["op"], file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)
    print("dsv4k-codegen-result " + json.dumps({**r, "ok": True, "artifacts": []}), flush=True)
"""


def test_compile_many_survives_a_compiler_crash(monkeypatch, tmp_path):
    """A subprocess that dies keeps the results so far; the request it died on is retried once in a
    fresh one (marked), one that kills it twice fails with the crash output, and the rest still run."""
    monkeypatch.setattr(codegen, "_WORKER", [sys.executable, "-c", _FAKE_WORKER, str(tmp_path / "crashed")])
    ops = ["a", "crash-once", "b", "crash-always", "c"]
    results = codegen.compile_many([{"op": op, "impl": "x", "target": "t"} for op in ops])
    assert [r["op"] for r in results] == ops
    assert [r["ok"] for r in results] == [True, True, True, False, True]
    assert "crash_retry" not in results[0] and "exit -11" in results[1]["crash_retry"]
    assert "exit -11" in results[3]["error"] and "dying on crash-always" in results[3]["error"]


def test_compile_many_reports_a_worker_that_cannot_start(monkeypatch):
    monkeypatch.setattr(codegen, "_WORKER", [sys.executable, "-c", "raise SystemExit('no compiler here')"])
    with pytest.raises(RuntimeError, match="no compiler here"):
        codegen.compile_many([{"op": "a", "impl": "x", "target": "t"}])
