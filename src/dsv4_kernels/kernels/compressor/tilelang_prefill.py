"""TileLang (GPU dialect) source of the compressor prefill (SPEC 2): a ragged batch of chunks, each continuing
its sequence from its own state slot, in one launch; the single-sequence form is the batch of one chunk from
position 0 with compact entries. The programs and their rules are triton_prefill.py's (README.md); the
thread layout is the TileLang decode kernel's (tilelang.py).

prefill_kernel: grid N // r + 2B blocks of `threads` threads, two kinds of block:
- entry blocks, pid < N // r + B: chunk b is the last with floor(cu_b / r) + b <= pid, found by a binary
  search over cu_seqlens (`steps` = bit_length(B) probes, every thread alike); its entry
  j = floor(s / r) + pid - floor(cu_b / r) - b is pooled when it completes inside the chunk and all its
  coff*r rows are the chunk's tokens. Pooling: channel lane l = t mod (d / 4) owns entry channels
  [4 l, 4 l + 4); row group g = t div (d / 4) runs an online softmax over rows g, g + G, ... (CHUNK rows a
  step; bf16 inputs upcast on load, score + ape[q mod r] in fp32); the G partial (max, sum, weighted sum)
  meet in shared memory after a barrier and row group 0 writes the entry at the row of the token that
  completes it (COMPACT: row j): fp32, or RMSNorm + RoPE at position j*r in bf16 and, with a cache, the
  SPEC 1.2 FP8 bytes at that row's cache slot (tilelang_common.make_fused_tail, shared with decode);
  the batched form sets emitted[row];
- state blocks, pid = N // r + B + b: the (at most coff) entries of chunk b whose rows reach back before
  the chunk into its state slot (rows at positions q < s from the slot, the start's block at rows
  off + q mod r, the block before it at rows q mod r; q < 0 is the virtual block kv 0 / score -inf), then,
  after a barrier that orders every pooling read before any state store, the slot update: ratio 4 rows
  0:4 <- the last complete block (or kv 0 / score -inf for a new sequence whose first block is open),
  then the incomplete block's new rows at off + p mod r. Work item (row, 4 channels) k * threads + t is
  thread t's in both passes, so the copy's read of a row precedes its overwrite in that thread's order.
  Only this block touches the chunk's slot.
Invalid chunks (slot outside the state, negative start, fused: last entry's RoPE position past the
tables) read and write nothing; rows of no chunk keep the zeros the wrapper allocates.

Compile-time: ratio, d, the input dtype, the cu_seqlens dtype, the form, starts / slots given, COMPACT,
threads, CHUNK and the cache block size; symbolic: tokens, cu_seqlens length, slots, table rows, cache pages
and the output rows, so one compile per form serves every batch and nothing is read back to the host.
"""
import functools

import torch
import tilelang
import tilelang.language as T

from dsv4_kernels import dispatch, platform
from dsv4_kernels.kernels import compressor as shared
from dsv4_kernels.kernels.compressor.tilelang_common import (BF16, CACHE_D, F32, I64, TOKEN_BYTES, U8, VEC, _exp,
                                                             make_fused_tail, pool_plan)

DEFAULTS = {"compressor_prefill": {"threads": 256, "CHUNK": 8},
            "compressor_prefill_batched": {"threads": 256, "CHUNK": 8}}
INPUT_DTYPES = {torch.float32: F32, torch.bfloat16: BF16}
CU_DTYPES = {torch.int32: "int32", torch.int64: I64}


