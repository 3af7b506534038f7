"""The runner on a throwaway op: a wrong implementation gets no speedup, peers are measured or reported
missing, in-place arguments are copied, ops that have not landed are skipped."""
import pytest
import torch

from dsv4_kernels import dispatch, ladder
from dsv4_kernels.bench import peers, runner, timing
from dsv4_kernels.bench.case import Case
from dsv4_kernels.dispatch import Implementation
from dsv4_kernels.ladder import OpCheck
from dsv4_kernels.platform import CPU

FAST = timing.Settings(warmup_us=0, target_us=1000, min_iters=3, max_iters=5, max_time_us=1e5)
ENV = {"chip": "cpu", "device_name": "test cpu"}


def add_one(x):
    return x + 1


def add_two(x):
    return x + 2


def add_one_slowly(x):
    return (x.double() + 1).float()


def _compare(out, expected):
    if not torch.equal(out, expected):
        raise AssertionError(f"max abs error {(out - expected).abs().max().item():g}")


@pytest.fixture
def toy(monkeypatch):
    """Op 'toy' (x + 1): the reference, a correct 'good' and a deliberately wrong 'wrong' implementation
    (tilelang-language entries serving the CPU, so the interpreter rule does not skip them)."""
    monkeypatch.setattr(dispatch, "_REGISTRY", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(ladder, "_CHECKS", {})
    monkeypatch.setattr(peers, "PEERS", ())
    monkeypatch.delenv("DSV4K_IMPL", raising=False)
    mod = __name__
    dispatch.register(Implementation("toy", "reference", "reference", ("cpu",), f"{mod}:add_one_slowly"))
    dispatch.register(Implementation("toy", "good", "tilelang", ("cpu",), f"{mod}:add_one", priority=20))
    dispatch.register(Implementation("toy", "wrong", "tilelang", ("cpu",), f"{mod}:add_two", priority=30))
    ladder.register_check(OpCheck("toy", lambda device: [], _compare))
    return Case("toy", "toy", "toy-T64", "v4", "decode", 64, "toy", {"T": 64}, bytes=64 * 8, flops=64,
                compute="none", make_inputs=lambda device: ((torch.arange(64.0, device=device),), {}),
                call=lambda *a, impl=None, **k: dispatch.call("toy", *a, impl=impl, **k))


def _run(case, **opts):
    rows = runner.run_case(case, runner.Options(torch.device("cpu"), settings=FAST, **opts), ENV)
    return {r["impl"]: r for r in rows}


def test_a_wrong_implementation_gets_no_speedup(toy):
    rows = _run(toy)
    ref, good, wrong = rows["reference"], rows["good"], rows["wrong"]
    assert all(r["status"] == "measured" and r["us"] > 0 for r in rows.values())
    assert ref["correct"] is True and ref["speedup_vs_reference"] == pytest.approx(1.0)
    assert good["correct"] is True and good["speedup_vs_reference"] == pytest.approx(ref["us"] / good["us"])
    assert wrong["correct"] is False and "max abs error 1" in wrong["reason"]
    assert wrong["speedup_vs_reference"] is None and wrong["speedup_vs_compiled"] is None
    assert wrong["us"] is not None and wrong["reference_us"] == ref["us"]     # the time itself is kept
    assert {r["dispatched"] for r in rows.values()} == {"wrong"}               # the highest priority
    assert all(r["timer"] == "cpu-wall" and r["pct_peak"] is None and r["bound"] is None for r in rows.values())
    assert all(r["compiled_status"] == "not measured (pass --compile)" for r in rows.values())
    line = runner.format_row(wrong)
    assert "wrong*" in line and "FAIL output 0: max abs error 1" in line and " -  " in line


def test_compiled_reference_speedup_only_for_correct_results(toy, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)     # the plumbing, without inductor
    rows = _run(toy, compile=True)
    assert rows["good"]["compiled_status"] == "measured" and rows["good"]["compiled_us"] > 0
    assert rows["good"]["speedup_vs_compiled"] == pytest.approx(rows["good"]["compiled_us"] / rows["good"]["us"])
    assert rows["wrong"]["speedup_vs_compiled"] is None


def test_compiled_reference_is_shared_per_op_within_a_budget(toy, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or fn)
    opts = runner.Options(torch.device("cpu"), compile=True, settings=FAST)
    cache = runner.CompiledReferences(budget_s=60.0)
    first = runner.run_case(toy, opts, ENV, cache)
    second = runner.run_case(toy, opts, ENV, cache)
    assert len(compiled) == 1 and compiled[0] is add_one_slowly       # the raw reference, compiled once
    assert first[0]["compiled_status"] == second[0]["compiled_status"] == "measured"
    assert 0 < cache.spent_s["toy"] < 60
    spent = runner.CompiledReferences(budget_s=0.0)
    (row, *_) = runner.run_case(toy, opts, ENV, spent)
    assert row["compiled_status"] == "skipped: compiling this op took 0 s already (--compile-budget 0)"
    assert row["speedup_vs_compiled"] is None and row["speedup_vs_reference"] == pytest.approx(1.0)


def test_impl_filter_keeps_the_reference_and_skips_the_others(toy):
    rows = _run(toy, impls=("good",))
    assert rows["wrong"]["status"] == "skipped: not selected (--impl)"
    assert rows["reference"]["status"] == rows["good"]["status"] == "measured"


def test_an_implementation_that_raises_is_an_error_row(toy, monkeypatch):
    def boom(x):
        raise RuntimeError("kernel launch failed\nsecond line")
    monkeypatch.setitem(globals(), "add_two", boom)
    rows = _run(toy)
    assert rows["wrong"]["status"] == "error: RuntimeError: kernel launch failed"
    assert rows["wrong"]["correct"] is False and rows["good"]["correct"] is True


def test_peers_missing_installed_and_measured(toy, monkeypatch):
    monkeypatch.setattr(peers, "PEERS", (
        peers.Peer("ghost", "dsv4k_no_such_module", "ghost", {"toy": None}),
        peers.Peer("stdlib", "json", "json", {"toy": None}),
        peers.Peer("fake", "math", "math", {"toy": add_one}),
        peers.Peer("other", "math", "math", {"mhc_pre": add_one}),
    ))
    rows = _run(toy)
    assert rows["peer:ghost"]["status"] == "missing (not installed)" and rows["peer:ghost"]["us"] is None
    assert rows["peer:stdlib"]["status"] == "installed (version unknown), no adapter for toy"
    fake = rows["peer:fake"]
    assert fake["status"] == "measured" and fake["correct"] is True and fake["language"] == "peer"
    assert fake["speedup_vs_reference"] == pytest.approx(rows["reference"]["us"] / fake["us"])
    assert "peer:other" not in rows
    assert "missing (not installed)" in runner.format_row(rows["peer:ghost"])


def test_an_op_that_has_not_landed_is_skipped():
    case = Case("fp4_not_here", "moe", "x", "pro", "decode", 1, "x", {}, bytes=1, flops=1, compute="fp8",
                make_inputs=lambda device: ((), {}))
    (row,) = runner.run_case(case, runner.Options(torch.device("cpu"), settings=FAST), ENV)
    assert row["status"] == "skipped: fp4_not_here is not in dsv4_kernels yet"


def test_in_place_arguments_are_copied_and_the_rest_shared():
    import dsv4_kernels  # noqa: F401  (registers torch.ops.dsv4)
    from dsv4_kernels.reference.compressor import compressor_init_state
    kv_state, score_state = compressor_init_state(4, 128, slots=2)
    kv, ape = torch.zeros(2, 256), torch.zeros(4, 256)
    args = (kv_state, score_state, kv, kv.clone(), ape, torch.tensor([3, 7]), 4)
    (a_kv_state, a_score_state, a_kv, _, a_ape, _, ratio), _ = runner._copy_inputs("compressor_decode", args, {})
    assert a_kv_state.data_ptr() != kv_state.data_ptr() and a_score_state.data_ptr() != score_state.data_ptr()
    assert a_kv is kv and a_ape is ape and ratio == 4
    assert runner._mutated_names("mhc_post") == set()


def test_real_op_case_runs_and_checks_against_the_reference():
    import dsv4_kernels  # noqa: F401
    from dsv4_kernels.bench.case import family_cases
    from dsv4_kernels.shapes import CPU as CPU_GRID
    case = next(c for c in family_cases("compressor", CPU_GRID) if c.label == "v4-decode-csa-r4-d128-emit-B1")
    rows = runner.run_case(case, runner.Options(torch.device("cpu"), impls=("reference",), settings=FAST),
                           {"chip": CPU.name, "device_name": "test"})
    ref = next(r for r in rows if r["impl"] == "reference")
    # "dispatched": what automatic selection picks for these arguments (the Triton decode kernel, through
    # the interpreter under pytest), recorded on every row of the case.
    assert ref["status"] == "measured" and ref["correct"] is True and ref["dispatched"] == "triton"
    assert ref["bytes"] == case.bytes and ref["gbps"] == pytest.approx(case.bytes / ref["us"] / 1e3)
