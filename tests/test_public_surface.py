"""The public surface as a new user meets it (issue 11): the `impl=` keyword and DSV4K_IMPL of every op,
and the checked-mode mechanism (ops/_values.py) that every family's value rules go through."""
from __future__ import annotations

import functools
import pytest
import torch

import dsv4_kernels as dk
from dsv4_kernels import cli, dispatch, ladder
from dsv4_kernels.ops import _values


@functools.lru_cache(maxsize=None)
def _first_case(op):
    _, args, kwargs = ladder.get_check(op).cases(torch.device("cpu"))[0]
    return args, kwargs


@pytest.mark.parametrize("op", dispatch.ops())
@pytest.mark.parametrize("bad", [123, b"triton", "", ["reference"]], ids=["int", "bytes", "empty", "list"])
def test_impl_must_be_none_or_a_name(op, bad):
    args, kwargs = _first_case(op)
    with dispatch.recording() as calls, pytest.raises(ValueError) as err:
        getattr(dk, op)(*args, **kwargs, impl=bad)
    assert str(err.value).startswith("impl: expected None or an implementation name")
    assert type(bad).__name__ in str(err.value)
    assert not calls


@pytest.mark.parametrize("value, message", [
    ("nosuchop=nosuchimpl", "DSV4K_IMPL entry 'nosuchop=nosuchimpl': unknown op 'nosuchop'"),
    ("mhc_post=nosuch", "DSV4K_IMPL entry 'mhc_post=nosuch': op 'mhc_post' has no implementation 'nosuch'"),
])
def test_a_bad_dsv4k_impl_names_the_variable(monkeypatch, value, message):
    monkeypatch.setenv("DSV4K_IMPL", value)
    args, kwargs = _first_case("mhc_post")
    with pytest.raises(ValueError, match=message):
        dk.mhc_post(*args, **kwargs)


def test_dsv4k_check_refuses_a_bad_dsv4k_impl(monkeypatch, capsys):
    monkeypatch.setenv("DSV4K_IMPL", "nosuchop=nosuchimpl")
    assert cli.main(["check", "--op", "mhc_sinkhorn"]) == 2
    assert "DSV4K_IMPL entry 'nosuchop=nosuchimpl': unknown op 'nosuchop'" in capsys.readouterr().err


@pytest.mark.parametrize("op", dispatch.ops())
def test_every_op_traces_under_dynamic_torch_compile(op):
    """torch.compile(dynamic=True) with symbolic floats: the argument checks must not read a symbolic
    value on the host (math.isfinite, f-strings of symbolic sizes) and must not break the graph."""
    args, kwargs = _first_case(op)
    fn = getattr(dk, op)

    def call(*a):
        return fn(*a, **kwargs, impl="reference")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(specialize_float=False):
        got = torch.compile(call, dynamic=True, backend="eager", fullgraph=True)(*args)
    want = call(*args)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, w) or (g.is_floating_point() and torch.equal(g.isnan(), w.isnan()))


def test_a_bad_float_fails_inside_the_compiled_graph_too():
    args, _ = _first_case("mhc_sinkhorn")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(specialize_float=False):
        compiled = torch.compile(lambda m, eps: dk.mhc_sinkhorn(m, *args[1:], 4, 20, eps), dynamic=True,
                                 backend="eager", fullgraph=True)
        compiled(args[0], 1e-6)
        with pytest.raises(Exception, match="eps: expected a positive finite float"):
            compiled(args[0], -1.0)


# The checked-mode mechanism.

def test_checks_are_off_by_default_and_read_no_values(monkeypatch):
    monkeypatch.delenv(_values.ENV, raising=False)
    meta = torch.empty(5, dtype=torch.int64, device="meta")  # no storage: any value read would fail
    _values.check(_values.InRange("ids", meta, 0, 3), _values.Distinct("ids", meta))


@pytest.mark.parametrize("value", ["1", "true", "on"])
def test_checked_mode_raises_on_the_first_bad_rule_with_position_and_value(monkeypatch, value):
    monkeypatch.setenv(_values.ENV, value)
    good = torch.tensor([0, 1, 2])
    bad = torch.tensor([[0, 1], [9, 2]])
    with pytest.raises(ValueError) as err:
        _values.check(_values.InRange("good", good, 0, 3), _values.InRange("table", bad, 0, 3, what="experts"),
                      _values.InRange("later", torch.tensor([-5]), 0, 3))
    assert str(err.value) == ("table: expected values in [0, 3) (experts), got 9 at position (1, 0) "
                              "(DSV4K_CHECK=1 checked mode)")


