"""fp64 oracles for the number formats (SPEC "Number formats", 1.2), written independently of
reference/formats.py.

Every code table is decoded from its bit fields as an exact fp64 formula (sign, exponent, mantissa),
never through torch's float8 dtypes. Rounding is a nearest search in the table of finite magnitudes:
the two neighbours of |v| are compared, and an exact tie goes to the even code (the code's lowest bit
is the mantissa's lowest bit), then the sign bit is set from the IEEE sign of v. Block scales are found
block by block on Python floats as the smallest power of two 2^k with fmt_max * 2^k >= max(amax, 1e-4)
(FlashMLA's KV rule: 448 * 2^k >= amax and 2^k >= 1e-4), by exact comparisons with powers of two.
The FP8 KV cache is assembled and read token by token at its byte offsets. A block (KV tile) whose
amax is not a finite Python float (it holds a NaN or an infinity) gets a NaN scale (ue8m0 byte 255) and
fixed bytes: the FP8 NaN byte (0x7F e4m3fn, 0x80 e4m3fnuz) or FP4 code 0.

Each function takes the op's signature and returns the op's outputs and dtypes, for the verification
ladder (which runs them on CPU tensors).
"""
from __future__ import annotations

import math
import struct

import torch

__all__ = ["fp8_table", "fp4_table", "smallest_pow2_exponent", "round_to_codes", "fp8_bytes", "fp4_codes",
           "decode_fp8", "quantize_fp8_blockwise", "quantize_mxfp4", "dequantize_mxfp4",
           "quantize_kv_cache_fp8", "dequantize_kv_cache_fp8"]

FMT = {  # fmt: (exponent bias, largest finite magnitude code, float8 dtype)
    "e4m3fn": (7, 0x7E, torch.float8_e4m3fn),
    "e4m3fnuz": (8, 0x7F, torch.float8_e4m3fnuz),
}
_KV_NOPE, _KV_ROPE, _KV_TILE, _KV_DATA, _KV_TOKEN = 448, 64, 64, 576, 584
_NAN_BYTE = {"e4m3fn": 0x7F, "e4m3fnuz": 0x80}   # S.1111.111 with S = 0; the only e4m3fnuz NaN


def fp8_table(fmt: str) -> torch.Tensor:
    """[256] fp64: the value of every byte. e4m3fn: bias 7, S.1111.111 is NaN (no inf). e4m3fnuz:
    bias 8, 0x80 (the would-be -0) is NaN and is the only NaN."""
    bias = FMT[fmt][0]
    vals = []
    for byte in range(256):
        sign, exp, man = byte >> 7, (byte >> 3) & 0xF, byte & 0x7
        if fmt == "e4m3fn" and exp == 0xF and man == 0x7:
            vals.append(math.nan)
            continue
        if fmt == "e4m3fnuz" and byte == 0x80:
            vals.append(math.nan)
            continue
        mag = man / 8 * 2.0 ** (1 - bias) if exp == 0 else (1 + man / 8) * 2.0 ** (exp - bias)
        vals.append(-mag if sign else mag)
    return torch.tensor(vals, dtype=torch.float64)


def fp4_table() -> torch.Tensor:
    """[16] fp64: e2m1 with bias 1, sign bit 3, exponent bits 2-1, mantissa bit 0."""
    vals = []
    for code in range(16):
        sign, exp, man = code >> 3, (code >> 1) & 0x3, code & 0x1
        mag = man / 2 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1)
        vals.append(-mag if sign else mag)
    return torch.tensor(vals, dtype=torch.float64)


def smallest_pow2_exponent(m: float, c: float = 1.0) -> int:
    """The smallest integer k with c * 2^k >= m (m > 0, c a small integer so c * 2^k is exact)."""
    k = math.ceil(math.log2(m / c))
    while c * 2.0 ** (k - 1) >= m:
        k -= 1
    while c * 2.0 ** k < m:
        k += 1
    return k


def round_to_codes(v: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of `magnitudes` (increasing, fp64) to |v|, ties to the even index,
    values above the last entry saturating to it. Returns int64 indices, v's shape."""
    a = v.double().abs().clamp(max=float(magnitudes[-1]))
    hi = torch.searchsorted(magnitudes, a).clamp(max=len(magnitudes) - 1)  # first magnitude >= a
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - magnitudes[lo], magnitudes[hi] - a
    tie_pick = torch.where(lo % 2 == 0, lo, hi)
    return torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, tie_pick))


