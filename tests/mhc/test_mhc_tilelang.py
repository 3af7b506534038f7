"""The TileLang mHC kernels (kernels/mhc/tilelang.py) beyond what the impl-parametrised op tests cover.

- codegen (from the session's `codegen_results`: sm_90a and gfx942, all four GPU targets with --all-targets): both V4 hidden sizes, the
  launches each op promises, a symbolic token count, 16-byte accesses, 32-lane shuffles, and no local
  memory (spills or register arrays indexed at run time) in any cubin;
- host logic in pure Python: the split-K plan, the workspace layout, the guards, the configs;
- on a CUDA/ROCm device (`--backend=cuda|rocm`): shapes the op tests do not reach (several token tiles
  and uneven K splits, dim not a multiple of the finalize block, the largest dim), determinism and
  CUDA-graph capture. TileLang GPU kernels do not run on the CPU, so these skip there.
"""
import math

import pytest
import torch
from hypothesis import given, strategies as st

pytest.importorskip("tilelang", reason="tilelang is not installed (pip install 'dsv4-kernels[cuda]')")

from dsv4_kernels import dispatch, ladder  # noqa: E402
from dsv4_kernels.backends import find_target  # noqa: E402
from dsv4_kernels.kernels.mhc import tilelang as tl  # noqa: E402
from dsv4_kernels.ops.mhc import OPS, mhc_head, mhc_post, mhc_post_pre, mhc_pre, mhc_sinkhorn  # noqa: E402
from dsv4_kernels.reference import mhc as reference  # noqa: E402

TARGETS = ("sm_90a", "sm_100a", "gfx942", "gfx950")
DIMS = (4096, 7168)
# Kernel specs per op: pre, head and post_pre are two launches (split-K projection, then finalize).
LABELS = {
    "mhc_sinkhorn": ["sinkhorn"],
    "mhc_pre": [f"{k}-dim{d}" for d in DIMS for k in ("project", "finalize")],
    "mhc_head": [f"{k}-dim{d}" for d in DIMS for k in ("project", "finalize")],
    "mhc_post_pre": [f"{k}-dim{d}" for d in DIMS for k in ("post_project", "finalize")],
    "mhc_post": [f"post-dim{d}" for d in DIMS],
}


@pytest.mark.codegen
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("op", OPS)
def test_codegen(op, target, codegen_artifacts):
    backend = find_target(target).backend
    arts = codegen_artifacts(op, "tilelang", target)
    assert [a.label for a in arts] == LABELS[op]
    for a in arts:
        # One compile serves every token count: T is a kernel argument, not a constant.
        assert "int n" in a.text, f"{a.label}: the token count is not symbolic"
        assert ("uint4" if a.label != "sinkhorn" else "float4") in a.text, f"{a.label}: no 16-byte accesses"
        if "project" in a.label:
            shuffle = "__shfl_xor_sync(" if backend == "cuda" else "__shfl_xor("
            assert shuffle in a.text and ", 32)" in a.text, f"{a.label}: expected 32-lane xor shuffles"
        if backend == "cuda":
            assert a.binary_kind == "cubin", f"{a.label}: no cubin ({a.resources})"
            res = a.resources
            assert res["reg"] > 0 and res["local"] == 0 and res["stack"] == 0, f"{a.label}: {res} (spills?)"
        else:
            assert a.kind == "hip-source"


@pytest.mark.codegen
@pytest.mark.parametrize("dim", [256, 768, 8192])
def test_kernels_lower_for_other_hidden_sizes(dim):
    """Any multiple of 256 up to 8192: 768 leaves a partial finalize/post block (1024 columns)."""
    import tilelang
    from tvm.target import Target
    cuda = find_target("sm_90a").tilelang
    funcs = [tl.make_project_kernel(dim, tl.MIX, 4, 2, 8, False), tl.make_project_kernel(dim, tl.MIX, 4, 2, 4, True),
             tl.make_project_kernel(dim, tl.HC, 1, 4, 8, False), tl.make_finalize_kernel(dim, 128, False),
             tl.make_finalize_kernel(dim, 128, True), tl.make_post_kernel(dim, 128)]
    for func in funcs:
        with Target(cuda):
            source = str(tilelang.lower(func, target=cuda, enable_device_compile=False).kernel_source)
        assert "__global__" in source


def test_registration_matches_this_module():
    for op in OPS:
        impl = dispatch.get(op, "tilelang")
        assert impl.entry == f"dsv4_kernels.kernels.mhc.tilelang:{op}"
        assert impl.codegen == f"dsv4_kernels.kernels.mhc.tilelang:codegen_{op}"
        assert impl.defaults == tl.DEFAULTS[op], f"{op}: registered defaults differ from tilelang.DEFAULTS"
        assert set(impl.backends) == {"cuda", "rocm"}


def _x(T: int, dim: int) -> torch.Tensor:
    return torch.zeros(T, 4, dim, dtype=torch.bfloat16)


