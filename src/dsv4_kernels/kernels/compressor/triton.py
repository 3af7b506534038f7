"""Triton source of the compressor decode step (SPEC 2): one launch for a batch of sequences, one source
for sm_90a, sm_100a, gfx942 and gfx950.

decode_kernel, one program per row b: write (kv, score + ape[p mod r]) into row off + p mod r of state
slot slot_ids[b]; if the block completes (decided on the device), pool the block's rows per channel with an
online softmax over row chunks (the row just written comes from registers, not from memory), shift the
ratio-4 state, and write the entry: fp32, or RMSNorm + interleaved RoPE on the last 64 dims in bf16 (the
fused form), then optionally its SPEC 1.2 FP8 form into the paged cache at its cache slot. Invalid rows (slot outside the state, negative position, RoPE position past the tables)
read and write nothing and emit nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4_kernels import dispatch, platform
from dsv4_kernels.kernels._triton_util import FP_FUSION, bf16_rne

ROPE_PAIRS = 32


@triton.jit
def _pool(state_kv, state_sc, base, cur_kv, cur_sc, d, NROWS: tl.constexpr, HALF: tl.constexpr,
          D: tl.constexpr, W: tl.constexpr, ROW_CHUNK: tl.constexpr):
    # [D] = sum_rows softmax_rows(score) * kv per channel, over rows 0 .. NROWS-2 of the state (row i reads
    # channels (i >= HALF) * D + d: ratio 4 pools the A halves of rows 0:4, the B halves of rows 4:8) and the
    # current row (cur_*, in registers). Online softmax: running max m, denominator l, numerator acc.
    m = tl.full([D], float("-inf"), tl.float32)
    l = tl.zeros([D], dtype=tl.float32)
    acc = tl.zeros([D], dtype=tl.float32)
    rc = tl.arange(0, ROW_CHUNK)
    for r0 in range(0, NROWS - 1, ROW_CHUNK):
        rows = r0 + rc                                                           # [RC]
        ok = rows < NROWS - 1
        offs = base + rows[:, None].to(tl.int64) * W + (rows >= HALF)[:, None] * D + d[None, :]  # [RC, D]
        s = tl.load(state_sc + offs, mask=ok[:, None], other=float("-inf"))
        k = tl.load(state_kv + offs, mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
        e = tl.where(s == float("-inf"), 0.0, tl.exp(s - m_new[None, :]))
        l = l * alpha + tl.sum(e, axis=0)
        acc = acc * alpha + tl.sum(e * k, axis=0)
        m = m_new
    m_new = tl.maximum(m, cur_sc)
    alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
    e = tl.where(cur_sc == float("-inf"), 0.0, tl.exp(cur_sc - m_new))
    return (acc * alpha + e * cur_kv) / (l * alpha + e)  # all -inf scores: 0 / 0 = NaN, as the reference


@triton.jit
def _norm_rope(x, w_ptr, cos_ptr, sin_ptr, pos, eps, d, D: tl.constexpr):
    # [D] fp32 -> [D] bf16: y = bf16(x * rsqrt(mean(x^2) + eps) * w); pairs (y[2i], y[2i+1]) of the last 64
    # dims rotated by the angle at pos in fp32 on the bf16 values, rounded to bf16
    y = bf16_rne(x * tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps) * tl.load(w_ptr + d)).to(tl.float32)
    even, odd = tl.split(tl.reshape(y, (D // 2, 2)))                              # [D/2] each
    i = tl.arange(0, D // 2) - (D // 2 - 32)                                      # pair index in the rope dims
    rope = i >= 0
    c = tl.load(cos_ptr + pos * 32 + i, mask=rope, other=1.0)
    s = tl.load(sin_ptr + pos * 32 + i, mask=rope, other=0.0)
    out = tl.reshape(tl.join(even * c - odd * s, even * s + odd * c), (D,))
    return tl.where(tl.reshape(tl.join(rope, rope), (D,)), bf16_rne(out), bf16_rne(y))


@triton.jit
def _e4m3fn(v):
    # fp32 |v| <= 448 -> e4m3fn byte, round to nearest even, by integer ops (the interpreter has no fp8
    # cast; the GPUs' cvt.rn gives the same bytes). Sign from the IEEE sign bit (-0 gives 0x80).
    bits = v.to(tl.uint32, bitcast=True)
    a = tl.abs(v)
    abits = a.to(tl.uint32, bitcast=True)
    rounded = abits + 0x7FFFF + ((abits >> 20) & 1)                         # keep 3 mantissa bits, RNE
    normal = ((tl.maximum(rounded >> 23, 121) - 120) << 3) | ((rounded >> 20) & 7)  # bias 127 -> 7
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.uint32)              # units of 2^-9, RNE
    code = tl.where(a < 0.015625, sub, normal)                              # below 2^-6: subnormal
    return (code | ((bits >> 31) << 7)).to(tl.uint8)


@triton.jit
def _store_kv_fp8(y, cache_ptr, cslot, block_size, capacity):
    # SPEC 1.2 form of one 512-d bf16 entry y [512] at flat cache slot cslot (skipped outside the cache):
    # 7 tiles of 64 nope values as e4m3fn with ue8m0 scales 2^ceil(log2(max(amax / 448, 1e-4))), the
    # last 64 (rope) as raw bf16, the scale bytes and a zero pad byte in the page's scale area. A tile with
    # a NaN or an infinity gets scale byte 255 and NaN bytes 0x7F.
    if (cslot >= 0) & (cslot < capacity):
        page = cslot // block_size
        row = cslot % block_size
        tiles = tl.reshape(y.to(tl.float32), (8, 64))                       # [8, 64]: 7 nope tiles, rope
        k = tl.arange(0, 8)
        j = tl.arange(0, 64)
        bad = tl.max(tl.where((tiles - tiles) == 0.0, 0, 1), axis=1) > 0    # NaN or inf in the tile
        amax = tl.max(tl.abs(tiles), axis=1)
        r = tl.maximum(tl.div_rn(amax, 448.0), 0.0001).to(tl.uint32, bitcast=True)
        exp = (r >> 23) + ((r & 0x7FFFFF) != 0)                             # ceil to a power of two
        inv = ((254 - tl.minimum(exp, 254)) << 23).to(tl.float32, bitcast=True)  # 1 / scale, exact
        q = _e4m3fn(tl.minimum(tl.maximum(tiles * inv[:, None], -448.0), 448.0))
        q = tl.where(bad[:, None], 0x7F, q).to(tl.uint8)
        base = cache_ptr + page * (block_size * 584)
        data = base + row * 576
        nope = k[:, None] < 7
        tl.store(data + k[:, None] * 64 + j[None, :], q, mask=nope)
        rope = tl.reshape(y, (8, 64)).to(tl.uint16, bitcast=True)
        tl.store((data + 448).to(tl.pointer_type(tl.uint16)) + (k[:, None] - 7) * 64 + j[None, :], rope, mask=~nope)
        scale_bytes = tl.where(bad, 255, exp).to(tl.uint8)
        tl.store(base + block_size * 576 + row * 8 + k, tl.where(k < 7, scale_bytes, 0).to(tl.uint8))


@triton.jit
def decode_kernel(kv_state, score_state, kv_ptr, score_ptr, ape_ptr, pos_ptr, slot_ptr, entries_ptr, emitted_ptr,
                  w_ptr, cos_ptr, sin_ptr, cache_ptr, cache_slot_ptr, slots, rope_rows, eps, block_size, capacity,
                  R: tl.constexpr, COFF: tl.constexpr, D: tl.constexpr, HAS_SLOTS: tl.constexpr,
                  FUSED: tl.constexpr, CACHE: tl.constexpr, ROW_CHUNK: tl.constexpr):
    W: tl.constexpr = COFF * D
    NROWS: tl.constexpr = COFF * R                    # rows pooled by one entry (8 for ratio 4, 128 for 128)
    OFF: tl.constexpr = R if COFF == 2 else 0         # ratio 4 writes the current block to rows 4:8
    b = tl.program_id(0).to(tl.int64)
    p = tl.load(pos_ptr + b)
    slot = b
    if HAS_SLOTS:
        slot = tl.load(slot_ptr + b)
    valid = (slot >= 0) & (slot < slots) & (p >= 0)   # never wrapped: an invalid row touches nothing
    if FUSED:
        valid = valid & (p + 1 - R < rope_rows)
    phase = tl.where(valid, p % R, 0)
    c = tl.arange(0, W)
    kv = tl.load(kv_ptr + b * W + c)
    sc = tl.load(score_ptr + b * W + c) + tl.load(ape_ptr + phase * W + c)   # sc' = sc + ape[p mod r]
    base = tl.where(valid, slot, 0) * NROWS * W
    if valid:  # a branch, not a mask: the interpreter refuses a scalar & vector mask
        tl.store(kv_state + base + (OFF + phase) * W + c, kv)
        tl.store(score_state + base + (OFF + phase) * W + c, sc)
    emit = valid & (phase == R - 1)
    d = tl.arange(0, D)
    if emit:
        half = (COFF - 1) * D    # the current row contributes its B half (ratio 4) or all of it (ratio 128)
        cur_kv = tl.load(kv_ptr + b * W + half + d)
        cur_sc = tl.load(score_ptr + b * W + half + d) + tl.load(ape_ptr + phase * W + half + d)
        pooled = _pool(kv_state, score_state, base, cur_kv, cur_sc, d, NROWS, R if COFF == 2 else NROWS, D, W,
                       ROW_CHUNK)
        if COFF == 2:  # rows 0:4 <- rows 4:8 (row 7 is the current row, still in registers)
            tl.debug_barrier()
            for i in tl.static_range(R - 1):
                row_kv = tl.load(kv_state + base + (R + i) * W + c)
                row_sc = tl.load(score_state + base + (R + i) * W + c)
                tl.store(kv_state + base + i * W + c, row_kv)
                tl.store(score_state + base + i * W + c, row_sc)
            tl.store(kv_state + base + (R - 1) * W + c, kv)
            tl.store(score_state + base + (R - 1) * W + c, sc)
        if FUSED:
            y = _norm_rope(pooled, w_ptr, cos_ptr, sin_ptr, p + 1 - R, eps, d, D)
            tl.store(entries_ptr + b * D + d, y)
            if CACHE:
                _store_kv_fp8(y, cache_ptr, tl.load(cache_slot_ptr + b), block_size, capacity)
        else:
            tl.store(entries_ptr + b * D + d, pooled)
    else:
        if FUSED:
            tl.store(entries_ptr + b * D + d, tl.zeros([D], dtype=tl.bfloat16))
        else:
            tl.store(entries_ptr + b * D + d, tl.zeros([D], dtype=tl.float32))
    tl.store(emitted_ptr + b, emit.to(tl.int8))


def compressor_decode(kv_state, score_state, kv, score, ape, positions, ratio, slot_ids=None, norm_weight=None,
                      rope_cos=None, rope_sin=None, kv_cache=None, cache_block_size=64, cache_slots=None):
    batch, width = kv.shape
    coff = 2 if ratio == 4 else 1
    d = width // coff
    fused = norm_weight is not None
    entries = torch.empty((batch, d), dtype=torch.bfloat16 if fused else torch.float32, device=kv.device)
    emitted = torch.empty((batch,), dtype=torch.bool, device=kv.device)
    if batch == 0:
        return entries, emitted
    cfg = dispatch.config(dispatch.get("compressor_decode", "triton"), platform.device_info(kv))
    dummy = kv  # pointers the specialisation never reads
    cache = kv_cache is not None
    decode_kernel[(batch,)](
        kv_state, score_state, kv, score, ape, positions, slot_ids if slot_ids is not None else positions,
        entries, emitted.view(torch.int8), norm_weight if fused else dummy, rope_cos if fused else dummy,
        rope_sin if fused else dummy, kv_cache if cache else dummy, cache_slots if cache else positions,
        kv_state.shape[0], rope_cos.shape[0] if fused else 0, 1e-6, cache_block_size,
        kv_cache.shape[0] * cache_block_size if cache else 0,
        R=ratio, COFF=coff, D=d, HAS_SLOTS=slot_ids is not None, FUSED=fused, CACHE=cache,
        ROW_CHUNK=cfg["ROW_CHUNK"], num_warps=cfg["num_warps"], enable_fp_fusion=FP_FUSION)
    return entries, emitted


def codegen_compressor_decode(target) -> list:
    """The forms engines run: d = 512 fused with the FP8 cache store (attention compressor), d = 128 in fp32
    (the indexer compressor's pooled entries), each for ratio 4 and 128."""
    from dsv4_kernels.codegen import TritonKernel
    cfg = dispatch.get("compressor_decode", "triton").defaults
    sig = {"kv_state": "*fp32", "score_state": "*fp32", "kv_ptr": "*fp32", "score_ptr": "*fp32", "ape_ptr": "*fp32",
           "pos_ptr": "*i64", "slot_ptr": "*i64", "entries_ptr": "*fp32", "emitted_ptr": "*i8", "w_ptr": "*fp32",
           "cos_ptr": "*fp32", "sin_ptr": "*fp32", "cache_ptr": "*u8", "cache_slot_ptr": "*i64", "slots": "i64",
           "rope_rows": "i64", "eps": "fp32", "block_size": "i64", "capacity": "i64"}
    specs = []
    for ratio, d, fused in ((4, 512, True), (128, 512, True), (4, 128, False), (128, 128, False)):
        s = dict(sig, entries_ptr="*bf16" if fused else "*fp32")
        specs.append(TritonKernel(decode_kernel, s, {"R": ratio, "COFF": 2 if ratio == 4 else 1, "D": d,
                                                     "HAS_SLOTS": True, "FUSED": fused, "CACHE": fused,
                                                     "ROW_CHUNK": cfg["ROW_CHUNK"]},
                                  num_warps=cfg["num_warps"], label=f"r{ratio}-d{d}" + ("-fp8-cache" if fused else "")))
    return specs


# The prefill kernel lives in triton_prefill.py (it shares _norm_rope and _store_kv_fp8 above).
from dsv4_kernels.kernels.compressor.triton_prefill import (  # noqa: E402, F401
    codegen_compressor_prefill, codegen_compressor_prefill_batched, compressor_prefill, compressor_prefill_batched)

# The indexer cache form (d = 128: Hadamard + MXFP4) lives in triton_indexer.py.
from dsv4_kernels.kernels.compressor.triton_indexer import (  # noqa: E402, F401
    codegen_indexer_cache_quantize, indexer_cache_quantize)
