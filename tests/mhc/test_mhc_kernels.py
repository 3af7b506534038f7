"""The mHC kernels beyond the op tests (test_mhc_ops.py runs every implementation through the public ops):
the shape contract (supports() refusals and their reasons), the split-K plan and its workspace, bf16
rounding, one decode layer step chained through all ops at V4-Flash and V4-Pro sizes, hypothesis cases,
and the full-shape device tests (prefill T = 4096, decode T <= 8) that run under --backend=cuda|rocm.
Every test runs with guard bands (tests/conftest.py): output and workspace buffers sit between canary
bytes, so a store past a mask fails the test that made it, naming the buffer and the offset.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_kernels import dispatch, ladder, platform
from dsv4_kernels.dispatch import ImplementationUnavailable
from dsv4_kernels.kernels import mhc as contract
from dsv4_kernels.ops import mhc as ops
from dsv4_kernels.oracles import mhc as oracle
from dsv4_kernels.reference import mhc as reference

pytestmark = pytest.mark.guard_bands

MODELS = {"flash": 4096, "pro": 7168}
KERNELS = ("triton", "tilelang")
compare = ladder.get_check("mhc_pre").compare  # per dtype: fp32 gates SPEC 6 Sinkhorn tolerance, bf16 two ulps


def _site(dim: int, rows: int = 24, comb_scale: float = 2.0, device="cpu"):
    """Unit-norm hc_fn rows: RMS-scaled mixes of order 1, as in the model."""
    hc_fn = torch.randn(rows, 4 * dim) / math.sqrt(4 * dim)
    hc_scale = torch.tensor([0.5, 0.5, comb_scale]) if rows == 24 else torch.tensor([0.8])
    return tuple(t.to(device) for t in (hc_fn, hc_scale, 0.5 * torch.randn(rows)))


def _residual(T: int, dim: int, device="cpu") -> torch.Tensor:
    return torch.randn(T, 4, dim).to(torch.bfloat16).to(device)


def _compare_all(out, expected) -> None:
    for o, e in zip(out, expected):
        compare(o.cpu(), e.cpu())


def _args(op: str, T: int = 3, dim: int = 256, device="cpu") -> dict:
    x, f = _residual(T, dim, device), torch.randn(T, dim).to(torch.bfloat16).to(device)
    post, comb = 2 * torch.rand(T, 4, device=device), torch.rand(T, 4, 4, device=device)
    hc_fn, hc_scale, hc_base = _site(dim, device=device)
    site = dict(hc_fn=hc_fn, hc_scale=hc_scale, hc_base=hc_base)
    return {
        "mhc_sinkhorn": dict(mixes=torch.randn(T, 24, device=device), hc_scale=hc_scale, hc_base=hc_base, hc_mult=4,
                             iters=20, eps=1e-6),
        "mhc_pre": dict(x=x, **site, iters=20, eps=1e-6, norm_eps=1e-6),
        "mhc_post": dict(f=f, x=x, post=post, comb=comb),
        "mhc_head": dict(x=x, hc_fn=hc_fn[:4].contiguous(), hc_scale=hc_scale[:1], hc_base=hc_base[:4], eps=1e-6,
                         norm_eps=1e-6),
        "mhc_post_pre": dict(f=f, x=x, post=post, comb=comb, **site, iters=20, eps=1e-6, norm_eps=1e-6),
    }[op]


@pytest.mark.parametrize("op", ops.OPS)
@pytest.mark.parametrize("dim", [256, 4096, 7168, 8192])
@pytest.mark.parametrize("T", [0, 1, 3, 17])
def test_supports_the_v4_shapes(op, dim, T):
    args = _args(op, T, 256 if op == "mhc_sinkhorn" else dim)
    for kernel in KERNELS:
        assert dispatch.get(op, kernel).supports(**args) is None


ODD_DIMS = [(100, "got dim 100"), (7000, "got dim 7000"), (8448, "got dim 8448"), (128, "got dim 128")]


def _triton_runs_on(device) -> None:
    backend = "cpu" if device.type == "cpu" else platform.backend_of(device)
    reason = dispatch.get("mhc_pre", "triton").available(backend)
    if reason:
        pytest.skip(f"triton on {backend}: {reason}")


@pytest.mark.parametrize("op", [op for op in ops.OPS if op != "mhc_sinkhorn"])
@pytest.mark.parametrize("dim, message", ODD_DIMS, ids=[str(d) for d, _ in ODD_DIMS])
def test_odd_dims_are_refused_with_the_reason(op, dim, message):
    args = _args(op, 3, dim)
    for kernel in KERNELS:
        reason = dispatch.get(op, kernel).supports(**args)
        assert reason and "multiples of 256 up to 8192" in reason and message in reason, reason


@pytest.mark.parametrize("op", [op for op in ops.OPS if op != "mhc_sinkhorn"])
def test_a_refused_kernel_asked_for_by_name_raises_and_never_runs(op, device):
    _triton_runs_on(device)
    with dispatch.recording() as calls, pytest.raises(ImplementationUnavailable,
                                                      match="'triton' was requested by argument.*got dim 100"):
        getattr(ops, op)(**_args(op, 3, 100, device), impl="triton")
    assert not calls


REFUSALS = [
    ("mhc_sinkhorn", "hc_mult", lambda a: 2, "built for hc_mult 4, got 2"),
    ("mhc_sinkhorn", "mixes", lambda a: a[:, :16].contiguous(), "mixes must be [T, 24], got (3, 16)"),
    ("mhc_sinkhorn", "mixes", lambda a: torch.randn(24, 3).t(), "mixes must be contiguous"),
    ("mhc_sinkhorn", "iters", lambda a: 0, "iters must be an int >= 1, got 0"),
    ("mhc_pre", "x", lambda a: a.float(), "x must be bf16, got torch.float32"),
    ("mhc_pre", "x", lambda a: a[:, :2].contiguous(), "x must be [T, 4, dim] (hc_mult 4), got (3, 2, 256)"),
    ("mhc_pre", "x", lambda a: a.transpose(0, 1).contiguous().transpose(0, 1), "x must be contiguous"),
    ("mhc_pre", "hc_fn", lambda a: a.double(), "hc_fn must be fp32, got torch.float64"),
    ("mhc_pre", "hc_fn", lambda a: a.t().contiguous().t(), "hc_fn must be contiguous"),
    ("mhc_pre", "iters", lambda a: 0, "iters must be an int >= 1, got 0"),
    ("mhc_post", "f", lambda a: a.half(), "f must be bf16, got torch.float16"),
    ("mhc_post", "f", lambda a: torch.zeros(256, 3, dtype=torch.bfloat16).t(), "f must be contiguous"),
    ("mhc_post", "comb", lambda a: a.transpose(1, 2), "comb must be contiguous"),
    ("mhc_post", "post", lambda a: a.bfloat16(), "post must be fp32, got torch.bfloat16"),
    ("mhc_head", "hc_base", lambda a: a.double(), "hc_base must be fp32, got torch.float64"),
    ("mhc_post_pre", "x", lambda a: a.half(), "x must be bf16, got torch.float16"),
    ("mhc_post_pre", "iters", lambda a: -2, "iters must be an int >= 1, got -2"),
]


@pytest.mark.parametrize("op, name, bad, message", REFUSALS,
                         ids=[f"{o}-{n}-{i}" for i, (o, n, _, _) in enumerate(REFUSALS)])
def test_supports_refuses_what_the_kernels_were_not_built_for(op, name, bad, message):
    # The op validation refuses most of these first; supports() must refuse them on its own too, since
    # the dispatcher (and dsv4k check) may ask it directly.
    args = _args(op)
    args[name] = bad(args[name])
    for kernel in KERNELS:
        assert dispatch.get(op, kernel).supports(**args) == message


def test_explain_names_the_refusal_and_the_fallback(device):
    _triton_runs_on(device)
    decision = dispatch.explain("mhc_post", *_args("mhc_post", 3, 100, device).values())
    assert decision.chosen.name == "reference"
    assert "triton declined: built for hidden sizes that are multiples of 256" in decision.fallback_reason


def test_registration_orders_triton_before_tilelang_before_the_reference():
    for op in ops.OPS:
        names = [i.name for i in dispatch.implementations(op)]
        assert names == ["triton", "tilelang", "tilelang_ascend", "reference"], names  # tilelang_ascend: NPU only
        assert dispatch.get(op, "tilelang").available("cpu") is not None  # codegen-verified only here


@pytest.mark.parametrize("T, dim, splits, per", [
    (1, 7168, 224, 1),     # decode, V4-Pro: 224 tiles of 32 columns, one per split (224 programs)
    (8, 4096, 128, 1),     # decode, V4-Flash: 128 tiles
    (17, 7168, 112, 2),    # 2 token blocks: 128 splits wanted, 2 tiles each -> 112 splits
    (64, 4096, 64, 2),     # 4 token blocks: 64 splits of 2 tiles
    (4096, 7168, 1, 224),  # prefill: 256 token blocks fill the grid, no split-K
    (4096, 256, 1, 8),
])
def test_split_plan_hand_counts(T, dim, splits, per):
    cfg = ops.TRITON_DEFAULTS["mhc_pre"]
    assert (cfg["MIX_BLOCK_T"], cfg["MIX_BLOCK_D"], cfg["MIX_PROGRAMS"]) == (16, 32, 256)
    assert contract.split_plan(T, dim, 16, 32, 256) == (splits, per)
    assert contract.workspace_shapes(T, dim, 24, 16, 32, 256) == ((splits, T, 24), (splits, T))


@given(T=st.integers(1, 5000), dim=st.sampled_from(range(256, 8193, 256)), block_d=st.sampled_from([16, 32, 64, 128]),
       programs=st.integers(1, 1024))
def test_split_plan_covers_every_tile_once_with_no_empty_split(T, dim, block_d, programs):
    splits, per = contract.split_plan(T, dim, 16, block_d, programs)
    tiles = dim // block_d
    assert (splits - 1) * per < tiles <= splits * per  # every tile in exactly one split, none empty
    wanted = min(tiles, contract.cdiv(programs, contract.cdiv(T, 16)))  # splits that reach `programs`
    assert splits == 1 or wanted / 2 <= splits <= wanted


@pytest.mark.parametrize("precision", ["ieee", "bf16x3"])
def test_workspace_partials_sum_to_the_projection(device, precision):
    _triton_runs_on(device)
    from dsv4_kernels.kernels.mhc import triton as kernels
    T, dim = 17, 1024
    x, (hc_fn, _, _) = _residual(T, dim), _site(dim)
    cfg = {**ops.TRITON_DEFAULTS["mhc_pre"], "MIX_PRECISION": precision}
    ws, sq, _ = kernels._project(x.to(device), hc_fn.to(device), 24, cfg)
    ws, sq = ws.cpu(), sq.cpu()
    assert (tuple(ws.shape), tuple(sq.shape)) == contract.workspace_shapes(
        T, dim, 24, cfg["MIX_BLOCK_T"], cfg["MIX_BLOCK_D"], cfg["MIX_PROGRAMS"]) == ((32, 17, 24), (32, 17))
    xf = x.flatten(1).double()
    # Both precisions form exact products (bf16 x fp32 in fp32; bf16 x each exact bf16 part of hc_fn)
    # summed in fp32: the rounding errors of n adds grow like sqrt(n) ulps of partial sums that grow like
    # sqrt(n) terms, while sum|terms| grows like n: about one fp32 ulp (2^-24) of sum|terms| whatever K
    # (measured here: 2e-8 ieee, 6e-9 bf16x3). 2^-22 leaves a margin of 4 ulps and still fails a
    # two-part split (hi + mid, the lo part dropped: 7e-7) and anything coarser.
    terms = xf.abs() @ hc_fn.double().abs().T
    assert ((ws.double().sum(0) - xf @ hc_fn.double().T).abs() <= 2.0 ** -22 * terms).all()
    assert ((sq.double().sum(0) - xf.square().sum(1)).abs() <= 1e-6 * xf.square().sum(1)).all()


@pytest.mark.parametrize("precision", ["ieee", "bf16x3"])
@pytest.mark.parametrize("model", MODELS, ids=MODELS)
def test_both_precisions_meet_spec6_against_the_fp64_oracle(device, precision, model, monkeypatch):
    # SPEC 6 tolerances (fp32 gates atol 2e-5 + rtol 1e-4, bf16 two ulps) against the fp64 oracle at the
    # V4 dims, comb logits scaled by 8 (the Sinkhorn amplifies mix errors). 8 programs keep the
    # interpreter cheap; the precision, not the plan, is under test.
    _triton_runs_on(device)
    impl = dispatch.get("mhc_pre", "triton")
    monkeypatch.setitem(impl.defaults, "MIX_PRECISION", precision)
    monkeypatch.setitem(impl.defaults, "MIX_PROGRAMS", 8)
    T, dim = 3, MODELS[model]
    x, site = _residual(T, dim), _site(dim, comb_scale=8.0)
    out = ops.mhc_pre(x.to(device), *(t.to(device) for t in site), impl="triton")
    _compare_all(out, oracle.mhc_pre(x, *site))


def test_batch_invariant_mode_gives_a_token_the_same_bits_in_any_batch(device, monkeypatch):
    # DSV4K_BATCH_INVARIANT=1: rows of T = 1 calls equal, bit for bit, the same rows of a T = 37 call
    # (first and last token block, the last partly masked). V4-Flash dim: the default plans differ
    # there (128 splits at T = 1, 64 at T = 37), so the default mode may give other bits.
    _triton_runs_on(device)
    T, dim = 37, MODELS["flash"]
    cfg = ops.TRITON_DEFAULTS["mhc_pre"]
    assert contract.launch_plan(1, dim, cfg)[1:] == (128, 1) and contract.launch_plan(T, dim, cfg)[1:] == (64, 2)
    assert contract.launch_plan(1, dim, cfg, True)[1:] == contract.launch_plan(T, dim, cfg, True)[1:] == (32, 4)
    monkeypatch.setenv("DSV4K_BATCH_INVARIANT", "1")
    x, site = _residual(T, dim, device), _site(dim, device=device)
    batch = ops.mhc_pre(x, *site, impl="triton")
    for i in (0, T - 1):
        for one, many in zip(ops.mhc_pre(x[i:i + 1], *site, impl="triton"), batch):
            assert torch.equal(one.cpu(), many[i:i + 1].cpu()), i
    monkeypatch.setenv("DSV4K_BATCH_INVARIANT", "yes")
    with pytest.raises(ValueError, match="DSV4K_BATCH_INVARIANT: expected 0 or 1, got 'yes'"):
        ops.mhc_pre(x[:1], *site, impl="triton")


@pytest.mark.op("mhc_post")
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # the NaN input
def test_bf16_outputs_round_to_nearest_even(impl, device):
    # X'_0 = comb[0, 0] * X_0 with X_0 = 1 and comb[0, 0] = 1 + k 2^-8, k = 0..12: odd k are exact ties
    # between two bf16 values (ulp 2^-7 in [1, 2)) and must go to the even neighbour, as torch's cast
    # does; truncation (the Triton interpreter's own fp32->bf16 cast) would give 1 + floor(k / 2) 2^-7.
    # The kernels round with integer ops instead. NaN and inf pass through.
    k = torch.arange(13, dtype=torch.float32)
    T = k.numel()
    x = torch.zeros(T, 4, 256, dtype=torch.bfloat16)
    x[:, 0] = 1.0
    x[0, 0, 1], x[1, 0, 2] = float("nan"), float("inf")
    comb = torch.zeros(T, 4, 4)
    comb[:, 0, 0] = 1 + k * 2.0 ** -8
    f, post = torch.zeros(T, 256, dtype=torch.bfloat16), torch.zeros(T, 4)
    out = ops.mhc_post(*(t.to(device) for t in (f, x, post, comb)), impl=impl).cpu()
    half_even = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6, 6], dtype=torch.float32)
    assert torch.equal(out[:, 0, 0].float(), 1 + half_even * 2.0 ** -7)
    expected = reference.mhc_post(f, x, post, comb)
    nan = expected.isnan()
    assert nan[0, :, 1].all() and torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    assert out[1, 0, 2] == float("inf")


def _layer_step(impl, device, T: int, dim: int):
    """One decode layer step through every op: pre (attention site), post + pre fused (FFN site), post,
    head; each kernel output against the reference given the same inputs."""
    x = _residual(T, dim, device)
    att, ffn = _site(dim, device=device), _site(dim, comb_scale=8.0, device=device)
    head = _site(dim, rows=4, device=device)
    y, post, comb = ops.mhc_pre(x, *att, impl=impl)
    _compare_all((y, post, comb), reference.mhc_pre(x.cpu(), *(t.cpu() for t in att)))
    f = (y.float() * 0.5).to(torch.bfloat16)
    x2, y2, post2, comb2 = ops.mhc_post_pre(f, x, post, comb, *ffn, impl=impl)
    compare(x2.cpu(), reference.mhc_post(f.cpu(), x.cpu(), post.cpu(), comb.cpu()))
    _compare_all((y2, post2, comb2), reference.mhc_pre(x2.cpu(), *(t.cpu() for t in ffn)))
    x3 = ops.mhc_post(-y2, x2, post2, comb2, impl=impl)
    compare(x3.cpu(), reference.mhc_post(-y2.cpu(), x2.cpu(), post2.cpu(), comb2.cpu()))
    compare(ops.mhc_head(x3, *head, impl=impl).cpu(), reference.mhc_head(x3.cpu(), *(t.cpu() for t in head)))
    cols = comb2.cpu().sum(dim=-2)
    assert (comb2 >= 0).all() and ((cols - 1).abs() <= 1e-5).all()  # SPEC 4: columns sum to 1 within 1e-5


@pytest.mark.op("mhc_post_pre")
@pytest.mark.parametrize("model", MODELS, ids=MODELS)
@pytest.mark.parametrize("T", [0, 1, 17])  # 17: a full token block and a one-token tail
def test_layer_step_at_v4_sizes(impl, device, model, T):
    _layer_step(impl, device, T, MODELS[model])


@pytest.mark.op("mhc_pre")
@given(T=st.integers(0, 20), dim=st.sampled_from([256, 512, 768]), iters=st.integers(1, 24),
       comb_scale=st.sampled_from([0.5, 2.0, 10.0]), eps=st.sampled_from([1e-6, 1e-4]),
       norm_eps=st.sampled_from([1e-6, 1e-2]), seed=st.integers(0, 2**31 - 1))
def test_pre_any_tokens_iters_and_eps(impl, device, T, dim, iters, comb_scale, eps, norm_eps, seed):
    torch.manual_seed(seed)
    x, site = _residual(T, dim), _site(dim, comb_scale=comb_scale)
    out = ops.mhc_pre(*(t.to(device) for t in (x, *site)), iters=iters, eps=eps, norm_eps=norm_eps, impl=impl)
    _compare_all(out, reference.mhc_pre(x, *site, iters=iters, eps=eps, norm_eps=norm_eps))


@pytest.mark.op("mhc_post_pre")
@given(T=st.integers(0, 18), dim=st.just(256), scale=st.sampled_from([1e-3, 1.0, 300.0]),
       seed=st.integers(0, 2**31 - 1))
def test_post_pre_any_tokens_and_magnitudes(impl, device, T, dim, scale, seed):
    torch.manual_seed(seed)
    f, x = (torch.randn(T, dim) * scale).to(torch.bfloat16), (_residual(T, dim).float() * scale).to(torch.bfloat16)
    comb = torch.rand(T, 4, 4)
    post, comb, site = 2 * torch.rand(T, 4), comb / comb.sum(dim=1, keepdim=True), _site(dim)
    x_new, *rest = ops.mhc_post_pre(*(t.to(device) for t in (f, x, post, comb, *site)), impl=impl)
    compare(x_new.cpu(), reference.mhc_post(f, x, post, comb))
    _compare_all(rest, reference.mhc_pre(x_new.cpu(), *site))


@pytest.mark.op("mhc_sinkhorn")
@given(T=st.integers(0, 70), iters=st.integers(1, 30), comb_scale=st.floats(0.0, 12.0), seed=st.integers(0, 2**31 - 1))
def test_sinkhorn_any_tokens_and_iters(impl, device, T, iters, comb_scale, seed):
    torch.manual_seed(seed)
    mixes, scale, base = torch.randn(T, 24), torch.tensor([1.0, 1.0, comb_scale]), 0.5 * torch.randn(24)
    out = ops.mhc_sinkhorn(*(t.to(device) for t in (mixes, scale, base)), iters=iters, impl=impl)
    _compare_all(out, reference.mhc_sinkhorn(mixes, scale, base, iters=iters))


def _on_the_device(device) -> None:
    if device.type == "cpu":
        pytest.skip("full V4 shapes (prefill T = 4096) run on the device, not in the CPU interpreter: "
                    "pytest --backend=cuda|rocm on a GPU machine")


@pytest.mark.op("mhc_post_pre")
@pytest.mark.parametrize("model", MODELS, ids=MODELS)
@pytest.mark.parametrize("T", [1, 4, 8, 4096])
def test_full_shapes_on_the_device(impl, device, model, T):
    _on_the_device(device)
    _layer_step(impl, device, T, MODELS[model])


@pytest.mark.op("mhc_pre")
@pytest.mark.parametrize("model", MODELS, ids=MODELS)
def test_prefill_is_deterministic_on_the_device(impl, device, model):
    # Split-K partials go through a workspace reduced in a fixed order: no atomics, same bits every run.
    _on_the_device(device)
    x, site = _residual(4096, MODELS[model], device), _site(MODELS[model], device=device)
    first = ops.mhc_pre(x, *site, impl=impl)
    for a, b in zip(first, ops.mhc_pre(x, *site, impl=impl)):
        assert torch.equal(a, b)


@pytest.mark.op("mhc_post_pre")
def test_decode_step_replays_in_a_cuda_graph(impl, device):
    # No host synchronisation and no host-side value reads: the fused step captures and replays.
    _on_the_device(device)
    T, dim = 4, MODELS["pro"]
    f, x = torch.randn(T, dim, device=device).to(torch.bfloat16), _residual(T, dim, device)
    comb = torch.rand(T, 4, 4, device=device)
    gates = (2 * torch.rand(T, 4, device=device), comb / comb.sum(dim=1, keepdim=True))
    site = _site(dim, device=device)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ops.mhc_post_pre(f, x, *gates, *site, impl=impl)  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.mhc_post_pre(f, x, *gates, *site, impl=impl)
    f.copy_(torch.randn_like(f, dtype=torch.float32).to(torch.bfloat16))
    graph.replay()
    for a, b in zip(captured, ops.mhc_post_pre(f, x, *gates, *site, impl=impl)):
        assert torch.equal(a, b)