def _site(dim: int, rows: int = 24):
    return torch.zeros(rows, 4 * dim), torch.ones(3 if rows == 24 else 1), torch.zeros(rows)


def _gates(T: int):
    return torch.zeros(T, 4), torch.zeros(T, 4, 4)


@pytest.mark.parametrize("T", [0, 3])
@pytest.mark.parametrize("dim", [256, 4096, 7168, 8192])
def test_supports_accepts_what_the_kernels_were_built_for(dim, T):
    x, f, (post, comb) = _x(T, dim), torch.zeros(T, dim, dtype=torch.bfloat16), _gates(T)
    assert tl.supports_mhc_pre(x, *_site(dim)) is None
    assert tl.supports_mhc_head(x, *_site(dim, rows=4)) is None
    assert tl.supports_mhc_post(f, x, post, comb) is None
    assert tl.supports_mhc_post_pre(f, x, post, comb, *_site(dim)) is None
    assert tl.supports_mhc_sinkhorn(torch.zeros(T, 24), torch.ones(3), torch.zeros(24), 4, 20, 1e-6) is None


def _misaligned_x(T: int, dim: int) -> torch.Tensor:
    """Contiguous, but 2 bytes past a 16-byte boundary: the kernels' 16-byte loads would fault."""
    return torch.zeros(T * 4 * dim + 1, dtype=torch.bfloat16)[1:].view(T, 4, dim)


REFUSALS = [
    ("dim 100", lambda: tl.supports_mhc_pre(_x(3, 100), *_site(100)), "multiples of 256"),
    ("dim 8448", lambda: tl.supports_mhc_head(_x(3, 8448), *_site(8448, rows=4)), "up to 8192"),
    ("fp32 x", lambda: tl.supports_mhc_pre(_x(3, 256).float(), *_site(256)), "bf16"),
    ("hc_mult 2", lambda: tl.supports_mhc_sinkhorn(torch.zeros(3, 24), torch.ones(3), torch.zeros(24), 2), "hc_mult"),
    ("iters 0", lambda: tl.supports_mhc_pre(_x(3, 256), *_site(256), 0), "iters"),
    ("iters 2^31", lambda: tl.supports_mhc_sinkhorn(torch.zeros(3, 24), torch.ones(3), torch.zeros(24), 4, 2**31),
     "int32"),
    ("misaligned x", lambda: tl.supports_mhc_pre(_misaligned_x(3, 256), *_site(256)), "16-byte"),
    ("misaligned f", lambda: tl.supports_mhc_post(
        torch.zeros(3 * 256 + 1, dtype=torch.bfloat16)[1:].view(3, 256), _x(3, 256), *_gates(3)), "16-byte"),
    ("misaligned mixes", lambda: tl.supports_mhc_sinkhorn(
        torch.zeros(3 * 24 + 1)[1:].view(3, 24), torch.ones(3), torch.zeros(24)), "16-byte"),
    ("2^30 + 1 tokens", lambda: tl.supports_mhc_post_pre(
        torch.empty(2**30 + 1, 256, dtype=torch.bfloat16, device="meta"),
        torch.empty(2**30 + 1, 4, 256, dtype=torch.bfloat16, device="meta"),
        torch.empty(2**30 + 1, 4, device="meta"), torch.empty(2**30 + 1, 4, 4, device="meta"), *_site(256)),
     "token count"),
]


