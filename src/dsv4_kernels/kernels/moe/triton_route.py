"""Triton token permutation by expert and the inverse combine of the FP4 MoE (SPEC 5), with buffers whose
sizes depend only on the shapes (T * k rows, E experts): no host sync, CUDA-graph capturable.

permute_kernel, one program: slot s = t * k + j (S = T * k slots) has the local expert e(s) = topk_ids[s],
or expert_map[topk_ids[s]] under expert parallelism; an id outside its range (-1 included) or a map entry
outside [0, E) makes the slot invalid, and nothing is read through it (never wrapped). Pass 1 ranks each
valid slot among the earlier slots of its expert (a CHUNK x CHUNK comparison inside a chunk plus the
running count per expert, kept in `counts`), pass 2 takes the exclusive prefix sum of the counts
(`offsets`) and scatters: row offsets[e] + rank of slot s gets token t, expert e and weight w[s], and
inv[s] is that row (-1 for an invalid slot). The order is stable (token order within an expert) and the
rows past offsets[E] are padding (expert -1, token -1, weight 0). Every slot and expert is handled by the
same program, with barriers between the passes, so no atomics and no second launch.

combine_kernel, one program per (token, BLOCK_D channels): y[t] = the fp32 sum over its k slots of the
expert outputs at rows inv[t * k + j] (invalid slots add nothing), rounded to bf16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4_kernels.kernels._triton_util import FP_FUSION, bf16_rne


@triton.jit
def _local_expert(ids_ptr, map_ptr, s, S, E, E_GLOBAL, HAS_MAP: tl.constexpr):
    # [CHUNK] slots -> local expert or -1 (slot past S, id or map entry out of range); reads nothing
    # through an invalid id
    ok = s < S
    e = tl.load(ids_ptr + s, mask=ok, other=-1)
    if HAS_MAP:
        known = ok & (e >= 0) & (e < E_GLOBAL)
        e = tl.load(map_ptr + tl.where(known, e, 0).to(tl.int64), mask=known, other=-1)
    return tl.where((e >= 0) & (e < E), e, -1)


@triton.jit
def permute_kernel(ids_ptr, map_ptr, w_ptr, counts_ptr, offsets_ptr, rank_ptr, tok_ptr, expert_ptr, roww_ptr,
                   inv_ptr, S, E, E_GLOBAL, TOPK: tl.constexpr, HAS_MAP: tl.constexpr, E_PAD: tl.constexpr,
                   CHUNK: tl.constexpr):
    ee = tl.arange(0, E_PAD)
    tl.store(counts_ptr + ee, tl.zeros([E_PAD], dtype=tl.int32))
    i = tl.arange(0, CHUNK)
    earlier = i[None, :] < i[:, None]                                          # [C, C]: j before i
    later = i[None, :] > i[:, None]
    for c0 in range(0, S, CHUNK):                 # pass 1: rank within the expert, running counts
        tl.debug_barrier()
        s = c0 + i
        e = _local_expert(ids_ptr, map_ptr, s, S, E, E_GLOBAL, HAS_MAP)
        valid = e >= 0
        same = (e[:, None] == e[None, :]) & valid[:, None]
        before = tl.sum(tl.where(same & earlier, 1, 0), axis=1)                # same expert, earlier in chunk
        last = tl.sum(tl.where(same & later, 1, 0), axis=1) == 0              # last of its expert here
        base = tl.load(counts_ptr + e, mask=valid, other=0)
        rank = base + before
        tl.store(rank_ptr + s, rank, mask=s < S)
        tl.debug_barrier()
        tl.store(counts_ptr + e, rank + 1, mask=valid & last)
    tl.debug_barrier()
    counts = tl.load(counts_ptr + ee, mask=ee < E, other=0)
    incl = tl.cumsum(counts, axis=0)
    tl.store(offsets_ptr + ee, incl - counts, mask=ee < E)
    total = tl.sum(counts, axis=0)
    tl.store(offsets_ptr + E, total)
    for c0 in range(0, S, CHUNK):                 # padding rows past the total
        p = c0 + i
        pad = (p < S) & (p >= total)
        tl.store(tok_ptr + p, tl.full([CHUNK], -1, tl.int32), mask=pad)
        tl.store(expert_ptr + p, tl.full([CHUNK], -1, tl.int32), mask=pad)
        tl.store(roww_ptr + p, tl.zeros([CHUNK], dtype=tl.float32), mask=pad)
    tl.debug_barrier()
    for c0 in range(0, S, CHUNK):                 # pass 2: scatter the valid slots
        s = c0 + i
        e = _local_expert(ids_ptr, map_ptr, s, S, E, E_GLOBAL, HAS_MAP)
        valid = e >= 0
        row = tl.load(offsets_ptr + e, mask=valid, other=0) + tl.load(rank_ptr + s, mask=valid, other=0)
        tl.store(tok_ptr + row, (s // TOPK).to(tl.int32), mask=valid)
        tl.store(expert_ptr + row, e, mask=valid)
        tl.store(roww_ptr + row, tl.load(w_ptr + s, mask=valid, other=0.0), mask=valid)
        tl.store(inv_ptr + s, tl.where(valid, row, -1), mask=s < S)


PERMUTE_CHUNK = 64


def permute(topk_ids: torch.Tensor, topk_weights: torch.Tensor, n_experts: int,
            expert_map: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """topk_ids [T, k] int32 (global ids under expert_map), topk_weights [T, k] fp32 -> the sorted
    layout, every buffer sized by the shapes alone (S = T * k), one launch:
        counts [E] int32 rows per local expert, offsets [E + 1] int32 (exclusive prefix sum, offsets[E] the
        valid rows), tokens [S] int32 token of each sorted row (-1: padding), experts [S] int32 its local
        expert (-1: padding; the grouped GEMMs' m_indices), weights [S] fp32 its routing weight (0 for
        padding), inv [T, k] int32 the sorted row of each slot (-1: invalid slot)."""
    T, k = topk_ids.shape
    S = T * k
    dev = topk_ids.device
    e_pad = triton.next_power_of_2(n_experts + 1)
    counts = torch.empty(e_pad, dtype=torch.int32, device=dev)
    offsets = torch.empty(n_experts + 1, dtype=torch.int32, device=dev)
    rank = torch.empty(max(S, 1), dtype=torch.int32, device=dev)
    tokens = torch.empty(S, dtype=torch.int32, device=dev)
    experts = torch.empty(S, dtype=torch.int32, device=dev)
    weights = torch.empty(S, dtype=torch.float32, device=dev)
    inv = torch.empty((T, k), dtype=torch.int32, device=dev)
    has_map = expert_map is not None
    permute_kernel[(1,)](
        topk_ids, expert_map if has_map else topk_ids, topk_weights, counts, offsets, rank, tokens, experts,
        weights, inv, S, n_experts, expert_map.shape[0] if has_map else 0, TOPK=k, HAS_MAP=has_map,
        E_PAD=e_pad, CHUNK=PERMUTE_CHUNK if dev.type != "cpu" else 256, num_warps=4, enable_fp_fusion=FP_FUSION)
    return {"counts": counts[:n_experts], "offsets": offsets, "tokens": tokens, "experts": experts,
            "weights": weights, "inv": inv}


@triton.jit
def combine_kernel(ys_ptr, inv_ptr, y_ptr, T, D, TOPK: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                   ROWS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)                  # [ROWS] tokens
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    j = tl.arange(0, K_PAD)
    t_ok = t < T
    rows = tl.load(inv_ptr + t[:, None] * TOPK + j[None, :], mask=t_ok[:, None] & (j < TOPK)[None, :],
                   other=-1).to(tl.int64)                                           # [ROWS, KP]
    ok = (rows >= 0)[:, :, None] & (d < D)[None, None, :]
    parts = tl.load(ys_ptr + rows[:, :, None] * D + d[None, None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + t[:, None] * D + d[None, :], bf16_rne(tl.sum(parts, axis=1)),
             mask=t_ok[:, None] & (d < D)[None, :])


COMBINE_BLOCK_D = 1024


def combine(y_sorted: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """y_sorted [S, D] bf16 (rows in sorted order), inv [T, k] int32 -> y [T, D] bf16, the fp32 sum of each
    token's rows (an invalid slot, inv -1, adds nothing; a token without one gets 0). One launch."""
    T, k = inv.shape
    D = y_sorted.shape[1]
    y = torch.empty((T, D), dtype=torch.bfloat16, device=y_sorted.device)
    if T:
        per = 16 if y_sorted.device.type == "cpu" else 1   # the interpreter pays per program
        combine_kernel[(triton.cdiv(T, per), triton.cdiv(D, COMBINE_BLOCK_D))](
            y_sorted, inv, y, T, D, TOPK=k, K_PAD=max(2, triton.next_power_of_2(k)), BLOCK_D=COMBINE_BLOCK_D,
            ROWS=per, num_warps=4, enable_fp_fusion=FP_FUSION)
    return y
