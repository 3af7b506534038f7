"""The dispatcher on CPU with a throwaway op registry and monkeypatched device detection."""
import json
import logging

import pytest
import torch

from dsv4_kernels import dispatch, platform
from dsv4_kernels.dispatch import FallbackError, Implementation, ImplementationUnavailable

H100 = platform.DeviceInfo("cuda", "sm_90", "NVIDIA H100 80GB HBM3")
CALLS = []


def fast(x):
    CALLS.append("fast")
    return x + 1


def slow(x):
    CALLS.append("slow")
    return x + 1


def _only_even(x):
    return None if x.shape[-1] % 2 == 0 else f"last dim must be even, got {x.shape[-1]}"


@pytest.fixture
def registry(monkeypatch):
    """A fresh registry holding op 'toy' with a tilelang, a triton and a reference implementation."""
    monkeypatch.setattr(dispatch, "_REGISTRY", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "_SELECTIONS", {})
    monkeypatch.setattr(dispatch, "_CONFIGS", {})
    monkeypatch.delenv("DSV4K_IMPL", raising=False)
    monkeypatch.delenv("DSV4K_STRICT", raising=False)
    mod = __name__
    dispatch.register(Implementation("toy", "tilelang", "tilelang", ("cuda", "rocm"), f"{mod}:fast", priority=30,
                                     available=lambda b: "tilelang is not installed", defaults={"BLOCK": 64}))
    dispatch.register(Implementation("toy", "triton", "triton", ("cpu", "cuda", "rocm"), f"{mod}:fast", priority=20,
                                     supports=_only_even, defaults={"BLOCK": 128, "num_warps": 4}))
    dispatch.register(Implementation("toy", "reference", "reference", ("cpu", "cuda", "rocm", "ascend"),
                                     f"{mod}:slow", priority=0))
    CALLS.clear()
    return dispatch


@pytest.fixture
def on_h100(monkeypatch):
    """Pretend every tensor lives on an H100."""
    monkeypatch.setattr(platform, "device_info", lambda device=None: H100)


def test_priority_picks_the_best_runnable(registry, on_h100):
    x = torch.zeros(4)
    d = dispatch.select("toy", (x,))
    assert d.chosen.name == "triton" and d.source == "priority" and d.fallback_reason is None
    assert dispatch.call("toy", x).tolist() == [1, 1, 1, 1] and CALLS == ["fast"]


def test_unavailable_toolchain_is_not_a_fallback(registry, on_h100, caplog, monkeypatch):
    monkeypatch.setenv("DSV4K_STRICT", "1")  # would raise if this were a fallback
    with caplog.at_level(logging.WARNING, "dsv4_kernels"):
        assert dispatch.select("toy", (torch.zeros(4),)).chosen.name == "triton"
    assert not caplog.records


def test_declined_arguments_fall_back_with_one_log_line(registry, on_h100, caplog):
    x = torch.zeros(3)
    with caplog.at_level(logging.WARNING, "dsv4_kernels"):
        d = dispatch.select("toy", (x,))
        dispatch.select("toy", (x,))
    assert d.chosen.name == "reference"
    assert "triton declined: last dim must be even, got 3" in d.fallback_reason
    assert "the PyTorch reference runs on a cuda device" in d.fallback_reason
    assert len(caplog.records) == 1 and "falling back to 'reference'" in caplog.records[0].getMessage()


def test_strict_mode_turns_fallback_into_an_error(registry, on_h100, monkeypatch):
    monkeypatch.setenv("DSV4K_STRICT", "1")
    with pytest.raises(FallbackError, match="last dim must be even, got 3.*DSV4K_STRICT=1"):
        dispatch.call("toy", torch.zeros(3))
    assert CALLS == []  # nothing ran


def test_declined_kernel_on_cpu_is_a_fallback_but_the_reference_itself_is_not(registry, monkeypatch):
    x = torch.zeros(3)  # triton serves the CPU here and declines the odd size
    d = dispatch.select("toy", (x,))
    assert d.chosen.name == "reference"
    assert d.fallback_reason == "triton declined: last dim must be even, got 3"  # no "reference runs on" part
    monkeypatch.setenv("DSV4K_STRICT", "1")
    with pytest.raises(FallbackError):
        dispatch.call("toy", x)


