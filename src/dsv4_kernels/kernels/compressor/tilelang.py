"""TileLang (GPU dialect) source of the compressor decode step (SPEC 2): one launch for a batch of
sequences, one source for sm_90a, sm_100a, gfx942 and gfx950. The semantics and numerics are those of
triton.py (README.md); the thread layout is this file's own.

decode_kernel: one block per row b (grid B), `threads` threads. Thread t owns 4 consecutive fp32 channels
(one 16-byte access) in each layout below:
- state write: channels 4 * (i * threads + t) of the coff*d wide row, i < ceil(coff*d / (4 * threads));
  (kv, score + ape[p mod r]) go to row off + p mod r of state slot slot_ids[b] (off = 4 for ratio 4);
- pooling (a row that completes its block, decided on the device): channel lane l = t mod (d / 4) owns
  entry channels [4 l, 4 l + 4); row group g = t div (d / 4) runs an online softmax (running max, sum
  and weighted sum in fp32 registers) over the state rows g, g + G, g + 2G, ... below the last, CHUNK
  rows per step; row group 0 then adds the block's last row, this step's token, from the kv / score
  inputs (never from the state row this launch wrote). The G partial softmaxes meet in shared memory
  and row group 0 combines them. Ratio 4 reads the A halves ([:d]) of rows 0:4 and the B halves ([d:])
  of rows 4:8, then, after a barrier, shifts rows 4:8 to 0:4 (row 7 from registers);
- the entry: fp32, or (fused form) RMSNorm with the sum of squares reduced over the block (xor shuffles
  then shared memory) and the interleaved RoPE of the last 64 dims at position p + 1 - r (a thread's 4
  channels are 2 whole pairs), both rounded to bf16 by integer ops (round to nearest even, the bits
  triton.py gives); then, with a cache, the SPEC 1.2 bytes at the row's cache slot: per 64-channel tile
  (16 lanes) the amax by xor shuffles, the ue8m0 scale from the fp32 bits, e4m3fn codes by integer
  arithmetic (no fp8 type: gfx942's native fp8 is e4m3fnuz), the 64 rope values as raw bf16 bytes, 7
  scale bytes and a zero pad.
Invalid rows (slot outside the state, negative position, fused: RoPE position past the tables) read and
write nothing and emit nothing; a cache slot outside the cache skips the store. Nothing is wrapped.

d, the ratio, the entry form, slot addressing and the block shape are compile-time; B, the slot count,
the RoPE table rows and the cache size are symbolic, so one compile per form serves every batch, and
nothing is read back to the host (CUDA-graph capturable). Indices into the state and the cache are int64.
"""
import functools

import torch
import tilelang
import tilelang.language as T

from dsv4_kernels import dispatch, platform
from dsv4_kernels.kernels import compressor as shared

from dsv4_kernels.kernels.compressor.tilelang_common import (  # noqa: F401 (re-exported)
    BF16, CACHE_D, DATA_BYTES, E4M3_MAX, F32, I32, I64, NOPE, ROPE_DIM, SCALE_FLOOR, TOKEN_BYTES, U8, U32, VEC,
    _bf16_rne, _e4m3fn, _exp, make_fused_tail, pool_plan)

# threads: per block (one block per sequence row); CHUNK: state rows per online-softmax step of a thread.
DEFAULTS = {"compressor_decode": {"threads": 256, "CHUNK": 8}}


def row_plan(ratio: int, d: int, threads: int, chunk: int) -> tuple[int, int, int, int]:
    """(LANES, GROUPS, STEPS, CHUNK) of the pooling: LANES = d / 4 channel lanes, GROUPS = threads / LANES
    row groups; group g pools state rows g + GROUPS * k for k < STEPS * CHUNK (rows past the block's
    last state row are masked), the block's last row being added from the inputs. CHUNK is clipped to
    the rows a group has."""
    return pool_plan((2 if ratio == 4 else 1) * ratio - 1, d, threads, chunk)


