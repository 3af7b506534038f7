"""fp64 oracles for sparse MQA (SPEC 1 and 1.2), written independently of reference/sparse_mqa.py.

Sparse MQA: one query row at a time, the row's usable entries collected as a Python list (so
duplicates, -1, out-of-range values and topk_length are handled by plain list logic), then dense fp64
matrices for that row. The sink is one more exponent in the denominator, shifted by the largest of the
logits and the sink. The FP8 cache is decoded token by token from its byte offsets, with the e4m3fn,
bf16 and ue8m0 bit layouts evaluated as exact fp64 formulas (never through torch's float8 dtype).
"""
from __future__ import annotations

import torch

__all__ = ["sparse_mqa", "sparse_mqa_fp8", "sparse_mqa_fp64", "sparse_mqa_fp8_fp64", "decode_kv_cache_fp8"]

_NOPE, _ROPE_BYTES, _SCALES, _TILE = 448, 128, 7, 64
_TOKEN_DATA, _TOKEN_BYTES = 576, 584


def sparse_mqa_fp64(q, kv, indices, attn_sink, softmax_scale=None, topk_length=None):
    """SPEC 1 in fp64: (out [T, H, D] fp64, lse [T, H] fp64); kv may be any float dtype."""
    T, H, D = q.shape
    n_rows = kv.shape[0]
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    q64, kv64, sink = q.double(), kv.double(), attn_sink.double()
    out = torch.zeros(T, H, D, dtype=torch.float64)
    lse = torch.full((T, H), float("inf"), dtype=torch.float64)
    for t in range(T):
        entries = indices[t].tolist()
        if topk_length is not None:
            entries = entries[:max(0, int(topk_length[t]))]
        used = [j for j in entries if 0 <= j < n_rows]
        if not used:
            continue
        rows = kv64[used]                                        # [n, D], duplicates repeated
        logits = scale * (rows @ q64[t].T).T                     # [H, n]
        peak = logits.max(dim=1).values                          # [H]
        top = torch.maximum(peak, sink)                          # sink -inf: top = peak
        weights = torch.exp(logits - top[:, None])
        out[t] = (weights @ rows) / (weights.sum(dim=1) + torch.exp(sink - top))[:, None]
        lse[t] = peak + torch.log(torch.exp(logits - peak[:, None]).sum(dim=1))
    return out, lse


def sparse_mqa(q, kv, indices, attn_sink, softmax_scale=None, topk_length=None):
    """The oracle with the op's output dtypes: (out bf16, rounded once from fp64; lse fp32)."""
    out, lse = sparse_mqa_fp64(q.cpu(), kv.cpu(), indices.cpu(), attn_sink.cpu(), softmax_scale,
                               None if topk_length is None else topk_length.cpu())
    return out.to(torch.bfloat16), lse.float()


def _e4m3fn(byte: int) -> float:
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return float("nan")
    if exponent == 0:
        return sign * mantissa * 2.0 ** -9                       # subnormal: m/8 * 2^-6
    return sign * (8 + mantissa) * 2.0 ** (exponent - 10)        # (1 + m/8) * 2^(e-7)


_E4M3FN = torch.tensor([_e4m3fn(b) for b in range(256)], dtype=torch.float64)


