"""TileLang (GPU dialect) sources of the routing ops (SPEC 3): one fused launch per op, one source for
sm_90a, sm_100a, gfx942 and gfx950.

One 32-lane group per token, TOKENS tokens per block (32 * TOKENS threads, grid ceil(T / TOKENS)).
score: lane l holds experts e = step * 32 * VEC + l * VEC + v (VEC consecutive experts per vector load,
STEPS loads), so a group reads its row of logits coalesced and every per-expert value lives in registers.
- `score_kernel`: s = sqrt(softplus(logit)), key = s + bias; k rounds of (local best over the lane's
  untaken experts, then a 5-step xor butterfly of (key, expert, s) keeping the larger key, the smaller
  expert among equal keys); the owner lane marks the winner taken and lane j keeps round j's (s, id).
- `hash_kernel`: lane j < k reads tid2eid[token, j] and only the logit it names (k logits per token)
  and forms its s; a NaN among them makes the row's weights NaN.
- `_finish` (both): a butterfly sum of the k lane weights, w / (sum + 1e-20), the scaling factor, NaN
  rows, the shared column (lane k), and lane j stores column j.
E, the logit dtype, top-k and the conventions are compile-time; the token count (and the vocabulary)
are symbolic, so one compile serves every T. The numerics are those of triton.py (README.md): the same
softplus series, the same tie rule, NaN keys select as -inf, invalid ids give id -1 weight 0.
"""
import functools

import torch
import tilelang
import tilelang.language as T

from dsv4_kernels import dispatch, platform
from dsv4_kernels.kernels import routing as shared

LANES = 32                 # one token per 32-lane group (a warp; half a wave64, shuffles of width 32)
NONE = 1 << 30             # "no expert" in the butterfly: loses every comparison of indices
SUM_EPS = 1e-20
INT32_MAX = 2**31 - 1
CODEGEN_EXPERTS = (256, 384)  # V4-Flash, V4-Pro
F32, I32 = "float32", "int32"
TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
ID_DTYPES = {torch.int32: "int32", torch.int64: "int64"}
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2}

# TOKENS: tokens (32-lane groups) per block.
DEFAULTS = {"score_topk": {"TOKENS": 4}, "hash_topk": {"TOKENS": 4}}


