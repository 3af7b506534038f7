"""The remainder paths of the Triton mHC projection (kernels.mhc.TAIL_PATHS), driven by the tiling plan.

A path only some token counts take (the shorter last split-K chunk, a partly masked token block, a
single split, masked lanes in the sum of partials, out_kernel's last dim block) passes every test that never
reaches it, however broken. The token counts come from `tail_tokens`, computed from the kernel's own
config and split plan, so a retuned config moves the tests with it. For each path the cheapest case is
taken (the smallest T over a small dim and the two model dims, capped for the interpreter); a second
config with a grid of 5 programs reaches the single-split path and an uneven split at small T (the
default needs T >= 4081 for one split). A property test checks that the lists cover every path.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_kernels import dispatch, ladder, platform
from dsv4_kernels.kernels import mhc as contract
from dsv4_kernels.ops import mhc as ops
from dsv4_kernels.reference import mhc as reference

TAIL_OPS = ("mhc_pre", "mhc_head", "mhc_post_pre")
compare = ladder.get_check("mhc_pre").compare
# Per phase (decode below PREFILL_MIN_T, prefill from there): {plan: (config overrides, {dim: the largest
# T the interpreter may spend on it}, the paths it is run for or None for all)}; a path is run in the
# first plan that reaches it, at its smallest T there. 768: two OUT_BLOCK_D = 512 blocks, the second
# partial. "v4": the uneven split-K of the default plan at V4-Pro (mhc_pre, T = 33: 75 splits of 3
# tiles, the last of 2; ~10 s in the interpreter, so the other ops take it at 768); grids of 5 and 1 programs
# reach an uneven split and one split at T = 1 (the defaults need T >= 4081 for one split); the
# prefill plans start that phase at T = 1.
SMALL_DIM = 768
MODEL_DIM = {"mhc_pre": (7168, 48)}
PLANS = {
    "decode": {"v4": ({}, None, ("short_last_split",)), "default": ({}, {SMALL_DIM: 16}, None),
               "grid5": ({"MIX_PROGRAMS": 5}, {SMALL_DIM: 16}, None),
               "grid1": ({"MIX_PROGRAMS": 1}, {SMALL_DIM: 16}, None)},
    "prefill": {"prefill": ({"PREFILL_MIN_T": 1}, {SMALL_DIM: 16}, None),
                "prefill-grid5": ({"PREFILL_MIN_T": 1, "PREFILL_MIX_PROGRAMS": 5}, {SMALL_DIM: 16}, None),
                "prefill-grid1": ({"PREFILL_MIN_T": 1, "PREFILL_MIX_PROGRAMS": 1}, {SMALL_DIM: 16}, None)},
}


def _config(op: str, overrides: dict) -> dict:
    return {**dispatch.get(op, "triton").defaults, **overrides}


def _overrides(plan: str) -> dict:
    return next(plans[plan][0] for plans in PLANS.values() if plan in plans)


def tail_cases(op: str, phase: str) -> list[tuple[str, int, int, tuple[str, ...]]]:
    """[(plan, dim, T, paths)]: each path the phase reaches, in the first plan reaching it at its smallest
    T there (ties: the smaller dim); cases that share (plan, dim, T) merged."""
    best: dict[str, tuple] = {}
    for rank, (plan, (overrides, caps, wanted)) in enumerate(PLANS[phase].items()):
        if caps is None:  # the model-dim plan
            caps = dict([MODEL_DIM[op]]) if op in MODEL_DIM else {}
        for dim, cap in caps.items():
            for path, T in contract.tail_tokens(dim, _config(op, overrides), cap, phase).items():
                if wanted is None or path in wanted:
                    best[path] = min(best.get(path, (rank, T, dim, plan)), (rank, T, dim, plan))
    merged: dict[tuple, list[str]] = {}
    for path, key in best.items():
        merged.setdefault(key, []).append(path)
    return [(plan, dim, T, tuple(paths)) for (_, T, dim, plan), paths in sorted(merged.items())]


CASES = [(op, phase, *case) for op in TAIL_OPS for phase in PLANS for case in tail_cases(op, phase)]


def test_the_cases_reach_every_tail_path_in_both_phases():
    for op in TAIL_OPS:
        for phase in PLANS:
            reached = {p for *_, paths in tail_cases(op, phase) for p in paths}
            assert reached == set(contract.TAIL_PATHS), (op, phase, set(contract.TAIL_PATHS) - reached)
    for op, (dim, _) in MODEL_DIM.items():  # the uneven split-K of the default plan at a model dim
        assert [(plan, d, T) for plan, d, T, paths in tail_cases(op, "decode") if "short_last_split" in paths] == [
            ("v4", dim, 33)], op


def _site(dim: int, rows: int):
    hc_fn = torch.randn(rows, 4 * dim) / math.sqrt(4 * dim)
    hc_scale = torch.tensor([0.5, 0.5, 2.0]) if rows == 24 else torch.tensor([0.8])
    return hc_fn, hc_scale, 0.5 * torch.randn(rows)


def run_against_reference(op: str, T: int, dim: int, device) -> None:
    """One call of the Triton op at (T, dim) against the reference given the same inputs."""
    x = torch.randn(T, 4, dim).to(torch.bfloat16)
    site = _site(dim, 4 if op == "mhc_head" else 24)
    on = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    if op == "mhc_head":
        compare(ops.mhc_head(*on(x, *site), impl="triton").cpu(), reference.mhc_head(x, *site))
        return
    if op == "mhc_pre":
        out, expected = ops.mhc_pre(*on(x, *site), impl="triton"), reference.mhc_pre(x, *site)
    else:
        f = torch.randn(T, dim).to(torch.bfloat16)
        comb = torch.rand(T, 4, 4)
        post, comb = 2 * torch.rand(T, 4), comb / comb.sum(dim=1, keepdim=True)
        x_new, *out = ops.mhc_post_pre(*on(f, x, post, comb, *site), impl="triton")
        compare(x_new.cpu(), reference.mhc_post(f, x, post, comb))
        expected = reference.mhc_pre(x_new.cpu(), *site)
    for o, e in zip(out, expected):
        compare(o.cpu(), e)


@pytest.mark.parametrize("op, phase, plan, dim, T, paths", CASES,
                         ids=[f"{op}-{plan}-dim{dim}-T{T}-{'+'.join(paths)}" for op, _, plan, dim, T, paths in CASES])
def test_every_tail_path_matches_the_reference(op, phase, plan, dim, T, paths, device, monkeypatch):
    backend = "cpu" if device.type == "cpu" else platform.backend_of(device)
    impl = dispatch.get(op, "triton")
    reason = impl.available(backend)
    if reason:
        pytest.skip(f"{op}/triton on {backend}: {reason}")
    for key, value in _overrides(plan).items():
        monkeypatch.setitem(impl.defaults, key, value)
    cfg = dispatch.config(impl, platform.device_info(torch.empty(0, device=device)))
    # a tuned table may move the paths: say so rather than test something else
    assert contract.phase_of(T, cfg) == phase and set(paths) <= contract.plan_paths(T, dim, cfg)
    run_against_reference(op, T, dim, device)


_BLOCK_CONFIGS = st.fixed_dictionaries({
    "MIX_BLOCK_T": st.sampled_from([16, 32, 64]), "MIX_BLOCK_D": st.sampled_from([16, 32, 64, 128, 256]),
    "MIX_PROGRAMS": st.integers(1, 600),
    "OUT_BLOCK_T": st.sampled_from([1, 2, 4, 8]), "OUT_BLOCK_D": st.sampled_from([128, 256, 512, 1024])})


_PREFILL_CONFIGS = st.one_of(st.just({}), st.builds(
    lambda start, blocks: {"PREFILL_MIN_T": start, **{f"PREFILL_{k}": v for k, v in blocks.items()}},
    st.integers(1, 3000), _BLOCK_CONFIGS))


@given(cfg=_BLOCK_CONFIGS, prefill=_PREFILL_CONFIGS, dim=st.sampled_from(range(256, 8193, 256)),
       max_tokens=st.integers(1, 3000))
def test_tail_tokens_gives_the_smallest_token_count_of_every_reachable_path(cfg, prefill, dim, max_tokens):
    # Brute force over every T: a path is listed iff some T <= max_tokens (of the phase) takes it, at the
    # first such T.
    cfg = {**cfg, **prefill}
    for phase in (None, *contract.PHASES):
        found = contract.tail_tokens(dim, cfg, max_tokens, phase)
        first: dict[str, int] = {}
        for T in range(1, max_tokens + 1):
            if phase in (None, contract.phase_of(T, cfg)):
                for path in contract.plan_paths(T, dim, cfg):
                    first.setdefault(path, T)
        assert found == first, phase
        assert list(found) == [p for p in contract.TAIL_PATHS if p in found]