def _bf16_from_bytes(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Little-endian byte pairs -> fp64 values of the bf16 bit patterns."""
    bits = low.long() + 256 * high.long()
    sign = torch.where(bits >= 0x8000, -1.0, 1.0).double()
    exponent, mantissa = (bits >> 7) & 0xFF, (bits & 0x7F).double()
    normal = torch.ldexp(128 + mantissa, exponent - 134)
    subnormal = torch.ldexp(mantissa, torch.full_like(exponent, -133))
    special = torch.where(mantissa == 0, float("inf"), float("nan")).double()
    mag = torch.where(exponent == 0, subnormal, torch.where(exponent == 0xFF, special, normal))
    return sign * mag


def decode_kv_cache_fp8(kv_cache: torch.Tensor, block_size: int) -> torch.Tensor:
    """Every slot of a SPEC 1.2 cache [P, >= block_size * 584] (uint8 or a float8_e4m3fn view of the bytes,
    any page stride) as fp64 rows [P * block_size, 512]; bytes past block_size * 584 of a page are unread."""
    pages = kv_cache.cpu()
    pages = (pages if pages.dtype == torch.uint8 else pages.view(torch.uint8)).long()
    rows = []
    for page in range(pages.shape[0]):
        for slot in range(block_size):
            data = pages[page, slot * _TOKEN_DATA:(slot + 1) * _TOKEN_DATA]
            base = block_size * _TOKEN_DATA + slot * (_TOKEN_BYTES - _TOKEN_DATA)
            scale_bytes = pages[page, base:base + _SCALES]
            scales = torch.where(scale_bytes == 255, float("nan"),
                                 torch.ldexp(torch.ones(_SCALES, dtype=torch.float64), scale_bytes - 127))
            nope = _E4M3FN[data[:_NOPE]] * scales.repeat_interleave(_TILE)
            rope_bytes = data[_NOPE:_NOPE + _ROPE_BYTES]
            rope = _bf16_from_bytes(rope_bytes[0::2], rope_bytes[1::2])
            rows.append(torch.cat((nope, rope)))
    if not rows:
        return torch.zeros(0, _NOPE + _ROPE_BYTES // 2, dtype=torch.float64)
    return torch.stack(rows)


def _used(indices, topk_length, num_rows, offset):
    """Row t's usable entries of one list as Python lists, shifted by `offset`; -1 for the others."""
    rows = []
    for t, entries in enumerate(indices.tolist()):
        if topk_length is not None:
            entries = entries[:max(0, int(topk_length[t]))]
        rows.append([j + offset if 0 <= j < num_rows else -1 for j in entries])
    return rows


def sparse_mqa_fp8_fp64(q, kv_cache, indices, attn_sink, softmax_scale=None, topk_length=None, block_size=64,
                        extra_kv_cache=None, extra_indices=None, extra_topk_length=None):
    """SPEC 1.2 / 1.3 in fp64: the fp64 oracle on the decoded cache, every slot of every page a row; with
    a second cache its decoded rows follow the first's and its usable entries follow the first list's."""
    kv = decode_kv_cache_fp8(kv_cache, block_size)
    if extra_kv_cache is None:
        return sparse_mqa_fp64(q.cpu(), kv, indices.cpu(), attn_sink.cpu(), softmax_scale,
                               None if topk_length is None else topk_length.cpu())
    kv2 = decode_kv_cache_fp8(extra_kv_cache, block_size)
    first = _used(indices.cpu(), None if topk_length is None else topk_length.cpu(), kv.shape[0], 0)
    second = _used(extra_indices.cpu(), None if extra_topk_length is None else extra_topk_length.cpu(),
                   kv2.shape[0], kv.shape[0])
    width = indices.shape[1] + extra_indices.shape[1]
    merged = torch.full((indices.shape[0], width), -1, dtype=torch.int64)
    for t, (a, b) in enumerate(zip(first, second)):
        merged[t, :len(a) + len(b)] = torch.tensor(a + b, dtype=torch.int64)
    return sparse_mqa_fp64(q.cpu(), torch.cat((kv, kv2)), merged, attn_sink.cpu(), softmax_scale)


def sparse_mqa_fp8(q, kv_cache, indices, attn_sink, softmax_scale=None, topk_length=None, block_size=64,
                   extra_kv_cache=None, extra_indices=None, extra_topk_length=None):
    """The FP8 oracle with the op's output dtypes: (out bf16, lse fp32)."""
    out, lse = sparse_mqa_fp8_fp64(q, kv_cache, indices, attn_sink, softmax_scale, topk_length, block_size,
                                   extra_kv_cache, extra_indices, extra_topk_length)
    return out.to(torch.bfloat16), lse.float()
