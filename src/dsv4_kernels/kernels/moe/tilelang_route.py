"""TileLang (GPU dialect) source of the FP4 MoE's token permutation by expert and its inverse combine
(SPEC 5), the same functions, outputs and bits as triton_route.py, for sm_90a, sm_100a, gfx942 and gfx950.
Every buffer is sized by the shapes alone (S = T * k rows, E experts): no host sync, no `.item()`,
CUDA-graph capturable. The TileLang fp4_grouped_moe (tilelang.py) composes them.

permute_kernel, one block of THREADS threads (grid 1): slot s = t * k + j has the local expert e(s) =
topk_ids[s], or expert_map[topk_ids[s]] under expert parallelism; an id outside [0, E_global) (-1
included) or a map entry outside [0, E) makes the slot invalid, and nothing is read through it (the map
index is also clamped to 0 where it is not read, never wrapped). Passes, with a barrier between each:
  1. per CHUNK slots (one per thread): the slots' experts to shared memory; barrier; each slot counts the
     earlier and later slots of its expert in the chunk (a CHUNK-long loop over shared memory), its rank
     is the expert's running count plus the earlier ones (written to the `rank` workspace); barrier; the
     last slot of each expert in the chunk advances the running count; barrier;
  2. one thread takes the exclusive prefix sum of the counts (`offsets`, offsets[E] the valid rows);
     barrier; counts and offsets are stored, rows past offsets[E] are padding (expert -1, token -1,
     weight 0); barrier;
  3. the scatter: row offsets[e] + rank of a valid slot s gets token s / k, expert e and weight w[s], and
     inv[s] is that row (-1 for an invalid slot).
The order is stable (token order within an expert) and deterministic, no atomics. E and k are compile-time
(E up to 1024, k up to 16), the slot and map lengths symbolic.

combine_kernel, grid (T, ceil(dim / BLOCK_D)), one block per (token, BLOCK_D channels): y[t, d] = the
fp32 sum over the token's slots of y_sorted[inv[t, j], d] (an invalid slot, inv -1 or past the rows, adds
+0), rounded to bf16 to nearest even by integer ops (NaN: the top half with the quiet bit set), as
triton_route.combine_kernel: the same pairwise tree over K_PAD = max(2, next_pow2(k)) lanes (lanes past k
add +0, so -0 sums give what Triton gives), which is how Triton 3.9 reduces the lanes a thread holds
(checked against its PTX: tests/moe/test_moe_tilelang_route.py). bf16 is read and written as its 16-bit
pattern (uint16 buffers: the fp32 value is the pattern << 16, exact). dim and K_PAD are compile-time,
T and k symbolic (k symbolic so that the lanes past k are run-time zeros: a literal 0.0 would be folded
away by TVM's simplifier, turning -0 + 0 into -0).
"""
from __future__ import annotations

import functools

import torch
import tilelang
import tilelang.language as T

from dsv4_kernels import platform

I32, F32, U16, U32 = "int32", "float32", "uint16", "uint32"
PERMUTE_THREADS = 256           # = PERMUTE_CHUNK: one slot per thread and chunk step
PERMUTE_CHUNK = 256
COMBINE_BLOCK_D = 1024          # channels per combine block (8 per thread)
COMBINE_THREADS = 128
MAX_EXPERTS = 1024
MAX_TOPK = 16