def fp8_bytes(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """v (fp64, values already divided by their scale) -> uint8 FP8 bytes: nearest, ties to even,
    saturating at +-fmt_max; -0 and negative values that round to 0 give byte 0x80 in e4m3fn and 0x00
    in e4m3fnuz (which has no -0)."""
    top = FMT[fmt][1]
    magnitudes = fp8_table(fmt)[: top + 1]
    idx = round_to_codes(v, magnitudes)
    neg = torch.signbit(v.double())
    if fmt == "e4m3fnuz":
        neg = neg & (idx != 0)
    return (idx | (neg.long() << 7)).to(torch.uint8)


def fp4_codes(v: torch.Tensor) -> torch.Tensor:
    """v (fp64, divided by the scale) -> uint8 e2m1 codes 0..15, sign bit = IEEE sign of v."""
    idx = round_to_codes(v, fp4_table()[:8])
    return (idx | (torch.signbit(v.double()).long() << 3)).to(torch.uint8)


def decode_fp8(raw: torch.Tensor, fmt: str = "e4m3fn") -> torch.Tensor:
    """uint8 bytes -> fp64 values by table lookup."""
    return fp8_table(fmt)[raw.long()]


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, list[float]]:
    """x [..., K] -> (fp64 [R, K / block, block], amax of every block as Python floats)."""
    rows = math.prod(x.shape[:-1])
    xb = x.double().reshape(rows, x.shape[-1] // block, block)
    return xb, xb.abs().amax(dim=-1).flatten().tolist()


def _exponents(amax: list[float], fmt_max: float) -> list[int | None]:
    """The block rule's exponent per block; None for a block whose amax is NaN or inf."""
    return [smallest_pow2_exponent(max(a, 1e-4), fmt_max) if math.isfinite(a) else None for a in amax]


def _scales(exps: list[int | None], shape) -> torch.Tensor:
    return torch.tensor([math.nan if k is None else 2.0 ** k for k in exps], dtype=torch.float64).reshape(shape)


def quantize_fp8_blockwise(x: torch.Tensor, block_size: int = 128, fmt: str = "e4m3fn"):
    """(q [..., K] float8 of fmt, scale [..., K / block_size] fp32)."""
    fmt_max = float(fp8_table(fmt)[FMT[fmt][1]])
    xb, amax = _blocks(x, block_size)
    scale = _scales(_exponents(amax, fmt_max), xb.shape[:-1])
    bad = scale.isnan().unsqueeze(-1)
    q = fp8_bytes(torch.where(bad, 0.0, xb / scale.unsqueeze(-1)), fmt)
    q = torch.where(bad, torch.tensor(_NAN_BYTE[fmt], dtype=torch.uint8), q).reshape(x.shape).view(FMT[fmt][2])
    return q, scale.float().reshape(*x.shape[:-1], x.shape[-1] // block_size)


def quantize_mxfp4(x: torch.Tensor, block_size: int = 32):
    """(packed [..., K / 2] uint8, low nibble = even index; scale [..., K / 32] uint8 ue8m0 bytes)."""
    xb, amax = _blocks(x, block_size)
    exps = _exponents(amax, 6.0)
    scale = _scales(exps, xb.shape[:-1])
    bad = scale.isnan().unsqueeze(-1)
    codes = fp4_codes(torch.where(bad, 0.0, xb / scale.unsqueeze(-1)))   # code 0 in a non-finite block
    codes = codes.reshape(*x.shape[:-1], x.shape[-1] // 2, 2).long()
    packed = (codes[..., 0] + 16 * codes[..., 1]).to(torch.uint8)
    scale_bytes = torch.tensor([255 if k is None else k + 127 for k in exps], dtype=torch.uint8)
    return packed, scale_bytes.reshape(*x.shape[:-1], x.shape[-1] // block_size)


def _ue8m0(byte: int) -> float:
    return math.nan if byte == 255 else 2.0 ** (byte - 127)


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [..., K]: each byte's low nibble (even k) and high nibble (odd k) decoded, times 2^(b - 127)
    of its block's scale byte b (255 is NaN); the fp64 product rounded once to fp32."""
    half = packed.shape[-1]
    lo, hi = packed.long() % 16, packed.long() // 16
    codes = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], 2 * half)
    factors = torch.tensor([_ue8m0(b) for b in scale.flatten().tolist()], dtype=torch.float64)
    rows, blocks = math.prod(scale.shape[:-1]), scale.shape[-1]
    values = fp4_table()[codes].reshape(rows, blocks, 2 * half // blocks)
    return (values * factors.reshape(rows, blocks, 1)).reshape(codes.shape).float()


def _kv_exponent(amax: float) -> int:
    """FlashMLA's rule 2^ceil(log2(max(amax / 448, 1e-4))): the larger of the smallest k with
    448 * 2^k >= amax and the smallest k with 2^k >= 1e-4 (ceil_pow2 is monotone)."""
    floor = smallest_pow2_exponent(1e-4)
    return floor if amax == 0 else max(floor, smallest_pow2_exponent(amax, 448.0))


def quantize_kv_cache_fp8(kv: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """[ceil(N / block_size), block_size * 584] uint8, assembled token by token (SPEC 1.2)."""
    n_tokens = kv.shape[0]
    pages = torch.zeros((n_tokens + block_size - 1) // block_size, block_size * _KV_TOKEN, dtype=torch.uint8)
    rope_bits = kv[:, _KV_NOPE:].contiguous().view(torch.int16).tolist()
    for n in range(n_tokens):
        page, slot = divmod(n, block_size)
        data = slot * _KV_DATA
        for tile in range(_KV_NOPE // _KV_TILE):
            vals = kv[n, tile * _KV_TILE:(tile + 1) * _KV_TILE].double()
            amax = float(vals.abs().max())
            at = slice(data + tile * _KV_TILE, data + (tile + 1) * _KV_TILE)
            if not math.isfinite(amax):                   # NaN or inf in the tile: NaN bytes, NaN scale
                pages[page, at] = _NAN_BYTE["e4m3fn"]
                pages[page, block_size * _KV_DATA + slot * 8 + tile] = 255
                continue
            k = _kv_exponent(amax)
            pages[page, at] = fp8_bytes(vals / 2.0 ** k, "e4m3fn")
            pages[page, block_size * _KV_DATA + slot * 8 + tile] = k + 127
        rope = [b for bits in rope_bits[n] for b in (bits & 0xFF, (bits >> 8) & 0xFF)]  # little-endian
        pages[page, data + _KV_NOPE:data + _KV_DATA] = torch.tensor(rope, dtype=torch.uint8)
    return pages


def _bf16_bits_to_float(lo: int, hi: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (hi << 24) | (lo << 16)))[0]


def dequantize_kv_cache_fp8(pages: torch.Tensor, num_tokens: int, block_size: int = 64) -> torch.Tensor:
    """[num_tokens, 512] bf16, read token by token: nope = e4m3fn value * 2^(b - 127) in fp64 (exact,
    then rounded to bf16; 255 is NaN), rope = the stored bf16 bit patterns."""
    fp8 = fp8_table("e4m3fn")
    out = torch.zeros(num_tokens, _KV_NOPE + _KV_ROPE, dtype=torch.float64)
    for n in range(num_tokens):
        page, slot = divmod(n, block_size)
        row = pages[page]
        data = slot * _KV_DATA
        factors = [_ue8m0(b) for b in row[block_size * _KV_DATA + slot * 8:][:_KV_NOPE // _KV_TILE].tolist()]
        nope = fp8[row[data:data + _KV_NOPE].long()].reshape(-1, _KV_TILE)
        out[n, :_KV_NOPE] = (nope * torch.tensor(factors, dtype=torch.float64)[:, None]).flatten()
        rope = row[data + _KV_NOPE:data + _KV_DATA].tolist()
        out[n, _KV_NOPE:] = torch.tensor([_bf16_bits_to_float(rope[2 * i], rope[2 * i + 1])
                                          for i in range(_KV_ROPE)], dtype=torch.float64)
    return out.to(torch.bfloat16)
