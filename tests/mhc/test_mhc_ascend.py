"""The Ascend 950 mHC kernels (backends/ascend/kernels/mhc*.py; README: backends/ascend/README.md).

On a machine without an NPU (here):
- codegen (from the session's `codegen_results`, one compile per op for ascend950): each op's kernels, at
  V4-Flash and V4-Pro dims, and their claims: Cube GEMMs for the projection only, Vector-only SIMT
  kernels for the rest, UB / L1 / L0 within the plan and capacity, the plan's trip counts and tails
  (mhc_source.problems, claim "source_plan");
- the tiling plan in pure Python: budgets at every V4 shape, trip counts, token tails, work items;
- a numpy replay of the tile decomposition (mhc_emulate) against the reference;
- zero tokens returned before any launch; the chip guard and the dispatcher's logged fallback.
On an NPU host (`pytest tests/mhc --backend=ascend`): the kernels against the reference at V4 shapes;
the impl-parametrised tests of test_mhc_ops.py also run `tilelang_ascend` there.
"""
import logging
import math

import numpy as np
import pytest
import torch

from dsv4_kernels import dispatch, ladder, platform
from dsv4_kernels.backends.ascend.kernels import mhc as asc, mhc_emulate as emu, mhc_plan as plan
from dsv4_kernels.ops.mhc import OPS, mhc_head, mhc_post, mhc_post_pre, mhc_pre, mhc_sinkhorn
from dsv4_kernels.reference import mhc as reference

FLASH, PRO = 4096, 7168
IMPL = "tilelang_ascend"


def _site(dim: int, rows: int = 24):
    hc_fn = torch.randn(rows, 4 * dim) / math.sqrt(4 * dim)
    scale = torch.tensor([0.5, 0.5, 2.0]) if rows == 24 else torch.tensor([0.8])
    return hc_fn, scale, 0.5 * torch.randn(rows)


def _x(T: int, dim: int) -> torch.Tensor:
    return torch.randn(T, 4, dim).to(torch.bfloat16)


