"""Triton source of the compressor prefill (SPEC 2): a ragged batch of chunks, each continuing its sequence
from its own state slot, in one launch; the single-sequence form is the batch of one chunk from position 0.

prefill_kernel runs two kinds of program side by side:
- entry programs, one per candidate entry: the entries of chunk b get candidates floor(cu_b / r) + b ..
  (a static bound: all chunks together emit at most N // r + B entries), found from the program id by a
  binary search over cu_seqlens. Such a program pools only rows of its own chunk (positions >= start)
  with an online softmax over row chunks, then writes the entry at the row of the token that completes
  it: fp32, or RMSNorm + RoPE in bf16 and optionally its SPEC 1.2 FP8 form at the token's cache slot.
- state programs, one per chunk: the (at most coff) entries whose rows reach back before the chunk into
  the state, then, after a barrier, the chunk's state update (ratio 4: rows 0:4 <- the last complete
  block, or kv 0 / score -inf for a new sequence that has none yet; the incomplete block's new rows at
  off + p mod r). Only this program touches the chunk's slot,
  so nothing races with the rows it reads.
Invalid chunks (slot outside the state, negative start, fused form past the RoPE tables) read and write
nothing; rows of no chunk keep the zeros the wrapper allocates.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4_kernels import dispatch, platform
from dsv4_kernels.kernels._triton_util import FP_FUSION
from dsv4_kernels.kernels.compressor.triton import _norm_rope, _store_kv_fp8


@triton.jit
def _rows(kv_ptr, score_ptr, ape_ptr, kv_state, score_state, sbase, lo, start, q, ch, R: tl.constexpr,
          OFF: tl.constexpr, W: tl.constexpr):
    # kv and biased score [RC, C] at positions q [RC] and channels ch [RC, C]: the chunk's token rows for
    # q >= start (upcast, score + ape[q mod r]), the state rows for 0 <= q < start (the start's block at
    # rows OFF + q mod r, the block before it at rows q mod r), the virtual block (kv 0, score -inf) for q < 0
    tok = q >= start
    st = (q < start) & (q >= 0)
    qs = tl.where(q >= 0, q, 0)
    trow = tl.where(tok, lo + q - start, 0)
    k_t = tl.load(kv_ptr + trow[:, None] * W + ch, mask=tok[:, None], other=0.0).to(tl.float32)
    s_t = tl.load(score_ptr + trow[:, None] * W + ch, mask=tok[:, None], other=0.0).to(tl.float32)
    s_t += tl.load(ape_ptr + (qs % R)[:, None] * W + ch, mask=tok[:, None], other=0.0)
    srow = tl.where(qs // R == start // R, OFF, 0) + qs % R
    k_s = tl.load(kv_state + sbase + srow[:, None] * W + ch, mask=st[:, None], other=0.0)
    s_s = tl.load(score_state + sbase + srow[:, None] * W + ch, mask=st[:, None], other=float("-inf"))
    return tl.where(tok[:, None], k_t, k_s), tl.where(tok[:, None], s_t, s_s)


@triton.jit
def _pool_entry(kv_ptr, score_ptr, ape_ptr, kv_state, score_state, sbase, lo, start, j, d, R: tl.constexpr,
                COFF: tl.constexpr, D: tl.constexpr, ROW_CHUNK: tl.constexpr):
    # entry j [D] fp32: per-channel softmax over its COFF*R rows; row i sits at position (j - COFF + 1)*R + i
    # and reads channels (i >= R) * D + d for ratio 4 (A halves of block j-1, B halves of block j)
    W: tl.constexpr = COFF * D
    NROWS: tl.constexpr = COFF * R
    HALF: tl.constexpr = R if COFF == 2 else NROWS
    OFF: tl.constexpr = R if COFF == 2 else 0
    m = tl.full([D], float("-inf"), tl.float32)
    l = tl.zeros([D], dtype=tl.float32)
    acc = tl.zeros([D], dtype=tl.float32)
    rc = tl.arange(0, ROW_CHUNK)
    for r0 in range(0, NROWS, ROW_CHUNK):
        i = r0 + rc
        q = (j - (COFF - 1)) * R + i
        ch = (i >= HALF)[:, None] * D + d[None, :]
        k, s = _rows(kv_ptr, score_ptr, ape_ptr, kv_state, score_state, sbase, lo, start, q, ch, R, OFF, W)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
        e = tl.where(s == float("-inf"), 0.0, tl.exp(s - m_new[None, :]))
        l = l * alpha + tl.sum(e, axis=0)
        acc = acc * alpha + tl.sum(e * k, axis=0)
        m = m_new
    return acc / l  # all -inf scores: 0 / 0 = NaN, as the reference


@triton.jit
def _emit(pooled, row, pos, d, entries_ptr, emitted_ptr, w_ptr, cos_ptr, sin_ptr, cache_ptr, cache_slot_ptr, eps,
          block_size, capacity, D: tl.constexpr, FUSED: tl.constexpr, CACHE: tl.constexpr, COMPACT: tl.constexpr):
    # row: the token that completes the entry, or (COMPACT, the single-sequence form) the entry's index
    if FUSED:
        y = _norm_rope(pooled, w_ptr, cos_ptr, sin_ptr, pos, eps, d, D)
        tl.store(entries_ptr + row * D + d, y)
        if CACHE:
            _store_kv_fp8(y, cache_ptr, tl.load(cache_slot_ptr + row), block_size, capacity)
    else:
        tl.store(entries_ptr + row * D + d, pooled)
    if not COMPACT:
        tl.store(emitted_ptr + row, 1)


@triton.jit
def _chunk(cu_ptr, start_ptr, slot_ptr, b, total, slots, rope_rows, R: tl.constexpr, HAS_STARTS: tl.constexpr,
           HAS_SLOTS: tl.constexpr, FUSED: tl.constexpr):
    # chunk b: first token row, start position, end position (start + length), state slot, validity
    lo = tl.minimum(tl.maximum(tl.load(cu_ptr + b).to(tl.int64), 0), total)
    hi = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1).to(tl.int64), lo), total)
    start = lo * 0
    if HAS_STARTS:
        start = tl.load(start_ptr + b)
    slot = b
    if HAS_SLOTS:
        slot = tl.load(slot_ptr + b)
    end = start + hi - lo
    valid = (slot >= 0) & (slot < slots) & (start >= 0)
    if FUSED:
        valid = valid & (end - R < rope_rows)
    return lo, start, end, tl.where(valid, slot, 0), valid


@triton.jit
def prefill_kernel(kv_ptr, score_ptr, ape_ptr, cu_ptr, start_ptr, slot_ptr, kv_state, score_state, entries_ptr,
                   emitted_ptr, w_ptr, cos_ptr, sin_ptr, cache_ptr, cache_slot_ptr, total, batch, candidates,
                   search_steps, slots, rope_rows, eps, block_size, capacity, R: tl.constexpr,
                   COFF: tl.constexpr, D: tl.constexpr, HAS_STARTS: tl.constexpr, HAS_SLOTS: tl.constexpr,
                   FUSED: tl.constexpr, CACHE: tl.constexpr, COMPACT: tl.constexpr, ROW_CHUNK: tl.constexpr):
    W: tl.constexpr = COFF * D
    NROWS: tl.constexpr = COFF * R
    OFF: tl.constexpr = R if COFF == 2 else 0
    pid = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, D)
    if pid < candidates:
        # entry program: chunk b is the last with floor(cu_b / r) + b <= pid (strictly increasing in b)
        b_lo = pid * 0
        b_hi = b_lo + batch
        for _ in range(search_steps):
            mid = (b_lo + b_hi) // 2
            cu_mid = tl.minimum(tl.maximum(tl.load(cu_ptr + mid).to(tl.int64), 0), total)
            up = cu_mid // R + mid <= pid
            b_lo = tl.where(up, mid, b_lo)
            b_hi = tl.where(up, b_hi, mid)
        b = b_lo
        lo, start, end, slot, valid = _chunk(cu_ptr, start_ptr, slot_ptr, b, total, slots, rope_rows, R, HAS_STARTS,
                                             HAS_SLOTS, FUSED)
        j = start // R + pid - (lo // R + b)
        first_free = tl.where(start > 0, (start + R - 1) // R + COFF - 1, 0)  # entries below read the state
        if valid & (pid >= lo // R + b) & (j < end // R) & (j >= first_free):
            pooled = _pool_entry(kv_ptr, score_ptr, ape_ptr, kv_state, score_state, 0, lo, start, j, d, R, COFF, D,
                                 ROW_CHUNK)
            row = j if COMPACT else lo + (j + 1) * R - 1 - start
            _emit(pooled, row, j * R, d, entries_ptr, emitted_ptr, w_ptr, cos_ptr, sin_ptr, cache_ptr, cache_slot_ptr,
                  eps, block_size, capacity, D, FUSED, CACHE, COMPACT)
    else:
        b = pid - candidates
        lo, start, end, slot, valid = _chunk(cu_ptr, start_ptr, slot_ptr, b, total, slots, rope_rows, R, HAS_STARTS,
                                             HAS_SLOTS, FUSED)
        sbase = slot * NROWS * W
        first_free = tl.where(start > 0, (start + R - 1) // R + COFF - 1, 0)
        if valid:
            for e in tl.static_range(COFF):
                j = start // R + e
                if (j < end // R) & (j < first_free):
                    pooled = _pool_entry(kv_ptr, score_ptr, ape_ptr, kv_state, score_state, sbase, lo, start, j, d,
                                         R, COFF, D, ROW_CHUNK)
                    _emit(pooled, lo + (j + 1) * R - 1 - start, j * R, d, entries_ptr, emitted_ptr, w_ptr, cos_ptr,
                          sin_ptr, cache_ptr, cache_slot_ptr, eps, block_size, capacity, D, FUSED, CACHE, False)
            tl.debug_barrier()  # every state row this program pooled is read before any is rewritten
            c = tl.arange(0, W)
            if COFF == 2:
                if (start == 0) & (end > 0) & (end < R):  # a new sequence: entry 0's previous block is empty
                    i = tl.arange(0, R)
                    zero = tl.zeros([R, W], dtype=tl.float32)
                    tl.store(kv_state + sbase + i[:, None] * W + c[None, :], zero)
                    tl.store(score_state + sbase + i[:, None] * W + c[None, :], zero - float("inf"))
                if end // R > start // R:  # a block completed: rows 0:4 <- the last complete block
                    i = tl.arange(0, R)
                    q = (end // R - 1) * R + i
                    ch = i[:, None] * 0 + c[None, :]
                    k, s = _rows(kv_ptr, score_ptr, ape_ptr, kv_state, score_state, sbase, lo, start, q, ch, R, OFF, W)
                    tl.debug_barrier()
                    tl.store(kv_state + sbase + i[:, None] * W + c[None, :], k)
                    tl.store(score_state + sbase + i[:, None] * W + c[None, :], s)
            TAIL: tl.constexpr = R if R < ROW_CHUNK else ROW_CHUNK
            rc = tl.arange(0, TAIL)
            tail = end - end % R
            for r0 in range(0, R, TAIL):  # the incomplete block's new rows
                q = tail + r0 + rc
                new = (q < end) & (q >= start)
                trow = tl.where(new, lo + q - start, 0)
                srow = sbase + (OFF + q % R)[:, None] * W + c[None, :]
                k = tl.load(kv_ptr + trow[:, None] * W + c[None, :], mask=new[:, None], other=0.0).to(tl.float32)
                s = tl.load(score_ptr + trow[:, None] * W + c[None, :], mask=new[:, None], other=0.0).to(tl.float32)
                s += tl.load(ape_ptr + (q % R)[:, None] * W + c[None, :], mask=new[:, None], other=0.0)
                tl.store(kv_state + srow, k, mask=new[:, None])
                tl.store(score_state + srow, s, mask=new[:, None])


def _launch(kv, score, ape, ratio, cu_seqlens, kv_state, score_state, start_positions, slot_ids, norm_weight,
            rope_cos, rope_sin, kv_cache, cache_block_size, cache_slots, op, compact=False):
    """compact: the single-sequence form (one chunk from position 0): entry j at row j of [N // r, d], no
    emitted flags, cache_slots per entry; else entries [N, d] at the completing tokens' rows, zeros elsewhere."""
    total, width = kv.shape
    coff = 2 if ratio == 4 else 1
    d = width // coff
    batch = cu_seqlens.shape[0] - 1
    fused = norm_weight is not None
    dtype = torch.bfloat16 if fused else torch.float32
    if compact:   # every row is written
        entries = torch.empty((total // ratio, d), dtype=dtype, device=kv.device)
        emitted = torch.empty((0,), dtype=torch.bool, device=kv.device)
    else:
        entries = torch.zeros((total, d), dtype=dtype, device=kv.device)
        emitted = torch.zeros((total,), dtype=torch.bool, device=kv.device)
    if total == 0 or batch == 0:
        return entries, emitted
    cfg = dispatch.config(dispatch.get(op, "triton"), platform.device_info(kv))
    candidates = total // ratio + batch
    cache = kv_cache is not None
    dummy = ape  # pointers the specialisation never reads
    prefill_kernel[(candidates + batch,)](
        kv, score, ape, cu_seqlens, start_positions if start_positions is not None else cu_seqlens,
        slot_ids if slot_ids is not None else cu_seqlens, kv_state, score_state, entries,
        emitted.view(torch.int8) if not compact else dummy,
        norm_weight if fused else dummy, rope_cos if fused else dummy, rope_sin if fused else dummy,
        kv_cache if cache else dummy, cache_slots if cache else cu_seqlens, total, batch, candidates,
        max(1, batch.bit_length()), kv_state.shape[0], rope_cos.shape[0] if fused else 0, 1e-6, cache_block_size,
        kv_cache.shape[0] * cache_block_size if cache else 0,
        R=ratio, COFF=coff, D=d, HAS_STARTS=start_positions is not None, HAS_SLOTS=slot_ids is not None,
        FUSED=fused, CACHE=cache, COMPACT=compact, ROW_CHUNK=cfg["ROW_CHUNK"], num_warps=cfg["num_warps"],
        enable_fp_fusion=FP_FUSION)
    return entries, emitted


def compressor_prefill_batched(kv, score, ape, ratio, cu_seqlens, kv_state, score_state, start_positions=None,
                               slot_ids=None, norm_weight=None, rope_cos=None, rope_sin=None, kv_cache=None,
                               cache_block_size=64, cache_slots=None):
    return _launch(kv, score, ape, ratio, cu_seqlens, kv_state, score_state, start_positions, slot_ids, norm_weight,
                   rope_cos, rope_sin, kv_cache, cache_block_size, cache_slots, "compressor_prefill_batched")


def compressor_prefill(kv, score, ape, ratio, norm_weight=None, rope_cos=None, rope_sin=None, kv_cache=None,
                       cache_block_size=64, cache_slots=None):
    """The single-sequence form: one chunk from position 0 into a fresh state, entries compact."""
    from dsv4_kernels.reference.compressor import compressor_init_state
    seq_len, width = kv.shape
    coff = 2 if ratio == 4 else 1
    kv_state, score_state = compressor_init_state(ratio, width // coff, 1, kv.device)
    cu = torch.tensor([0, seq_len], dtype=torch.int64, device=kv.device)
    entries, _ = _launch(kv, score, ape, ratio, cu, kv_state, score_state, None, None, norm_weight, rope_cos,
                         rope_sin, kv_cache, cache_block_size, cache_slots, "compressor_prefill", compact=True)
    return entries, kv_state[0], score_state[0]


def _codegen(op: str, forms, compact: bool) -> list:
    from dsv4_kernels.codegen import TritonKernel
    cfg = dispatch.get(op, "triton").defaults
    sig = {"kv_ptr": "*fp32", "score_ptr": "*fp32", "ape_ptr": "*fp32", "cu_ptr": "*i32", "start_ptr": "*i64",
           "slot_ptr": "*i64", "kv_state": "*fp32", "score_state": "*fp32", "entries_ptr": "*fp32",
           "emitted_ptr": "*i8", "w_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "cache_ptr": "*u8",
           "cache_slot_ptr": "*i64", "total": "i64", "batch": "i64", "candidates": "i64", "search_steps": "i32",
           "slots": "i64", "rope_rows": "i64", "eps": "fp32", "block_size": "i64", "capacity": "i64"}
    if compact:
        sig.update(cu_ptr="*i64", emitted_ptr="*fp32")
    specs = []
    for ratio, d, fused in forms:
        s = dict(sig, entries_ptr="*bf16" if fused else "*fp32")
        if fused:
            s.update(kv_ptr="*bf16", score_ptr="*bf16")
        specs.append(TritonKernel(prefill_kernel, s, {"R": ratio, "COFF": 2 if ratio == 4 else 1, "D": d,
                                                      "HAS_STARTS": not compact, "HAS_SLOTS": not compact,
                                                      "FUSED": fused, "CACHE": fused, "COMPACT": compact,
                                                      "ROW_CHUNK": cfg["ROW_CHUNK"]},
                                  num_warps=cfg["num_warps"],
                                  label=f"r{ratio}-d{d}" + ("-bf16-in-fp8-cache" if fused else "")))
    return specs


def codegen_compressor_prefill_batched(target) -> list:
    """The forms engines run: d = 512 fused with the FP8 cache store (attention compressor) and d = 128 in
    fp32 (the indexer compressor's pooled entries), for ratio 4 and 128; bf16 inputs for the d = 512 form."""
    return _codegen("compressor_prefill_batched", ((4, 512, True), (128, 512, True), (4, 128, False),
                                                   (128, 128, False)), compact=False)


def codegen_compressor_prefill(target) -> list:
    """The single-sequence specialisation (compact entries, no starts or slots), one form per ratio."""
    return _codegen("compressor_prefill", ((4, 512, True), (128, 128, False)), compact=True)
