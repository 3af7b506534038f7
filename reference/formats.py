"""Number formats of SPEC "Number formats" and 1.2: ue8m0 scales, FP8 and MXFP4 block quantisation,
and the 584-byte FP8 KV cache.

Scale rule for activations and weights: scale = 2^ceil(log2(max(amax, 1e-4) / fmt_max)). The FP8 KV
cache uses FlashMLA's rule instead: scale = 2^ceil(log2(max(amax / 448, 1e-4))). Stored values are
x / scale rounded to nearest, ties to even, saturating at +-fmt_max. Every ceil(log2(.)) is taken
exactly from the fp32 exponent (torch.frexp), never from an approximate log2.

Non-finite input (SPEC "Number formats"): a block (KV tile) holding a NaN or an infinity gets a NaN
scale (fp32 NaN, or ue8m0 byte 0xFF) and every element of it gets a fixed code that never stands for a
value of x: the format's NaN byte for FP8 (0x7F in e4m3fn, 0x80 in e4m3fnuz), code 0 for FP4 (which has
no NaN). So the whole block dequantises to NaN and the other blocks are untouched.
"""
from __future__ import annotations

import torch

__all__ = [
    "FP4_VALUES", "FP8_MAX", "FP8_NAN_BYTE", "KV_NOPE_DIM", "KV_ROPE_DIM", "KV_TILE", "KV_TOKEN_BYTES",
    "ue8m0_to_float", "float_to_ue8m0", "ceil_pow2",
    "quantize_fp8_blockwise", "dequantize_fp8_blockwise",
    "pack_fp4", "unpack_fp4", "quantize_mxfp4", "dequantize_mxfp4",
    "store_kv_cache_fp8", "quantize_kv_cache_fp8", "dequantize_kv_cache_fp8", "gather_kv_cache_fp8",
]

FP8_MAX = {"e4m3fn": 448.0, "e4m3fnuz": 240.0}
_FP8_DTYPE = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}

FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                           -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32)
_FP4_MAX = 6.0
# Midpoints between consecutive FP4 magnitudes; at midpoint k (between codes k and k+1) a tie goes to
# the code with the even mantissa bit, i.e. the even code: up when k is odd, down when k is even.
_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

KV_NOPE_DIM = 448
KV_ROPE_DIM = 64
KV_TILE = 64
KV_TOKEN_BYTES = 584
_KV_DATA_BYTES = KV_NOPE_DIM + 2 * KV_ROPE_DIM  # 576: [448 fp8 | 64 bf16]
_KV_SCALE_BYTES = KV_TOKEN_BYTES - _KV_DATA_BYTES  # 8: 7 ue8m0 + 1 pad
_KV_TILES = KV_NOPE_DIM // KV_TILE  # 7
FP8_NAN_BYTE = {"e4m3fn": 0x7F, "e4m3fnuz": 0x80}  # the byte a non-finite block's elements get


def ue8m0_to_float(b: torch.Tensor) -> torch.Tensor:
    """Decode ue8m0 scale bytes: value 2^(b - 127).

    Args:
        b: uint8 tensor of any shape.
    Returns:
        fp32 tensor of the same shape. Byte 0 gives 2^-127 (an fp32 subnormal, exact); byte 255 gives
        NaN, as in OCP E8M0 (the quantisers write it for a block holding a NaN or an infinity).
    """
    e = b.to(torch.int32)
    normal = (e << 23).view(torch.float32)  # biased exponent e, zero mantissa: exactly 2^(e-127)
    out = torch.where(e == 0, torch.full_like(normal, 2.0 ** -127), normal)
    return torch.where(e == 255, torch.full_like(out, float("nan")), out)


def float_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """Encode exact powers of two as ue8m0 bytes (inverse of ue8m0_to_float).

    Args:
        x: fp32 tensor of any shape; every element an exact power of two in [2^-127, 2^127], or NaN.
    Returns:
        uint8 tensor of the same shape: log2(x) + 127; NaN gives 255. Other inputs (not a power of two,
        zero, negative, inf) give unspecified bytes.
    """
    mantissa, exponent = torch.frexp(x.float())  # x = 0.5 * 2^exponent for a power of two
    byte = (exponent.to(torch.int32) + 126).clamp(0, 255)
    return torch.where(mantissa.isnan(), torch.full_like(byte, 255), byte).to(torch.uint8)