def make_prefill_kernel(ratio: int, d: int, in_dtype: str, cu_dtype: str, fused: bool, cache: bool, compact: bool,
                        has_starts: bool, has_slots: bool, threads: int, chunk: int, block_size: int = 64):
    """compressor_prefill(_batched) for one form (see the module docstring).

    Arguments (the wrapper passes [.., coff, d] views of the [.., coff*d] rows): KV, SC [N, coff, d] in_dtype
    (fp32 or bf16); APE [r, coff, d] fp32; CU [B + 1] cu_dtype; START, SLOT [B] int64 (read only when
    given); KVS, SCS [slots, coff*r, coff, d] fp32, updated in place;
    ENT [rows, d] fp32 (bf16 fused): [N, d] batched, [N // r, d] COMPACT; EMIT [rows] uint8 (unused COMPACT);
    NW [d] fp32, COS, SIN [P, 32] fp32 (fused); KC [pages, block_size * 584] uint8, CSLOT [rows] int64
    (cache); eps fp32; steps int32 (binary-search probes, bit_length(B)). Unused arguments are not read.
    """
    if ratio not in (4, 128) or d not in (128, 512):
        raise ValueError(f"prefill kernel: expected ratio 4 or 128 and d 128 or 512, got ratio {ratio}, d {d}")
    if in_dtype not in (F32, BF16) or cu_dtype not in CU_DTYPES.values():
        raise ValueError(f"prefill kernel: expected fp32/bf16 inputs and int32/int64 cu_seqlens, got {in_dtype}, "
                         f"{cu_dtype}")
    if cache and (not fused or d != CACHE_D):
        raise ValueError(f"prefill kernel: the FP8 cache store needs the fused form and d = {CACHE_D}")
    if compact and (has_starts or has_slots):
        raise ValueError("prefill kernel: the compact (single-sequence) form has no starts or slots")
    if block_size < 1:
        raise ValueError(f"prefill kernel: block_size must be >= 1, got {block_size}")
    coff = 2 if ratio == 4 else 1
    R = ratio
    W = coff * d                                  # state row and input row width
    NROWS = coff * ratio                          # rows pooled per entry (8 or 128)
    OFF = ratio if coff == 2 else 0               # ratio 4 keeps the current block in rows 4:8
    HALF = ratio if coff == 2 else NROWS          # rows from HALF on are read at channel offset d
    LANES, GROUPS, STEPS, CH = pool_plan(NROWS, d, threads, chunk)
    WARPS = max(1, LANES // 32)                   # warps of row group 0
    VROW = W // VEC                               # 4-channel vectors per state row
    DV = d // VEC                                 # ... per half row (the [.., coff, d] views)
    ITEMS = -(-(R * VROW) // threads)             # state-update passes over (row, vector) items
    ENT_DTYPE = BF16 if fused else F32
    NEG_INF = -T.infinity(F32)
    n = T.dynamic("n")
    NB = T.dynamic("cu_len")
    NS = T.dynamic("n_starts")
    NSL = T.dynamic("n_slots")
    S = T.dynamic("slots")
    M = T.dynamic("rows")
    P = T.dynamic("rope_rows")
    NP = T.dynamic("pages")
    _, finish_fused = make_fused_tail(d, cache, block_size, NP, WARPS)

    @T.macro
    def load_token(KV, SC, APE, rk, rs, k, q, t, h, c):
        # token row t (position q), channels h * d + c .. + 4: upcast, score + ape[q mod r] in fp32
        if t >= 0 and t < T.cast(n, I64):   # always true: it lets TVM prove the vector accesses in range
            for v in T.vectorized(VEC):
                rs[k * VEC + v] = T.cast(SC[t, h, c + v], F32) + APE[q % R, h, c + v]
            for v in T.vectorized(VEC):
                rk[k * VEC + v] = T.cast(KV[t, h, c + v], F32)

    @T.macro
    def load_row(KV, SC, APE, KVS, SCS, rk, rs, k, i, pv, slot, hx, c0):
        # pooled row i (position q = pv[0] + i) of an entry, channels c0 .. c0 + 4 of half h, into
        # rk/rs[4 k : 4 k + 4]: the chunk's token row pv[1] + q for q >= start = pv[2], else the slot's row
        # (the start's block, from position pv[3] on, at off + q mod r; the block before at q mod r), else
        # the virtual block (kv 0, score -inf). pv: int64 scalars kept in registers, so the index
        # expressions stay small (TVM's simplifier is slow on the inlined ones).
        q = pv[0] + i
        h = T.cast(i >= HALF, "int32") + hx             # ratio 4: the B halves of rows 4:8 (hx: the copy's half)
        if q >= pv[2]:
            load_token(KV, SC, APE, rk, rs, k, q, pv[1] + q, h, c0)
        elif q >= 0:
            for v in T.vectorized(VEC):
                rs[k * VEC + v] = SCS[slot, OFF * T.cast(q >= pv[3], I64) + q % R, h, c0 + v]
            for v in T.vectorized(VEC):
                rk[k * VEC + v] = KVS[slot, OFF * T.cast(q >= pv[3], I64) + q % R, h, c0 + v]
        else:
            for v in T.unroll(VEC):
                rs[k * VEC + v] = NEG_INF
                rk[k * VEC + v] = 0.0

    @T.macro
    def pool(KV, SC, APE, KVS, SCS, pv, slot, grp, c0, rk, rs, m, lsum, acc, tmp, y, sm, sl, sa):
        # y (row group 0) = the entry at pv pooled per channel: online softmax per row group, then the combine
        for v in T.unroll(VEC):
            m[v] = NEG_INF
            lsum[v] = 0.0
            acc[v] = 0.0
        for s in T.serial(STEPS):
            for k in T.unroll(CH):
                i = grp + GROUPS * (s * CH + k)
                if i < NROWS:
                    load_row(KV, SC, APE, KVS, SCS, rk, rs, k, i, pv, slot, 0, c0)
                else:
                    for v in T.unroll(VEC):
                        rs[k * VEC + v] = NEG_INF
                        rk[k * VEC + v] = 0.0
            for v in T.unroll(VEC):
                tmp[0] = m[v]
                for k in T.unroll(CH):
                    tmp[0] = T.max(tmp[0], rs[k * VEC + v])
                tmp[1] = T.if_then_else(m[v] == tmp[0], 1.0, _exp(m[v] - tmp[0]))
                lsum[v] = lsum[v] * tmp[1]
                acc[v] = acc[v] * tmp[1]
                for k in T.unroll(CH):
                    tmp[2] = T.if_then_else(rs[k * VEC + v] == NEG_INF, 0.0, _exp(rs[k * VEC + v] - tmp[0]))
                    lsum[v] = lsum[v] + tmp[2]
                    acc[v] = acc[v] + tmp[2] * rk[k * VEC + v]
                m[v] = tmp[0]
        for v in T.unroll(VEC):
            sm[grp, c0 + v] = m[v]
            sl[grp, c0 + v] = lsum[v]
            sa[grp, c0 + v] = acc[v]
        T.sync_threads()
        if grp == 0:  # pooled = sum_g a_g e^(m_g - M) / sum_g l_g e^(m_g - M), M = max_g m_g
            for v in T.unroll(VEC):
                tmp[0] = sm[0, c0 + v]
                for g in T.unroll(1, GROUPS):
                    tmp[0] = T.max(tmp[0], sm[g, c0 + v])
                lsum[v] = 0.0
                acc[v] = 0.0
                for g in T.unroll(GROUPS):
                    tmp[1] = T.if_then_else(sm[g, c0 + v] == tmp[0], 1.0, _exp(sm[g, c0 + v] - tmp[0]))
                    lsum[v] = lsum[v] + sl[g, c0 + v] * tmp[1]
                    acc[v] = acc[v] + sa[g, c0 + v] * tmp[1]
                y[v] = acc[v] / lsum[v]   # all -inf scores: 0 / 0 = NaN, as the reference

    @T.macro
    def emit_row(ENT, EMIT, NW, COS, SIN, KC, CSLOT, eps, row, pos, tx, lane, grp, c0, y, tmp, acc, red, q, sb):
        if fused:
            finish_fused(ENT, NW, COS, SIN, KC, CSLOT, eps, row, tx, lane, grp, c0, pos, y, tmp, acc, red, q, sb)
        elif grp == 0:
            for v in T.vectorized(VEC):
                ENT[row, c0 + v] = y[v]
        if not compact and tx == 0:
            EMIT[row] = T.uint8(1)

    @T.macro
    def emit(ENT, EMIT, NW, COS, SIN, KC, CSLOT, eps, row, pos, tx, lane, grp, c0, y, tmp, acc, red, q, sb):
        # row (block-uniform) < rows always: the test lets TVM prove the accesses in range
        if row >= 0 and row < T.cast(M, I64):
            emit_row(ENT, EMIT, NW, COS, SIN, KC, CSLOT, eps, row, pos, tx, lane, grp, c0, y, tmp, acc, red, q, sb)

    @T.prim_func
    def prefill_kernel(KV: T.Tensor((n, coff, d), in_dtype), SC: T.Tensor((n, coff, d), in_dtype),
                       APE: T.Tensor((R, coff, d), F32),
                       CU: T.Tensor((NB,), cu_dtype), START: T.Tensor((NS,), I64), SLOT: T.Tensor((NSL,), I64),
                       KVS: T.Tensor((S, NROWS, coff, d), F32), SCS: T.Tensor((S, NROWS, coff, d), F32),
                       ENT: T.Tensor((M, d), ENT_DTYPE), EMIT: T.Tensor((M,), U8), NW: T.Tensor((d,), F32),
                       COS: T.Tensor((P, 32), F32), SIN: T.Tensor((P, 32), F32),
                       KC: T.Tensor((NP, block_size * TOKEN_BYTES), U8), CSLOT: T.Tensor((M,), I64),
                       eps: T.float32, steps: T.int32):
        with T.Kernel(n // R + 2 * (NB - 1), threads=threads) as bx:
            tx = T.get_thread_binding()
            lane = tx % LANES
            grp = tx // LANES
            c0 = lane * VEC                                   # this thread's entry channels
            rk = T.alloc_local((CH * VEC,), F32)              # a chunk of pooled rows
            rs = T.alloc_local((CH * VEC,), F32)
            m = T.alloc_local((VEC,), F32)                    # running max, sum, weighted sum
            lsum = T.alloc_local((VEC,), F32)
            acc = T.alloc_local((VEC,), F32)
            tmp = T.alloc_local((4,), F32)
            y = T.alloc_local((VEC,), F32)
            q = T.alloc_local((2 * VEC,), U8)
            sb = T.alloc_local((2,), T.uint32)
            bs = T.alloc_local((2,), I64)                     # binary search bounds
            pv = T.alloc_local((4,), I64)                     # pooled rows: load_row
            cv = T.alloc_local((7,), I64)                     # the chunk's scalars
            sm = T.alloc_shared((GROUPS, d), F32)
            sl = T.alloc_shared((GROUPS, d), F32)
            sa = T.alloc_shared((GROUPS, d), F32)
            red = T.alloc_shared((WARPS,), F32)
            pid = T.cast(bx, I64)
            total = T.cast(n, I64)
            batch = T.cast(NB, I64) - 1
            candidates = total // R + batch
            if pid < candidates:
                # entry block: chunk b is the last with floor(cu_b / r) + b <= pid (strictly increasing in b)
                bs[0] = T.int64(0)
                bs[1] = batch
                for _ in T.serial(steps):
                    if T.min(T.max(T.cast(CU[(bs[0] + bs[1]) // 2], I64), T.int64(0)), total) // R + (
                            bs[0] + bs[1]) // 2 <= pid:
                        bs[0] = (bs[0] + bs[1]) // 2
                    else:
                        bs[1] = (bs[0] + bs[1]) // 2
            else:
                bs[0] = pid - candidates                      # state block of chunk pid - candidates
            # the chunk's scalars go through registers (cv): the index expressions stay small, and TVM's
            # simplifier is slow on the inlined ones; the let-bound names below carry the range conditions
            cv[0] = T.min(T.max(T.cast(CU[bs[0]], I64), T.int64(0)), total)                   # first token row
            cv[1] = T.min(T.max(T.cast(CU[bs[0] + 1], I64), cv[0]), total) - cv[0]            # chunk length
            cv[2] = START[bs[0]] if has_starts else T.int64(0)                                 # start position
            cv[3] = SLOT[bs[0]] if has_slots else bs[0]                                        # state slot
            lo = cv[0]
            start = cv[2]
            end = cv[2] + cv[1]
            slot = cv[3]
            valid = slot >= 0 and slot < T.cast(S, I64) and start >= 0
            if fused:
                valid = valid and end - R < T.cast(P, I64)
            # the entries this block pools, j0 .. j0 + count - 1: an entry block's own if it completes inside
            # the chunk and reads only its tokens (j0 >= first_free: the entries below read the state); a
            # state block's that reach into the state
            cv[4] = T.if_then_else(start > 0, (start + R - 1) // R + coff - 1, T.int64(0))   # first_free
            if pid < candidates:
                cv[5] = start // R + pid - (lo // R + bs[0])
                cv[6] = T.if_then_else(pid >= lo // R + bs[0] and cv[5] < end // R and cv[5] >= cv[4],
                                       T.int64(1), T.int64(0))
            else:
                cv[5] = start // R
                cv[6] = T.max(T.min(end // R, cv[4]) - cv[5], T.int64(0))
            j0 = cv[5]
            count = cv[6]
            pv[1] = lo - start
            pv[2] = start
            pv[3] = start // R * R
            if valid:
                for e in T.serial(coff):
                    if e < count:
                        pv[0] = (j0 + e - (coff - 1)) * R
                        pool(KV, SC, APE, KVS, SCS, pv, slot, grp, c0, rk, rs, m, lsum, acc, tmp, y, sm, sl, sa)
                        emit(ENT, EMIT, NW, COS, SIN, KC, CSLOT, eps,
                             j0 + e if compact else lo + (j0 + e + 1) * R - 1 - start, (j0 + e) * R, tx, lane, grp,
                             c0, y, tmp, acc, red, q, sb)
                    T.sync_threads()  # every state row pooled is read before any is rewritten, shared reused
                if pid >= candidates:
                    if coff == 2:
                        if start == 0 and end > 0 and end < R:  # a new sequence: entry 0's previous block is empty
                            for it in T.serial(ITEMS):
                                if it * threads + tx < R * VROW:
                                    for v in T.vectorized(VEC):
                                        KVS[slot, (it * threads + tx) // VROW, (it * threads + tx) % VROW // DV,
                                            (it * threads + tx) % DV * VEC + v] = 0.0
                                    for v in T.vectorized(VEC):
                                        SCS[slot, (it * threads + tx) // VROW, (it * threads + tx) % VROW // DV,
                                            (it * threads + tx) % DV * VEC + v] = NEG_INF
                        if end // R > start // R:  # a block completed: rows 0:4 <- the last complete block
                            pv[0] = (end // R - 1) * R
                            for it in T.serial(ITEMS):
                                if it * threads + tx < R * VROW:
                                    load_row(KV, SC, APE, KVS, SCS, rk, rs, 0, (it * threads + tx) // VROW, pv,
                                             slot, (it * threads + tx) % VROW // DV, (it * threads + tx) % DV * VEC)
                                    for v in T.vectorized(VEC):
                                        KVS[slot, (it * threads + tx) // VROW, (it * threads + tx) % VROW // DV,
                                            (it * threads + tx) % DV * VEC + v] = rk[v]
                                    for v in T.vectorized(VEC):
                                        SCS[slot, (it * threads + tx) // VROW, (it * threads + tx) % VROW // DV,
                                            (it * threads + tx) % DV * VEC + v] = rs[v]
                    for it in T.serial(ITEMS):  # the incomplete block's new rows at off + p mod r
                        if it * threads + tx < R * VROW:
                            tq = end - end % R + (it * threads + tx) // VROW
                            tt = lo + tq - start
                            hh = (it * threads + tx) % VROW // DV
                            cc = (it * threads + tx) % DV * VEC
                            if tq < end and tq >= start and tt >= 0 and tt < total:
                                for v in T.vectorized(VEC):
                                    KVS[slot, OFF + tq % R, hh, cc + v] = T.cast(KV[tt, hh, cc + v], F32)
                                for v in T.vectorized(VEC):
                                    SCS[slot, OFF + tq % R, hh, cc + v] = T.cast(SC[tt, hh, cc + v], F32) + APE[
                                        tq % R, hh, cc + v]

    return prefill_kernel


@functools.lru_cache(maxsize=None)
def _compiled(target: str, *params):
    return tilelang.compile(make_prefill_kernel(*params), target=target)


@functools.lru_cache(maxsize=None)
def _dummies(device: torch.device, d: int, block_size: int) -> tuple:
    """Tensors of the right dtypes and static shapes for the arguments a form does not read."""
    return (torch.empty((0,), dtype=torch.int64, device=device), torch.empty((d,), dtype=torch.float32, device=device),
            torch.empty((0, 32), dtype=torch.float32, device=device),
            torch.empty((0, block_size * TOKEN_BYTES), dtype=torch.uint8, device=device))


def _launch(op, kv, score, ape, ratio, cu_seqlens, kv_state, score_state, start_positions, slot_ids, norm_weight,
            rope_cos, rope_sin, kv_cache, cache_block_size, cache_slots, compact):
    """compact: one chunk from position 0, entry j at row j of [N // r, d], cache_slots per entry; else
    entries [N, d] at the completing tokens' rows with emitted [N], zeros elsewhere."""
    total, width = kv.shape
    coff = 2 if ratio == 4 else 1
    d = width // coff
    batch = cu_seqlens.shape[0] - 1
    fused, cache = norm_weight is not None, kv_cache is not None
    dtype = torch.bfloat16 if fused else torch.float32
    rows = total // ratio if compact else total
    entries = (torch.empty if compact else torch.zeros)((rows, d), dtype=dtype, device=kv.device)
    emitted = (torch.empty if compact else torch.zeros)((rows,), dtype=torch.bool, device=kv.device)  # compact: unused
    if total == 0 or batch == 0:
        return entries, emitted
    cfg = dispatch.config(dispatch.get(op, "tilelang"), platform.device_info(kv))
    block = cache_block_size if cache else 64
    kernel = _compiled(platform.tilelang_target(kv), ratio, d, INPUT_DTYPES[kv.dtype], CU_DTYPES[cu_seqlens.dtype], fused, cache,
                       compact, start_positions is not None, slot_ids is not None, cfg["threads"], cfg["CHUNK"],
                       block)
    none_i64, none_w, none_table, none_cache = _dummies(kv.device, d, block)
    half = (total, coff, d)
    state = (kv_state.shape[0], coff * ratio, coff, d)
    kernel(kv.view(half), score.view(half), ape.view(ratio, coff, d), cu_seqlens,
           start_positions if start_positions is not None else none_i64,
           slot_ids if slot_ids is not None else none_i64, kv_state.view(state), score_state.view(state), entries,
           emitted.view(torch.uint8), norm_weight if fused else none_w, rope_cos if fused else none_table,
           rope_sin if fused else none_table, kv_cache if cache else none_cache,
           cache_slots if cache else torch.empty((rows,), dtype=torch.int64, device=kv.device), 1e-6,
           max(1, batch.bit_length()))
    return entries, emitted


def compressor_prefill_batched(kv, score, ape, ratio, cu_seqlens, kv_state, score_state, start_positions=None,
                               slot_ids=None, norm_weight=None, rope_cos=None, rope_sin=None, kv_cache=None,
                               cache_block_size=64, cache_slots=None):
    return _launch("compressor_prefill_batched", kv, score, ape, ratio, cu_seqlens, kv_state, score_state,
                   start_positions, slot_ids, norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size,
                   cache_slots, compact=False)


def compressor_prefill(kv, score, ape, ratio, norm_weight=None, rope_cos=None, rope_sin=None, kv_cache=None,
                       cache_block_size=64, cache_slots=None):
    """The single-sequence form: one chunk from position 0 into a fresh state, entries compact."""
    from dsv4_kernels.reference.compressor import compressor_init_state
    seq_len, width = kv.shape
    coff = 2 if ratio == 4 else 1
    kv_state, score_state = compressor_init_state(ratio, width // coff, 1, kv.device)
    cu = torch.tensor([0, seq_len], dtype=torch.int64, device=kv.device)
    entries, _ = _launch("compressor_prefill", kv, score, ape, ratio, cu, kv_state, score_state, None, None,
                         norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size, cache_slots, compact=True)
    return entries, kv_state[0], score_state[0]


INT32_MAX = 2**31 - 1


def _guard(kv, score, ape, ratio, kv_state, score_state, ints, norm_weight, rope_cos, kv_cache,
           batch) -> str | None:
    """What prefill_kernel was built for, beyond the shared guard (both forms)."""
    if ratio not in (4, 128):
        return f"built for ratio 4 or 128, got {ratio}"
    coff = 2 if ratio == 4 else 1
    if kv.dim() != 2 or kv.shape[1] % coff or kv.shape[1] // coff not in (512, 128):
        return f"built for d = 512 or 128 (kv [N, {coff} * d]), got kv shape {tuple(kv.shape)}"
    if kv.dtype not in INPUT_DTYPES:
        return f"kv and score: built for fp32 or bf16, got {kv.dtype}"
    for name, t in ints:
        if t is not None and (t.dtype != torch.int64 or not t.is_contiguous()):
            return f"{name} must be a contiguous int64 tensor, got {t.dtype}"
    if kv_cache is not None and (kv_cache.dtype != torch.uint8 or norm_weight is None
                                 or kv.shape[1] // coff != CACHE_D):
        return f"kv_cache: built for a uint8 cache with the fused form at d = {CACHE_D}"
    counts = [("token row", kv.shape[0]), ("block", kv.shape[0] // ratio + 2 * batch)]
    if kv_state is not None:
        counts.append(("state slot", kv_state.shape[0]))
    if rope_cos is not None:
        counts.append(("rope table row", rope_cos.shape[0]))
    if kv_cache is not None:
        counts.append(("cache page", kv_cache.shape[0]))
    for name, count in counts:
        if count > INT32_MAX:
            return f"{count} {name}s exceed the int32 {name} count of the TileLang kernel ({INT32_MAX})"
    nbytes_in = 16 if kv.dtype == torch.float32 else 8
    aligned = [("kv", kv, nbytes_in), ("score", score, nbytes_in), ("ape", ape, 16)]
    if kv_state is not None:
        aligned += [("kv_state", kv_state, 16), ("score_state", score_state, 16)]
    if kv_cache is not None:
        aligned.append(("kv_cache", kv_cache, 8))
    for name, t, nbytes in aligned:
        if t.data_ptr() % nbytes:
            return (f"{name}: the TileLang kernel uses {nbytes}-byte accesses, data_ptr {t.data_ptr():#x} is not "
                    f"{nbytes}-byte aligned")
    return None


def supports_compressor_prefill_batched(kv, score, ape, ratio, cu_seqlens, kv_state, score_state,
                                        start_positions=None, slot_ids=None, norm_weight=None, rope_cos=None,
                                        rope_sin=None, kv_cache=None, cache_block_size=64,
                                        cache_slots=None) -> str | None:
    """prefill_kernel's batched form: ratio 4 or 128, d 512 or 128, fp32 or bf16 kv / score, int32 or int64
    cu_seqlens, int64 starts, slots and cache slots, 16-byte aligned fp32 tensors (8-byte for bf16 inputs;
    the vector accesses are unchecked), an 8-byte aligned cache, int32 counts."""
    reason = shared.supports_compressor_prefill_batched(kv, score, ape, ratio, cu_seqlens, kv_state, score_state,
                                                        start_positions, slot_ids, norm_weight, rope_cos, rope_sin,
                                                        kv_cache, cache_block_size, cache_slots)
    if reason:
        return reason
    if cu_seqlens.dtype not in CU_DTYPES:
        return f"cu_seqlens: built for int32 or int64, got {cu_seqlens.dtype}"
    if cu_seqlens.shape[0] > INT32_MAX:
        return f"{cu_seqlens.shape[0]} cu_seqlens entries exceed the int32 count of the TileLang kernel"
    return _guard(kv, score, ape, ratio, kv_state, score_state,
                  (("start_positions", start_positions), ("slot_ids", slot_ids), ("cache_slots", cache_slots)),
                  norm_weight, rope_cos, kv_cache, cu_seqlens.shape[0] - 1)


def supports_compressor_prefill(kv, score, ape, ratio, norm_weight=None, rope_cos=None, rope_sin=None,
                                kv_cache=None, cache_block_size=64, cache_slots=None) -> str | None:
    """prefill_kernel's single-sequence (compact) form: as the batched form, without starts or slots."""
    reason = shared.supports_compressor_prefill(kv, score, ape, ratio, norm_weight, rope_cos, rope_sin, kv_cache,
                                                cache_block_size, cache_slots)
    return reason or _guard(kv, score, ape, ratio, None, None, (("cache_slots", cache_slots),), norm_weight,
                            rope_cos, kv_cache, 1)


# Two specs (codegen time is CI time): the attention compressor's CSA form (ratio 4, d = 512, bf16 inputs, the
# FP8 cache store) batched, and the single-sequence form at ratio 128, d = 128 in fp32 (int64 cu_seqlens);
# tests/compressor/test_compressor_tilelang_prefill.py lowers other forms to CUDA source.
CODEGEN_BATCHED = ((4, 512, BF16, "int32", True, True),)
CODEGEN_SINGLE = ((128, 128, F32, I64, False, False),)


def _specs(op: str, forms, compact: bool) -> list:
    from dsv4_kernels.codegen import TileLangKernel
    cfg = dispatch.get(op, "tilelang").defaults
    return [TileLangKernel(make_prefill_kernel(ratio, d, in_dtype, cu_dtype, fused, cache, compact, not compact,
                                               not compact, cfg["threads"], cfg["CHUNK"]),
                           label=f"r{ratio}-d{d}" + ("-bf16-in" if in_dtype == BF16 else "")
                           + ("-fp8-cache" if cache else "-fp32"))
            for ratio, d, in_dtype, cu_dtype, fused, cache in forms]


def codegen_compressor_prefill_batched(target) -> list:
    return _specs("compressor_prefill_batched", CODEGEN_BATCHED, compact=False)


def codegen_compressor_prefill(target) -> list:
    return _specs("compressor_prefill", CODEGEN_SINGLE, compact=True)
