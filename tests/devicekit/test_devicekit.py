"""The device kit (`dsv4k device-check`): its CPU dry run end to end (CI's guarantee that the kit works
between GPU runs), the budget and the clean stop at it, and the pure parts (log and junit parsing,
case choice, summary, comparison of device records)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv4_kernels.bench import records, timing
from dsv4_kernels.devicekit import OUTPUT_FILES, kit, sanitizer, steps, summary
from dsv4_kernels.devicekit.budget import STEP_NAMES, STEPS, step_budget

ROOT = Path(__file__).resolve().parents[2]


def _kit(out: Path, *extra: str, budget: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv4_kernels.cli", "device-check", "--dry-run", "--out", str(out),
                           "--budget-s", str(budget), "--tests", str(ROOT / "tests"), *extra],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kit") / "out"
    proc = _kit(out)
    return out, proc


def test_dry_run_passes_and_writes_exactly_the_kit_files(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(OUTPUT_FILES) and len(files) <= 8
    assert all(p.is_file() for p in out.iterdir())       # no folders: nothing deeper than the limit
    assert (out / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dry_run_runs_every_step_and_skips_only_with_a_reason(dry_run):
    out, _ = dry_run
    kitjson = json.loads((out / "kit.json").read_text())
    got = kitjson["steps"]
    assert list(got) == list(STEP_NAMES)
    for name in ("machine", "numerics", "pytest", "bench", "report"):
        assert got[name]["status"] == "pass", (name, got[name])
    for name in ("sanitizer", "tilelang"):
        assert got[name]["status"] == "skipped" and got[name]["reason"], got[name]
    assert "compute-sanitizer needs one" in (out / "sanitizer.log").read_text()
    launches = got["sanitizer"]["launches"]        # the unsanitised launches still ran
    assert {k for k, v in launches.items() if v["status"] == "ok"} == {f"{op}/triton" for op in steps.DRY_RUN_OPS}
    assert set(got["numerics"]["results"]) >= {f"{op}/{i}" for op in steps.DRY_RUN_OPS for i in ("reference", "triton")}
    assert all(r["status"] == "pass" for r in got["numerics"]["results"].values())
    measured = got["machine"]["measured"]
    assert measured["copy_tbps"] > 0 and measured["bf16_tflops"] > 0


def test_dry_run_junit_and_bench_records(dry_run):
    out, _ = dry_run
    junit = steps.parse_junit(out / "junit.xml")
    assert junit["passed"] > 0 and junit["failed"] == 0
    rows = records.read_jsonl(out / "bench.jsonl")
    assert rows and all(set(records.REQUIRED_KEYS) <= set(r) for r in rows)
    decode = [r for r in rows if r["phase"] == "decode" and r["status"] == "measured"]
    assert decode and all(r["call_us"] > 0 and r["graph_us"] is None and "CUDA" in r["graph_status"] for r in decode)
    assert {r["impl"] for r in decode} >= {"reference", "triton"}
    assert all(r["commit"] != "unknown" and r["chip"] for r in rows)


def test_dry_run_summary_fits_one_screen_and_names_every_op(dry_run):
    out, _ = dry_run
    text = (out / "summary.md").read_text()
    assert len(text.splitlines()) < 60
    assert "DRY RUN" in text
    for op in steps.DRY_RUN_OPS:
        assert f"| {op} | triton | pass |" in text


def test_a_step_over_its_budget_stops_cleanly_and_the_report_still_runs(tmp_path):
    proc = _kit(tmp_path / "out", "--steps", "bench", budget=4)
    got = json.loads((tmp_path / "out" / "kit.json").read_text())["steps"]
    assert proc.returncode == 1        # a step that did not finish is not a pass
    assert got["bench"]["status"] == "timeout" and got["bench"]["cases_not_run"] > 0
    assert got["report"]["status"] == "pass"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(OUTPUT_FILES)


def test_unknown_step_and_bad_budget_are_refused(tmp_path):
    from dsv4_kernels.cli import main
    assert main(["device-check", "--dry-run", "--out", str(tmp_path), "--steps", "bench,nosuch"]) == 2
    assert main(["device-check", "--dry-run", "--out", str(tmp_path), "--budget-s", "0"]) == 2


def test_step_budget_shares_time_left_among_the_remaining_steps():
    first, rest = STEPS[0], list(STEPS[1:])
    total = sum(s.share for s in STEPS)
    assert step_budget(450, first, rest) == pytest.approx(450 * first.share / total)
    # time the earlier steps left unused goes to the later ones, in proportion
    last_two = list(STEPS[-2:])
    assert step_budget(100, last_two[0], last_two[1:]) == pytest.approx(
        100 * last_two[0].share / (last_two[0].share + last_two[1].share))
    assert step_budget(-5, first, rest) == 0.0
    assert STEP_NAMES[-1] == "report" and len(set(STEP_NAMES)) == len(STEP_NAMES)


def _log():
    lines = []
    return lines, lines.append


def test_a_step_process_past_its_budget_is_interrupted(monkeypatch):
    monkeypatch.setattr(kit, "GRACE_S", 3.0)  # room for a loaded machine to unwind
    lines, log = _log()
    start = time.monotonic()
    rc, how = kit.run_step_process([sys.executable, "-c", "import time; print('started', flush=True); "
                                    "time.sleep(60)"], 0.5, log)
    assert how == "stopped at the budget" and rc != 0 and time.monotonic() - start < 10
    assert lines[0] == "started\n" and "KeyboardInterrupt" in lines[-1]


def test_a_step_process_that_ignores_sigint_is_killed(monkeypatch):
    monkeypatch.setattr(kit, "GRACE_S", 0.5)
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
    rc, how = kit.run_step_process([sys.executable, "-c", code], 2.0, _log()[1])  # 2.5 s: started and ignoring SIGINT by then
    assert how == "killed" and rc != 0


MEMCHECK_CLEAN = """========= COMPUTE-SANITIZER
========= ERROR SUMMARY: 0 errors
"""
MEMCHECK_BAD = """========= COMPUTE-SANITIZER
========= Invalid __global__ write of size 2 bytes
=========     at mix_kernel+0x1f0 in /work/src/dsv4_kernels/kernels/mhc/triton.py:141
=========     by thread (5,0,0) in block (0,3,0)
========= ERROR SUMMARY: 3 errors
"""


def test_sanitizer_log_parsing_and_attribution_to_ops():
    launches = {"mhc_pre/triton": {"status": "ok", "kernels": ["mix_kernel", "out_kernel"]},
                "mhc_post/triton": {"status": "ok", "kernels": ["post_kernel"]},
                "mhc_head/triton": {"status": "error", "reason": "RuntimeError: boom", "kernels": ["mix_kernel"]}}
    clean = sanitizer.attribute("memcheck", sanitizer.parse_log(MEMCHECK_CLEAN), 0, launches)
    assert clean["mhc_pre/triton"] == "clean" and clean["mhc_head/triton"].startswith("not launched")
    parsed = sanitizer.parse_log(MEMCHECK_BAD)
    assert parsed == {"errors": 3, "kernels": ["mix_kernel"]}
    bad = sanitizer.attribute("memcheck", parsed, sanitizer.ERROR_EXIT, launches)
    assert "mix_kernel" in bad["mhc_pre/triton"] and bad["mhc_post/triton"].startswith("clean")
    none = sanitizer.attribute("memcheck", sanitizer.parse_log("Device not supported"), 255, launches)
    assert none["mhc_pre/triton"].startswith("no verdict")


def test_junit_parsing_counts_outcomes_per_file(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite name="pytest">
<testcase classname="tests.mhc.test_a" name="t1" file="tests/mhc/test_a.py"/>
<testcase classname="tests.mhc.test_a" name="t2" file="tests/mhc/test_a.py"><failure message="x"/></testcase>
<testcase classname="tests.mhc.test_b" name="t3"><skipped message="no device"/></testcase>
<testcase classname="tests.mhc.test_b" name="t4"><error message="e"/></testcase>
</testsuite></testsuites>""")
    got = steps.parse_junit(xml)
    assert (got["tests"], got["passed"], got["failed"], got["skipped"], got["errors"]) == (4, 1, 1, 1, 1)
    assert got["failed_ids"] == ["tests.mhc.test_a::t2", "tests.mhc.test_b::t4"]
    assert got["per_file"]["tests/mhc/test_a.py"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 0}


