"""mhc_sinkhorn, mhc_pre, mhc_post, mhc_head and mhc_post_pre through the public ops (SPEC 4, SPEC 7
"mHC"): every implementation against the reference, validation, the torch.library registration,
torch.compile and the ladder cases."""
from __future__ import annotations

import math

import pytest
import torch

from dsv4_kernels import dispatch, ladder
from dsv4_kernels.ops import mhc as ops
from dsv4_kernels.ops.mhc import mhc_head, mhc_post, mhc_post_pre, mhc_pre, mhc_sinkhorn
from dsv4_kernels.reference import mhc as reference

DIMS = {"flash": 4096, "pro": 7168, "odd": 100}


def _compare(out, expected, impl: str) -> None:
    """The op's tolerance per output (fp32 gates: SPEC 6 Sinkhorn; bf16: two ulps); the reference itself
    must be bit-exact."""
    out = out if isinstance(out, tuple) else (out,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(out) == len(expected)
    for o, e in zip(out, expected):
        ladder.get_check("mhc_pre").compare(o.cpu(), e)
        if impl == "reference":
            assert torch.equal(o.cpu(), e)


def _site(dim: int, rows: int = 24, comb_scale: float = 2.0):
    """Unit-norm hc_fn rows: RMS-scaled mixes of order 1, as in the model."""
    hc_fn = torch.randn(rows, 4 * dim) / math.sqrt(4 * dim)
    hc_scale = torch.tensor([0.5, 0.5, comb_scale]) if rows == 24 else torch.tensor([0.8])
    return hc_fn, hc_scale, 0.5 * torch.randn(rows)


def _residual(T: int, dim: int) -> torch.Tensor:
    return torch.randn(T, 4, dim).to(torch.bfloat16)


def _gates(T: int):
    comb = torch.rand(T, 4, 4)
    return 2 * torch.rand(T, 4), comb / comb.sum(dim=1, keepdim=True)


def _on(device, *tensors):
    return tuple(t.to(device) for t in tensors)


@pytest.mark.op("mhc_sinkhorn")
@pytest.mark.parametrize("T", [0, 1, 3, 100])
@pytest.mark.parametrize("comb_scale, iters, eps", [(2.0, 20, 1e-6), (10.0, 20, 1e-6), (3.0, 1, 1e-6), (3.0, 7, 1e-3)],
                         ids=["v4", "large-logits", "iters1", "iters7-eps1e-3"])
def test_sinkhorn_matches_reference(impl, device, T, comb_scale, iters, eps):
    mixes, scale, base = torch.randn(T, 24), torch.tensor([0.7, 1.3, comb_scale]), 0.3 * torch.randn(24)
    out = mhc_sinkhorn(*_on(device, mixes, scale, base), 4, iters, eps, impl=impl)
    assert [tuple(o.shape) for o in out] == [(T, 4), (T, 4), (T, 4, 4)]
    _compare(out, reference.mhc_sinkhorn(mixes, scale, base, 4, iters, eps), impl)


@pytest.mark.op("mhc_pre")
@pytest.mark.parametrize("dim", DIMS.values(), ids=DIMS.keys())
@pytest.mark.parametrize("T", [0, 1, 3])
def test_pre_matches_reference(impl, device, dim, T, require_supported):
    x, site = _residual(T, dim), _site(dim)
    require_supported("mhc_pre", impl, x, *site)
    out = mhc_pre(*_on(device, x, *site), impl=impl)
    assert [tuple(o.shape) for o in out] == [(T, dim), (T, 4), (T, 4, 4)]
    _compare(out, reference.mhc_pre(x, *site), impl)


@pytest.mark.op("mhc_pre")
def test_pre_non_default_iters_and_eps(impl, device):
    x, site = _residual(3, 256), _site(256, comb_scale=5.0)
    out = mhc_pre(*_on(device, x, *site), iters=3, eps=1e-3, norm_eps=1e-2, impl=impl)
    _compare(out, reference.mhc_pre(x, *site, iters=3, eps=1e-3, norm_eps=1e-2), impl)


@pytest.mark.op("mhc_post")
@pytest.mark.parametrize("dim", DIMS.values(), ids=DIMS.keys())
@pytest.mark.parametrize("T", [0, 1, 3])
def test_post_matches_reference(impl, device, dim, T, require_supported):
    f, x, (post, comb) = torch.randn(T, dim).to(torch.bfloat16), _residual(T, dim), _gates(T)
    require_supported("mhc_post", impl, f, x, post, comb)
    out = mhc_post(*_on(device, f, x, post, comb), impl=impl)
    assert out.shape == (T, 4, dim) and out.dtype == torch.bfloat16
    _compare(out, reference.mhc_post(f, x, post, comb), impl)


@pytest.mark.op("mhc_post")
def test_post_orientation(impl, device):
    # comb[i, j]: source i feeds destination j. A cycle i -> i + 1 gives X'[:, j] = X[:, j - 1].
    x, f = _residual(2, 256), torch.randn(2, 256).to(torch.bfloat16)
    cycle = torch.zeros(4, 4)
    cycle[torch.arange(4), (torch.arange(4) + 1) % 4] = 1
    out = mhc_post(*_on(device, f, x, torch.zeros(2, 4), cycle.expand(2, 4, 4).contiguous()), impl=impl)
    assert torch.equal(out.cpu(), x.roll(1, dims=1))


@pytest.mark.op("mhc_head")
@pytest.mark.parametrize("dim", DIMS.values(), ids=DIMS.keys())
@pytest.mark.parametrize("T", [0, 1, 3])
def test_head_matches_reference(impl, device, dim, T, require_supported):
    x, site = _residual(T, dim), _site(dim, rows=4)
    require_supported("mhc_head", impl, x, *site)
    out = mhc_head(*_on(device, x, *site), impl=impl)
    assert out.shape == (T, dim) and out.dtype == torch.bfloat16
    _compare(out, reference.mhc_head(x, *site), impl)


@pytest.mark.op("mhc_post_pre")
@pytest.mark.parametrize("dim", DIMS.values(), ids=DIMS.keys())
@pytest.mark.parametrize("T", [0, 1, 3])
def test_post_pre_is_post_then_pre(impl, device, dim, T, require_supported):
    f, x, (post, comb), site = torch.randn(T, dim).to(torch.bfloat16), _residual(T, dim), _gates(T), _site(dim)
    require_supported("mhc_post_pre", impl, f, x, post, comb, *site)
    out = mhc_post_pre(*_on(device, f, x, post, comb, *site), impl=impl)
    assert [tuple(o.shape) for o in out] == [(T, 4, dim), (T, dim), (T, 4), (T, 4, 4)]
    _compare(out[0], reference.mhc_post(f, x, post, comb), impl)
    # The pre stage is checked on the op's own x_new: where an implementation's fp32 sum rounds x_new to
    # the other bf16 neighbour, y legitimately moves by pre_i * ulp(x_new_i).
    _compare(out[1:], reference.mhc_pre(out[0].cpu(), *site), impl)
    if impl == "reference":
        _compare(out, reference.mhc_post_pre(f, x, post, comb, *site), impl)


def test_compare_catches_transposed_comb_extra_iteration_and_three_ulps():
    compare = ladder.get_check("mhc_post").compare
    f, x, (post, comb) = torch.randn(3, 256).to(torch.bfloat16), _residual(3, 256), _gates(3)
    with pytest.raises(AssertionError, match="beyond 2 bf16 ulps"):
        compare(reference.mhc_post(f, x, post, comb.transpose(1, 2).contiguous()), reference.mhc_post(f, x, post, comb))
    mixes, scale, base = torch.randn(8, 24), torch.tensor([1.0, 1.0, 10.0]), torch.zeros(24)
    with pytest.raises(AssertionError, match="fp32 gates"):
        compare(reference.mhc_sinkhorn(mixes, scale, base, iters=19)[2], reference.mhc_sinkhorn(mixes, scale, base)[2])
    y = torch.tensor([1.0, 3.0, -0.5]).to(torch.bfloat16)
    compare(torch.tensor([1.015625, 3.0, -0.5]).to(torch.bfloat16), y)  # two ulps of 1.0 (2^-6)
    with pytest.raises(AssertionError, match="beyond 2 bf16 ulps"):
        compare(torch.tensor([1.0, 3.0, -0.51171875]).to(torch.bfloat16), y)  # three ulps of 0.5


def _valid(op: str) -> dict:
    T, dim = 3, 256
    x, f, (post, comb) = _residual(T, dim), torch.randn(T, dim).to(torch.bfloat16), _gates(T)
    hc_fn, hc_scale, hc_base = _site(dim)
    site = dict(hc_fn=hc_fn, hc_scale=hc_scale, hc_base=hc_base)
    return {
        "mhc_sinkhorn": dict(mixes=torch.randn(T, 24), hc_scale=hc_scale, hc_base=hc_base, hc_mult=4, iters=20,
                             eps=1e-6),
        "mhc_pre": dict(x=x, **site, iters=20, eps=1e-6, norm_eps=1e-6),
        "mhc_post": dict(f=f, x=x, post=post, comb=comb),
        "mhc_head": dict(x=x, hc_fn=hc_fn[:4], hc_scale=hc_scale[:1], hc_base=hc_base[:4], eps=1e-6, norm_eps=1e-6),
        "mhc_post_pre": dict(f=f, x=x, post=post, comb=comb, **site, iters=20, eps=1e-6, norm_eps=1e-6),
    }[op]


BAD = [
    ("mhc_sinkhorn", "hc_mult", lambda a: 2, "hc_mult: expected one of 4, got 2"),
    ("mhc_sinkhorn", "hc_mult", lambda a: 4.0, "hc_mult: expected an int, got float 4.0"),
    ("mhc_sinkhorn", "mixes", lambda a: a.bfloat16(), "mixes: expected dtype torch.float32, got torch.bfloat16"),
    ("mhc_sinkhorn", "mixes", lambda a: a[:, :16].contiguous(), "mixes: expected shape (*, 24), got (3, 16)"),
    ("mhc_sinkhorn", "mixes", lambda a: a[None], "mixes: expected 2 dimensions, got 3"),
    ("mhc_sinkhorn", "mixes", lambda a: torch.randn(24, 3).t(), "mixes: expected a contiguous tensor"),
    ("mhc_sinkhorn", "hc_scale", lambda a: torch.ones(4), "hc_scale: expected shape (3,), got (4,)"),
    ("mhc_sinkhorn", "hc_scale", lambda a: a.double(), "hc_scale: expected dtype torch.float32, got torch.float64"),
    ("mhc_sinkhorn", "hc_base", lambda a: a[:16], "hc_base: expected shape (24,), got (16,)"),
    ("mhc_sinkhorn", "hc_base", lambda a: a.to("meta"), "hc_base: expected device cpu (the device of mixes), got meta"),
    ("mhc_sinkhorn", "iters", lambda a: 0, "iters: expected an int >= 1, got 0"),
    ("mhc_sinkhorn", "iters", lambda a: 20.0, "iters: expected an int, got float 20.0"),
    ("mhc_sinkhorn", "eps", lambda a: 0.0, "eps: expected a positive finite float, got 0.0"),
    ("mhc_sinkhorn", "eps", lambda a: -1e-6, "eps: expected a positive finite float, got -1e-06"),
    ("mhc_sinkhorn", "eps", lambda a: math.nan, "eps: expected a positive finite float, got nan"),
    ("mhc_pre", "x", lambda a: a.float(), "x: expected dtype torch.bfloat16, got torch.float32"),
    ("mhc_pre", "x", lambda a: a[:, 0], "x: expected 3 dimensions, got 2"),
    ("mhc_pre", "x", lambda a: a[:, :2].contiguous(), "x: expected shape (*, 4, *), got (3, 2, 256)"),
    ("mhc_pre", "x", lambda a: a[:, :, :0].contiguous(), "x: expected shape (T, 4, dim) with dim >= 1, got (3, 4, 0)"),
    ("mhc_pre", "x", lambda a: a.transpose(0, 1).contiguous().transpose(0, 1), "x: expected a contiguous tensor"),
    ("mhc_pre", "hc_fn", lambda a: a[:, :-1].contiguous(), "hc_fn: expected shape (24, 1024), got (24, 1023)"),
    ("mhc_pre", "hc_fn", lambda a: a[:4], "hc_fn: expected shape (24, 1024), got (4, 1024)"),
    ("mhc_pre", "hc_fn", lambda a: a.bfloat16(), "hc_fn: expected dtype torch.float32, got torch.bfloat16"),
    ("mhc_pre", "hc_fn", lambda a: a.to("meta"), "hc_fn: expected device cpu (the device of x), got meta"),
    ("mhc_pre", "hc_scale", lambda a: a[:1], "hc_scale: expected shape (3,), got (1,)"),
    ("mhc_pre", "hc_base", lambda a: a[:4], "hc_base: expected shape (24,), got (4,)"),
    ("mhc_pre", "iters", lambda a: -1, "iters: expected an int >= 1, got -1"),
    ("mhc_pre", "norm_eps", lambda a: 0.0, "norm_eps: expected a positive finite float, got 0.0"),
    ("mhc_pre", "norm_eps", lambda a: math.inf, "norm_eps: expected a positive finite float, got inf"),
    ("mhc_post", "f", lambda a: a.float(), "f: expected dtype torch.bfloat16, got torch.float32"),
    ("mhc_post", "f", lambda a: torch.zeros(3, 257, dtype=torch.bfloat16), "f: expected shape (3, 256), got (3, 257)"),
    ("mhc_post", "f", lambda a: torch.zeros(4, 256, dtype=torch.bfloat16), "f: expected shape (3, 256), got (4, 256)"),
    ("mhc_post", "x", lambda a: a[:, :3].contiguous(), "x: expected shape (*, 4, *), got (3, 3, 256)"),
    ("mhc_post", "post", lambda a: a.bfloat16(), "post: expected dtype torch.float32, got torch.bfloat16"),
    ("mhc_post", "post", lambda a: a[:, :2].contiguous(), "post: expected shape (3, 4), got (3, 2)"),
    ("mhc_post", "post", lambda a: a[:2], "post: expected shape (3, 4), got (2, 4)"),
    ("mhc_post", "comb", lambda a: a.double(), "comb: expected dtype torch.float32, got torch.float64"),
    ("mhc_post", "comb", lambda a: a[:, 0].contiguous(), "comb: expected 3 dimensions, got 2 (shape (3, 4))"),
    ("mhc_post", "comb", lambda a: a.transpose(1, 2), "comb: expected a contiguous tensor"),
    ("mhc_post", "comb", lambda a: a.to("meta"), "comb: expected device cpu (the device of x), got meta"),
    ("mhc_head", "hc_fn", lambda a: torch.zeros(24, 1024), "hc_fn: expected shape (4, 1024), got (24, 1024)"),
    ("mhc_head", "hc_scale", lambda a: torch.ones(3), "hc_scale: expected shape (1,), got (3,)"),
    ("mhc_head", "hc_base", lambda a: torch.zeros(24), "hc_base: expected shape (4,), got (24,)"),
    ("mhc_head", "x", lambda a: a[:, :1].contiguous(), "x: expected shape (*, 4, *), got (3, 1, 256)"),
    ("mhc_head", "eps", lambda a: -1.0, "eps: expected a positive finite float, got -1.0"),
    ("mhc_head", "norm_eps", lambda a: "1e-6", "norm_eps: expected a positive finite float, got str '1e-6'"),
    ("mhc_post_pre", "hc_fn", lambda a: torch.zeros(24, 1028), "hc_fn: expected shape (24, 1024), got (24, 1028)"),
    ("mhc_post_pre", "f", lambda a: a[:, :128].contiguous(), "f: expected shape (3, 256), got (3, 128)"),
    ("mhc_post_pre", "comb", lambda a: a[:, :, :2].contiguous(), "comb: expected shape (3, 4, 4), got (3, 4, 2)"),
    ("mhc_post_pre", "hc_base", lambda a: a.to("meta"), "hc_base: expected device cpu (the device of x), got meta"),
    ("mhc_post_pre", "iters", lambda a: 0, "iters: expected an int >= 1, got 0"),
    ("mhc_post_pre", "eps", lambda a: 0, "eps: expected a positive finite float, got 0"),
]


@pytest.mark.parametrize("op, name, bad, message", BAD, ids=[f"{o}-{n}-{i}" for i, (o, n, _, _) in enumerate(BAD)])
def test_bad_argument_is_refused_before_launch(op, name, bad, message):
    args = _valid(op)
    args[name] = bad(args[name])
    with dispatch.recording() as calls, pytest.raises(ValueError) as err:
        getattr(ops, op)(**args)
    assert message in str(err.value)
    assert not calls


GENERATED = [(op, r) for op in ops.OPS for r in ops.SPECS[op].refusals(_valid(op))]


@pytest.mark.parametrize("op, refusal", GENERATED, ids=[f"{o}-{r.name}-{r.what}" for o, r in GENERATED])
def test_every_property_of_the_spec_is_refused(op, refusal):
    """Generated from the op's declarative spec: each stated property of each argument (dtype, rank,
    sizes, contiguity, device, range) has a bad variant, refused with an error that names it."""
    args = _valid(op)
    args[refusal.name] = refusal.value
    with dispatch.recording() as calls, pytest.raises(ValueError) as err:
        getattr(ops, op)(**args)
    assert str(err.value).startswith(f"{refusal.name}: expected"), str(err.value)
    assert not calls


def test_the_generated_refusals_cover_every_argument():
    for op in ops.OPS:
        named = {r.name for r in ops.SPECS[op].refusals(_valid(op))}
        assert named == {a.name for a in ops.SPECS[op].args} == set(_valid(op)), op


def test_valid_arguments_of_the_refusal_table_run():
    with dispatch.recording() as calls:
        for op in ops.OPS:
            getattr(ops, op)(**_valid(op))
    # Whichever implementation the dispatcher picks here (the Triton interpreter under pytest), each op ran once.
    assert sorted(op for op, _ in calls) == sorted(ops.OPS) and set(calls.values()) == {1}


def test_torch_library_ops_are_complete():
    T, dim = 3, 64
    x, f, (post, comb) = _residual(T, dim), torch.randn(T, dim).to(torch.bfloat16), _gates(T)
    hc_fn, hc_scale, hc_base = _site(dim)
    head = _site(dim, rows=4)
    calls = [
        (torch.ops.dsv4.mhc_sinkhorn.default, (torch.randn(T, 24), hc_scale, hc_base, 4, 20, 1e-6, "reference")),
        (torch.ops.dsv4.mhc_pre.default, (x, hc_fn, hc_scale, hc_base, 20, 1e-6, 1e-6, "reference")),
        (torch.ops.dsv4.mhc_post.default, (f, x, post, comb, "reference")),
        (torch.ops.dsv4.mhc_head.default, (x, *head, 1e-6, 1e-6, "reference")),
        (torch.ops.dsv4.mhc_post_pre.default, (f, x, post, comb, hc_fn, hc_scale, hc_base, 20, 1e-6, 1e-6, "reference")),
        (torch.ops.dsv4.mhc_post_pre.default, (f[:0], x[:0], post[:0], comb[:0], hc_fn, hc_scale, hc_base, 20, 1e-6,
                                               1e-6, "reference")),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_without_graph_breaks():
    torch._dynamo.reset()

    def two_sublayers_and_head(x, site, site2, head):
        y, post, comb = mhc_pre(x, *site, impl="reference")
        x = mhc_post(y * 0.5, x, post, comb, impl="reference")
        y, post, comb = mhc_pre(x, *site2, impl="reference")
        x, y2, post2, comb2 = mhc_post_pre(-y, x, post, comb, *site, impl="reference")
        pre, _, _ = mhc_sinkhorn(torch.zeros(x.shape[0], 24), site[1], site[2], impl="reference")
        return mhc_head(x, *head, impl="reference"), y2, post2, comb2, pre

    args = (_residual(3, 256), _site(256), _site(256), _site(256, rows=4))
    compiled = torch.compile(two_sublayers_and_head, fullgraph=True, backend="eager")
    for got, want in zip(compiled(*args), two_sublayers_and_head(*args)):
        assert torch.equal(got, want)
    explain = torch._dynamo.explain(two_sublayers_and_head)(*args)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def _ladder_cases(op: str, impl: str, device, cases: int, odd_dim_case: str | None) -> None:
    """All sample cases match; the kernels (built for dim % 256 == 0) refuse the odd-dim case by name."""
    summary = ladder.run_cases(op, impl, device)
    if impl == "reference" or odd_dim_case is None:
        assert summary.startswith(f"{cases} cases match") and "refused" not in summary, summary
    else:
        assert summary.startswith(f"{cases - 1} cases match"), summary
        assert f"refused by supports(): {odd_dim_case} (built for hidden sizes that are multiples of 256" in summary


@pytest.mark.op("mhc_sinkhorn")
def test_sinkhorn_ladder_cases(impl, device):
    _ladder_cases("mhc_sinkhorn", impl, device, 7, None)


@pytest.mark.op("mhc_pre")
def test_pre_ladder_cases(impl, device):
    _ladder_cases("mhc_pre", impl, device, 6, "odd-dim100-T3")


@pytest.mark.op("mhc_post")
def test_post_ladder_cases(impl, device):
    _ladder_cases("mhc_post", impl, device, 5, "odd-dim100-T3")


@pytest.mark.op("mhc_head")
def test_head_ladder_cases(impl, device):
    _ladder_cases("mhc_head", impl, device, 5, "odd-dim100-T3")


@pytest.mark.op("mhc_post_pre")
def test_post_pre_ladder_cases(impl, device):
    _ladder_cases("mhc_post_pre", impl, device, 5, "odd-dim100-T3")