def make_permute_kernel(E: int, K: int, has_map: bool, chunk: int = PERMUTE_CHUNK, threads: int = PERMUTE_THREADS):
    """permute_kernel for E local experts and top-k K (see the module docstring). Arguments: IDS [S] int32
    (topk_ids flattened), MAP [E_global] int32 (expert_map; any int32 tensor when has_map is False: never
    read), W [S] fp32, then the outputs COUNTS [E], OFFSETS [E + 1], the workspace RANK [S], TOK [S],
    EXP [S] int32, ROWW [S] fp32 and INV [S] int32."""
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"n_experts must be in [1, {MAX_EXPERTS}], got {E}")
    if not 1 <= K <= MAX_TOPK:
        raise ValueError(f"top-k must be in [1, {MAX_TOPK}], got {K}")
    if chunk != threads:
        raise ValueError(f"chunk must equal threads (one slot per thread), got chunk {chunk}, threads {threads}")
    C = chunk
    EB = (E + C - 1) // C                          # experts per thread, rounded up
    S = T.dynamic("S")
    EG = T.dynamic("E_global")
    # one thread (the C target's form): no shared memory there, the same buffers as locals
    smem = T.alloc_shared if C > 1 else T.alloc_local

    @T.prim_func
    def permute_kernel(IDS: T.Tensor((S,), I32), MAP: T.Tensor((EG,), I32), W: T.Tensor((S,), F32),
                       COUNTS: T.Tensor((E,), I32), OFFSETS: T.Tensor((E + 1,), I32), RANK: T.Tensor((S,), I32),
                       TOK: T.Tensor((S,), I32), EXP: T.Tensor((S,), I32), ROWW: T.Tensor((S,), F32),
                       INV: T.Tensor((S,), I32)):
        with T.Kernel(1, threads=C):
            # thread i owns slot c * C + i of chunk c (one thread: 0, the form TileLang's C target runs)
            i = T.get_thread_binding() if C > 1 else 0
            run = smem((E,), I32)       # running count per expert, then the counts
            off = smem((E + 1,), I32)   # exclusive prefix sum of the counts
            ex = smem((C,), I32)        # the chunk's local experts (-1: invalid)
            e = T.alloc_var(I32)
            before = T.alloc_var(I32)
            later = T.alloc_var(I32)
            rank = T.alloc_var(I32)
            acc = T.alloc_var(I32)
            for b in T.serial(EB):
                if b * C + i < E:
                    run[b * C + i] = 0
            T.sync_threads()
            for c in T.serial(T.ceildiv(S, C)):   # pass 1: rank within the expert, running counts
                # the slot's local expert (again in pass 3), as statements: one nested select expression
                # stalled TileLang's final simplify
                e = T.if_then_else(c * C + i < S, IDS[c * C + i], -1)
                if has_map:                       # a global id outside [0, E_global): nothing read
                    if e >= 0 and e < EG:
                        e = MAP[e]
                    else:
                        e = -1
                e = T.if_then_else(e >= 0 and e < E, e, -1)
                ex[i] = e
                T.sync_threads()
                before = 0
                later = 0
                for j in T.serial(C):             # same expert, earlier / later in the chunk
                    if ex[j] == e:
                        if j < i:
                            before += 1
                        if j > i:
                            later += 1
                rank = T.if_then_else(e >= 0, run[T.if_then_else(e >= 0, e, 0)], 0) + before
                if c * C + i < S:
                    RANK[c * C + i] = rank
                T.sync_threads()                  # every slot has read run before the last one writes it
                if e >= 0 and later == 0:         # the last slot of its expert in the chunk
                    run[e] = rank + 1
                T.sync_threads()
            if i == 0:                            # pass 2: exclusive prefix sum of the counts
                acc = 0
                for x in T.serial(E):
                    off[x] = acc
                    acc += run[x]
                off[E] = acc
            T.sync_threads()
            for b in T.serial(EB):
                if b * C + i < E:
                    COUNTS[b * C + i] = run[b * C + i]
                    OFFSETS[b * C + i] = off[b * C + i]
            if i == 0:
                OFFSETS[E] = off[E]
            for c in T.serial(T.ceildiv(S, C)):   # padding rows past the total
                if c * C + i < S and c * C + i >= off[E]:
                    TOK[c * C + i] = -1
                    EXP[c * C + i] = -1
                    ROWW[c * C + i] = T.float32(0)
            T.sync_threads()
            for c in T.serial(T.ceildiv(S, C)):   # pass 3: scatter the valid slots
                e = T.if_then_else(c * C + i < S, IDS[c * C + i], -1)
                if has_map:                       # a global id outside [0, E_global): nothing read
                    if e >= 0 and e < EG:
                        e = MAP[e]
                    else:
                        e = -1
                e = T.if_then_else(e >= 0 and e < E, e, -1)
                if c * C + i < S:
                    if e >= 0:
                        TOK[off[e] + RANK[c * C + i]] = (c * C + i) // K
                        EXP[off[e] + RANK[c * C + i]] = e
                        ROWW[off[e] + RANK[c * C + i]] = W[c * C + i]
                        INV[c * C + i] = off[e] + RANK[c * C + i]
                    else:
                        INV[c * C + i] = -1

    return permute_kernel


