"""The dsv4k command, run as users run it."""
import json
import os
import subprocess
import sys

import pytest

LEVELS = {"cpu-numerics", "codegen", "device-numerics", "device-perf"}


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
    r = dsv4k("check", "--json", "--op", "sigmoid_gate")
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_check_json_records(check_records):
    for rec in check_records:
        assert set(rec) == {"op", "impl", "language", "backend", "target", "level", "status", "reason"}
        assert rec["level"] in LEVELS and rec["status"] in ("pass", "fail", "skip")
        assert rec["status"] == "pass" or rec["reason"]
    got = {(r["impl"], r["target"], r["level"]) for r in check_records if r["status"] == "pass"}
    assert {("reference", "cpu", "cpu-numerics"), ("triton", "cpu", "cpu-numerics")} <= got
    assert {("triton", t, "codegen") for t in ("sm_90a", "sm_100a", "gfx942", "gfx950")} <= got
    assert {("tilelang", t, "codegen") for t in ("sm_90a", "sm_100a", "gfx942", "gfx950")} <= got
    assert ("tilelang_ascend", "ascend950", "codegen") in got


def test_check_table_and_backend_filter():
    r = dsv4k("check", "--backend", "rocm", "--op", "sigmoid_gate")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "highest level" in r.stdout and "gfx942" in r.stdout and "sm_90a" not in r.stdout
    assert "failed" in r.stdout.splitlines()[-1]


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