def test_reference_on_cpu_with_nothing_declined_is_silent(registry, caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_REGISTRY", {"toy": {"reference": dispatch.get("toy", "reference")}})
    monkeypatch.setenv("DSV4K_STRICT", "1")
    with caplog.at_level(logging.WARNING, "dsv4_kernels"):
        assert dispatch.select("toy", (torch.zeros(3),)).fallback_reason is None
    assert not caplog.records


def test_explicit_argument_wins_and_cannot_be_silently_replaced(registry, on_h100):
    x = torch.zeros(4)
    assert dispatch.select("toy", (x,), impl="reference").chosen.name == "reference"
    with pytest.raises(ImplementationUnavailable, match="'tilelang' was requested by argument but cannot run on "
                                                       "cuda \\(sm_90\\): tilelang is not installed"):
        dispatch.call("toy", x, impl="tilelang")
    with pytest.raises(ImplementationUnavailable, match="'triton' was requested by argument.*even, got 3"):
        dispatch.call("toy", torch.zeros(3), impl="triton")
    with pytest.raises(ValueError, match="op 'toy' has no implementation 'cuda'; expected one of tilelang, triton, reference"):
        dispatch.call("toy", x, impl="cuda")


def test_explicit_reference_on_a_gpu_is_not_a_fallback(registry, on_h100, monkeypatch):
    monkeypatch.setenv("DSV4K_STRICT", "1")
    assert dispatch.select("toy", (torch.zeros(4),), impl="reference").fallback_reason is None


@pytest.mark.parametrize("value, message", [
    ("toy", "entry 'toy' is malformed; expected OP=IMPL"),
    ("toy=", "entry 'toy=' is malformed"),
    ("toy=triton,=x", "entry '=x' is malformed"),
    ("nope=triton", "unknown op 'nope'; expected one of toy"),
    ("toy=cutlass", "op 'toy' has no implementation 'cutlass'; expected one of tilelang, triton, reference"),
])
def test_bad_env_value_is_a_clear_error(registry, monkeypatch, value, message):
    monkeypatch.setenv("DSV4K_IMPL", value)
    with pytest.raises(ValueError, match=message):
        dispatch.call("toy", torch.zeros(4))


def test_env_choice_applies_per_op(registry, on_h100, monkeypatch):
    monkeypatch.setenv("DSV4K_IMPL", " toy = reference , ")
    d = dispatch.select("toy", (torch.zeros(4),))
    assert d.chosen.name == "reference" and d.source == "DSV4K_IMPL"
    monkeypatch.setenv("DSV4K_IMPL", "toy=tilelang")
    with pytest.raises(ImplementationUnavailable, match="requested by DSV4K_IMPL"):
        dispatch.call("toy", torch.zeros(4))


def test_tuned_table_orders_first_and_overrides_configs(registry, on_h100, monkeypatch, tmp_path):
    from dsv4_kernels import backends
    table = {"dispatch": {"toy": "reference"}, "configs": {"toy/triton": {"BLOCK": 256}}}
    (tmp_path / "sm_90.json").write_text(json.dumps(table))
    monkeypatch.setattr(backends.Backend, "tuned_dir", property(lambda self: tmp_path))
    backends._load_tuned.cache_clear()
    try:
        d = dispatch.select("toy", (torch.zeros(4),))
        assert d.chosen.name == "reference" and d.source == "tuned"
        assert dispatch.config(dispatch.get("toy", "triton"), H100) == {"BLOCK": 256, "num_warps": 4}
        assert dispatch.config(dispatch.get("toy", "triton"), platform.CPU) == {"BLOCK": 128, "num_warps": 4}
        (tmp_path / "sm_90.json").write_text(json.dumps({"dispatch": {}, "blocks": {}}))
        backends._load_tuned.cache_clear()
        dispatch.clear_cache()  # a tuned table edited in a running process
        with pytest.raises(ValueError, match=r"unknown keys \['blocks'\]"):
            dispatch.select("toy", (torch.zeros(4),))
    finally:
        backends._load_tuned.cache_clear()


def test_explain_lists_every_candidate_and_never_raises(registry, on_h100, monkeypatch):
    monkeypatch.setenv("DSV4K_STRICT", "1")
    d = dispatch.explain("toy", torch.zeros(3))
    assert [c.impl.name for c in d.candidates] == ["tilelang", "triton", "reference"]
    assert [c.stage for c in d.candidates] == ["available", "supports", "ok"]
    text = str(d)
    assert "toy on cuda (sm_90): reference [reference] chosen by priority" in text
    assert "tilelang is not installed" in text and "last dim must be even" in text
    assert CALLS == []


def test_nothing_runnable_lists_all_reasons(registry, monkeypatch):
    monkeypatch.setattr(platform, "device_info", lambda device=None: platform.DeviceInfo("ascend", "ascend950", "Ascend 950"))
    monkeypatch.setattr(dispatch, "_REGISTRY", {"toy": {k: v for k, v in dispatch._REGISTRY["toy"].items() if k != "reference"}})
    with pytest.raises(ImplementationUnavailable, match="no implementation can run on ascend.*tilelang: does not serve ascend"):
        dispatch.call("toy", torch.zeros(4))


def test_registration_errors(registry):
    with pytest.raises(ValueError, match="registered twice"):
        dispatch.register(Implementation("toy", "triton", "triton", ("cuda",), "x:y"))
    with pytest.raises(ValueError, match="language 'cuda' is not one of"):
        dispatch.register(Implementation("toy", "cu", "cuda", ("cuda",), "x:y"))
    with pytest.raises(ValueError, match=r"unknown backends \['metal'\]"):
        dispatch.register(Implementation("toy", "mps", "triton", ("metal",), "x:y"))
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        dispatch.implementations("nope")


def test_no_tensor_argument(registry):
    with pytest.raises(ValueError, match="no tensor argument"):
        dispatch.select("toy", (3,))


def test_recording_counts_what_ran(registry, on_h100):
    with dispatch.recording() as counts:
        dispatch.call("toy", torch.zeros(4))
        dispatch.call("toy", torch.zeros(4), impl="reference")
        dispatch.call("toy", torch.zeros(2))
    dispatch.call("toy", torch.zeros(2))  # outside the block: not counted
    assert counts == {("toy", "triton"): 2, ("toy", "reference"): 1}


def test_fallback_logs_once_per_kind_not_per_shape(registry, on_h100, caplog):
    with caplog.at_level(logging.WARNING, "dsv4_kernels"):
        dispatch.select("toy", (torch.zeros(3),))
        dispatch.select("toy", (torch.zeros(5),))  # another shape, same kind of fallback
    assert len(caplog.records) == 1


def test_env_value_is_reparsed_when_it_changes(registry, on_h100, monkeypatch):
    monkeypatch.setenv("DSV4K_IMPL", "toy=reference")
    assert dispatch.select("toy", (torch.zeros(4),)).chosen.name == "reference"
    monkeypatch.setenv("DSV4K_IMPL", "toy=triton")
    assert dispatch.select("toy", (torch.zeros(4),)).chosen.name == "triton"


SUPPORTS_CALLS = []


def fast_any(x, *rest):
    CALLS.append("fast")
    return x + 1


def _counting_even(x, *rest, **kwargs):
    SUPPORTS_CALLS.append(tuple(x.shape))
    return _only_even(x)


@pytest.fixture
def counted(registry, monkeypatch):
    """Op 'toy' whose triton supports() records each call: a selection that ran shows there."""
    monkeypatch.setitem(registry._REGISTRY["toy"], "triton", Implementation(
        "toy", "triton", "triton", ("cpu", "cuda", "rocm"), f"{__name__}:fast_any", priority=20, supports=_counting_even,
        defaults={"BLOCK": 128, "num_warps": 4}))
    dispatch.clear_cache()
    SUPPORTS_CALLS.clear()
    return registry


def test_a_repeated_shape_class_reuses_the_selection(counted, on_h100):
    x = torch.zeros(4)
    for _ in range(3):
        dispatch.call("toy", x)
    assert SUPPORTS_CALLS == [(4,)] and CALLS == ["fast"] * 3
    dispatch.call("toy", torch.ones(4))  # other values, same shape class
    dispatch.call("toy", torch.zeros(6))  # another shape
    dispatch.call("toy", torch.zeros(4, dtype=torch.float64))  # another dtype
    dispatch.call("toy", torch.zeros(8)[::2])  # another stride
    dispatch.call("toy", x, 3)
    dispatch.call("toy", x, 4)  # a scalar argument's value is part of the key
    dispatch.call("toy", x, True)  # and its type (True == 1)
    dispatch.call("toy", x, 3)
    assert SUPPORTS_CALLS == [(4,), (6,), (4,), (4,), (4,), (4,), (4,)]


def test_the_cache_follows_the_environment_and_the_registry(counted, on_h100, monkeypatch):
    x, odd = torch.zeros(4), torch.zeros(3)
    assert dispatch.selection("toy", (x,)).chosen.name == "triton"
    monkeypatch.setenv("DSV4K_IMPL", "toy=reference")
    assert dispatch.selection("toy", (x,)).chosen.name == "reference"
    monkeypatch.delenv("DSV4K_IMPL")
    assert dispatch.selection("toy", (odd,)).chosen.name == "reference"  # a fallback, now cached
    monkeypatch.setenv("DSV4K_STRICT", "1")
    with pytest.raises(FallbackError):  # strict mode is part of the key: the cached fallback is not reused
        dispatch.call("toy", odd)
    monkeypatch.delenv("DSV4K_STRICT")
    dispatch.register(Implementation("toy", "odd", "triton", ("cpu", "cuda"), f"{__name__}:fast", priority=50))
    assert dispatch.selection("toy", (odd,)).chosen.name == "odd"  # register() emptied the cache


def test_arguments_without_a_key_are_selected_every_time(counted, on_h100):
    x = torch.zeros(4)
    dispatch.call("toy", x, {"not": "hashable"})
    dispatch.call("toy", x, {"not": "hashable"})
    assert SUPPORTS_CALLS == [(4,), (4,)]


def test_a_first_selection_inside_graph_capture_is_refused(counted, on_h100, monkeypatch):
    x = torch.zeros(4)
    dispatch.call("toy", x)  # warmed up before the "capture"
    monkeypatch.setattr(dispatch, "_capturing", lambda args, kwargs: True)
    dispatch.call("toy", x)  # known shape class: runs
    with pytest.raises(dispatch.CaptureError, match=r"toy: first call with these argument shapes inside CUDA-graph "
                                                    r"capture.*dsv4_kernels.precompile\('toy', \*args\)"):
        dispatch.call("toy", torch.zeros(6))
    assert CALLS == ["fast", "fast"]


def test_cpu_tensors_never_ask_about_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: pytest.fail("asked on the CPU"))
    assert dispatch._capturing((torch.zeros(2), 3), {}) is False


def test_precompile_runs_once_and_returns_the_cached_decision(counted, on_h100):
    x = torch.zeros(4)
    decision = dispatch.precompile("toy", x)
    assert decision.chosen.name == "triton" and CALLS == ["fast"] and SUPPORTS_CALLS == [(4,)]
    assert dispatch.selection("toy", (x,)) is decision
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        dispatch.precompile("nope", x)


def test_precompile_goes_through_the_public_op(monkeypatch):
    import dsv4_kernels
    x, g = torch.randn(8), torch.randn(8)
    with dispatch.recording() as counts:
        decision = dsv4_kernels.precompile("sigmoid_gate", x, g, impl="reference")
    assert counts == {("sigmoid_gate", "reference"): 1} and decision.chosen.name == "reference"
    with pytest.raises(ValueError):  # the public op's validation ran
        dsv4_kernels.precompile("sigmoid_gate", x, torch.randn(7), impl="reference")


def test_config_is_cached_and_handed_out_as_a_copy(registry, on_h100):
    impl = dispatch.get("toy", "triton")
    cfg = dispatch.config(impl, H100)
    cfg["BLOCK"] = 1
    assert dispatch.config(impl, H100) == {"BLOCK": 128, "num_warps": 4}