def _bf16_bits_to_f32(bits):
    """A bf16 bit pattern (uint16) -> its fp32 value, exactly (the pattern in the top half)."""
    return T.reinterpret(T.shift_left(T.cast(bits, U32), T.uint32(16)), F32)


def _bf16_rne_bits(bits):
    """fp32 bits (uint32) -> the bf16 bit pattern (uint16), round to nearest even by integer ops, as
    _triton_util.bf16_rne: NaN keeps its top half with the quiet bit set, overflow rounds to inf. The NaN
    test is on the bits (TVM folds v != v to false)."""
    top = T.shift_right(bits, T.uint32(16))
    rounded = T.shift_right(bits + T.uint32(0x7FFF) + T.bitwise_and(top, T.uint32(1)), T.uint32(16))
    nan = T.bitwise_and(bits, T.uint32(0x7FFFFFFF)) > T.uint32(0x7F800000)
    return T.cast(T.if_then_else(nan, T.bitwise_or(top, T.uint32(0x40)), rounded), U16)


def _tree_sum(terms: list):
    """Pairwise sum ((t0 + t1) + (t2 + t3)) + ... over a power-of-two list: the order in which Triton 3.9
    reduces the lanes one thread holds (triton_route.combine_kernel's tl.sum over K_PAD)."""
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] for i in range(0, len(terms), 2)]
    return terms[0]


def combine_k_pad(k: int) -> int:
    """The lanes combine_kernel sums per token for top-k k: max(2, next power of two), as triton_route."""
    return max(2, 1 << (k - 1).bit_length())


def make_combine_kernel(D: int, k_pad: int, block_d: int = COMBINE_BLOCK_D, threads: int = COMBINE_THREADS):
    """combine_kernel for dim D and K_PAD lanes (see the module docstring). Arguments: YS [S, D] uint16 (the
    bf16 bits of y_sorted), INV [T, k] int32 (k <= K_PAD), Y [T, D] uint16 (written: the bf16 bits of y)."""
    if k_pad not in (2, 4, 8, 16):
        raise ValueError(f"k_pad must be 2, 4, 8 or 16, got {k_pad}")
    if D < 1:
        raise ValueError(f"dim must be >= 1, got {D}")
    S = T.dynamic("S")
    NT = T.dynamic("T")
    K = T.dynamic("k")

    @T.prim_func
    def combine_kernel(YS: T.Tensor((S, D), U16), INV: T.Tensor((NT, K), I32), Y: T.Tensor((NT, D), U16)):
        with T.Kernel(NT, T.ceildiv(D, block_d), threads=threads) as (t, bd):
            rows = T.alloc_shared((k_pad,), I32)
            for j in T.Parallel(k_pad):           # the token's rows; -1: invalid slot or a lane past k
                rows[j] = T.if_then_else(j < K, INV[t, j], -1)
            acc = T.alloc_fragment((block_d,), F32)
            for i in T.Parallel(block_d):
                # an invalid lane adds +0 (a run-time zero: TVM folds x + 0.0 into x)
                acc[i] = _tree_sum([T.if_then_else(
                    T.And(T.And(rows[j] >= 0, rows[j] < S), bd * block_d + i < D),
                    _bf16_bits_to_f32(YS[rows[j], bd * block_d + i]), T.float32(0)) for j in range(k_pad)])
            for i in T.Parallel(block_d):
                if bd * block_d + i < D:
                    Y[t, bd * block_d + i] = _bf16_rne_bits(T.reinterpret(acc[i], U32))

    return combine_kernel


