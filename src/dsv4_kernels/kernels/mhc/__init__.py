"""mHC kernels (SPEC 4): triton.py and tilelang.py, one source each for every GPU target.

This module holds what both languages share and what needs no toolchain: the shape contract the
kernels were built for (the `supports_*` guards the dispatcher asks before a launch) and the split-K
plan of the RMS-scaled projection (how many K splits, hence the workspace shapes). See README.md.
"""
from __future__ import annotations

import torch

HC_MULT = 4
MIX_ROWS = (2 + HC_MULT) * HC_MULT  # 24: pre gates, post gates, the 4 x 4 comb logits
DIM_MULTIPLE = 256
MAX_DIM = 8192

__all__ = ["HC_MULT", "MIX_ROWS", "DIM_MULTIPLE", "MAX_DIM", "TAIL_PATHS", "cdiv", "split_plan", "workspace_shapes",
           "PHASES", "phase_of", "phase_config", "launch_plan", "plan_paths", "tail_tokens",
           "supports_mhc_sinkhorn", "supports_mhc_pre", "supports_mhc_post", "supports_mhc_head",
           "supports_mhc_post_pre"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_plan(T: int, dim: int, block_t: int, block_d: int, programs: int) -> tuple[int, int]:
    """(splits, tiles_per_split) of the split-K projection over K = 4 * dim.

    Split s owns dim tiles [s * tiles_per_split, (s + 1) * tiles_per_split) of BLOCK_D columns, for all
    4 streams. Splits are added until the grid (token blocks x splits) reaches `programs` or every
    split holds one tile: decode (few token blocks) spreads the hc_fn read over many programs, prefill
    (many token blocks) keeps one split and no partial traffic. The plan depends on T, so the fp32
    summation order (deterministic for a given T and config) may differ between batch sizes.
    """
    tiles = cdiv(dim, block_d)
    want = max(1, min(tiles, cdiv(programs, max(1, cdiv(T, block_t)))))
    per = cdiv(tiles, want)
    return cdiv(tiles, per), per


def workspace_shapes(T: int, dim: int, rows: int, block_t: int, block_d: int,
                     programs: int) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """Shapes of the fp32 split-K workspace: partial mixes [splits, T, rows], sums of squares [splits, T]."""
    splits, _ = split_plan(T, dim, block_t, block_d, programs)
    return (splits, T, rows), (splits, T)


# The remainder paths of one mix_kernel + out_kernel launch (plan_paths): each is a branch or a mask that
# only some token counts take, so a test that never reaches it cannot see it broken.
TAIL_PATHS = (
    "mix_token_tail",    # the last token block of mix_kernel is partly masked (T % MIX_BLOCK_T != 0)
    "short_last_split",  # the last split owns fewer tiles than the others (splits * per > tiles)
    "single_split",      # one split: no split-K, the workspace holds the whole projection
    "split_sum_tail",    # out_kernel's tree over next_power_of_2(splits) partials has masked lanes
    "out_token_tail",    # the last token block of out_kernel is partly masked (T % OUT_BLOCK_T != 0)
    "out_dim_tail",      # out_kernel's last dim block is partly masked (dim % OUT_BLOCK_D != 0)
)


PHASES = ("decode", "prefill")  # chosen by T; "invariant" (batch-invariant mode) is chosen by the caller


def phase_of(T: int, cfg: dict) -> str:
    """"prefill" when T >= cfg["PREFILL_MIN_T"] (absent: never), else "decode"."""
    return "prefill" if T >= cfg.get("PREFILL_MIN_T", float("inf")) else "decode"


_PREFIXES = ("PREFILL_", "INVARIANT_")


def phase_config(cfg: dict, phase: str) -> dict:
    """The flat config one launch uses: `cfg` without its PREFILL_* and INVARIANT_* keys, and for phase
    "prefill" (or "invariant") each PREFILL_<KEY> (INVARIANT_<KEY>) given as <KEY>, so a tuned table
    overrides any phase key by key."""
    if phase not in (*PHASES, "invariant"):
        raise ValueError(f"phase: expected one of {(*PHASES, 'invariant')}, got {phase!r}")
    out = {k: v for k, v in cfg.items() if not k.startswith(_PREFIXES)}
    if phase != "decode":
        prefix = f"{phase.upper()}_"
        out.update({k[len(prefix):]: v for k, v in cfg.items() if k.startswith(prefix) and k != "PREFILL_MIN_T"})
    return out


def launch_plan(T: int, dim: int, cfg: dict, invariant: bool = False) -> tuple[dict, int, int]:
    """(the phase config, splits, tiles_per_split) that mhc_pre / mhc_head / mhc_post_pre launch with at
    T tokens under the op's config `cfg`. invariant (batch-invariant mode): the "invariant" config and
    the split plan of one token block, whatever T, so every token's fp32 summation order (hence its
    bits) is the same in any batch."""
    if invariant:
        run = phase_config(cfg, "invariant")
        return (run, *split_plan(1, dim, run["MIX_BLOCK_T"], run["MIX_BLOCK_D"], run["MIX_PROGRAMS"]))
    run = phase_config(cfg, phase_of(T, cfg))
    return (run, *split_plan(T, dim, run["MIX_BLOCK_T"], run["MIX_BLOCK_D"], run["MIX_PROGRAMS"]))


def plan_paths(T: int, dim: int, cfg: dict) -> frozenset[str]:
    """The TAIL_PATHS that mhc_pre / mhc_head / mhc_post_pre take at T >= 1 tokens of `dim` under the
    op's config `cfg` (in the phase config for T: MIX_BLOCK_T, MIX_BLOCK_D, MIX_PROGRAMS, OUT_BLOCK_T,
    OUT_BLOCK_D)."""
    run, splits, per = launch_plan(T, dim, cfg)
    taken = {
        "mix_token_tail": T % run["MIX_BLOCK_T"] != 0,
        "short_last_split": splits * per > cdiv(dim, run["MIX_BLOCK_D"]),
        "single_split": splits == 1,
        "split_sum_tail": splits & (splits - 1) != 0,
        "out_token_tail": T % run["OUT_BLOCK_T"] != 0,
        "out_dim_tail": dim % run["OUT_BLOCK_D"] != 0,
    }
    return frozenset(p for p, hit in taken.items() if hit)


def _candidates(cfg: dict, max_tokens: int) -> list[int]:
    # Within one phase the plan depends on T only through n = cdiv(T, MIX_BLOCK_T), so the first T of
    # each block count is the first to take that count's split paths; the token-tail paths (T modulo a
    # block size > 1) are first taken at a phase's first T or the one after; out_dim_tail at any T.
    start = min(cfg.get("PREFILL_MIN_T", max_tokens + 1), max_tokens + 1)
    out = set()
    for lo, hi, phase in ((1, start, "decode"), (start, max_tokens + 1, "prefill")):
        if lo >= hi:
            continue
        bt = phase_config(cfg, phase)["MIX_BLOCK_T"]
        out.update(T for T in (lo, lo + 1) if T < hi)
        out.update(range((cdiv(lo, bt)) * bt + 1, hi, bt))
    return sorted(out)


def tail_tokens(dim: int, cfg: dict, max_tokens: int, phase: str | None = None) -> dict[str, int]:
    """{path: the smallest T in [1, max_tokens] that takes it} for every TAIL_PATHS entry some such T
    takes (in `phase` only, when given); paths no such T reaches are left out (the caller asserts what
    it needs). Walks the token-block counts of each phase, not every T (a property test checks it
    against every T)."""
    found: dict[str, int] = {}
    for T in _candidates(cfg, max_tokens):
        if phase is None or phase_of(T, cfg) == phase:
            for path in plan_paths(T, dim, cfg):
                found.setdefault(path, T)
    return {p: found[p] for p in TAIL_PATHS if p in found}


def _residual_reason(x) -> str | None:
    if x.dtype != torch.bfloat16:
        return f"x must be bf16, got {x.dtype}"
    if x.dim() != 3 or x.shape[1] != HC_MULT:
        return f"x must be [T, {HC_MULT}, dim] (hc_mult {HC_MULT}), got {tuple(x.shape)}"
    if not x.is_contiguous():
        return "x must be contiguous"
    dim = x.shape[2]
    if dim % DIM_MULTIPLE or not 0 < dim <= MAX_DIM:
        return (f"built for hidden sizes that are multiples of {DIM_MULTIPLE} up to {MAX_DIM} "
                f"(4096 V4-Flash, 7168 V4-Pro), got dim {dim}")
    return None


def _iters_reason(iters) -> str | None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        return f"iters must be an int >= 1, got {iters!r}"
    return None


def _fp32_contiguous(**tensors) -> str | None:
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            return f"{name} must be fp32, got {t.dtype}"
        if not t.is_contiguous():
            return f"{name} must be contiguous"
    return None


def supports_mhc_sinkhorn(mixes, hc_scale, hc_base, hc_mult=4, iters=20, eps=1e-6) -> str | None:
    if hc_mult != HC_MULT:
        return f"built for hc_mult {HC_MULT}, got {hc_mult}"
    if mixes.dim() != 2 or mixes.shape[1] != MIX_ROWS:
        return f"mixes must be [T, {MIX_ROWS}], got {tuple(mixes.shape)}"
    return _iters_reason(iters) or _fp32_contiguous(mixes=mixes, hc_scale=hc_scale, hc_base=hc_base)


def supports_mhc_pre(x, hc_fn, hc_scale, hc_base, iters=20, eps=1e-6, norm_eps=1e-6) -> str | None:
    return (_residual_reason(x) or _iters_reason(iters)
            or _fp32_contiguous(hc_fn=hc_fn, hc_scale=hc_scale, hc_base=hc_base))


def supports_mhc_post(f, x, post, comb) -> str | None:
    if f.dtype != torch.bfloat16:
        return f"f must be bf16, got {f.dtype}"
    if not f.is_contiguous():
        return "f must be contiguous"
    return _residual_reason(x) or _fp32_contiguous(post=post, comb=comb)


def supports_mhc_head(x, hc_fn, hc_scale, hc_base, eps=1e-6, norm_eps=1e-6) -> str | None:
    return _residual_reason(x) or _fp32_contiguous(hc_fn=hc_fn, hc_scale=hc_scale, hc_base=hc_base)


def supports_mhc_post_pre(f, x, post, comb, hc_fn, hc_scale, hc_base, iters=20, eps=1e-6,
                          norm_eps=1e-6) -> str | None:
    return supports_mhc_post(f, x, post, comb) or supports_mhc_pre(x, hc_fn, hc_scale, hc_base, iters)
