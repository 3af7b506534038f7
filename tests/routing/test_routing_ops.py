"""score_topk and hash_topk through the public ops (SPEC 3, SPEC 7 "Routing"): every implementation
against the reference, validation, the torch.library registration, torch.compile and the ladder cases."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv4_kernels import dispatch, ladder
from dsv4_kernels.ops import routing as ops
from dsv4_kernels.ops.routing import hash_topk, score_topk
from dsv4_kernels.oracles.routing import score_topk_fp64, sqrt_softplus
from dsv4_kernels.reference import routing as reference

MODELS = {"flash": (256, 1.5), "pro": (384, 2.5)}   # (routed experts E, routed_scaling_factor)
VOCAB = 129280


def _compare(out: tuple, expected: tuple, impl: str) -> None:
    """The op's tolerance (ids exact, weights rtol 1e-6); the reference itself must be bit-exact."""
    assert len(out) == len(expected) == 2
    for o, e in zip(out, expected):
        ladder.get_check("score_topk").compare(o.cpu(), e)
        if impl == "reference":
            assert torch.equal(o.cpu(), e)


def _bias(E: int, device) -> torch.Tensor:
    if E == 256:
        return (8.08 + 0.003 * torch.randn(E)).to(device)  # V4-Flash: large, nearly uniform (the trap)
    return (0.1 * torch.randn(E)).to(device)


@pytest.mark.op("score_topk")
@pytest.mark.parametrize("model", MODELS, ids=MODELS.keys())
@pytest.mark.parametrize("T", [0, 1, 3, 100])
@pytest.mark.parametrize("shared", [0, 1], ids=["routed-only", "fused-shared"])
def test_score_topk_matches_reference(impl, device, model, T, shared):
    E, rsf = MODELS[model]
    logits, bias = 2.0 * torch.randn(T, E), _bias(E, "cpu")
    out = score_topk(logits.to(device), bias.to(device), 6, rsf, shared, impl=impl)
    assert out[0].shape == out[1].shape == (T, 6 + shared) and out[0].device == device
    _compare(out, reference.score_topk(logits, bias, 6, rsf, shared), impl)


@pytest.mark.op("hash_topk")
@pytest.mark.parametrize("model", MODELS, ids=MODELS.keys())
@pytest.mark.parametrize("T", [0, 1, 3, 100])
@pytest.mark.parametrize("shared", [0, 1], ids=["routed-only", "fused-shared"])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=["ids32", "ids64"])
def test_hash_topk_matches_reference(impl, device, model, T, shared, id_dtype):
    E, rsf = MODELS[model]
    tid2eid = torch.randint(0, E, (VOCAB, 6), dtype=torch.int32)
    input_ids = torch.randint(0, VOCAB, (T,), dtype=id_dtype)
    if T:
        input_ids[-1] = VOCAB - 1
    logits = 2.0 * torch.randn(T, E)
    out = hash_topk(logits.to(device), input_ids.to(device), tid2eid.to(device), shared, rsf, impl=impl)
    assert out[0].shape == out[1].shape == (T, 6 + shared) and out[0].device == device
    _compare(out, reference.hash_topk(logits, input_ids, tid2eid, shared, rsf), impl)
    assert torch.equal(out[1][:, :6].cpu(), tid2eid[input_ids.long()])


@pytest.mark.op("score_topk")
def test_score_topk_ties_go_to_the_smaller_index(impl, device):
    # s = 5 6 4.5 7 5.5 6 (logits > 20 are their own softplus); keys = s + bias = 6 6 4.5 6 7.5 6, exact.
    logits = torch.tensor([[25.0, 36.0, 20.25, 49.0, 30.25, 36.0]], device=device)
    bias = torch.tensor([1.0, 0.0, 0.0, -1.0, 2.0, 0.0], device=device)
    w, ids = score_topk(logits, bias, topk=4, impl=impl)
    assert ids.tolist() == [[4, 0, 1, 3]]
    expected = torch.tensor([[5.5, 5.0, 6.0, 7.0]], dtype=torch.float64) / 23.5
    ladder.get_check("score_topk").compare(w.cpu(), expected.float())


@pytest.mark.op("score_topk")
def test_v4_flash_bias_trap(impl, device):
    """Weights come from s alone: with bias ~8.08 the biased weights are nearly flat and must fail."""
    E, rsf = MODELS["flash"]
    logits, bias = torch.randn(16, E), 8.08 + 0.003 * torch.randn(E)
    w, ids = score_topk(logits.to(device), bias.to(device), 6, rsf, impl=impl)
    exp_w, exp_ids = score_topk_fp64(logits, bias, 6, rsf, 0)
    compare = ladder.get_check("score_topk").compare
    compare(ids.cpu(), exp_ids)
    compare(w.cpu(), exp_w.float())
    key = (sqrt_softplus(logits) + bias).double().gather(1, ids.cpu().long())
    with pytest.raises(AssertionError, match="weights"):
        compare((key / key.sum(dim=1, keepdim=True) * rsf).float(), exp_w.float())


