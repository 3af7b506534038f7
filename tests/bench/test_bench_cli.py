"""`dsv4k bench` end to end, as users run it: JSON lines and PNG charts on this machine."""
import os
import subprocess
import sys

import pytest

from dsv4_kernels.bench.records import REQUIRED_KEYS, read_jsonl
from dsv4_kernels.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def dsv4k(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", "import sys; from dsv4_kernels.cli import main; sys.exit(main())",
                           *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def mhc_post_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    r = dsv4k("bench", "--op", "mhc_post", "--grid", "cpu", "--max-cases", "3", "--out", str(out), "--plot")
    assert r.returncode == 0, r.stdout + r.stderr
    return r, out


def test_bench_writes_json_records(mhc_post_run):
    r, out = mhc_post_run
    (path,) = out.glob("*.jsonl")
    rows = read_jsonl(path)
    assert "CPU run: wall-clock timings" in r.stdout and f"wrote {len(rows)} records to {path}" in r.stdout
    measured = [row for row in rows if row["status"] == "measured"]
    assert {row["label"] for row in measured} == {"flash-decode-dim4096-T1", "flash-decode-dim4096-T4",
                                                  "flash-prefill-dim4096-T64"}
    for row in rows:
        assert set(REQUIRED_KEYS) <= set(row), set(REQUIRED_KEYS) - set(row)
        assert row["chip"] == "cpu" and row["driver"] == "cpu" and row["backend"] == "cpu"
        assert row["date"] and row["commit"] and row["torch"]
    for row in measured:
        assert row["op"] == "mhc_post" and row["impl"] == "reference" and row["dispatched"] == "reference"
        assert row["timer"] == "cpu-wall" and row["pct_peak"] is None and row["bound"] is None
        assert row["correct"] is True and row["speedup_vs_reference"] == 1.0
        assert row["us"] > 0 and row["p10"] <= row["us"] <= row["p90"] and row["first_call_us"] > 0
        assert row["gbps"] > 0 and row["shape"]["dim"] == 4096
        assert row["compiled_status"] == "not measured (pass --compile)" and row["speedup_vs_compiled"] is None
    peer_rows = [row for row in rows if row["impl"].startswith("peer:")]
    assert peer_rows and all(row["status"] == "missing (not installed)" and row["us"] is None for row in peer_rows)
    assert not any(row["status"].startswith("skipped") for row in rows)     # shown in the table only
    assert "skipped: Triton runs on the CPU only through its interpreter" in r.stdout


def test_bench_plot_writes_png_charts(mhc_post_run):
    r, out = mhc_post_run
    (folder,) = out.glob("*-plots")
    pngs = {p.name: p for p in folder.glob("*.png")}
    assert set(pngs) == {"roofline-cpu.png", "latency-mhc_post.png"}
    for p in pngs.values():
        data = p.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
        assert f"wrote {p}" in r.stdout


def test_gpu_records_get_roofline_ceilings(tmp_path):
    from dsv4_kernels.bench.plots import write_plots
    rows = []
    for i, (op, phase, tokens) in enumerate([("mhc_pre", "decode", 1), ("mhc_pre", "decode", 8),
                                             ("sparse_mqa", "prefill", 1024), ("fp4_grouped_moe", "decode", 4)]):
        us = 10.0 * (i + 1)
        rows.append({"status": "measured", "correct": True, "chip": "NVIDIA H100 80GB HBM3", "peak_chip": "H100",
                     "peak_tbps": 3.35, "op": op, "impl": "triton", "language": "triton", "model": "pro",
                     "variant": "v", "phase": phase, "tokens": tokens, "us": us, "p10": us * 0.9, "p90": us * 1.2,
                     "bytes": 10**6 * (i + 1), "flops": 10**8 * (i + 1), "tflops": 10**2 * (i + 1) / us,
                     "timer": "cuda-events"})
    rows.append(dict(rows[0], correct=False, impl="tilelang", language="tilelang"))   # not drawn
    written = write_plots(rows, tmp_path)
    assert {p.name for p in written} == {"roofline-nvidia-h100-80gb-hbm3.png", "latency-mhc_pre.png",
                                         "latency-sparse_mqa.png", "latency-fp4_grouped_moe.png"}
    assert all(p.read_bytes()[:8] == PNG_SIGNATURE for p in written)


def test_bench_from_file_prints_the_table(mhc_post_run, capsys):
    _, out = mhc_post_run
    (path,) = out.glob("*.jsonl")
    assert main(["bench", "--from", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "flash-prefill-dim4096-T64" in printed and "peer:tilekernels" in printed


def test_importing_the_harness_does_not_import_matplotlib():
    code = ("import sys, dsv4_kernels.bench, dsv4_kernels.bench.command, dsv4_kernels.bench.runner, "
            "dsv4_kernels.bench.plots, dsv4_kernels.cli; dsv4_kernels.cli.build_parser(); "
            "print('matplotlib' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # `import matplotlib` now raises ImportError
    assert main(["bench", "--plot", "--op", "mhc_post", "--out", str(tmp_path)]) == 2
    assert "--plot needs matplotlib: pip install 'dsv4-kernels[bench]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())                        # refused before anything ran


def test_help_texts_render():
    for argv in (["--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0


def test_unknown_op_and_list(capsys):
    assert main(["bench", "--op", "sparse_mha"]) == 2
    assert "--op: no benchmark cases for sparse_mha; expected one of" in capsys.readouterr().err
    assert main(["bench", "--list", "--grid", "full", "--family", "fp4_moe", "--max-cases", "2"]) == 0
    listed = capsys.readouterr().out
    assert "fp4_grouped_moe" in listed and "mxfp4_grouped_gemm" in listed and "4 cases on grid full" in listed