@pytest.mark.parametrize("rule, ok", [
    (_values.InRange("x", torch.tensor([-1, 0, 2]), 0, 3, allow=(-1,)), True),
    (_values.InRange("x", torch.tensor([-2, 0, 2]), 0, 3, allow=(-1,)), False),
    (_values.InRange("x", torch.tensor([0, 3]), 0, 3), False),
    (_values.Distinct("x", torch.tensor([4, -1, -1, 2]), ignore=(-1,)), True),
    (_values.Distinct("x", torch.tensor([4, 2, 7, 2])), False),
    (_values.AllFinite("x", torch.tensor([0.0, 1e38])), True),
    (_values.AllFinite("x", torch.tensor([0.0, float("inf")])), False),
    (_values.InRange("x", None, 0, 3), True),
    (_values.InRange("x", torch.empty(0, dtype=torch.int64), 0, 0), True),
])
def test_each_rule_accepts_and_refuses(monkeypatch, rule, ok):
    monkeypatch.setenv(_values.ENV, "1")
    if ok:
        _values.check(rule)
    else:
        with pytest.raises(ValueError, match=r"^x: expected "):
            _values.check(rule)


def test_distinct_names_the_second_occurrence(monkeypatch):
    monkeypatch.setenv(_values.ENV, "1")
    with pytest.raises(ValueError, match=r"got 2 at position \(3,\)"):
        _values.check(_values.Distinct("slots", torch.tensor([2, 5, 7, 2, 5])))


def test_the_ladder_leaves_cases_too_large_for_the_interpreter_to_the_device(monkeypatch):
    """A kernel's CPU numerics run through the interpreter only on sample cases of at most
    INTERPRETER_CASE_BYTES of inputs; the others are named as left to the device, never silently dropped."""
    monkeypatch.setattr(ladder, "INTERPRETER_CASE_BYTES", -1)
    with pytest.raises(LookupError, match="ran no sample case: .* too large for the interpreter"):
        ladder.run_cases("sigmoid_gate", "triton", torch.device("cpu"))
    monkeypatch.setattr(ladder, "INTERPRETER_CASE_BYTES", 60000)   # pro-3x7168 has 86016 bytes
    summary = ladder.run_cases("sigmoid_gate", "triton", torch.device("cpu"))
    assert "cases match" in summary and "left to the device (too large for the interpreter)" in summary
    assert "too large" not in ladder.run_cases("sigmoid_gate", "reference", torch.device("cpu"))


# The checked-call cache (dispatch.checked, ops/_library.py EagerFastOp.known/run).

@pytest.mark.parametrize("op", dispatch.ops())
def test_a_call_class_that_passed_the_checks_skips_them_and_no_other(op, monkeypatch):
    """After a good call, a call of the same class runs the implementation chosen for it without the
    checks (a patched check that always raises is not reached), and counts in dispatch.recording; a
    tensor on another device, or checked mode, takes the checked path again and is refused."""
    monkeypatch.delenv(_values.ENV, raising=False)
    args, kwargs = _first_case(op)
    fn = getattr(dk, op)
    dispatch.clear_cache()
    want = fn(*args, **kwargs, impl="reference")
    with dispatch.recording() as calls:
        again = fn(*args, **kwargs, impl="reference")
    assert calls == {(op, "reference"): 1}
    for g, w in zip(again if isinstance(again, tuple) else (again,), want if isinstance(want, tuple) else (want,)):
        assert g.shape == w.shape and g.dtype == w.dtype
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    for i in tensors[1:]:
        moved = tuple(a.to("meta") if j == i else a for j, a in enumerate(args))
        with pytest.raises(ValueError, match="expected device"):
            fn(*moved, **kwargs, impl="reference")


def test_the_checked_call_cache_is_bypassed_in_checked_mode_and_for_a_new_class(monkeypatch):
    from dsv4_kernels.ops import compressor
    args, kwargs = _first_case("compressor_decode")
    state = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    dispatch.clear_cache()
    dk.compressor_decode(*state, **kwargs)
    seen = []
    real = compressor.validate_decode
    monkeypatch.setattr(compressor, "validate_decode", lambda *a: seen.append(a) or real(*a))
    dk.compressor_decode(*state, **kwargs)
    assert not seen                                   # the same class: checks skipped
    monkeypatch.setenv(_values.ENV, "1")
    dk.compressor_decode(*state, **kwargs)
    assert len(seen) == 1                             # checked mode: checks and value rules run
    monkeypatch.delenv(_values.ENV)
    narrower = [a[:1] if i in (2, 3, 5, 7) else a for i, a in enumerate(state)]   # kv, score, positions, slots
    dk.compressor_decode(*narrower, **kwargs)
    assert len(seen) == 2                             # a new class: checked
    dispatch.clear_cache()
    dk.compressor_decode(*state, **kwargs)
    assert len(seen) == 3                             # clear_cache forgets the classes too