def lane_plan(E: int, dtype: str) -> tuple[int, int]:
    """(VEC, STEPS): lane l loads experts step * 32 * VEC + l * VEC + [0, VEC) for step < STEPS.

    VEC divides E (a vector is all inside the row or all past it) and is at most 16 bytes; among those,
    the fewest experts per lane (VEC * STEPS, registers and scan length), then the widest load.
    """
    best = None
    vec = 16 // ELEMENT_BYTES[dtype]
    while vec >= 1:
        if E % vec == 0:
            steps = -(-E // (LANES * vec))
            if best is None or vec * steps < best[0] * best[1]:
                best = (vec, steps)
        vec //= 2
    return best


def _check_config(E: int, topk: int, width: int, tokens: int) -> None:
    if not 1 <= E <= shared.MAX_EXPERTS or not 1 <= topk <= min(E, shared.MAX_TOPK) or width > LANES:
        raise ValueError(f"routing kernel: expected 1 <= topk <= min(E, {shared.MAX_TOPK}) and E <= "
                         f"{shared.MAX_EXPERTS}, got E={E}, topk={topk}")
    if tokens < 1 or LANES * tokens > 1024:
        raise ValueError(f"TOKENS must be in [1, 32] (32 threads per token, <= 1024 per block), got {tokens}")


@T.macro
def _sqrt_softplus(x, sp, dst, i):
    # dst[i] = sqrt(softplus(x)), softplus(x) = max(x, 0) + log1p(exp(-|x|)); log1p(z) = 2 atanh(w),
    # w = z / (2 + z) <= 1/3, by its odd series to w^16 (as triton.py: exp, division, FMAs, sqrt; no fast
    # math, so division and sqrt are IEEE). sp: [3] fp32 scratch (z, w, w^2).
    sp[0] = T.call_pure_extern(F32, "expf", -T.abs(x))  # the precise expf on CUDA and HIP (T.exp: __expf on HIP)
    sp[1] = sp[0] / (2.0 + sp[0])
    sp[2] = sp[1] * sp[1]
    dst[i] = T.sqrt(T.max(x, 0.0) + 2.0 * sp[1] * (((((((((1.0 / 17.0) * sp[2] + 1.0 / 15.0) * sp[2] + 1.0 / 13.0)
                                                        * sp[2] + 1.0 / 11.0) * sp[2] + 1.0 / 9.0) * sp[2] + 1.0 / 7.0)
                                                     * sp[2] + 1.0 / 5.0) * sp[2] + 1.0 / 3.0) * sp[2] + 1.0))


@T.macro
def _load_row(X, row, lane, xv, VEC, STEPS, E, dtype):
    # xv[step * VEC + v] = X[row, step * 32 * VEC + lane * VEC + v]  (vectors past E: 0, never used)
    for step in T.unroll(STEPS):
        if step * LANES * VEC + lane * VEC < E:
            for v in T.vectorized(VEC):
                xv[step * VEC + v] = X[row, step * LANES * VEC + lane * VEC + v]
        else:
            for v in T.vectorized(VEC):
                xv[step * VEC + v] = T.cast(0, dtype)


@T.macro
def _any_lane(flag):
    # flag[0] = max over the 32 lanes of flag[0]
    for o in T.unroll(5):
        flag[0] = T.max(flag[0], T.shfl_xor(flag[0], 16 >> o, LANES))


@T.macro
def _finish(W, IDS, t, n, lane, mine, mine_id, nan, rsf, TOPK, E, SHARED, RENORMALIZE, APPLY_RSF):
    # mine[0] / mine_id[0]: lane j < TOPK holds column j (weight 0 for id -1), other lanes 0.
    tot = T.alloc_local((1,), F32)
    tot[0] = mine[0]
    for o in T.unroll(5):
        tot[0] = tot[0] + T.shfl_xor(tot[0], 16 >> o, LANES)
    if RENORMALIZE:
        mine[0] = mine[0] / (tot[0] + SUM_EPS)                 # w = w / (sum(w) + 1e-20)
    if APPLY_RSF:
        mine[0] = mine[0] * rsf
    if nan[0] > 0:
        mine[0] = T.float32(float("nan"))                      # NaN in, NaN out
    if SHARED:
        if lane == TOPK:
            if APPLY_RSF:
                mine[0] = 1.0
            else:
                mine[0] = 1.0 / rsf
            mine_id[0] = E
    if t < n and lane < TOPK + SHARED:
        W[t, lane] = mine[0]
        IDS[t, lane] = mine_id[0]


def make_score_kernel(E: int, dtype: str, topk: int, shared_experts: int, renormalize: bool, apply_rsf: bool,
                      tokens: int):
    """score_topk: weights, ids [T, topk + shared]; grid ceil(T / tokens), 32 * tokens threads."""
    width = topk + shared_experts
    _check_config(E, topk, width, tokens)
    VEC, STEPS = lane_plan(E, dtype)
    NL = VEC * STEPS
    BV = min(VEC, 4)  # bias: fp32, at most 16 bytes per load
    n = T.dynamic("n")

    @T.prim_func
    def score_kernel(X: T.Tensor((n, E), dtype), BIAS: T.Tensor((E,), F32), W: T.Tensor((n, width), F32),
                     IDS: T.Tensor((n, width), I32), rsf: T.float32):
        with T.Kernel(T.ceildiv(n, tokens), threads=LANES * tokens) as bx:
            tx = T.get_thread_binding()
            lane = tx % LANES
            t = bx * tokens + tx // LANES
            row = T.min(t, n - 1)  # a tail group recomputes the last row and stores nothing
            xv = T.alloc_local((NL,), dtype)
            bv = T.alloc_local((NL,), F32)
            s = T.alloc_local((NL,), F32)
            key = T.alloc_local((NL,), F32)
            sp = T.alloc_local((3,), F32)
            taken = T.alloc_local((1,), I32)
            nan = T.alloc_local((1,), I32)
            best = T.alloc_local((2,), F32)      # (key, s) of the round's best so far
            best_id = T.alloc_local((1,), I32)
            other = T.alloc_local((2,), F32)
            other_id = T.alloc_local((1,), I32)
            mine = T.alloc_local((1,), F32)
            mine_id = T.alloc_local((1,), I32)
            _load_row(X, row, lane, xv, VEC, STEPS, E, dtype)
            for step in T.unroll(STEPS):
                if step * LANES * VEC + lane * VEC < E:
                    for h in T.unroll(VEC // BV):
                        for v in T.vectorized(BV):
                            bv[step * VEC + h * BV + v] = BIAS[step * LANES * VEC + lane * VEC + h * BV + v]
            taken[0] = 0
            nan[0] = 0
            for i in T.unroll(NL):
                _sqrt_softplus(T.cast(xv[i], F32), sp, s, i)
                key[i] = s[i] + bv[i]                                    # selection key s + bias
                if (i // VEC) * LANES * VEC + lane * VEC + i % VEC >= E:
                    taken[0] = taken[0] | (1 << i)                       # past the row: never chosen
                elif T.isnan(key[i]):
                    nan[0] = 1
                    key[i] = -T.infinity(F32)                            # a NaN key selects as -inf
            _any_lane(nan)
            mine[0] = 0.0
            mine_id[0] = 0
            for j in T.unroll(topk):
                best[0] = -T.infinity(F32)
                best[1] = 0.0
                best_id[0] = NONE
                for i in T.unroll(NL):  # experts of a lane ascend with i: the first of equal keys wins
                    if (taken[0] >> i) & 1 == 0 and (key[i] > best[0] or best_id[0] == NONE):
                        best[0] = key[i]
                        best[1] = s[i]
                        best_id[0] = (i // VEC) * LANES * VEC + lane * VEC + i % VEC
                for o in T.unroll(5):
                    other[0] = T.shfl_xor(best[0], 16 >> o, LANES)
                    other[1] = T.shfl_xor(best[1], 16 >> o, LANES)
                    other_id[0] = T.shfl_xor(best_id[0], 16 >> o, LANES)
                    if other[0] > best[0] or (other[0] == best[0] and other_id[0] < best_id[0]):
                        best[0] = other[0]
                        best[1] = other[1]
                        best_id[0] = other_id[0]
                for i in T.unroll(NL):
                    if (i // VEC) * LANES * VEC + lane * VEC + i % VEC == best_id[0]:
                        taken[0] = taken[0] | (1 << i)
                if lane == j:
                    mine[0] = best[1]                                    # w = s.gather(ids)
                    mine_id[0] = best_id[0]
            _finish(W, IDS, t, n, lane, mine, mine_id, nan, rsf, topk, E, shared_experts, renormalize, apply_rsf)

    return score_kernel


def make_hash_kernel(E: int, dtype: str, id_dtype: str, topk: int, shared_experts: int, apply_rsf: bool,
                     tokens: int):
    """hash_topk: weights, ids [T, topk + shared]; grid ceil(T / tokens), 32 * tokens threads. Lane j < topk
    reads tid2eid[token, j] and the one logit it names: k logits per token, never the whole row."""
    width = topk + shared_experts
    _check_config(E, topk, width, tokens)
    n = T.dynamic("n")
    V = T.dynamic("V")

    @T.prim_func
    def hash_kernel(X: T.Tensor((n, E), dtype), TOK: T.Tensor((n,), id_dtype), TABLE: T.Tensor((V, topk), I32),
                    W: T.Tensor((n, width), F32), IDS: T.Tensor((n, width), I32), rsf: T.float32):
        with T.Kernel(T.ceildiv(n, tokens), threads=LANES * tokens) as bx:
            tx = T.get_thread_binding()
            lane = tx % LANES
            t = bx * tokens + tx // LANES
            row = T.min(t, n - 1)
            sp = T.alloc_local((3,), F32)
            nan = T.alloc_local((1,), I32)
            tok = T.alloc_local((1,), id_dtype)
            mine = T.alloc_local((1,), F32)
            mine_id = T.alloc_local((1,), I32)
            tok[0] = TOK[row]
            nan[0] = 0
            mine[0] = 0.0
            mine_id[0] = 0
            if lane < topk:
                mine_id[0] = -1
                if tok[0] >= 0 and tok[0] < V:                           # never wrapped: a bad id reads no row
                    mine_id[0] = TABLE[T.cast(tok[0], I32), lane]       # tid2eid[input_ids]
                    if mine_id[0] < 0 or mine_id[0] >= E:
                        mine_id[0] = -1
                if mine_id[0] >= 0:
                    _sqrt_softplus(T.cast(X[row, mine_id[0]], F32), sp, mine, 0)  # s at the table's expert
                    if T.isnan(mine[0]):
                        nan[0] = 1                                       # a NaN among the row's experts
            _any_lane(nan)
            _finish(W, IDS, t, n, lane, mine, mine_id, nan, rsf, topk, E, shared_experts, True, apply_rsf)

    return hash_kernel


@functools.lru_cache(maxsize=None)
def _compiled(kind: str, target: str, *params):
    maker = make_score_kernel if kind == "score" else make_hash_kernel
    return tilelang.compile(maker(*params), target=target)


def _config(op: str, t: torch.Tensor) -> dict:
    return dispatch.config(dispatch.get(op, "tilelang"), platform.device_info(t))


def _outputs(x: torch.Tensor, n: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((n, width), dtype=torch.float32, device=x.device),
            torch.empty((n, width), dtype=torch.int32, device=x.device))


def score_topk(router_logits, bias, topk=6, routed_scaling_factor=1.0, num_fused_shared_experts=0,
               apply_routed_scaling_factor_on_output=False, renormalize=True):
    n, E = router_logits.shape
    weights, ids = _outputs(router_logits, n, topk + num_fused_shared_experts)
    if n == 0:
        return weights, ids
    cfg = _config("score_topk", router_logits)
    kernel = _compiled("score", platform.tilelang_target(router_logits), E, TL_DTYPES[router_logits.dtype], topk,
                       num_fused_shared_experts, bool(renormalize), bool(apply_routed_scaling_factor_on_output),
                       cfg["TOKENS"])
    kernel(router_logits, bias, weights, ids, float(routed_scaling_factor))
    return weights, ids


def hash_topk(router_logits, input_ids, tid2eid, num_fused_shared_experts=0, routed_scaling_factor=1.0,
              apply_routed_scaling_factor_on_output=False):
    n, E = router_logits.shape
    topk = tid2eid.shape[1]
    weights, ids = _outputs(router_logits, n, topk + num_fused_shared_experts)
    if n == 0:
        return weights, ids
    cfg = _config("hash_topk", router_logits)
    kernel = _compiled("hash", platform.tilelang_target(router_logits), E, TL_DTYPES[router_logits.dtype], ID_DTYPES[input_ids.dtype],
                       topk, num_fused_shared_experts, bool(apply_routed_scaling_factor_on_output), cfg["TOKENS"])
    kernel(router_logits, input_ids, tid2eid, weights, ids, float(routed_scaling_factor))
    return weights, ids


def _count_reason(name: str, count: int) -> str | None:
    if count > INT32_MAX:
        return f"{name}: {count} exceeds the int32 {name} count of the TileLang kernels ({INT32_MAX})"
    return None


def _aligned_reason(name: str, t: torch.Tensor, nbytes: int) -> str | None:
    """TileLang emits vector loads without an alignment check (Triton specialises instead)."""
    if nbytes > 1 and t.data_ptr() % nbytes:
        return (f"{name}: the TileLang kernels load {nbytes}-byte vectors, data_ptr {t.data_ptr():#x} is not "
                f"{nbytes}-byte aligned")
    return None


def supports_score_topk(router_logits, bias, topk=6, routed_scaling_factor=1.0, num_fused_shared_experts=0,
                        apply_routed_scaling_factor_on_output=False, renormalize=True) -> str | None:
    reason = shared.supports_score_topk(router_logits, bias, topk, routed_scaling_factor, num_fused_shared_experts,
                                        apply_routed_scaling_factor_on_output, renormalize)
    if reason:
        return reason
    n, E = router_logits.shape
    vec, _ = lane_plan(E, TL_DTYPES[router_logits.dtype])
    return (_count_reason("token", n)
            or _aligned_reason("router_logits", router_logits, vec * router_logits.element_size())
            or _aligned_reason("bias", bias, 4 * min(vec, 4)))


def supports_hash_topk(router_logits, input_ids, tid2eid, num_fused_shared_experts=0, routed_scaling_factor=1.0,
                       apply_routed_scaling_factor_on_output=False) -> str | None:
    return (shared.supports_hash_topk(router_logits, input_ids, tid2eid, num_fused_shared_experts,
                                      routed_scaling_factor, apply_routed_scaling_factor_on_output)
            or _count_reason("token", router_logits.shape[0]) or _count_reason("table row", tid2eid.shape[0]))


def _codegen_config(op: str) -> dict:
    return dict(dispatch.get(op, "tilelang").defaults)


def codegen_score_topk(target) -> list:
    from dsv4_kernels.codegen import TileLangKernel
    tokens = _codegen_config("score_topk")["TOKENS"]
    return [TileLangKernel(make_score_kernel(E, dtype, 6, 1, True, False, tokens), label=f"E{E}-{label}")
            for E, dtype, label in zip(CODEGEN_EXPERTS, ("float32", "bfloat16"), ("fp32", "bf16"))]


def codegen_hash_topk(target) -> list:
    from dsv4_kernels.codegen import TileLangKernel
    tokens = _codegen_config("hash_topk")["TOKENS"]
    cases = zip(CODEGEN_EXPERTS, ("float32", "bfloat16"), ("fp32", "bf16"), ("int64", "int32"))
    return [TileLangKernel(make_hash_kernel(E, dtype, ids, 6, 1, False, tokens), label=f"E{E}-{label}-ids{ids[3:]}")
            for E, dtype, label, ids in cases]
