"""Triton source of sparse MQA (SPEC 1, 1.2, 1.3): one source for sm_90a, sm_100a, gfx942 and gfx950, for
the bf16 pool and the FP8 paged cache (one cache or two read in place), decode and prefill.

attend_kernel, grid (head groups, splits, T): program (g, s, t) takes heads [g*H_BLOCK, (g+1)*H_BLOCK)
of query t (masked past H) and the blocks [s*bps, (s+1)*bps) of BLOCK_N entries of t's index list (the
second list's blocks follow the first's, so a block never mixes caches). Per block: gather BLOCK_N KV
rows once for all H_BLOCK heads (FP8: dequantised in registers), s = scale * q kv^T [H_BLOCK, BLOCK_N]
(tl.dot, heads as M), online softmax (running max m, sum l), acc += p kv [H_BLOCK, 512] (tl.dot, fp32
accumulator). With one split it finishes in place (sink, out bf16, lse); otherwise it writes (acc, m, l)
to a workspace of fixed size [T, splits, H, 512 + 2] and merge_kernel, grid (T, head blocks), folds the
splits and the sink. Entries past topk_length, outside [0, rows) or in a block past the list's end read
nothing (masked, never wrapped); duplicates count once per occurrence. README.md has the numerics.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dsv4_kernels import dispatch, platform, toolchains
from dsv4_kernels.kernels._triton_util import FP_FUSION, bf16_rne

D_MODEL = 512
TOKEN_DATA = 576      # [448 e4m3 | 64 bf16] bytes per token at the start of a page
NOPE = 448


@triton.jit
def _e4m3fn(b):
    # e4m3fn byte -> fp32 by integer ops (the interpreter has no fp8 cast): normal (e, m) -> 2^(e-7)(1+m/8)
    # as fp32 bits (e + 120) << 23 | m << 20; subnormal m * 2^-9; 0x7F / 0xFF NaN; sign from bit 7
    x = b.to(tl.uint32)
    mag = x & 0x7F
    normal = ((mag << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    v = tl.where(mag < 8, (x & 7).to(tl.float32) * 0.001953125, normal)
    v = tl.where(mag == 0x7F, float("nan"), v)
    return tl.where(x >= 0x80, -v, v)


@triton.jit
def _ue8m0(b):
    # ue8m0 byte -> 2^(b - 127) fp32; 0 -> 2^-127 (subnormal), 255 -> NaN
    x = b.to(tl.uint32)
    v = tl.where(x == 0, 5.877471754111438e-39, (x << 23).to(tl.float32, bitcast=True))
    return tl.where(x == 255, float("nan"), v)


@triton.jit
def _rows(cache_ptr, rows, ok, page_stride, block_size, D: tl.constexpr, BLOCK_N: tl.constexpr,
          FP8: tl.constexpr, UPCAST: tl.constexpr):
    # [BLOCK_N, D] KV rows `rows` (masked by ok: zeros), bf16 (fp32 under UPCAST) for the dots.
    # FP8 (SPEC 1.2): token n at page n // bs, slot n % bs; nope 7 x 64 e4m3 * ue8m0 scale, rope 64 bf16
    d = tl.arange(0, D)
    if FP8:
        page = (rows // block_size).to(tl.int64)
        slot = (rows % block_size).to(tl.int64)
        data = (page * page_stride + slot * 576)[:, None]                     # [BN, 1] byte offsets
        scales = (page * page_stride + block_size * 576 + slot * 8)[:, None]
        nope = ok[:, None] & (d < 448)[None, :]
        codes = tl.load(cache_ptr + data + d[None, :], mask=nope, other=0)    # [BN, D] u8 (first 448)
        sbytes = tl.load(cache_ptr + scales + (d // 64)[None, :], mask=nope, other=127)
        rope = tl.load((cache_ptr + data + 448).to(tl.pointer_type(tl.uint16)) + (d - 448)[None, :],
                       mask=ok[:, None] & (d >= 448)[None, :], other=0)       # [BN, D] u16 (last 64)
        kv = tl.where(d[None, :] < 448, _e4m3fn(codes) * _ue8m0(sbytes),      # exact in fp32 and bf16
                      rope.to(tl.bfloat16, bitcast=True).to(tl.float32))
    else:
        kv = tl.load(cache_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    if UPCAST:
        return kv.to(tl.float32)
    return kv.to(tl.bfloat16)


@triton.jit
def _block(q, m, l, acc, cache_ptr, idx_row, j0, used, num_rows, page_stride, block_size, qk_scale,
           D: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr):
    # one block of BLOCK_N entries j0 + [0, BLOCK_N) of one list: (m, l, acc) <- online softmax update
    if j0 < used:  # a block wholly past the list's used length reads nothing
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < used
        idx = tl.load(idx_row + j, mask=ok, other=-1)
        ok = ok & (idx >= 0) & (idx < num_rows)                               # invalid: never read
        kv = _rows(cache_ptr, tl.where(ok, idx, 0), ok, page_stride, block_size, D, BLOCK_N, FP8, UPCAST)
        s = tl.dot(q, tl.trans(kv)) * qk_scale                                # [HB, BN] fp32
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])                                       # masked: exactly 0
        l = l * alpha + tl.sum(p, axis=1)
        hi = bf16_rne(p)                                                      # p = hi + lo to 2^-18: two
        lo = bf16_rne(p - hi.to(tl.float32))                                  # bf16 dots, fp32 accumulator
        acc = acc * alpha[:, None]
        if UPCAST:  # hi + lo is exact in fp32 (16 significant bits): one fp32 dot, the same exact products
            acc = tl.dot(hi.to(tl.float32) + lo.to(tl.float32), kv, acc)
        else:
            acc = tl.dot(lo, kv, acc)
            acc = tl.dot(hi, kv, acc)                                         # [HB, D] fp32
        m = m_new
    return m, l, acc


@triton.jit
def _finish(acc, m, l, sink):
    # out = acc e^(m - M) / (l e^(m - M) + e^(sink - M)), M = max(m, sink); lse = m + log l; an empty row
    # (l == 0; a NaN l is not empty) gives out 0 and lse +inf
    empty = l == 0.0
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    big = tl.maximum(m_safe, sink)
    w = tl.exp(m_safe - big)
    den = l * w + tl.exp(sink - big)
    out = tl.where(empty[:, None], 0.0, acc * (w / tl.where(empty, 1.0, den))[:, None])
    lse = tl.where(empty, float("inf"), m_safe + tl.log(tl.where(empty, 1.0, l)))
    return out, lse


@triton.jit
def attend_kernel(q_ptr, cache_ptr, idx_ptr, len_ptr, cache2_ptr, idx2_ptr, len2_ptr, sink_ptr, out_ptr, lse_ptr,
                  ws_ptr, H, K1, K2, rows1, rows2, stride1, stride2, block_size, qk_scale, blocks1, blocks_per_split,
                  num_blocks, num_splits, D: tl.constexpr, H_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                  FP8: tl.constexpr, TWO: tl.constexpr, HAS_LEN: tl.constexpr, HAS_LEN2: tl.constexpr,
                  SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    g = tl.program_id(0)
    sp = tl.program_id(1)
    t = tl.program_id(2).to(tl.int64)
    h = g * H_BLOCK + tl.arange(0, H_BLOCK)
    hm = h < H
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (t * H + h)[:, None] * D + d[None, :], mask=hm[:, None], other=0.0)  # [HB, D] bf16
    if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 inputs give the same exact products
        q = q.to(tl.float32)
    used1 = K1
    if HAS_LEN:
        used1 = tl.minimum(tl.maximum(tl.load(len_ptr + t), 0), K1)
    m = tl.full([H_BLOCK], float("-inf"), tl.float32)
    l = tl.zeros([H_BLOCK], dtype=tl.float32)
    acc = tl.zeros([H_BLOCK, D], dtype=tl.float32)
    b0 = sp * blocks_per_split
    b1 = tl.minimum(b0 + blocks_per_split, num_blocks)
    for b in range(b0, tl.minimum(b1, blocks1)):
        m, l, acc = _block(q, m, l, acc, cache_ptr, idx_ptr + t * K1, b * BLOCK_N, used1, rows1, stride1,
                           block_size, qk_scale, D, BLOCK_N, FP8, UPCAST)
    if TWO:  # the second list's blocks, after the first's: one softmax over both
        used2 = K2
        if HAS_LEN2:
            used2 = tl.minimum(tl.maximum(tl.load(len2_ptr + t), 0), K2)
        for b in range(tl.maximum(b0, blocks1), b1):
            m, l, acc = _block(q, m, l, acc, cache2_ptr, idx2_ptr + t * K2, (b - blocks1) * BLOCK_N, used2, rows2,
                               stride2, block_size, qk_scale, D, BLOCK_N, FP8, UPCAST)
    if SPLIT:  # partial result of this split: ws[t, sp, h] = [acc (D) | m | l]
        row = ((t * num_splits + sp) * H + h) * (D + 2)
        tl.store(ws_ptr + row[:, None] + d[None, :], acc, mask=hm[:, None])
        tl.store(ws_ptr + row + D, m, mask=hm)
        tl.store(ws_ptr + row + D + 1, l, mask=hm)
    else:
        out, lse = _finish(acc, m, l, tl.load(sink_ptr + h, mask=hm, other=0.0))
        tl.store(out_ptr + (t * H + h)[:, None] * D + d[None, :], bf16_rne(out), mask=hm[:, None])
        tl.store(lse_ptr + t * H + h, lse, mask=hm)


@triton.jit
def merge_kernel(ws_ptr, sink_ptr, out_ptr, lse_ptr, H, num_splits, D: tl.constexpr, H_BLOCK: tl.constexpr):
    # fold the splits' (acc, m, l) of query t, heads of this block, with the running max; then the sink
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * H_BLOCK + tl.arange(0, H_BLOCK)
    hm = h < H
    d = tl.arange(0, D)
    m = tl.full([H_BLOCK], float("-inf"), tl.float32)
    l = tl.zeros([H_BLOCK], dtype=tl.float32)
    acc = tl.zeros([H_BLOCK, D], dtype=tl.float32)
    for s in range(num_splits):
        row = ((t * num_splits + s) * H + h) * (D + 2)
        ms = tl.load(ws_ptr + row + D, mask=hm, other=float("-inf"))
        ls = tl.load(ws_ptr + row + D + 1, mask=hm, other=0.0)
        a = tl.load(ws_ptr + row[:, None] + d[None, :], mask=hm[:, None], other=0.0)
        m_new = tl.maximum(m, ms)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_old = tl.exp(m - m_safe)
        w_s = tl.exp(ms - m_safe)
        l = l * w_old + ls * w_s
        acc = acc * w_old[:, None] + a * w_s[:, None]
        m = m_new
    out, lse = _finish(acc, m, l, tl.load(sink_ptr + h, mask=hm, other=0.0))
    tl.store(out_ptr + (t * H + h)[:, None] * D + d[None, :], bf16_rne(out), mask=hm[:, None])
    tl.store(lse_ptr + t * H + h, lse, mask=hm)


@functools.lru_cache(maxsize=16)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan(T: int, H: int, blocks: int, cfg: dict, device: torch.device) -> tuple[int, int, int, int]:
    """(H_BLOCK, head groups, splits, blocks per split) of one call, from shapes only (no data): enough
    programs to fill the device (cfg PROGRAMS, 0 = two per multiprocessor; 8 on the CPU), at most
    MAX_SPLITS splits and never more than there are blocks; one split needs no merge."""
    h_block = min(cfg["H_BLOCK"], max(16, triton.next_power_of_2(H)))
    groups = triton.cdiv(H, h_block)
    target = cfg["PROGRAMS"] or (2 * _multiprocessors(device.index or 0) if device.type == "cuda" else 8)
    splits = max(1, min(blocks, cfg["MAX_SPLITS"], triton.cdiv(target, max(1, T * groups))))
    per_split = max(1, triton.cdiv(blocks, splits))
    return h_block, groups, max(1, triton.cdiv(blocks, per_split)), per_split


def _launch(op, q, cache, indices, attn_sink, softmax_scale, topk_length, rows, stride, block_size, fp8,
            cache2=None, indices2=None, topk_length2=None, rows2=0, stride2=0):
    T, H, D = q.shape
    out = torch.empty((T, H, D), dtype=torch.bfloat16, device=q.device)
    lse = torch.empty((T, H), dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    cfg = dispatch.config(dispatch.get(op, "triton"), platform.device_info(q))
    upcast = toolchains.interpreter_active()
    BN = cfg["INTERPRET_BLOCK_N"] if upcast else cfg["BLOCK_N"]
    K1 = indices.shape[1]
    two = cache2 is not None
    K2 = indices2.shape[1] if two else 0
    blocks1 = triton.cdiv(K1, BN)
    blocks = blocks1 + triton.cdiv(K2, BN)
    h_block, groups, splits, per_split = plan(T, H, blocks, cfg, q.device)
    ws = torch.empty((T, splits, H, D + 2), dtype=torch.float32, device=q.device) if splits > 1 else lse
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    attend_kernel[(groups, splits, T)](
        q, cache, indices, topk_length if topk_length is not None else indices,
        cache2 if two else cache, indices2 if two else indices,
        topk_length2 if topk_length2 is not None else indices, attn_sink, out, lse, ws,
        H, K1, K2, rows, rows2, stride, stride2, block_size, scale, blocks1, per_split, blocks, splits,
        D=D, H_BLOCK=h_block, BLOCK_N=BN, FP8=fp8, TWO=two, HAS_LEN=topk_length is not None,
        HAS_LEN2=topk_length2 is not None, SPLIT=splits > 1, UPCAST=upcast,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION)
    if splits > 1:
        mh = cfg["MERGE_H"]
        merge_kernel[(T, triton.cdiv(H, mh))](ws, attn_sink, out, lse, H, splits, D=D, H_BLOCK=mh,
                                               num_warps=cfg["MERGE_WARPS"], enable_fp_fusion=FP_FUSION)
    return out, lse


def sparse_mqa(q, kv, indices, attn_sink, softmax_scale=None, topk_length=None):
    return _launch("sparse_mqa", q, kv, indices, attn_sink, softmax_scale, topk_length, kv.shape[0], 0, 1, False)


def _bytes(cache):
    return cache if cache.dtype == torch.uint8 else cache.view(torch.uint8)  # a view: the same bytes, no copy


def sparse_mqa_fp8(q, kv_cache, indices, attn_sink, softmax_scale=None, topk_length=None, block_size=64,
                   extra_kv_cache=None, extra_indices=None, extra_topk_length=None):
    two = extra_kv_cache is not None
    return _launch("sparse_mqa_fp8", q, _bytes(kv_cache), indices, attn_sink, softmax_scale, topk_length,
                   kv_cache.shape[0] * block_size, kv_cache.stride(0), block_size, True,
                   _bytes(extra_kv_cache) if two else None, extra_indices, extra_topk_length,
                   extra_kv_cache.shape[0] * block_size if two else 0, extra_kv_cache.stride(0) if two else 0)


_SIG = {"q_ptr": "*bf16", "cache_ptr": "*bf16", "idx_ptr": "*i32", "len_ptr": "*i32", "cache2_ptr": "*bf16",
        "idx2_ptr": "*i32", "len2_ptr": "*i32", "sink_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32",
        "ws_ptr": "*fp32", "H": "i32", "K1": "i32", "K2": "i32", "rows1": "i32", "rows2": "i32", "stride1": "i64",
        "stride2": "i64", "block_size": "i32", "qk_scale": "fp32", "blocks1": "i32", "blocks_per_split": "i32",
        "num_blocks": "i32", "num_splits": "i32"}


def _attend_spec(op: str, fp8: bool, two: bool, split: bool, label: str):
    from dsv4_kernels.codegen import TritonKernel
    cfg = dispatch.get(op, "triton").defaults
    sig = dict(_SIG, cache_ptr="*u8", cache2_ptr="*u8") if fp8 else _SIG
    return TritonKernel(attend_kernel, sig, {"D": D_MODEL, "H_BLOCK": cfg["H_BLOCK"], "BLOCK_N": cfg["BLOCK_N"],
                                             "FP8": fp8, "TWO": two, "HAS_LEN": True, "HAS_LEN2": two,
                                             "SPLIT": split, "UPCAST": False},
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], label=label,
                        expects={"reduced_precision_mma": True})   # bf16 tensor-core dots, fp32 accumulators


def codegen_sparse_mqa(target) -> list:
    """Decode as engines launch it (H = 64 or 128 heads per rank: H_BLOCK 64): the split-K attend kernel
    over the bf16 pool with topk_length, and the merge kernel (shared by both ops)."""
    from dsv4_kernels.codegen import TritonKernel
    cfg = dispatch.get("sparse_mqa", "triton").defaults
    merge = TritonKernel(merge_kernel, {"ws_ptr": "*fp32", "sink_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32",
                                        "H": "i32", "num_splits": "i32"},
                         {"D": D_MODEL, "H_BLOCK": cfg["MERGE_H"]}, num_warps=cfg["MERGE_WARPS"], label="merge")
    return [_attend_spec("sparse_mqa", False, False, True, "decode-bf16-split"), merge]


def codegen_sparse_mqa_fp8(target) -> list:
    """V4 decode over the FP8 cache: two caches in one launch (SPEC 1.3), both topk_lengths, split-K."""
    return [_attend_spec("sparse_mqa_fp8", True, True, True, "decode-fp8-two-cache-split")]