def test_quick_cases_take_the_smallest_decode_per_model_and_one_prefill():
    from dsv4_kernels.bench.case import all_cases
    from dsv4_kernels.shapes import get_grid
    cases = [c for c in all_cases(get_grid("full")) if c.op in ("mhc_post", "score_topk")]
    picked = steps.quick_cases(cases, {"mhc_post"})
    for op in ("mhc_post", "score_topk"):
        mine = [c for c in picked if c.op == op]
        decode = [c for c in mine if c.phase == "decode"]
        assert sorted(c.model for c in decode) == sorted({c.model for c in cases if c.op == op and c.phase == "decode"})
        for c in decode:
            assert c.tokens == min(x.tokens for x in cases if x.op == op and x.phase == "decode" and x.model == c.model)
        assert sum(c.phase == "prefill" for c in mine) == 1
    assert picked[0].op == "mhc_post" and picked[-1].op == "score_topk"   # kernel ops first


def _bench_row(**kw):
    base = {k: None for k in records.REQUIRED_KEYS}
    base.update(op="mhc_pre", impl="triton", label="pro-decode-dim7168-T1", chip="NVIDIA H200", model="pro",
                phase="decode", status="measured", correct=True, us=10.0, graph_us=6.0, host_overhead_us=4.0,
                pct_peak=40.0, speedup_vs_reference=5.0, speedup_vs_compiled=2.0, reason="")
    base.update(kw)
    return base


