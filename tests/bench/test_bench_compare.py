"""`dsv4k bench --compare A B` catches a planted regression (slower, or no longer correct)."""
import json

from dsv4_kernels.bench import records
from dsv4_kernels.cli import main


def _row(op, impl, label, us, correct=True, chip="NVIDIA H100 80GB HBM3"):
    return {"op": op, "impl": impl, "label": label, "chip": chip, "us": us, "correct": correct,
            "reason": "" if correct else "output 0: 3 of 10 elements beyond 2 bf16 ulps", "status": "measured"}


BASE = [_row("mhc_pre", "triton", "pro-decode-dim7168-T1", 10.0),
        _row("mhc_pre", "reference", "pro-decode-dim7168-T1", 80.0),
        _row("sparse_mqa", "triton", "flash-decode-csa-ctx2048-B4", 40.0),
        _row("sparse_mqa", "peer:flashmla", "flash-decode-csa-ctx2048-B4", 30.0)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_planted_slowdown_fails_the_comparison(tmp_path, capsys):
    after = [dict(r) for r in BASE]
    after[0]["us"] = 11.5                        # mhc_pre/triton 15% slower
    after[1]["us"] = 40.0                        # the reference got faster: fine
    a, b = _write(tmp_path / "a.jsonl", BASE), _write(tmp_path / "b.jsonl", after)
    assert main(["bench", "--compare", a, b]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("mhc_pre") and "triton" in ln)
    assert "+15.0%" in line and "REGRESSION: 15.0% slower (threshold 10%)" in line
    assert "4 matched, 1 regressed" in out
    assert main(["bench", "--compare", a, b, "--threshold", "0.2"]) == 0


def test_correct_to_incorrect_fails_even_when_faster(tmp_path, capsys):
    after = [dict(r) for r in BASE]
    after[2].update(us=20.0, correct=False, reason="out: cos-diff 3e-4 is not below 5e-06")
    assert main(["bench", "--compare", _write(tmp_path / "a.jsonl", BASE), _write(tmp_path / "b.jsonl", after)]) == 1
    assert "was correct, now incorrect: out: cos-diff 3e-4" in capsys.readouterr().out


def test_unchanged_runs_pass_and_peers_never_fail(tmp_path, capsys):
    after = [dict(r) for r in BASE] + [_row("mhc_post", "triton", "flash-decode-dim4096-T1", 5.0)]
    after[3]["us"] = 90.0                        # a peer slowed down 3x: shown, not a failure of ours
    assert main(["bench", "--compare", _write(tmp_path / "a.jsonl", BASE), _write(tmp_path / "b.jsonl", after)]) == 0
    out = capsys.readouterr().out
    assert "+200.0%" in out and "4 matched, 0 regressed, 0 not measured in both runs" in out
    assert "0 only in the first run, 1 only in the second" in out


def test_a_peer_that_is_not_installed_is_not_counted_as_matching(tmp_path, capsys):
    missing = {"us": None, "correct": None, "status": "missing (not installed)", "reason": ""}
    before = BASE[:3] + [dict(BASE[3], **missing)]
    after = [dict(r) for r in before]
    assert main(["bench", "--compare", _write(tmp_path / "a.jsonl", before), _write(tmp_path / "b.jsonl", after)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "peer:flashmla" in ln)
    assert "not compared (first: missing (not installed); second: missing (not installed))" in line
    assert "3 matched, 0 regressed, 1 not measured in both runs" in out


def test_a_kernel_that_stopped_running_is_a_regression(tmp_path, capsys):
    after = [dict(r) for r in BASE]
    after[0].update(us=None, correct=None, status="skipped", reason="supports(): dim 7168 refused")
    assert main(["bench", "--compare", _write(tmp_path / "a.jsonl", BASE), _write(tmp_path / "b.jsonl", after)]) == 1
    assert "REGRESSION: was measured and correct, now not measured: supports(): dim 7168" in capsys.readouterr().out


def test_runs_are_written_outside_the_checkout_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv("DSV4K_BENCH_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert records.default_out_dir() == tmp_path / "cache" / "dsv4k" / "bench"
    monkeypatch.setenv("DSV4K_BENCH_DIR", str(tmp_path / "mine"))
    assert records.default_out_dir() == tmp_path / "mine"


def test_records_match_on_chip_too():
    other_chip = [dict(r, chip="AMD Instinct MI300X", us=1000.0) for r in BASE]
    changes, only_a, only_b = records.compare(BASE, other_chip)
    assert changes == [] and len(only_a) == len(only_b) == 4


def test_unreadable_results_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"op": "x"}\nnot json\n')
    assert main(["bench", "--compare", str(bad), str(bad)]) == 2
    assert "bad.jsonl:2: not a JSON record" in capsys.readouterr().err
