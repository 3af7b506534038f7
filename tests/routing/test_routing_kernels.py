"""The routing kernels (kernels/routing/triton.py) against the reference, beyond the shared op tests of
test_routing_ops.py (which run every implementation on V4-Flash and V4-Pro shapes): odd expert counts and
top-k, token tails, both logit dtypes, every weight convention, the near-tie rule of SPEC 6, and the
shapes the kernels refuse."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import dsv4_kernels as dk
from dsv4_kernels import dispatch
from dsv4_kernels.reference.routing import sqrt_softplus
from dsv4_kernels.testing import assert_close

W_ATOL, W_RTOL = 1e-12, 1e-6  # as ops/routing.py: fp32 softplus/sqrt and normaliser, a few 1e-7
pytestmark = pytest.mark.guard_bands  # outputs between canary bands: a store past a tail fails here


def _assert_same_routing(got, want, what=""):
    (w, ids), (rw, rids) = got, want
    assert torch.equal(ids, rids), f"{what}: ids differ\n{ids}\nexpected\n{rids}"
    assert_close(w, rw, W_ATOL, W_RTOL, what=f"{what} weights")


@pytest.mark.parametrize("E, topk", [(1, 1), (7, 7), (100, 6), (257, 16), (511, 3), (512, 6)])
def test_score_kernel_odd_sizes(E, topk):
    T = 37  # BLOCK_T 4: ten blocks, the last with one token
    gen = torch.Generator().manual_seed(E * 100 + T)
    logits, bias = 3.0 * torch.randn(T, E, generator=gen), 0.5 * torch.randn(E, generator=gen)
    for kwargs in ({}, {"apply_routed_scaling_factor_on_output": True}, {"renormalize": False}):
        args = (logits, bias, topk, 2.5, 1 if E > 1 else 0)
        _assert_same_routing(dk.score_topk(*args, **kwargs, impl="triton"),
                             dk.score_topk(*args, **kwargs, impl="reference"), f"E{E} k{topk} {kwargs}")


@pytest.mark.parametrize("E, k", [(1, 1), (100, 6), (384, 16), (512, 6)])
@pytest.mark.parametrize("apply", [False, True])
def test_hash_kernel_odd_sizes_and_vocabulary_ends(E, k, apply):
    gen = torch.Generator().manual_seed(E + k)
    V, T = 129280, 37
    table = torch.randint(0, E, (V, k), generator=gen, dtype=torch.int32)
    input_ids = torch.randint(0, V, (T,), generator=gen)
    input_ids[:2] = torch.tensor([0, V - 1])
    logits = 2.0 * torch.randn(T, E, generator=gen)
    args = (logits, input_ids, table, 1, 1.5, apply)
    _assert_same_routing(dk.hash_topk(*args, impl="triton"), dk.hash_topk(*args, impl="reference"))


@pytest.mark.parametrize("op", ["score", "hash"])
def test_bf16_logits_are_upcast(op):
    logits = (2.0 * torch.randn(9, 384)).bfloat16()
    if op == "score":
        args, fn = (logits, 0.1 * torch.randn(384), 6, 2.5, 1), dk.score_topk
    else:
        args, fn = (logits, torch.arange(9), torch.randint(0, 384, (10, 6), dtype=torch.int32), 1, 2.5), dk.hash_topk
    _assert_same_routing(fn(*args, impl="triton"), fn(*args, impl="reference"))
    _assert_same_routing(fn(*args, impl="triton"), fn(args[0].float(), *args[1:], impl="reference"))


def _near_tie_ok(logits, bias, topk, ids, want_ids):
    """SPEC 6: a different choice or order only where the keys differ by <= 2^-21 * max(1, |key|)."""
    key = sqrt_softplus(logits).double() + bias.double()
    for t in torch.nonzero((ids != want_ids).any(dim=1)).flatten().tolist():
        got_k, want_k = key[t, ids[t].long()], key[t, want_ids[t].long()]
        tol = 2.0 ** -21 * torch.maximum(torch.ones_like(want_k), want_k.abs())
        assert len(set(ids[t].tolist())) == topk, f"row {t}: repeated expert"
        assert ((got_k - want_k).abs() <= tol).all(), f"row {t}: {ids[t]} vs {want_ids[t]} beyond the near-tie rule"


@st.composite
def _score_case(draw):
    E = draw(st.integers(1, 512))
    topk = draw(st.integers(1, min(E, 16)))
    T = draw(st.integers(0, 9))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.1, 2.0, 30.0]))
    logits = scale * torch.randn(T, E, generator=g)
    if draw(st.booleans()):  # few distinct values: exact ties everywhere
        logits = logits.round()
    bias = draw(st.sampled_from([0.0, 8.08])) + draw(st.sampled_from([0.0, 0.003])) * torch.randn(E, generator=g)
    return logits, bias, topk, draw(st.booleans()), draw(st.booleans())


@given(_score_case())
@settings(max_examples=12, deadline=None)
def test_score_kernel_property(case):
    logits, bias, topk, apply, renormalize = case
    w, ids = dk.score_topk(logits, bias, topk, 1.5, 0, apply, renormalize, impl="triton")
    rw, rids = dk.score_topk(logits, bias, topk, 1.5, 0, apply, renormalize, impl="reference")
    _near_tie_ok(logits, bias, topk, ids, rids)
    if torch.equal(ids, rids):
        assert_close(w, rw, W_ATOL, W_RTOL, what="weights")


@pytest.mark.parametrize("op, make, reason", [
    ("score_topk", lambda: (torch.randn(3, 513), torch.randn(513), 6), "built for up to 512 experts"),
    ("score_topk", lambda: (torch.randn(3, 256), torch.randn(256), 17), "built for top-k up to 16"),
    ("hash_topk", lambda: (torch.randn(3, 600), torch.arange(3), torch.zeros(4, 6, dtype=torch.int32)),
     "built for up to 512 experts"),
    ("hash_topk", lambda: (torch.randn(3, 256), torch.arange(3), torch.zeros(4, 17, dtype=torch.int32)),
     "built for tables of up to 16 experts per token"),
])
def test_shapes_the_kernels_were_not_built_for_are_refused(op, make, reason):
    args = make()
    with pytest.raises(dispatch.ImplementationUnavailable, match=reason):
        getattr(dk, op)(*args, impl="triton")
    decision = dk.explain(op, *args)
    assert decision.chosen.name == "reference" and reason in str(decision)


def _device_only(device):
    if device.type == "cpu":
        pytest.skip("full V4 shapes and CUDA-graph capture run on a device (--backend=cuda|rocm); "
                    "on the CPU the interpreter covers T <= 100")


@pytest.mark.op("score_topk")
@pytest.mark.parametrize("E, rsf", [(256, 1.5), (384, 2.5)], ids=["flash", "pro"])
@pytest.mark.parametrize("T", [128, 16384])
def test_score_topk_full_shapes_on_device(impl, device, E, rsf, T):
    _device_only(device)
    gen = torch.Generator().manual_seed(T + E)
    logits = 2.0 * torch.randn(T, E, generator=gen)
    bias = 8.08 + 0.003 * torch.randn(E, generator=gen) if E == 256 else 0.1 * torch.randn(E, generator=gen)
    w, ids = dk.score_topk(logits.to(device), bias.to(device), 6, rsf, 1, impl=impl)
    rw, rids = dk.score_topk(logits, bias, 6, rsf, 1, impl="reference")
    _near_tie_ok(logits, bias, 6, ids[:, :6].cpu(), rids[:, :6])
    same = (ids.cpu() == rids).all(dim=1)
    assert_close(w.cpu()[same], rw[same], W_ATOL, W_RTOL, what="weights")


@pytest.mark.op("hash_topk")
@pytest.mark.parametrize("E", [256, 384])
def test_hash_topk_full_shapes_on_device(impl, device, E):
    _device_only(device)
    gen = torch.Generator().manual_seed(E)
    V, T = 129280, 16384
    table = torch.randint(0, E, (V, 6), generator=gen, dtype=torch.int32)
    input_ids = torch.randint(0, V, (T,), generator=gen)
    input_ids[:2] = torch.tensor([0, V - 1])
    logits = 2.0 * torch.randn(T, E, generator=gen)
    args = (logits, input_ids, table, 1, 2.5)
    got = dk.hash_topk(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args), impl=impl)
    _assert_same_routing(tuple(x.cpu() for x in got), dk.hash_topk(*args, impl="reference"))


@pytest.mark.op("score_topk")
def test_score_topk_replays_in_a_cuda_graph(impl, device):
    _device_only(device)
    if impl == "reference":
        pytest.skip("CUDA-graph capture is the kernels' contract; the reference is the oracle, not a decode-path op")
    logits, bias = 2.0 * torch.randn(64, 384, device=device), 0.1 * torch.randn(384, device=device)
    dk.score_topk(logits, bias, 6, 2.5, 1, impl=impl)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, ids = dk.score_topk(logits, bias, 6, 2.5, 1, impl=impl)
    logits.copy_(2.0 * torch.randn(64, 384, device=device))
    graph.replay()
    rw, rids = dk.score_topk(logits.cpu(), bias.cpu(), 6, 2.5, 1, impl="reference")
    assert torch.equal(ids.cpu(), rids)
    assert_close(w.cpu(), rw, W_ATOL, W_RTOL, what="weights")