def test_summary_rows_show_failures_and_the_decode_timings():
    steps_ = {"numerics": {"results": {"mhc_pre/triton": {"status": "fail", "reason": "case x"},
                                       "mhc_pre/reference": {"status": "pass"}}},
              "sanitizer": {"per_impl": {"mhc_pre/triton": "memcheck clean; racecheck clean"}}}
    bench = [_bench_row(), _bench_row(label="pro-prefill", phase="prefill", us=100.0),
             _bench_row(impl="reference", us=50.0, graph_us=None, host_overhead_us=None),
             _bench_row(impl="peer:tilekernels", us=1.0)]
    rows, labels = summary.table_rows(steps_, bench)
    assert [(r["op"], r["impl"]) for r in rows] == [("mhc_pre", "reference"), ("mhc_pre", "triton")]
    tri = rows[1]
    assert (tri["numerics"], tri["decode_us"], tri["graph_us"], tri["host_us"], tri["prefill_us"]) == (
        "FAIL", 10.0, 6.0, 4.0, 100.0)
    assert labels["mhc_pre"] == ["pro-decode-dim7168-T1", "pro-prefill"]
    text = summary.render(steps_, bench, dry_run=False, elapsed_s=1.0)
    assert "| mhc_pre | triton | FAIL | memcheck clean; racecheck clean | 10.0 | 6.0 | 4.0 | 100.0 |" in text


def test_compare_flags_a_slower_graph_replay_on_device_records():
    before, after = [_bench_row()], [_bench_row(graph_us=7.5)]
    changes, _, _ = records.compare(before, after, threshold=0.10)
    assert changes[0].regression and "CUDA-graph replay" in changes[0].regression
    changes, _, _ = records.compare(before, [_bench_row(graph_us=6.2)], threshold=0.10)
    assert changes[0].regression is None


def test_call_timing_on_the_cpu_says_why_there_is_no_graph():
    import torch
    x = torch.randn(64)
    t = timing.call_and_graph(lambda: x * 2, torch.device("cpu"), estimate_us=10.0)
    assert t.call_us > 0 and t.graph_us is None and t.host_overhead_us is None
    assert "CUDA graphs need a CUDA" in t.graph_status
    assert timing.call_iterations(1e9) == 5 and timing.call_iterations(0.001) == 200


def test_a_step_interrupted_at_the_budget_keeps_its_partial_results(tmp_path, monkeypatch):
    monkeypatch.setattr(kit, "GRACE_S", 6.0)
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    cmd = [sys.executable, "-m", "dsv4_kernels.devicekit.steps", "bench", "--out", str(out), "--work", str(work),
           "--budget-s", "300", "--tests", str(ROOT / "tests"), "--dry-run",
           # the dry run's ops, then one whose interpreter cases take longer than the 6 s budget on any machine
           "--op", "mhc_post", "--op", "mhc_sinkhorn", "--op", "sigmoid_gate", "--op", "sparse_mqa_fp8"]
    rc, how = kit.run_step_process(cmd, 6.0, _log()[1], env={**os.environ, "TRITON_INTERPRET": "1"})
    assert how == "stopped at the budget"
    result = json.loads((work / "bench.json").read_text())
    assert result["status"] == "timeout" and "partial" in result["reason"]
    assert (out / "bench.jsonl").is_file()
    assert len(records.read_jsonl(out / "bench.jsonl")) == result["records"]