def test_compare_refuses_a_wrong_id_or_dtype():
    compare = ladder.get_check("hash_topk").compare
    ids = torch.tensor([[3, 1, 2]], dtype=torch.int32)
    with pytest.raises(AssertionError, match=r"ids: 2 of 3 differ, first at \(0, 1\)"):
        compare(torch.tensor([[3, 2, 1]], dtype=torch.int32), ids)
    with pytest.raises(AssertionError, match="dtype torch.int64 != expected torch.int32"):
        compare(ids.long(), ids)


@st.composite
def _score_case(draw):
    T, E = draw(st.integers(0, 20)), draw(st.integers(1, 400))
    topk = draw(st.integers(1, min(E, 8)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = draw(st.sampled_from([0.1, 2.0, 40.0])) * torch.randn(T, E, generator=g)
    bias = draw(st.sampled_from([0.0, 8.08])) + 0.05 * torch.randn(E, generator=g)
    if draw(st.booleans()):  # exact ties
        logits, bias = logits.round(), (4 * bias).round() / 4
    return logits, bias, topk, draw(st.sampled_from([1.0, 1.5, 2.5, 0.7])), draw(st.integers(0, 1))


@pytest.mark.op("score_topk")
@given(case=_score_case())
@settings(deadline=None)
def test_score_topk_any_shape(impl, device, case):
    logits, bias, topk, rsf, shared = case
    out = score_topk(logits.to(device), bias.to(device), topk, rsf, shared, impl=impl)
    _compare(out, reference.score_topk(logits, bias, topk, rsf, shared), impl)


def _score_args():
    return dict(router_logits=torch.randn(3, 256), bias=torch.randn(256), topk=6, routed_scaling_factor=1.5,
                num_fused_shared_experts=1, apply_routed_scaling_factor_on_output=False, renormalize=True)


def _hash_args():
    return dict(router_logits=torch.randn(3, 256), input_ids=torch.tensor([0, 5, 9]),
                tid2eid=torch.randint(0, 256, (10, 6), dtype=torch.int32), num_fused_shared_experts=0,
                routed_scaling_factor=2.5, apply_routed_scaling_factor_on_output=True)


BAD = [
    ("score", "router_logits", lambda a: a.tolist(), "router_logits: expected a torch.Tensor, got list"),
    ("score", "router_logits", lambda a: a.half(), "router_logits: expected dtype torch.float32 or torch.bfloat16, got torch.float16"),
    ("score", "router_logits", lambda a: a[None], "router_logits: expected 2 dimensions, got 3"),
    ("score", "router_logits", lambda a: torch.randn(256, 3).t(), "router_logits: expected a contiguous tensor"),
    ("score", "router_logits", lambda a: torch.randn(3, 0), "router_logits: expected shape (T, E) with E >= 1 experts, got (3, 0)"),
    ("score", "bias", lambda a: a.double(), "bias: expected dtype torch.float32, got torch.float64"),
    ("score", "bias", lambda a: a[:-1], "bias: expected shape (256,), got (255,)"),
    ("score", "bias", lambda a: a[None], "bias: expected shape (256,), got (1, 256)"),
    ("score", "bias", lambda a: torch.randn(512)[::2], "bias: expected a contiguous tensor"),
    ("score", "bias", lambda a: a.to("meta"), "bias: expected device cpu (the device of router_logits), got meta"),
    ("score", "topk", lambda a: 0, "topk: expected 1 <= topk <= 256 (the number of experts, router_logits.shape[1]), got 0"),
    ("score", "topk", lambda a: 257, "topk: expected 1 <= topk <= 256 (the number of experts"),
    ("score", "topk", lambda a: 6.0, "topk: expected an int, got float 6.0"),
    ("score", "routed_scaling_factor", lambda a: 0.0, "routed_scaling_factor: expected a positive finite float, got 0.0"),
    ("score", "routed_scaling_factor", lambda a: -1.5, "routed_scaling_factor: expected a positive finite float, got -1.5"),
    ("score", "routed_scaling_factor", lambda a: math.inf, "routed_scaling_factor: expected a positive finite float, got inf"),
    ("score", "routed_scaling_factor", lambda a: math.nan, "routed_scaling_factor: expected a positive finite float, got nan"),
    ("score", "routed_scaling_factor", lambda a: "1.5", "routed_scaling_factor: expected a positive finite float, got str"),
    ("score", "num_fused_shared_experts", lambda a: 2, "num_fused_shared_experts: expected one of 0, 1, got 2"),
    ("score", "num_fused_shared_experts", lambda a: True, "num_fused_shared_experts: expected an int, got bool"),
    ("score", "apply_routed_scaling_factor_on_output", lambda a: "yes", "apply_routed_scaling_factor_on_output: expected a bool, got str"),
    ("score", "renormalize", lambda a: None, "renormalize: expected a bool, got NoneType None"),
    ("hash", "router_logits", lambda a: a.double(), "router_logits: expected dtype torch.float32 or torch.bfloat16, got torch.float64"),
    ("hash", "apply_routed_scaling_factor_on_output", lambda a: 1, "apply_routed_scaling_factor_on_output: expected a bool, got int 1"),
    ("hash", "input_ids", lambda a: a.float(), "input_ids: expected dtype torch.int32 or torch.int64, got torch.float32"),
    ("hash", "input_ids", lambda a: torch.tensor([0, 5, 9, 1]), "input_ids: expected shape (3,), got (4,)"),
    ("hash", "input_ids", lambda a: a[:, None], "input_ids: expected shape (3,), got (3, 1)"),
    ("hash", "input_ids", lambda a: torch.arange(6)[::2], "input_ids: expected a contiguous tensor"),
    ("hash", "input_ids", lambda a: a.to("meta"), "input_ids: expected device cpu (the device of router_logits), got meta"),
    ("hash", "tid2eid", lambda a: a.long(), "tid2eid: expected dtype torch.int32, got torch.int64"),
    ("hash", "tid2eid", lambda a: a.flatten(), "tid2eid: expected 2 dimensions, got 1"),
    ("hash", "tid2eid", lambda a: a.t(), "tid2eid: expected a contiguous tensor"),
    ("hash", "tid2eid", lambda a: a[:0], "tid2eid: expected shape (V, k) with V >= 1 table rows, got (0, 6)"),
    ("hash", "tid2eid", lambda a: a[:, :0], "tid2eid: expected shape (V, k) with 1 <= k <= 256 (k routed experts per token"),
    ("hash", "tid2eid", lambda a: torch.zeros(10, 257, dtype=torch.int32), "tid2eid: expected shape (V, k) with 1 <= k <= 256"),
    ("hash", "tid2eid", lambda a: a.to("meta"), "tid2eid: expected device cpu (the device of router_logits), got meta"),
    ("hash", "num_fused_shared_experts", lambda a: 2, "num_fused_shared_experts: expected one of 0, 1, got 2"),
    ("hash", "routed_scaling_factor", lambda a: -2.5, "routed_scaling_factor: expected a positive finite float, got -2.5"),
]


@pytest.mark.parametrize("op, name, bad, message", BAD, ids=[f"{o}-{n}-{i}" for i, (o, n, _, _) in enumerate(BAD)])
def test_bad_argument_is_refused_before_launch(op, name, bad, message):
    args = _score_args() if op == "score" else _hash_args()
    args[name] = bad(args[name])
    fn = score_topk if op == "score" else hash_topk
    with dispatch.recording() as calls, pytest.raises(ValueError) as err:
        fn(**args)
    assert message in str(err.value)
    assert not calls


def test_valid_arguments_of_the_refusal_table_run():
    with dispatch.recording() as calls:
        score_topk(**_score_args())
        hash_topk(**_hash_args())
    assert calls == {("score_topk", "triton"): 1, ("hash_topk", "triton"): 1}  # the interpreter under pytest


@pytest.mark.parametrize("T", [0, 3])
def test_torch_library_ops_are_complete(T):
    logits, bias = torch.randn(T, 256), torch.randn(256)
    torch.library.opcheck(torch.ops.dsv4.score_topk.default, (logits, bias, 6, 1.5, 1, False, True, "reference"),
                          test_utils=("test_schema", "test_faketensor"))
    tid2eid = torch.randint(0, 256, (50, 6), dtype=torch.int32)
    torch.library.opcheck(torch.ops.dsv4.hash_topk.default,
                          (logits, torch.randint(0, 50, (T,)), tid2eid, 1, 2.5, True, "reference"),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_without_graph_breaks():
    torch._dynamo.reset()

    def router(logits, bias, input_ids, tid2eid):
        w, ids = score_topk(logits, bias, 6, 2.5, 1, impl="reference")
        hw, hids = hash_topk(logits, input_ids, tid2eid, 1, 2.5, impl="reference")
        return w * 2, ids, hw + 1, hids

    args = (torch.randn(5, 384), 0.1 * torch.randn(384), torch.randint(0, 99, (5,)),
            torch.randint(0, 384, (99, 6), dtype=torch.int32))
    compiled = torch.compile(router, fullgraph=True, backend="eager")
    for got, want in zip(compiled(*args), router(*args)):
        assert torch.equal(got, want)
    explain = torch._dynamo.explain(router)(*args)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


@pytest.mark.op("score_topk")
def test_score_topk_ladder_cases(impl, device):
    assert "13 cases match" in ladder.run_cases(ops.SCORE_OP, impl, device)


@pytest.mark.op("hash_topk")
def test_hash_topk_ladder_cases(impl, device):
    assert "10 cases match" in ladder.run_cases(ops.HASH_OP, impl, device)