def ceil_pow2(r: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(r)) for positive finite fp32 r, computed exactly from the fp32 exponent.

    Args:
        r: fp32 tensor of any shape, r > 0 and finite (0 or non-finite gives unspecified values).
    Returns:
        fp32 tensor of the same shape: the smallest power of two >= r.
    """
    mantissa, exponent = torch.frexp(r)  # r = m * 2^e, m in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)  # r is already a power of two
    return torch.ldexp(torch.ones_like(r), exponent)


def _nan_where_nonfinite(scale: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """NaN where the block's amax is not finite (amax propagates NaN, and inf stays inf)."""
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))


def _block_scale(amax: torch.Tensor, fmt_max: float) -> torch.Tensor:
    """SPEC rule for activations and weights: 2^ceil(log2(max(amax, 1e-4) / fmt_max)); NaN for a block
    whose amax is NaN or inf."""
    return _nan_where_nonfinite(ceil_pow2(amax.clamp_min(1e-4) / fmt_max), amax)


def _fp8_codes(v: torch.Tensor, fmt: str, block_ok: torch.Tensor) -> torch.Tensor:
    """v (x / scale, fp32 [..., blocks, block]) -> FP8 of fmt, saturating; the elements of blocks that
    are not ok get the format's NaN byte."""
    fmt_max = FP8_MAX[fmt]
    q = v.clamp(-fmt_max, fmt_max).to(_FP8_DTYPE[fmt]).view(torch.uint8)
    nan = torch.full_like(q, FP8_NAN_BYTE[fmt])
    return torch.where(block_ok.unsqueeze(-1), q, nan).view(_FP8_DTYPE[fmt])