@functools.lru_cache(maxsize=None)
def _compiled(target: str, kind: str, *params):
    make = make_permute_kernel if kind == "permute" else make_combine_kernel
    return tilelang.compile(make(*params), target=target)


def permute(topk_ids: torch.Tensor, topk_weights: torch.Tensor, n_experts: int,
            expert_map: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """triton_route.permute's contract and bits: topk_ids [T, k] int32 (global ids under expert_map),
    topk_weights [T, k] fp32 -> counts [E] int32, offsets [E + 1] int32, tokens [S] int32, experts [S]
    int32, weights [S] fp32, inv [T, k] int32 (S = T * k), one launch, every buffer sized by the shapes.
    S = 0 launches nothing (counts and offsets are zero-filled)."""
    T_, k = topk_ids.shape
    S = T_ * k
    dev = topk_ids.device
    counts = torch.empty(n_experts, dtype=torch.int32, device=dev)
    offsets = torch.empty(n_experts + 1, dtype=torch.int32, device=dev)
    tokens = torch.empty(S, dtype=torch.int32, device=dev)
    experts = torch.empty(S, dtype=torch.int32, device=dev)
    weights = torch.empty(S, dtype=torch.float32, device=dev)
    inv = torch.empty((T_, k), dtype=torch.int32, device=dev)
    if S == 0:
        counts.zero_()
        offsets.zero_()
    else:
        rank = torch.empty(S, dtype=torch.int32, device=dev)
        ids = topk_ids.reshape(S)
        kernel = _compiled(platform.tilelang_target(topk_ids), "permute", n_experts, k, expert_map is not None)
        kernel(ids, expert_map if expert_map is not None else ids, topk_weights.reshape(S), counts, offsets, rank,
               tokens, experts, weights, inv.view(S))
    return {"counts": counts, "offsets": offsets, "tokens": tokens, "experts": experts, "weights": weights,
            "inv": inv}


def combine(y_sorted: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """triton_route.combine's contract and bits: y_sorted [S, D] bf16, inv [T, k] int32 -> y [T, D] bf16,
    the fp32 sum of each token's rows (inv -1 adds nothing; a token without a valid slot gets 0). One
    launch (none for T = 0)."""
    T_, k = inv.shape
    D = y_sorted.shape[1]
    y = torch.empty((T_, D), dtype=torch.bfloat16, device=y_sorted.device)
    if T_ and D:
        kernel = _compiled(platform.tilelang_target(y_sorted), "combine", D, combine_k_pad(k))
        kernel(y_sorted.view(torch.uint16), inv, y.view(torch.uint16))
    return y


# Codegen: the V4 shapes (E 256 / k 6 for V4-Flash, E 384 / k 6 with an expert_map for V4-Pro under expert
# parallelism; combine at dim 4096 and 7168, K_PAD 8), one spec each per target.
CODEGEN_PERMUTE = {"sm_90a": (384, 6, True), "sm_100a": (256, 6, False), "gfx942": (384, 6, True),
                   "gfx950": (256, 6, False)}
CODEGEN_COMBINE = {"sm_90a": 7168, "sm_100a": 4096, "gfx942": 7168, "gfx950": 4096}


def codegen_permute(target) -> list:
    from dsv4_kernels.codegen import TileLangKernel
    E, k, has_map = CODEGEN_PERMUTE[target.name]
    label = f"permute-E{E}-k{k}" + ("-map" if has_map else "")
    return [TileLangKernel(make_permute_kernel(E, k, has_map), label=label)]


def codegen_combine(target) -> list:
    from dsv4_kernels.codegen import TileLangKernel
    D = CODEGEN_COMBINE[target.name]
    return [TileLangKernel(make_combine_kernel(D, combine_k_pad(6)), label=f"combine-D{D}-k6")]


def codegen_route(target) -> list:
    """Both kernels' specs for one target (for the composed TileLang fp4_grouped_moe's codegen)."""
    return codegen_permute(target) + codegen_combine(target)