@pytest.mark.parametrize("check, needle", [(c, n) for _, c, n in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_supports_refuses_with_a_reason(check, needle):
    reason = check()
    assert reason and needle in reason, reason


def test_registered_tilelang_refuses_misaligned_x():
    """The dispatcher must ask the TileLang guard: a 16-byte load from a misaligned x faults the device."""
    impl = dispatch.get("mhc_pre", "tilelang")
    assert impl.supports(_misaligned_x(3, 256), *_site(256), 20, 1e-6, 1e-6)


def test_kernel_configs_are_checked():
    with pytest.raises(ValueError, match="ROW_GROUPS"):
        tl.make_project_kernel(4096, tl.MIX, 5, 1, 8, False)
    with pytest.raises(ValueError, match="ROW_GROUPS"):
        tl.make_project_kernel(4096, tl.HC, 2, 17, 8, False)
    with pytest.raises(ValueError, match="threads"):
        tl.make_post_kernel(4096, 100)
    with pytest.raises(ValueError, match="threads"):
        tl.make_finalize_kernel(4096, 2048, False)


def test_workspace_columns_hold_the_mixes_and_the_sum_of_squares():
    assert tl.ws_cols(tl.MIX) >= tl.MIX + 1 and tl.ws_cols(tl.HC) >= tl.HC + 1


def _device_runs(splits: int, units: int) -> list[range]:
    """The unit ranges the projection kernel gives each split (its per = ceil(units / splits))."""
    per = math.ceil(units / splits)
    return [range(s * per, min(s * per + per, units)) for s in range(splits)]


@given(tokens=st.integers(1, 1 << 20), dim=st.integers(1, 32).map(lambda k: 256 * k),
       block=st.sampled_from([4, 8, 16, 32]), target=st.sampled_from([1, 132, 264, 304, 4096]))
def test_split_plan_covers_every_unit_once_with_no_empty_split(tokens, dim, block, target):
    units = 4 * dim // tl.UNIT
    splits = tl.split_count(tokens, dim, block, target)
    assert 1 <= splits <= units
    runs = _device_runs(splits, units)
    assert all(len(r) > 0 for r in runs)
    assert [u for r in runs for u in r] == list(range(units))
    tiles = math.ceil(tokens / block)
    if tiles >= target:
        assert splits == 1  # prefill: no partial traffic
    else:
        assert splits == units or tiles * splits >= target / 2  # decode: the grid reaches the target


def test_split_plan_at_v4_decode_and_prefill():
    pre = tl.DEFAULTS["mhc_pre"]
    block, target = pre["TOKEN_GROUPS"] * pre["TOKENS"], pre["TARGET_BLOCKS"]
    assert tl.split_count(1, 7168, block, target) == 112  # every 256-wide unit of K = 28672 its own split
    assert tl.split_count(1, 4096, block, target) == 64
    assert tl.split_count(8192, 7168, block, target) == 1


def _on_device(device):
    if device.type == "cpu":
        pytest.skip("TileLang GPU kernels run only on CUDA/ROCm devices (on the CPU they are codegen-verified)")


def _compare(op: str, out, expected) -> None:
    out = out if isinstance(out, tuple) else (out,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for o, e in zip(out, expected):
        ladder.get_check(op).compare(o.cpu(), e)


def _site_weights(dim: int, rows: int = 24):
    hc_fn = torch.randn(rows, 4 * dim) / math.sqrt(4 * dim)
    return hc_fn, torch.tensor([0.5, 0.5, 2.0]) if rows == 24 else torch.tensor([0.8]), 0.5 * torch.randn(rows)


# Several token tiles and uneven splits (37, 130, 300 tokens), a partial dim block (768), the largest dim.
SHAPES = [(768, 37), (4096, 300), (7168, 130), (7168, 2), (8192, 17)]


@pytest.mark.parametrize("dim, T", SHAPES, ids=[f"dim{d}-T{t}" for d, t in SHAPES])
def test_device_pre_head_post_post_pre(device, dim, T):
    _on_device(device)
    x = torch.randn(T, 4, dim).to(torch.bfloat16)
    site, head = _site_weights(dim), _site_weights(dim, rows=4)
    on = lambda *ts: tuple(t.to(device) for t in ts)  # noqa: E731
    _compare("mhc_pre", mhc_pre(*on(x, *site), impl="tilelang"), reference.mhc_pre(x, *site))
    _compare("mhc_head", mhc_head(*on(x, *head), impl="tilelang"), reference.mhc_head(x, *head))
    f, post = torch.randn(T, dim).to(torch.bfloat16), 2 * torch.rand(T, 4)
    comb = torch.rand(T, 4, 4)
    comb = comb / comb.sum(dim=1, keepdim=True)
    _compare("mhc_post", mhc_post(*on(f, x, post, comb), impl="tilelang"), reference.mhc_post(f, x, post, comb))
    out = mhc_post_pre(*on(f, x, post, comb, *site), impl="tilelang")
    _compare("mhc_post", out[0], reference.mhc_post(f, x, post, comb))
    _compare("mhc_pre", out[1:], reference.mhc_pre(out[0].cpu(), *site))


def test_device_sinkhorn_many_tokens(device):
    _on_device(device)
    mixes, scale, base = torch.randn(1000, 24), torch.tensor([0.7, 1.3, 4.0]), 0.3 * torch.randn(24)
    out = mhc_sinkhorn(mixes.to(device), scale.to(device), base.to(device), impl="tilelang")
    _compare("mhc_sinkhorn", out, reference.mhc_sinkhorn(mixes, scale, base))


def test_device_deterministic_and_graph_safe(device):
    """Split-K through a workspace: bit-identical reruns; no host sync: capturable in a CUDA graph."""
    _on_device(device)
    dim, T = 7168, 4
    f = torch.randn(T, dim, device=device).to(torch.bfloat16)
    x = torch.randn(T, 4, dim, device=device).to(torch.bfloat16)
    post, comb = 2 * torch.rand(T, 4, device=device), torch.rand(T, 4, 4, device=device)
    site = tuple(t.to(device) for t in _site_weights(dim))

    def step():
        return mhc_post_pre(f, x, post, comb, *site, impl="tilelang") + mhc_pre(x, *site, impl="tilelang")

    eager = step()
    for a, b in zip(eager, step()):
        assert torch.equal(a, b)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)