def quantize_fp8_blockwise(x: torch.Tensor, block_size: int = 128, fmt: str = "e4m3fn"):
    """FP8 block quantisation along the last dimension with power-of-two scales.

    Args:
        x: [..., K] float tensor (bf16, fp16 or fp32); K a multiple of block_size. Leading dims may be
            empty (T = 0). A block holding a NaN or +-inf gets scale NaN and NaN bytes (see below).
        block_size: elements per scale (32 or 128 in this project).
        fmt: "e4m3fn" (OCP, max 448) or "e4m3fnuz" (gfx942, max 240).
    Returns:
        q: [..., K] torch.float8_e4m3fn or torch.float8_e4m3fnuz, x / scale rounded to nearest, ties to
            even, saturating at +-fmt_max (only reachable through rounding, since amax / scale <= fmt_max).
            A -0 input stays -0 in e4m3fn; e4m3fnuz has no -0 and stores +0.
        scale: [..., K / block_size] fp32, 2^ceil(log2(max(amax, 1e-4) / fmt_max)) per block (an all-zero
            block gets the scale of amax = 1e-4).
    A block holding a NaN or an infinity gets scale NaN and every q of it the format's NaN byte
    (FP8_NAN_BYTE: 0x7F in e4m3fn, 0x80 in e4m3fnuz), so the block dequantises to NaN.
    """
    k = x.shape[-1]
    xb = x.float().reshape(*x.shape[:-1], k // block_size, block_size)
    amax = xb.abs().amax(dim=-1)
    scale = _block_scale(amax, FP8_MAX[fmt])
    q = _fp8_codes(xb / scale.unsqueeze(-1), fmt, torch.isfinite(amax))
    return q.reshape(x.shape), scale


def dequantize_fp8_blockwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_fp8_blockwise: q * scale (exact in fp32).

    Args:
        q: [..., K] float8_e4m3fn or float8_e4m3fnuz.
        scale: [..., K / block] fp32; the block size is K // scale.shape[-1].
    Returns:
        [..., K] fp32.
    """
    block = q.shape[-1] // scale.shape[-1]
    return q.float() * scale.float().repeat_interleave(block, dim=-1)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dim: low nibble = even index, high = odd index.

    Args:
        codes: [..., K] uint8 with values 0..15, K even.
    Returns:
        [..., K / 2] uint8.
    """
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_fp4.

    Args:
        packed: [..., K / 2] uint8.
    Returns:
        [..., K] uint8 codes 0..15 (element 2i from the low nibble of byte i, 2i+1 from the high one).
    """
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def _fp4_encode(v: torch.Tensor) -> torch.Tensor:
    """Nearest FP4 code of fp32 values (ties to even, saturating at 6); sign bit = IEEE sign of v."""
    a = v.abs()
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for k, mid in enumerate(_FP4_MIDPOINTS):
        code += (a > mid) if k % 2 == 0 else (a >= mid)
    return code | (torch.signbit(v).to(torch.uint8) << 3)


def quantize_mxfp4(x: torch.Tensor, block_size: int = 32):
    """MXFP4 (e2m1 values, ue8m0 scale per block) quantisation along the last dimension.

    Args:
        x: [..., K] float tensor (bf16, fp16 or fp32); K a multiple of block_size (and even).
        block_size: elements per scale, 32 for MXFP4.
    Returns:
        packed: [..., K / 2] uint8, two codes per byte (pack_fp4 order).
        scale: [..., K / block_size] uint8 ue8m0 bytes of 2^ceil(log2(max(amax, 1e-4) / 6)).
    Each value is x / scale rounded to the nearest of {0, 0.5, 1, 1.5, 2, 3, 4, 6}, ties to the code with
    the even mantissa bit (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4),
    saturating at 6. The sign bit is the IEEE sign of x, as the hardware cvt does: -0 and negative values
    that round to zero give code 8 (-0); +0 gives code 0. Both zeros dequantise to a zero.
    A block holding a NaN or an infinity gets scale byte 255 (NaN) and code 0 for all its elements, so it
    dequantises to NaN.
    """
    k = x.shape[-1]
    xb = x.float().reshape(*x.shape[:-1], k // block_size, block_size)
    amax = xb.abs().amax(dim=-1)
    scale = _block_scale(amax, _FP4_MAX)
    codes = _fp4_encode(xb / scale.unsqueeze(-1))
    codes = torch.where(torch.isfinite(amax).unsqueeze(-1), codes, torch.zeros_like(codes)).reshape(x.shape)
    return pack_fp4(codes), float_to_ue8m0(scale)


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_mxfp4: FP4 value * 2^(scale - 127) (exact in fp32).

    Args:
        packed: [..., K / 2] uint8.
        scale: [..., K / block] uint8 ue8m0 bytes; block = K // scale.shape[-1] (32 for MXFP4).
    Returns:
        [..., K] fp32. Code 8 gives -0.0 (times the scale); a scale byte 255 gives NaN.
    """
    values = FP4_VALUES.to(packed.device)[unpack_fp4(packed).int()]
    block = values.shape[-1] // scale.shape[-1]
    blocks = values.reshape(*scale.shape, block) * ue8m0_to_float(scale).unsqueeze(-1)
    return blocks.reshape(values.shape)


def _kv_page_views(pages: torch.Tensor, block_size: int):
    """Views of a cache [num_pages, >= block_size * 584] (uint8, or a float8_e4m3fn view of the bytes; the
    page stride may exceed the row: a slice of a wider buffer): data [P, bs, 576] and scales [P, bs, 8].
    Bytes past block_size * 584 in a page (FlashMLA's padding) are not part of either view."""
    p = pages.shape[0]
    if pages.dtype != torch.uint8:
        pages = pages.view(torch.uint8)
    data = pages[:, : block_size * _KV_DATA_BYTES].view(p, block_size, _KV_DATA_BYTES)
    scales = pages[:, block_size * _KV_DATA_BYTES: block_size * KV_TOKEN_BYTES].view(p, block_size, _KV_SCALE_BYTES)
    return data, scales


def store_kv_cache_fp8(pages: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor, block_size: int = 64) -> None:
    """Quantise KV rows and write them in place into the FP8 cache at flat slot ids (SPEC 1.2).

    Args:
        pages: [num_pages, block_size * 584] uint8, contiguous; modified in place.
        slots: [n] integer flat slot ids: page = slot // block_size, row = slot % block_size. A slot
            outside [0, num_pages * block_size) -- the engines' -1 padding, any other negative value, or
            one past the cache -- is skipped: nothing is written for that row, and a slot never wraps
            around (no Python negative indexing, no modulo). In-range slots must be distinct (with
            duplicates, which row lands is unspecified).
        kv: [n, 512] bf16: first 448 dims (nope) become e4m3fn, last 64 (rope) are stored as raw bf16
            (NaN and +-inf included, bit for bit).
        block_size: tokens per page.
    Per token: 448 e4m3fn bytes, 128 bytes of bf16 rope (little-endian), then in the page's scale area
    7 ue8m0 bytes (FlashMLA's rule 2^ceil(log2(max(amax / 448, 1e-4))) per 64 nope values) and a zero
    pad byte. A nope tile holding a NaN or an infinity gets scale byte 255 and e4m3fn NaN bytes (0x7F), so
    it dequantises to NaN. n = 0 writes nothing. Only the bytes of the stored slots change.
    """
    keep = (slots >= 0) & (slots < pages.shape[0] * block_size)
    slots, kv = slots[keep], kv[keep]
    n = kv.shape[0]
    nope = kv[:, :KV_NOPE_DIM].float().reshape(n, _KV_TILES, KV_TILE)
    amax = nope.abs().amax(dim=-1)
    scale = _nan_where_nonfinite(ceil_pow2((amax / FP8_MAX["e4m3fn"]).clamp_min(1e-4)), amax)  # [n, 7]
    q = _fp8_codes(nope / scale.unsqueeze(-1), "e4m3fn", torch.isfinite(amax)).reshape(n, KV_NOPE_DIM)
    rope = kv[:, KV_NOPE_DIM:].to(torch.bfloat16).contiguous().view(torch.uint8)  # [n, 128]
    scale_bytes = torch.cat((float_to_ue8m0(scale), torch.zeros(n, 1, dtype=torch.uint8, device=kv.device)), dim=1)

    data, scales = _kv_page_views(pages, block_size)
    page, row = slots // block_size, slots % block_size
    data[page, row] = torch.cat((q.view(torch.uint8), rope), dim=1)
    scales[page, row] = scale_bytes


def quantize_kv_cache_fp8(kv: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Build a whole FP8 KV cache from N rows (token i at slot i).

    Args:
        kv: [N, 512] bf16 (non-finite values as in store_kv_cache_fp8); N may be 0.
        block_size: tokens per page.
    Returns:
        [ceil(N / block_size), block_size * 584] uint8; rows past N in the last page are zero bytes
        (they dequantise to 0).
    """
    n = kv.shape[0]
    pages = torch.zeros((n + block_size - 1) // block_size, block_size * KV_TOKEN_BYTES,
                        dtype=torch.uint8, device=kv.device)
    store_kv_cache_fp8(pages, torch.arange(n, device=kv.device), kv, block_size)
    return pages


def gather_kv_cache_fp8(pages: torch.Tensor, idx: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Dequantise the cache rows at flat slot ids.

    Args:
        pages: [num_pages, page_bytes] uint8 (or a float8_e4m3fn view of the bytes) in the SPEC 1.2 layout,
            page_bytes >= block_size * 584 and any page stride (a padded page, or a slice of a wider
            buffer); only the first block_size * 584 bytes of a page are read.
        idx: int tensor of any shape; slot n is page n // block_size, row n % block_size. Entries < 0 or
            >= num_pages * block_size give zero rows and read nothing (never wrapped around); callers mask
            invalid indices themselves.
        block_size: tokens per page.
    Returns:
        [*idx.shape, 512] bf16: nope = fp8 * 2^(scale byte - 127) (exact in bf16), rope = stored bf16.
    """
    data, scales = _kv_page_views(pages, block_size)
    flat = idx.reshape(-1).long()
    valid = (flat >= 0) & (flat < pages.shape[0] * block_size)
    safe = torch.where(valid, flat, torch.zeros_like(flat))
    page, row = safe // block_size, safe % block_size
    rows, srows = data[page, row], scales[page, row]  # [n, 576], [n, 8]
    scale = ue8m0_to_float(srows[:, :_KV_TILES]).repeat_interleave(KV_TILE, dim=1)
    nope = rows[:, :KV_NOPE_DIM].contiguous().view(torch.float8_e4m3fn).float() * scale
    rope = rows[:, KV_NOPE_DIM:].contiguous().view(torch.bfloat16).float()
    out = torch.where(valid.unsqueeze(1), torch.cat((nope, rope), dim=1), 0.0)
    return out.to(torch.bfloat16).reshape(*idx.shape, KV_NOPE_DIM + KV_ROPE_DIM)


def dequantize_kv_cache_fp8(pages: torch.Tensor, num_tokens: int, block_size: int = 64) -> torch.Tensor:
    """Dequantise the first num_tokens slots of an FP8 KV cache (inverse of quantize_kv_cache_fp8).

    Args:
        pages: [num_pages, block_size * 584] uint8 in the SPEC 1.2 layout.
        num_tokens: 0 <= num_tokens <= num_pages * block_size.
        block_size: tokens per page.
    Returns:
        [num_tokens, 512] bf16.
    """
    return gather_kv_cache_fp8(pages, torch.arange(num_tokens, device=pages.device), block_size)
