"""The remainder paths of the Triton mHC projection (kernels.mhc.TAIL_PATHS), driven by the tiling plan.

A path only some token counts take (the shorter last split-K chunk, a partly masked token block, a
single split, a partial chunk of partials, out_kernel's last dim block) passes every test that never
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
# (config overrides, {dim: the largest T the interpreter may spend on it}). 768: two OUT_BLOCK_D = 512
# blocks, the second partial. The uneven split-K of the default plan is reached at a model dim (pre:
# V4-Pro, post_pre: V4-Flash, T = 33 each, ~10-20 s in the interpreter); head takes it from grid5.
SMALL_DIM = 768
PLANS = {
    "default": ({}, {SMALL_DIM: 16}),
    "grid5": ({"MIX_PROGRAMS": 5}, {SMALL_DIM: 80}),
}
MODEL_DIM = {"mhc_pre": (7168, 48), "mhc_post_pre": (4096, 48)}


def _config(op: str, overrides: dict) -> dict:
    return {**dispatch.get(op, "triton").defaults, **overrides}


def tail_cases(op: str, plan: str) -> list[tuple[int, int, tuple[str, ...]]]:
    """[(dim, T, paths)]: for each reachable path the smallest T over the plan's dims (ties: the smaller
    dim), cases that share (dim, T) merged."""
    overrides, caps = PLANS[plan]
    if plan == "default" and op in MODEL_DIM:
        caps = {**caps, MODEL_DIM[op][0]: MODEL_DIM[op][1]}
    cfg, best = _config(op, overrides), {}
    for dim, cap in caps.items():
        for path, T in contract.tail_tokens(dim, cfg, cap).items():
            best[path] = min(best.get(path, (T, dim)), (T, dim))
    merged: dict[tuple[int, int], list[str]] = {}
    for path, (T, dim) in best.items():
        merged.setdefault((dim, T), []).append(path)
    return [(dim, T, tuple(paths)) for (dim, T), paths in sorted(merged.items())]


CASES = [(op, plan, dim, T, paths) for op in TAIL_OPS for plan in PLANS for dim, T, paths in tail_cases(op, plan)]


def test_the_cases_reach_every_tail_path():
    for op in TAIL_OPS:
        reached = {p for plan in PLANS for _, _, paths in tail_cases(op, plan) for p in paths}
        assert reached == set(contract.TAIL_PATHS), (op, set(contract.TAIL_PATHS) - reached)
    for op, (dim, _) in MODEL_DIM.items():  # the uneven split-K at a model dim
        assert [d for d, _, paths in tail_cases(op, "default") if "short_last_split" in paths] == [dim], op


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


@pytest.mark.parametrize("op, plan, dim, T, paths", CASES,
                         ids=[f"{op}-{plan}-dim{dim}-T{T}-{'+'.join(paths)}" for op, plan, dim, T, paths in CASES])
def test_every_tail_path_matches_the_reference(op, plan, dim, T, paths, device, monkeypatch):
    backend = "cpu" if device.type == "cpu" else platform.backend_of(device)
    impl = dispatch.get(op, "triton")
    reason = impl.available(backend)
    if reason:
        pytest.skip(f"{op}/triton on {backend}: {reason}")
    for key, value in PLANS[plan][0].items():
        monkeypatch.setitem(impl.defaults, key, value)
    cfg = dispatch.config(impl, platform.device_info(torch.empty(0, device=device)))
    assert set(paths) <= contract.plan_paths(T, dim, cfg)  # a tuned table may move the paths: say so
    run_against_reference(op, T, dim, device)


_BLOCK_CONFIGS = st.fixed_dictionaries({
    "MIX_BLOCK_T": st.sampled_from([16, 32, 64]), "MIX_BLOCK_D": st.sampled_from([16, 32, 64, 128, 256]),
    "MIX_PROGRAMS": st.integers(1, 600), "SPLIT_BLOCK": st.sampled_from([1, 4, 16, 32]),
    "OUT_BLOCK_T": st.sampled_from([1, 2, 4, 8]), "OUT_BLOCK_D": st.sampled_from([128, 256, 512, 1024])})


@given(cfg=_BLOCK_CONFIGS, dim=st.sampled_from(range(256, 8193, 256)), max_tokens=st.integers(1, 3000))
def test_tail_tokens_gives_the_smallest_token_count_of_every_reachable_path(cfg, dim, max_tokens):
    # Brute force over every T: a path is listed iff some T <= max_tokens takes it, at the first such T.
    found = contract.tail_tokens(dim, cfg, max_tokens)
    first: dict[str, int] = {}
    for T in range(1, max_tokens + 1):
        for path in contract.plan_paths(T, dim, cfg):
            first.setdefault(path, T)
    assert found == first
    assert list(found) == [p for p in contract.TAIL_PATHS if p in found]
