"""The dsv4k command, run as users run it."""
import json
import os
import subprocess
import sys

import pytest

LEVELS = {"cpu-numerics", "codegen-source", "codegen-binary", "device-numerics", "device-perf"}


def dsv4k(*args, env=None):
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", "import sys; from dsv4_kernels.cli import main; sys.exit(main())",
                           *args], capture_output=True, text=True, env=full_env, timeout=900)


def test_info():
    r = dsv4k("info")
    assert r.returncode == 0, r.stderr
    for needle in ("dsv4-kernels", "torch", "triton", "tilelang", "device:", "backend cuda", "backend rocm",
                   "backend ascend", "sigmoid_gate"):
        assert needle in r.stdout


@pytest.fixture(scope="module")
def check_records():
    r = dsv4k("check", "--json", "--all-targets", "--op", "sigmoid_gate")
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_check_json_records(check_records):
    for rec in check_records:
        assert set(rec) == {"op", "impl", "language", "backend", "target", "level", "status", "reason"}
        assert rec["level"] in LEVELS and rec["status"] in ("pass", "fail", "skip")
        assert rec["status"] == "pass" or rec["reason"]
    got = {(r["impl"], r["target"], r["level"]) for r in check_records if r["status"] == "pass"}
    assert {("reference", "cpu", "cpu-numerics"), ("triton", "cpu", "cpu-numerics")} <= got
    assert {("triton", t, "codegen-binary") for t in ("sm_90a", "sm_100a", "gfx942", "gfx950")} <= got
    assert {("tilelang", t, "codegen-binary") for t in ("sm_90a", "sm_100a")} <= got  # nvcc builds a cubin
    assert {("tilelang", t, "codegen-source") for t in ("gfx942", "gfx950")} <= got  # HIP source, no hipcc
    assert ("tilelang_ascend", "ascend950", "codegen-source") in got
    skipped = {(r["impl"], r["target"], r["level"]) for r in check_records if r["status"] == "skip"}
    assert ("tilelang", "gfx942", "codegen-binary") in skipped


def test_check_table_and_backend_filter():
    r = dsv4k("check", "--backend", "rocm", "--op", "sigmoid_gate", "--op", "mhc_sinkhorn")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "highest level" in r.stdout and "gfx942" in r.stdout and "sm_90a" not in r.stdout
    assert "gfx950" not in r.stdout.split("codegen targets:")[0]     # default: the first target per backend
    ops = [line.split()[0] for line in r.stdout.splitlines()[2:] if line.split()[:1] in (["mhc_sinkhorn"],
                                                                                          ["sigmoid_gate"])]
    assert ops == ["mhc_sinkhorn"] * 3 + ["sigmoid_gate"] * 3    # one row per implementation, op by op
    assert "0 failed" in r.stdout and "--op NAME" in r.stdout.splitlines()[-1]


def test_check_reports_the_ascend_mhc_kernels_as_source_level_codegen():
    """backends/ascend/README.md: Ascend C source with its claims held, no binary (no bisheng), never run."""
    r = dsv4k("check", "--json", "--backend", "ascend", "--op", "mhc_sinkhorn")
    assert r.returncode == 0, r.stdout + r.stderr
    recs = {(x["level"], x["status"]): x["reason"] for x in map(json.loads, r.stdout.splitlines())
            if x["impl"] == "tilelang_ascend"}
    assert "cube_mma=False, ub_budget=True, source_plan=True" in recs[("codegen-source", "pass")]
    assert "bisheng" in recs[("codegen-binary", "skip")]
    assert not any(status == "pass" for level, status in recs if level != "codegen-source")


def test_check_table_never_shows_a_level_above_one_not_passed():
    from dsv4_kernels.check_report import table
    from dsv4_kernels.ladder import Record

    def rec(impl, backend, target, level, status="pass", reason="ok"):
        lang = "reference" if impl == "reference" else impl
        return Record("op", impl, lang, backend, target, level, status, reason)
    no_gpu = "no CUDA device"
    out = table([
        rec("triton", "cpu", "cpu", "cpu-numerics"),
        rec("triton", "cuda", "sm_90a", "codegen-binary"),
        rec("triton", "cuda", "device", "device-numerics", "skip", no_gpu),
        rec("reference", "cpu", "cpu", "cpu-numerics"),
        rec("reference", "cuda", "device", "device-numerics", "skip", no_gpu),
        rec("reference", "rocm", "device", "device-numerics", "skip", "no ROCm device"),
        rec("tilelang", "cuda", "sm_90a", "codegen-binary"),
        rec("tilelang", "cuda", "device", "device-numerics", "skip", no_gpu),
        rec("tilelang", "rocm", "gfx942", "codegen-source"),
        rec("tilelang", "rocm", "gfx942", "codegen-binary", "skip", "source only: building a hsaco needs hipcc"),
        rec("tritonbad", "cpu", "cpu", "cpu-numerics"),
        rec("tritonbad", "rocm", "gfx942", "codegen-binary", "fail", "claims not met: k: vector_loads: expected True"),
    ])
    rows = {line.split()[1]: line for line in out.splitlines()[2:] if line.startswith("op ")}
    assert set(rows) == {"triton", "reference", "tilelang", "tritonbad"}   # one row per implementation
    assert rows["triton"].endswith("codegen-binary") and "not run [1]" in rows["triton"]
    assert rows["reference"].endswith("cpu-numerics")
    line = rows["tilelang"]   # compiled, never run: numerics and highest level say "not run"
    assert line.split()[2:4] == ["not", "run"] and line.endswith("not run"), line
    assert "binary sm_90a; source gfx942 [" in line
    assert "FAIL codegen-binary/gfx942: claims not met" in rows["tritonbad"]
    assert rows["tritonbad"].split()[-1] != "codegen-binary"
    assert "hsaco needs hipcc" in out and "no CPU path" in out and "no CUDA device; no ROCm device" in out


def test_codegen_writes_a_file(tmp_path):
    out = tmp_path / "k.ptx"
    r = dsv4k("codegen", "sigmoid_gate", "--impl", "triton", "--target", "sm_90a", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert ".target sm_90a" in out.read_text()


def test_codegen_wrong_target_says_which_impl_does():
    r = dsv4k("codegen", "sigmoid_gate", "--impl", "tilelang", "--target", "ascend950")
    assert r.returncode == 1
    assert "does not compile for ascend950" in r.stderr and "implementations that do: tilelang_ascend" in r.stderr


def test_bad_env_impl_is_a_clear_error():
    r = dsv4k("info", env={"DSV4K_IMPL": "sigmoid_gate:triton"})
    assert r.returncode == 2
    assert "DSV4K_IMPL entry 'sigmoid_gate:triton' is malformed; expected OP=IMPL" in r.stderr
    r = dsv4k("info", env={"DSV4K_IMPL": "sigmoid_gate=cuda"})
    assert r.returncode == 2 and "expected one of triton, tilelang" in r.stderr
