"""What the Ascend C source of each mHC kernel must show, checked against the tiling plan (mhc_plan).

`problems(kind, params, text)` lists what does not hold; codegen runs it on every artifact (claim
"source_plan", so `dsv4k check` and tests/test_codegen.py fail on any of them):
- mix: a mixed Cube + Vector kernel whose AIC branch issues exactly three Cube GEMMs of the plan's tile
  (M tokens x 256 K x padded rows), L0A / L0B stages and L1 within the plan, the K-step loop of the
  plan's split, the L0C tile drained to UB (asc_copy_l0c2ub), the token tail clipped on the x load.
- gates / sinkhorn: a Vector-only kernel (no Cube call) of SIMT vector functions, with the plan's trip
  counts (splits, dim tiles, lane steps, the iters - 1 row/column rounds of Sinkhorn), exp and rsqrt.
- y / post: Vector-only, SIMT, the token tail of a short tile clipped on the loads and the store.
- every kernel: the UB (and L1) offsets in the source within the plan's bytes, and those within capacity.
"""
from __future__ import annotations

import re

from dsv4_kernels.backends.ascend.kernels import mhc_plan as plan


def _loop(text: str, var: str, trips: int) -> bool:
    return re.search(rf"for \(int32_t {var} = 0; {var} < {trips}; \+\+{var}\)", text) is not None


def _extents(text: str) -> dict[str, int]:
    from dsv4_kernels.codegen import ascend_buffer_extents
    return ascend_buffer_extents(text)


def problems(kind: str, params: tuple, text: str) -> list[str]:
    from dsv4_kernels.codegen import ascend_cube_calls
    out: list[str] = []
    n = params[0]
    dim = params[1] if kind != "sinkhorn" else 0
    rows = params[2] if kind in ("mix", "gates") else plan.MIX
    buffers = plan.budget(kind, n, dim, rows)
    for scope, used in _extents(text).items():
        if scope in ("ub", "l1") and used > buffers.get(scope, 0):
            out.append(f"{scope}: the source places data at {used} B, past the plan's {buffers.get(scope, 0)} B")
        if scope in ("l0a", "l0b") and used != buffers.get(scope, 0):
            out.append(f"{scope}: the Cube GEMM stages take {used} B, the plan {buffers.get(scope, 0)} B")
    out += plan.over_budget(kind, n, dim, rows)
    cube = ascend_cube_calls(text)
    if kind == "mix":
        m, npad = plan.cube_m(n), plan.padded_rows(rows)
        want = f"ascend_gemm_l1<{m}, {plan.CUBE_K}, {npad}, {plan.CUBE_K}, true, bfloat16_t>"
        if cube != [want] * 3:
            out.append(f"expected three Cube GEMMs {want} on the AIC, found {cube}")
        _, per = plan.split_k(n, dim)
        if per > 1 and not _loop(text, "kk", per):
            out.append(f"no K-step loop of {per} trips (plan: split_k{(n, dim)})")
        if "asc_copy_l0c2ub" not in text:
            out.append("the L0C tile is not drained to UB (asc_copy_l0c2ub)")
        if n < m and not re.search(rf"asc_copy_gm2l1_nd2nz\([^;]*&\(X\[[^;]*, {n}, {plan.CUBE_K}, 0, 0\)", text):
            out.append(f"the x load of the short token tile is not clipped to {n} rows")
        return out
    if cube or "__vector__" not in text:
        out.append(f"{kind}: expected a Vector-only kernel, found Cube calls {cube}" if cube
                   else f"{kind}: the kernel is not a __vector__ kernel")
    if "__simt_vf__" not in text or "asc_vf_call" not in text:
        out.append(f"{kind}: no SIMT vector function")
    if kind in ("gates", "sinkhorn"):
        iters = params[1] if kind == "sinkhorn" else params[4]
        head = kind == "gates" and rows == plan.HC
        if "expf" not in text:
            out.append(f"{kind}: no exp (sigmoid / softmax)")
        rounds = re.findall(r"for \(int32_t _\w* = 0; _\w* < (\d+);", text)
        if head and rounds:
            out.append(f"the head has no Sinkhorn, found a {rounds} round loop")
        if not head and iters > 2 and rounds != [str(iters - 1)]:
            out.append(f"Sinkhorn: expected one loop of {iters - 1} row/column rounds, found {rounds}")
    if kind == "gates":
        splits = params[3]
        for var, trips in (("dd", dim // plan.DIM_TILE), ("c", plan.trips("gates", n, dim)["lane_steps"]),
                           ("lane", plan.LANES), ("s", splits)):
            if trips > 1 and not _loop(text, var, trips):
                out.append(f"gates: no {var} loop of {trips} trips")
        if "rsqrtf" not in text:
            out.append("gates: no rsqrt (RMS scale)")
    if kind in ("y", "post"):
        bt = plan.VEC_TOKENS[kind]
        if n < bt:  # one short tile: its loads and store move exactly the n tokens
            store = "Y" if kind == "y" else "O"
            rows_out = n if kind == "y" else plan.HC * n
            if not re.search(rf"&\(X\[[^;]*\)\)\), {plan.HC * n}, {plan.DIM_TILE * 2},", text):
                out.append(f"{kind}: the x load of the short tile is not {plan.HC * n} rows")
            if not re.search(rf"&\({store}\[[^;]*\)\)\), {rows_out}, {plan.DIM_TILE * 2},", text):
                out.append(f"{kind}: the store of the short tile is not {rows_out} rows")
    return out