def _compare(out, expected) -> None:
    out = out if isinstance(out, tuple) else (out,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(out) == len(expected)
    for o, e in zip(out, expected):
        ladder.get_check("mhc_pre").compare(o.cpu(), e)


# --- codegen ---------------------------------------------------------------------------------------

@pytest.mark.codegen
@pytest.mark.parametrize("op", OPS)
def test_codegen(op, codegen_artifacts):
    arts = codegen_artifacts(op, IMPL, "ascend950")
    assert [a.label for a in arts] == [asc.label(k, p) for k, p in asc.CODEGEN_CASES[op]]
    for a in arts:
        assert a.kind == "ascend-c" and a.level == "source", a.label
        assert {"cube_mma", "ub_budget", "source_plan"} <= set(a.claims), (a.label, a.claims)
        assert not a.failed_claims(), (a.label, a.failed_claims())
        assert a.claims["cube_mma"]["expected"] == a.label.startswith("mix"), a.label


def test_codegen_covers_both_v4_dims_per_kernel():
    dims = {}
    for cases in asc.CODEGEN_CASES.values():
        for kind, params in cases:
            if kind != "sinkhorn":
                dims.setdefault(kind, set()).add(params[1])
    assert dims == {"mix": {FLASH, PRO}, "gates": {FLASH, PRO}, "y": {FLASH, PRO}, "post": {FLASH, PRO}}


def test_the_cube_template_issues_mmad():
    """ascend_gemm_l1 (TileLang's Ascend C template the projection lowers to) issues asc_mmad."""
    tilelang = pytest.importorskip("tilelang", reason="tilelang is not installed")
    from pathlib import Path
    header = Path(tilelang.__file__).parent / "src" / "tl_templates" / "ascend" / "gemm.h"
    body = header.read_text().split("ascend_gemm_l1(", 1)[1].split("\n}\n", 1)[0]
    assert "asc_mmad(" in body


# --- the plan ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [1024, FLASH, PRO, 8192])
@pytest.mark.parametrize("T", [1, 3, 16, 17, 301, 4096])
def test_every_kernel_fits_its_buffers(T, dim):
    for kind in ("mix", "gates", "sinkhorn", "y", "post"):
        for rows in ((plan.MIX, plan.HC) if kind in ("mix", "gates") else (plan.MIX,)):
            assert not plan.over_budget(kind, T, dim, rows), plan.budget(kind, T, dim, rows)
    assert plan.budget("post", T, dim)["ub"] <= plan.UB_BYTES  # the largest Vector kernel: 145 KB


def test_trip_counts_at_v4_shapes():
    assert plan.trips("mix", 1, FLASH) == {"token_blocks": 1, "splits": 32, "k_steps": 2}
    assert plan.trips("mix", 3, PRO) == {"token_blocks": 1, "splits": 28, "k_steps": 4}
    assert plan.trips("mix", 301, FLASH) == {"token_blocks": 5, "splits": 4, "k_steps": 16}
    assert plan.trips("mix", 4096, PRO) == {"token_blocks": 64, "splits": 1, "k_steps": 112}
    assert plan.trips("gates", 3, FLASH) == {"token_blocks": 1, "dim_tiles": 4, "lane_steps": 64}
    assert plan.trips("gates", 301, PRO) == {"token_blocks": 76, "dim_tiles": 7, "lane_steps": 64}
    assert plan.trips("post", 301, PRO) == {"token_blocks": 76, "dim_tiles": 7}
    for T in (1, 3, 17, 64, 301, 4096):
        for dim in (FLASH, PRO):
            splits, per = plan.split_k(T, dim)
            assert splits * per * plan.CUBE_K == 4 * dim  # no short or empty split
            assert plan.cdiv(T, plan.cube_m(T)) * splits <= max(plan.BLOCKS, plan.cdiv(T, plan.cube_m(T)))


@pytest.mark.parametrize("T, bt", [(1, 4), (3, 4), (4, 4), (301, 4), (301, 64), (17, 16)])
def test_token_tiles_cover_every_token_once_with_a_short_last_tile(T, bt):
    tiles = plan.token_tiles(T, bt)
    covered = [t for t0, n in tiles for t in range(t0, t0 + n)]
    assert covered == list(range(T))
    assert all(n == bt for _, n in tiles[:-1]) and tiles[-1][1] == T - (len(tiles) - 1) * bt
    assert plan.token_tiles(0, bt) == []


def test_block_items_deal_every_item_to_one_block():
    for items in (1, 7, 32, 33, 140):
        dealt = sorted(i for block in plan.block_items(items) for i in block)
        assert dealt == list(range(items))


# --- the numpy replay of the tile decomposition ------------------------------------------------------

def _np(*ts):
    return tuple(t.float().numpy() for t in ts)


@pytest.mark.parametrize("dim, T", [(FLASH, 3), (PRO, 1), (PRO, 17), (FLASH, 21)])
def test_replay_of_pre_and_head_matches_the_reference(dim, T):
    x = _x(T, dim)
    site = _site(dim)
    y, _, post, comb = emu.pre_gates(*_np(x, *site), 20, 1e-6, 1e-6)
    _compare((torch.from_numpy(y).to(torch.bfloat16), torch.from_numpy(post), torch.from_numpy(comb)),
             reference.mhc_pre(x, *site))
    head = _site(dim, rows=4)
    y, *_ = emu.pre_gates(*_np(x, *head), 1, 1e-6, 1e-6)
    _compare(torch.from_numpy(y).to(torch.bfloat16), reference.mhc_head(x, *head))


def test_replay_projection_is_fp32_accurate():
    """The three bf16 parts reproduce hc_fn exactly, so the Cube sum is the fp32 sum of exact products."""
    hc_fn = _site(PRO)[0].numpy()
    assert np.array_equal(emu.parts(hc_fn)[:, :24].sum(axis=0, dtype=np.float64), hc_fn.astype(np.float64))
    x = _x(5, PRO)
    P = emu.mix(x.reshape(5, -1).float().numpy(), emu.parts(hc_fn), PRO).sum(axis=0)
    exact = x.reshape(5, -1).double() @ torch.from_numpy(hc_fn).double().T
    scale = (x.reshape(5, -1).double().abs() @ torch.from_numpy(hc_fn).double().abs().T)
    assert ((torch.from_numpy(P[:, :24]).double() - exact).abs() <= 2**-20 * scale).all()


@pytest.mark.parametrize("T", [1, 5, 70])
def test_replay_of_sinkhorn_and_post_matches_the_reference(T):
    mixes, scale, base = torch.randn(T, 24), torch.tensor([0.5, 0.5, 2.0]), 0.5 * torch.randn(24)
    out = emu.sinkhorn(*_np(mixes, scale, base), 20, 1e-6)
    _compare(tuple(torch.from_numpy(a) for a in out), reference.mhc_sinkhorn(mixes, scale, base))
    f, x = torch.randn(T, FLASH).to(torch.bfloat16), _x(T, FLASH)
    post, comb = 2 * torch.rand(T, 4), torch.rand(T, 4, 4)
    got = torch.from_numpy(emu.post(*_np(f, x, post, comb))).to(torch.bfloat16)
    _compare(got, reference.mhc_post(f, x, post, comb))


# --- host logic: zero tokens, the guards, the dispatcher ----------------------------------------------

def test_zero_tokens_return_before_any_launch(monkeypatch):
    def no_launch(*args):
        raise AssertionError(f"launched {args[0]} for T = 0")
    monkeypatch.setattr(asc, "_compiled", no_launch)
    x, f = _x(0, FLASH), torch.zeros(0, FLASH, dtype=torch.bfloat16)
    post, comb = torch.zeros(0, 4), torch.zeros(0, 4, 4)
    y, p, c = asc.mhc_pre(x, *_site(FLASH))
    assert y.shape == (0, FLASH) and y.dtype == torch.bfloat16 and p.shape == (0, 4) and c.shape == (0, 4, 4)
    assert asc.mhc_head(x, *_site(FLASH, rows=4)).shape == (0, FLASH)
    assert asc.mhc_post(f, x, post, comb).shape == (0, 4, FLASH)
    assert [t.shape for t in asc.mhc_post_pre(f, x, post, comb, *_site(FLASH))] == [
        (0, 4, FLASH), (0, FLASH), (0, 4), (0, 4, 4)]
    assert [t.shape for t in asc.mhc_sinkhorn(torch.zeros(0, 24), torch.ones(3), torch.zeros(24))] == [
        (0, 4), (0, 4), (0, 4, 4)]


def _npu(monkeypatch, arch: str) -> None:
    monkeypatch.setattr(platform, "device_info", lambda device=None: platform.DeviceInfo("ascend", arch, arch))
    monkeypatch.setenv("ASCEND_HOME_PATH", "/nonexistent/cann")  # available(): CANN "set up"


@pytest.mark.parametrize("arch", ["ascend910b3", "ascend910_9391", "ascend910c"])
def test_910b_and_a3_fall_back_to_the_reference_logged(monkeypatch, caplog, arch):
    _npu(monkeypatch, arch)
    x, site = _x(3, FLASH), _site(FLASH)
    reason = asc.supports_mhc_pre(x, *site)
    assert reason and "Ascend 950 (dav-3510) only" in reason and arch in reason
    monkeypatch.setattr(dispatch, "_warned", set())  # the fallback is logged once per kind: start afresh
    with caplog.at_level(logging.WARNING, logger="dsv4_kernels"):
        decision = dispatch.select("mhc_pre", (x, *site))
    assert decision.chosen.name == "reference"
    assert "tilelang_ascend declined" in decision.fallback_reason and "dav-3510" in decision.fallback_reason
    assert any("falling back to 'reference'" in r.getMessage() and "dav-3510" in r.getMessage()
               for r in caplog.records), caplog.text
    monkeypatch.setenv("DSV4K_STRICT", "1")
    with pytest.raises(dispatch.FallbackError):
        dispatch.select("mhc_head", (x, *_site(FLASH, rows=4)))


def test_ascend_950_selects_the_kernels(monkeypatch):
    _npu(monkeypatch, "ascend950")
    x, site = _x(3, PRO), _site(PRO)
    f, post, comb = torch.zeros(3, PRO, dtype=torch.bfloat16), torch.zeros(3, 4), torch.zeros(3, 4, 4)
    assert dispatch.select("mhc_pre", (x, *site)).chosen.name == IMPL
    assert dispatch.select("mhc_post", (f, x, post, comb)).chosen.name == IMPL
    assert dispatch.select("mhc_sinkhorn", (torch.zeros(3, 24), *site[1:])).chosen.name == IMPL
    odd = _x(3, 1536)  # dim % 256 == 0 but not a multiple of the 1024-column Vector tile
    assert "multiple" in asc.supports_mhc_pre(odd, *_site(1536))
    assert dispatch.select("mhc_pre", (odd, *_site(1536))).chosen.name == "reference"
    big = torch.empty(asc.MAX_TOKENS, 4, 8192, dtype=torch.bfloat16, device="meta")
    assert "int32" in asc.supports_mhc_pre(big, *(t.to("meta") for t in _site(8192)))
    many = torch.empty(2**31 // 24 + 1, 24, device="meta")
    assert "int32" in asc.supports_mhc_sinkhorn(many, *(t.to("meta") for t in site[1:]))


def test_registration_and_lazy_imports():
    import subprocess
    import sys
    for op in OPS:
        impl = dispatch.get(op, IMPL)
        assert impl.backends == ("ascend",) and impl.language == "tilelang"
        assert impl.available("cpu") and impl.available("cuda")
    # registering and asking supports() imports neither tilelang nor torch_npu
    code = ("import sys, torch, dsv4_kernels; from dsv4_kernels import dispatch;"
            "x = torch.zeros(1, 4, 4096, dtype=torch.bfloat16);"
            "from dsv4_kernels.backends.ascend.kernels import mhc;"
            "assert mhc.supports_mhc_pre(x, torch.zeros(24, 16384), torch.ones(3), torch.zeros(24)) is None;"
            "print(sorted(m for m in ('tilelang', 'torch_npu') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# --- on an NPU (pytest --backend=ascend) -------------------------------------------------------------

def _on_npu(device):
    if device.type != "npu":
        pytest.skip("Ascend kernels run only on an Ascend 950 NPU with CANN (here: codegen-source only)")
    reason = asc.chip_reason(torch.empty(0, device=device))
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("dim, T", [(FLASH, 1), (FLASH, 301), (PRO, 3), (PRO, 4096)])
def test_device_ops_match_the_reference(device, dim, T):
    _on_npu(device)
    on = lambda *ts: tuple(t.to(device) for t in ts)  # noqa: E731
    x, site, head = _x(T, dim), _site(dim), _site(dim, rows=4)
    f, post, comb = torch.randn(T, dim).to(torch.bfloat16), 2 * torch.rand(T, 4), torch.rand(T, 4, 4)
    _compare(mhc_pre(*on(x, *site), impl=IMPL), reference.mhc_pre(x, *site))
    _compare(mhc_head(*on(x, *head), impl=IMPL), reference.mhc_head(x, *head))
    _compare(mhc_post(*on(f, x, post, comb), impl=IMPL), reference.mhc_post(f, x, post, comb))
    _compare(mhc_post_pre(*on(f, x, post, comb, *site), impl=IMPL),
             reference.mhc_post_pre(f, x, post, comb, *site))
    mixes = torch.randn(T, 24)
    _compare(mhc_sinkhorn(*on(mixes, *site[1:]), impl=IMPL), reference.mhc_sinkhorn(mixes, *site[1:]))


def test_device_zero_tokens_and_nan(device):
    _on_npu(device)
    x = _x(2, FLASH)
    x[1, 0, 5] = float("nan")
    y, post, comb = mhc_pre(x.to(device), *(t.to(device) for t in _site(FLASH)), impl=IMPL)
    assert torch.isnan(y[1].float().cpu()).all() and not torch.isnan(y[0].float().cpu()).any()
    assert mhc_pre(_x(0, FLASH).to(device), *(t.to(device) for t in _site(FLASH)), impl=IMPL)[0].shape == (0, FLASH)
