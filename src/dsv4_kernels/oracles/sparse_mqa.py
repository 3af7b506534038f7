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
    """Every slot of a SPEC 1.2 cache [P, block_size * 584] uint8 as fp64 rows [P * block_size, 512]."""
    pages = kv_cache.cpu().long()
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


def sparse_mqa_fp8_fp64(q, kv_cache, indices, attn_sink, softmax_scale=None, topk_length=None, block_size=64):
    """SPEC 1.2 in fp64: the fp64 oracle on the decoded cache, every slot of every page a row."""
    kv = decode_kv_cache_fp8(kv_cache, block_size)
    return sparse_mqa_fp64(q.cpu(), kv, indices.cpu(), attn_sink.cpu(), softmax_scale,
                           None if topk_length is None else topk_length.cpu())


def sparse_mqa_fp8(q, kv_cache, indices, attn_sink, softmax_scale=None, topk_length=None, block_size=64):
    """The FP8 oracle with the op's output dtypes: (out bf16, lse fp32)."""
    out, lse = sparse_mqa_fp8_fp64(q, kv_cache, indices, attn_sink, softmax_scale, topk_length, block_size)
    return out.to(torch.bfloat16), lse.float()