def make_decode_kernel(ratio: int, d: int, fused: bool, cache: bool, has_slots: bool, threads: int, chunk: int,
                       block_size: int = 64):
    """compressor_decode for one form: grid B, `threads` threads per block (see the module docstring).

    Arguments: KVS, SCS [slots, coff*r*coff, d] fp32 (the state [slots, coff*r, coff*d] viewed as
    half rows, updated in place); KV, SC [B, coff*d] fp32; APE [r, coff*d] fp32; POS [B] int64; SLOT [B]
    int64 (read only with has_slots); ENT [B, d] fp32 (bf16 fused); EMIT [B] uint8; fused: NW [d] fp32,
    COS, SIN [P, 32] fp32, eps; cache: KC [pages, block_size * 584] uint8, CSLOT [B] int64.
    """
    if ratio not in (4, 128) or d not in (128, 512):
        raise ValueError(f"decode kernel: expected ratio 4 or 128 and d 128 or 512, got ratio {ratio}, d {d}")
    if cache and (not fused or d != CACHE_D):
        raise ValueError(f"decode kernel: the FP8 cache store needs the fused form and d = {CACHE_D}")
    if block_size < 1:
        raise ValueError(f"decode kernel: block_size must be >= 1, got {block_size}")
    coff = 2 if ratio == 4 else 1
    W = coff * d                                  # state row width
    NROWS = coff * ratio                          # rows pooled per entry (8 or 128)
    OFF = ratio if coff == 2 else 0               # ratio 4 writes the current block to rows 4:8
    HALF = ratio if coff == 2 else NROWS          # rows from HALF on are read at channel offset d
    CUR = (coff - 1) * d                          # the current row's channels in the pooled entry
    LANES, GROUPS, STEPS, CH = row_plan(ratio, d, threads, chunk)
    WSTEPS = -(-W // (VEC * threads))             # state-write passes
    WARPS = max(1, LANES // 32)                   # warps of row group 0
    ENT_DTYPE = BF16 if fused else F32
    BS = block_size
    NEG_INF = -T.infinity(F32)
    n = T.dynamic("n")
    S = T.dynamic("slots")
    P = T.dynamic("rope_rows")
    NP = T.dynamic("pages")

    store_fp8, finish_fused = make_fused_tail(d, cache, BS, NP, WARPS)

    @T.macro
    def body(KVS, SCS, KV, SC, APE, POS, SLOT, ENT, EMIT, NW, COS, SIN, KC, CSLOT, eps):
        with T.Kernel(n, threads=threads) as b:
            tx = T.get_thread_binding()
            lane = tx % LANES
            grp = tx // LANES
            c0 = lane * VEC                                   # this thread's entry channels
            kvr = T.alloc_local((WSTEPS * VEC,), F32)         # this step's row, state-write layout
            scr = T.alloc_local((WSTEPS * VEC,), F32)
            rk = T.alloc_local((CH * VEC,), F32)              # a chunk of state rows
            rs = T.alloc_local((CH * VEC,), F32)
            m = T.alloc_local((VEC,), F32)                    # running max, sum, weighted sum
            lsum = T.alloc_local((VEC,), F32)
            acc = T.alloc_local((VEC,), F32)
            tmp = T.alloc_local((4,), F32)
            y = T.alloc_local((VEC,), F32)
            q = T.alloc_local((2 * VEC,), U8)
            sb = T.alloc_local((2,), U32)
            sm = T.alloc_shared((GROUPS, d), F32)
            sl = T.alloc_shared((GROUPS, d), F32)
            sa = T.alloc_shared((GROUPS, d), F32)
            red = T.alloc_shared((WARPS,), F32)
            p = POS[b]
            slot = SLOT[b] if has_slots else T.cast(b, I64)
            valid = slot >= 0 and slot < T.cast(S, I64) and p >= 0
            if fused:
                valid = valid and p + 1 - ratio < T.cast(P, I64)
            phase = T.if_then_else(valid, p % ratio, T.int64(0))
            emit = valid and phase == ratio - 1               # decided on the device
            if valid:  # never wrapped: an invalid row touches nothing
                for i in T.unroll(WSTEPS):
                    ch = (i * threads + tx) * VEC
                    if ch < W:
                        for v in T.vectorized(VEC):
                            kvr[i * VEC + v] = KV[b, ch + v]
                        for v in T.vectorized(VEC):
                            scr[i * VEC + v] = SC[b, ch + v] + APE[phase, ch + v]   # sc' = sc + ape[p mod r]
                        for v in T.vectorized(VEC):
                            KVS[slot, (OFF + phase) * coff + ch // d, ch % d + v] = kvr[i * VEC + v]
                        for v in T.vectorized(VEC):
                            SCS[slot, (OFF + phase) * coff + ch // d, ch % d + v] = scr[i * VEC + v]
            if emit:
                for v in T.unroll(VEC):
                    m[v] = NEG_INF
                    lsum[v] = 0.0
                    acc[v] = 0.0
                for s in T.serial(STEPS):
                    for j in T.unroll(CH):
                        row = grp + GROUPS * (s * CH + j)
                        if row < NROWS - 1:
                            if coff == 2:  # rows 0:4 give their A halves, rows 4:8 their B halves
                                for v in T.vectorized(VEC):
                                    rs[j * VEC + v] = SCS[slot, 2 * row + T.cast(row >= HALF, I32), c0 + v]
                                for v in T.vectorized(VEC):
                                    rk[j * VEC + v] = KVS[slot, 2 * row + T.cast(row >= HALF, I32), c0 + v]
                            else:
                                for v in T.vectorized(VEC):
                                    rs[j * VEC + v] = SCS[slot, row, c0 + v]
                                for v in T.vectorized(VEC):
                                    rk[j * VEC + v] = KVS[slot, row, c0 + v]
                        else:
                            for v in T.unroll(VEC):
                                rs[j * VEC + v] = NEG_INF
                                rk[j * VEC + v] = 0.0
                    for v in T.unroll(VEC):  # online softmax step over the chunk
                        tmp[0] = m[v]
                        for j in T.unroll(CH):
                            tmp[0] = T.max(tmp[0], rs[j * VEC + v])
                        tmp[1] = T.if_then_else(m[v] == tmp[0], 1.0, _exp(m[v] - tmp[0]))
                        lsum[v] = lsum[v] * tmp[1]
                        acc[v] = acc[v] * tmp[1]
                        for j in T.unroll(CH):
                            tmp[2] = T.if_then_else(rs[j * VEC + v] == NEG_INF, 0.0, _exp(rs[j * VEC + v] - tmp[0]))
                            lsum[v] = lsum[v] + tmp[2]
                            acc[v] = acc[v] + tmp[2] * rk[j * VEC + v]
                        m[v] = tmp[0]
                if grp == 0:  # the block's last row: this step's token, from the inputs
                    for v in T.unroll(VEC):
                        tmp[3] = SC[b, CUR + c0 + v] + APE[ratio - 1, CUR + c0 + v]
                        tmp[0] = T.max(m[v], tmp[3])
                        tmp[1] = T.if_then_else(m[v] == tmp[0], 1.0, _exp(m[v] - tmp[0]))
                        tmp[2] = T.if_then_else(tmp[3] == NEG_INF, 0.0, _exp(tmp[3] - tmp[0]))
                        lsum[v] = lsum[v] * tmp[1] + tmp[2]
                        acc[v] = acc[v] * tmp[1] + tmp[2] * KV[b, CUR + c0 + v]
                        m[v] = tmp[0]
                for v in T.unroll(VEC):
                    sm[grp, c0 + v] = m[v]
                    sl[grp, c0 + v] = lsum[v]
                    sa[grp, c0 + v] = acc[v]
                T.sync_threads()
                if coff == 2:  # rows 0:4 <- rows 4:8, after every pooling read (the barrier above)
                    for i in T.unroll(WSTEPS):
                        ch = (i * threads + tx) * VEC
                        if ch < W:
                            for r in T.unroll(ratio - 1):
                                for v in T.vectorized(VEC):
                                    KVS[slot, 2 * r + ch // d, ch % d + v] = KVS[slot, 2 * (ratio + r) + ch // d,
                                                                                 ch % d + v]
                                for v in T.vectorized(VEC):
                                    SCS[slot, 2 * r + ch // d, ch % d + v] = SCS[slot, 2 * (ratio + r) + ch // d,
                                                                                 ch % d + v]
                            for v in T.vectorized(VEC):
                                KVS[slot, 2 * (ratio - 1) + ch // d, ch % d + v] = kvr[i * VEC + v]
                            for v in T.vectorized(VEC):
                                SCS[slot, 2 * (ratio - 1) + ch // d, ch % d + v] = scr[i * VEC + v]
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
                if fused:
                    finish_fused(ENT, NW, COS, SIN, KC, CSLOT, eps, b, tx, lane, grp, c0, p + 1 - ratio, y, tmp, acc,
                                 red, q, sb)
                elif grp == 0:
                    for v in T.vectorized(VEC):
                        ENT[b, c0 + v] = y[v]
            elif grp == 0:
                for v in T.vectorized(VEC):
                    ENT[b, c0 + v] = T.cast(0, ENT_DTYPE)
            if tx == 0:
                EMIT[b] = T.cast(emit, U8)

    SHAPE = (S, NROWS * coff, d)
    if cache:
        @T.prim_func
        def decode_kernel(KVS: T.Tensor(SHAPE, F32), SCS: T.Tensor(SHAPE, F32), KV: T.Tensor((n, W), F32),
                          SC: T.Tensor((n, W), F32), APE: T.Tensor((ratio, W), F32), POS: T.Tensor((n,), I64),
                          SLOT: T.Tensor((n,), I64), ENT: T.Tensor((n, d), ENT_DTYPE), EMIT: T.Tensor((n,), U8),
                          NW: T.Tensor((d,), F32), COS: T.Tensor((P, 32), F32), SIN: T.Tensor((P, 32), F32),
                          KC: T.Tensor((NP, BS * TOKEN_BYTES), U8), CSLOT: T.Tensor((n,), I64), eps: T.float32):
            body(KVS, SCS, KV, SC, APE, POS, SLOT, ENT, EMIT, NW, COS, SIN, KC, CSLOT, eps)
    elif fused:
        @T.prim_func
        def decode_kernel(KVS: T.Tensor(SHAPE, F32), SCS: T.Tensor(SHAPE, F32), KV: T.Tensor((n, W), F32),
                          SC: T.Tensor((n, W), F32), APE: T.Tensor((ratio, W), F32), POS: T.Tensor((n,), I64),
                          SLOT: T.Tensor((n,), I64), ENT: T.Tensor((n, d), ENT_DTYPE), EMIT: T.Tensor((n,), U8),
                          NW: T.Tensor((d,), F32), COS: T.Tensor((P, 32), F32), SIN: T.Tensor((P, 32), F32),
                          eps: T.float32):
            body(KVS, SCS, KV, SC, APE, POS, SLOT, ENT, EMIT, NW, COS, SIN, None, None, eps)
    else:
        @T.prim_func
        def decode_kernel(KVS: T.Tensor(SHAPE, F32), SCS: T.Tensor(SHAPE, F32), KV: T.Tensor((n, W), F32),
                          SC: T.Tensor((n, W), F32), APE: T.Tensor((ratio, W), F32), POS: T.Tensor((n,), I64),
                          SLOT: T.Tensor((n,), I64), ENT: T.Tensor((n, d), ENT_DTYPE), EMIT: T.Tensor((n,), U8)):
            body(KVS, SCS, KV, SC, APE, POS, SLOT, ENT, EMIT, None, None, None, None, None, None)

    return decode_kernel


@functools.lru_cache(maxsize=None)
def _compiled(target: str, *params):
    return tilelang.compile(make_decode_kernel(*params), target=target)


def compressor_decode(kv_state, score_state, kv, score, ape, positions, ratio, slot_ids=None, norm_weight=None,
                      rope_cos=None, rope_sin=None, kv_cache=None, cache_block_size=64, cache_slots=None):
    batch, width = kv.shape
    coff = 2 if ratio == 4 else 1
    d = width // coff
    fused, cache = norm_weight is not None, kv_cache is not None
    entries = torch.empty((batch, d), dtype=torch.bfloat16 if fused else torch.float32, device=kv.device)
    emitted = torch.empty((batch,), dtype=torch.bool, device=kv.device)
    if batch == 0:
        return entries, emitted
    cfg = dispatch.config(dispatch.get("compressor_decode", "tilelang"), platform.device_info(kv))
    kernel = _compiled(platform.tilelang_target(kv), ratio, d, fused, cache, slot_ids is not None, cfg["threads"], cfg["CHUNK"],
                       cache_block_size if cache else 64)
    half_rows = (kv_state.shape[0], coff * coff * ratio, d)   # the state as [slots, half rows, d]
    args = [kv_state.view(half_rows), score_state.view(half_rows), kv, score, ape, positions,
            slot_ids if slot_ids is not None else positions, entries, emitted.view(torch.uint8)]
    if fused:
        args += [norm_weight, rope_cos, rope_sin]
        if cache:
            args += [kv_cache, cache_slots]
        args.append(1e-6)
    kernel(*args)
    return entries, emitted


INT32_MAX = 2**31 - 1
# (name, bytes) of the vector accesses per tensor: fp32 16 bytes; the cache's rope bytes 8 at a time.
_VECTOR_BYTES = (("kv_state", 16), ("score_state", 16), ("kv", 16), ("score", 16), ("ape", 16))


def supports_compressor_decode(kv_state, score_state, kv, score, ape, positions, ratio, slot_ids=None,
                               norm_weight=None, rope_cos=None, rope_sin=None, kv_cache=None, cache_block_size=64,
                               cache_slots=None) -> str | None:
    """What decode_kernel was built for: ratio 4 or 128, d 512 or 128, fp32 contiguous state and inputs,
    int64 positions and slots, fp32 fused-form tables, 16-byte aligned fp32 tensors (its vector accesses are
    unchecked), an 8-byte aligned cache, and int32 counts of rows, slots, table rows and cache pages."""
    reason = shared.supports_compressor_decode(kv_state, score_state, kv, score, ape, positions, ratio, slot_ids,
                                               norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size,
                                               cache_slots)
    if reason:
        return reason
    if ratio not in (4, 128):
        return f"built for ratio 4 or 128, got {ratio}"
    coff = 2 if ratio == 4 else 1
    if kv.dim() != 2 or kv.shape[1] % coff or kv.shape[1] // coff not in (512, 128):
        return f"built for d = 512 or 128 (kv [B, {coff} * d]), got kv shape {tuple(kv.shape)}"
    for name, t in (("positions", positions), ("slot_ids", slot_ids), ("cache_slots", cache_slots)):
        if t is not None and (t.dtype != torch.int64 or not t.is_contiguous()):
            return f"{name} must be a contiguous int64 tensor, got {t.dtype}"
    if kv_cache is not None and (kv_cache.dtype != torch.uint8 or norm_weight is None):
        return "kv_cache: built for a uint8 cache with the fused form"
    counts = [("row", kv.shape[0]), ("state slot", kv_state.shape[0])]
    if rope_cos is not None:
        counts.append(("rope table row", rope_cos.shape[0]))
    if kv_cache is not None:
        counts.append(("cache page", kv_cache.shape[0]))
    for name, count in counts:
        if count > INT32_MAX:
            return f"{count} {name}s exceed the int32 {name} count of the TileLang kernel ({INT32_MAX})"
    aligned = [(name, t, nbytes) for (name, nbytes), t in zip(_VECTOR_BYTES, (kv_state, score_state, kv, score, ape))]
    if kv_cache is not None:
        aligned.append(("kv_cache", kv_cache, 8))
    for name, t, nbytes in aligned:
        if t.data_ptr() % nbytes:
            return (f"{name}: the TileLang kernel uses {nbytes}-byte accesses, data_ptr {t.data_ptr():#x} is not "
                    f"{nbytes}-byte aligned")
    return None


# The forms engines run (V4: the attention compressor at ratio 4 and 128 with the FP8 cache store, the
# indexer compressor at ratio 4); tests/compressor/test_compressor_tilelang.py lowers the others to source.
CODEGEN_FORMS = ((4, 512, True, True), (128, 512, True, True), (4, 128, False, False))


def codegen_compressor_decode(target) -> list:
    from dsv4_kernels.codegen import TileLangKernel
    cfg = dict(dispatch.get("compressor_decode", "tilelang").defaults)
    return [TileLangKernel(make_decode_kernel(ratio, d, fused, cache, True, cfg["threads"], cfg["CHUNK"]),
                           label=f"r{ratio}-d{d}" + ("-fp8-cache" if cache else "-fp32"))
            for ratio, d, fused, cache in CODEGEN_FORMS]


# The prefill (both public forms) lives in tilelang_prefill.py; the dispatcher finds every TileLang entry here.
from dsv4_kernels.kernels.compressor.tilelang_prefill import (  # noqa: E402, F401
    codegen_compressor_prefill, codegen_compressor_prefill_batched, compressor_prefill, compressor_prefill_batched,
    supports_compressor_prefill, supports_compressor_prefill_batched)

# The indexer cache form (d = 128: Hadamard + MXFP4) lives in tilelang_indexer.py.
from dsv4_kernels.kernels.compressor.tilelang_indexer import (  # noqa: E402, F401
    codegen_indexer_cache_quantize, indexer_cache_quantize, supports_indexer_cache_quantize)
