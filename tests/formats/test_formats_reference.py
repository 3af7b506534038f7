"""ue8m0, FP8 block and MXFP4 quantisation references (SPEC "Number formats", 7 Formats).

Oracles are written differently from the reference: FP8 rounding by nearest search over the table of
all finite byte values, FP4 by nearest search over the 8 magnitudes, scales with Python's math.log2 in
fp64. Quantisation outputs are compared bit-exactly: the format is defined down to the bit."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv4_kernels.reference.formats import (
    FP4_VALUES, ceil_pow2, dequantize_fp8_blockwise, dequantize_mxfp4, float_to_ue8m0, pack_fp4,
    quantize_fp8_blockwise, quantize_mxfp4, ue8m0_to_float, unpack_fp4,
)
from dsv4_kernels.reference.formats import _fp4_encode

FP8 = {"e4m3fn": (torch.float8_e4m3fn, 448.0), "e4m3fnuz": (torch.float8_e4m3fnuz, 240.0)}


def _finite_fp8_bytes(fmt: str) -> torch.Tensor:
    dtype, _ = FP8[fmt]
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    return b[b.view(dtype).float().isfinite()]


def _oracle_scale(amax: float, fmt_max: float) -> float:
    return 2.0 ** math.ceil(math.log2(max(amax, 1e-4) / fmt_max))


def _oracle_fp8_bytes(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """Nearest finite FP8 value by table search, ties to the even byte (= even mantissa), saturating."""
    dtype, fmt_max = FP8[fmt]
    grid_bytes = torch.arange(0x7F if fmt == "e4m3fn" else 0x80, dtype=torch.int64)
    grid = grid_bytes.to(torch.uint8).view(dtype).double()  # increasing magnitudes, byte i -> grid[i]
    a = v.double().abs().clamp(max=fmt_max)
    hi = torch.searchsorted(grid, a).clamp(max=len(grid) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    pick = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(lo % 2 == 0, lo, hi)))
    neg = torch.signbit(v)
    if fmt == "e4m3fnuz":
        neg = neg & (pick != 0)  # no negative zero in fnuz
    return (pick | (neg.long() << 7)).to(torch.uint8)


_FP4_MAGS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _oracle_fp4_code(v: float) -> int:
    a = min(abs(v), 6.0)
    dist = [abs(a - m) for m in _FP4_MAGS]
    best = min(dist)
    code = min(i for i, d in enumerate(dist) if d == best and (dist.count(best) == 1 or i % 2 == 0))
    return code | (8 if math.copysign(1.0, v) < 0 else 0)


def test_ue8m0_hand_values():
    b = torch.tensor([0, 1, 126, 127, 128, 200, 254, 255], dtype=torch.uint8)
    got = ue8m0_to_float(b)
    want = [2.0 ** -127, 2.0 ** -126, 0.5, 1.0, 2.0, 2.0 ** 73, 2.0 ** 127]
    assert got[:7].tolist() == want
    assert got[7].isnan()


def test_ue8m0_all_bytes_round_trip():
    b = torch.arange(255, dtype=torch.int32).to(torch.uint8)
    v = ue8m0_to_float(b)
    assert v.tolist() == [math.ldexp(1.0, i - 127) for i in range(255)]
    assert torch.equal(float_to_ue8m0(v), b)
    assert float_to_ue8m0(torch.tensor([float("nan")])).item() == 255


def test_ceil_pow2_hand_values():
    r = torch.tensor([1.0, 1.0000001, 0.75, 3.0, 4.0, 2.0 ** -20, 448.0 / 448.0, 5.0 / 448.0])
    assert ceil_pow2(r).tolist() == [1.0, 2.0, 1.0, 4.0, 4.0, 2.0 ** -20, 1.0, 2.0 ** -6]


@pytest.mark.parametrize("fmt", ["e4m3fn", "e4m3fnuz"])
def test_fp8_every_finite_byte_round_trips_at_scale_one(fmt):
    dtype, fmt_max = FP8[fmt]
    b = _finite_fp8_bytes(fmt)  # byte order: positives up to +max, then negatives down to -max
    vals = b.view(dtype).float()
    # Two blocks of 128 padded with fmt_max: block 0 holds +fmt_max, block 1 -fmt_max, so both scales are 1.
    x = torch.cat((vals, torch.full((256 - len(vals),), fmt_max)))
    q, scale = quantize_fp8_blockwise(x, 128, fmt)
    assert q.dtype == dtype
    assert scale.tolist() == [1.0, 1.0]
    assert torch.equal(q.view(torch.uint8)[:len(b)], b)
    assert torch.equal(dequantize_fp8_blockwise(q, scale), x)


def test_fp8_hand_block():
    # amax 1 -> scale 2^ceil(log2(1/448)) = 2^-8; x / scale = 256 x.
    x = torch.zeros(32)
    x[:7] = torch.tensor([1.0, -0.5, 1.0625 / 256, 1.1875 / 256, 0.0, 3 * 2.0 ** -17, 5 * 2.0 ** -18])
    q, scale = quantize_fp8_blockwise(x, 32)
    assert scale.item() == 2.0 ** -8
    # 1.0625 is the midpoint of 1 (mantissa 000) and 1.125 (001): even -> 1. 1.1875 is the midpoint of
    # 1.125 (001) and 1.25 (010): -> 1.25. 3 * 2^-9 is the subnormal code 3 exactly. 2.5 * 2^-9 is the
    # midpoint of subnormal codes 2 and 3: -> 2 * 2^-9.
    assert q.float()[:7].tolist() == [256.0, -128.0, 1.0, 1.25, 0.0, 3 * 2.0 ** -9, 2.0 ** -8]


def test_fp8_all_zero_block_and_empty():
    q, scale = quantize_fp8_blockwise(torch.zeros(2, 64, dtype=torch.bfloat16), 32)
    assert torch.equal(scale, torch.full((2, 2), _oracle_scale(0.0, 448.0)))
    assert scale[0, 0].item() == 2.0 ** -22
    assert (q.float() == 0).all()
    q, scale = quantize_fp8_blockwise(torch.zeros(0, 256), 128, "e4m3fnuz")
    assert q.shape == (0, 256) and q.dtype == torch.float8_e4m3fnuz and scale.shape == (0, 2)


@pytest.mark.parametrize("fmt", ["e4m3fn", "e4m3fnuz"])
def test_fp8_saturation_boundary(fmt):
    _, fmt_max = FP8[fmt]
    # amax exactly fmt_max * 2^3: scale 2^3, the max element lands on fmt_max (not NaN, not above).
    x = torch.linspace(-1, 1, 128) * fmt_max * 8
    q, scale = quantize_fp8_blockwise(x, 128, fmt)
    assert scale.item() == 8.0 and q.float().abs().max().item() == fmt_max
    # One fp32 ulp above: the scale doubles (ceil), the max lands on fmt_max / 2.
    x[-1] = torch.nextafter(torch.tensor(fmt_max * 8), torch.tensor(math.inf))
    q, scale = quantize_fp8_blockwise(x, 128, fmt)
    assert scale.item() == 16.0 and q.float()[-1].item() == fmt_max / 2


@pytest.mark.parametrize("fmt", ["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("block", [32, 128])
@settings(deadline=None)
@given(seed=st.integers(0, 2**31 - 1), log_mag=st.integers(-30, 30), rows=st.integers(0, 3),
       nblocks=st.integers(1, 3), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_fp8_matches_table_oracle(fmt, block, seed, log_mag, rows, nblocks, dtype):
    g = torch.Generator().manual_seed(seed)
    _, fmt_max = FP8[fmt]
    x = (torch.randn(rows, nblocks * block, generator=g) * 2.0 ** log_mag).to(dtype)
    x[..., :3] = torch.tensor([0.0, -0.0, 2.0 ** log_mag]).to(dtype)
    q, scale = quantize_fp8_blockwise(x, block, fmt)
    assert q.shape == x.shape and scale.shape == (rows, nblocks) and scale.dtype == torch.float32
    xb = x.double().reshape(rows, nblocks, block)
    for r in range(rows):
        for j in range(nblocks):
            amax = xb[r, j].abs().max().item()
            s = _oracle_scale(amax, fmt_max)
            assert scale[r, j].item() == s
            assert s / 2 < max(amax, 1e-4) / fmt_max <= s  # a power of two, the smallest that fits
            want = _oracle_fp8_bytes(xb[r, j] / s, fmt)
            assert torch.equal(q[r, j * block:(j + 1) * block].view(torch.uint8), want)
    deq = dequantize_fp8_blockwise(q, scale)
    assert deq.dtype == torch.float32
    # Round to nearest: error <= half a step, i.e. 2^-4 relative (3 mantissa bits) or half the smallest
    # subnormal (2^-10 fn, 2^-11 fnuz) times the scale.
    sub = 2.0 ** -10 if fmt == "e4m3fn" else 2.0 ** -11
    s_full = scale.repeat_interleave(block, dim=-1)
    assert ((deq - x.float()).abs() <= torch.maximum(x.float().abs() * 2.0 ** -4, s_full * sub)).all()


def test_fp4_values_table():
    for code in range(16):
        e, m, neg = (code >> 1) & 3, code & 1, code >> 3
        mag = m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
        v = FP4_VALUES[code].item()
        assert v == (-mag if neg else mag) and math.copysign(1.0, v) == (-1.0 if neg else 1.0)


def test_fp4_nibble_order_hand_byte():
    assert unpack_fp4(torch.tensor([0xA3], dtype=torch.uint8)).tolist() == [3, 10]
    assert pack_fp4(torch.tensor([3, 10, 0, 15], dtype=torch.uint8)).tolist() == [0xA3, 0xF0]
    packed = torch.zeros(1, 16, dtype=torch.uint8)
    packed[0, 0] = 0x21  # element 0 = code 1 (0.5), element 1 = code 2 (1.0)
    packed[0, 1] = 0xF7  # element 2 = code 7 (6.0), element 3 = code 15 (-6.0)
    out = dequantize_mxfp4(packed, torch.tensor([[128]], dtype=torch.uint8))  # scale 2
    assert out[0, :5].tolist() == [1.0, 2.0, 12.0, -12.0, 0.0]


@pytest.mark.parametrize("scale_byte", [127, 113, 140, 200])  # above the 1e-4 amax floor
def test_fp4_every_code_round_trips(scale_byte):
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)  # one block of 32 with both zeros and +-6
    packed = pack_fp4(codes).unsqueeze(0)
    scale = torch.tensor([[scale_byte]], dtype=torch.uint8)
    x = dequantize_mxfp4(packed, scale)
    assert torch.equal(torch.signbit(x[0, 8]), torch.tensor(True))  # code 8 is -0
    p2, s2 = quantize_mxfp4(x)
    assert torch.equal(s2, scale)
    assert torch.equal(unpack_fp4(p2)[0], codes)


def test_fp4_ties_to_even_and_saturation():
    # Scale 1 (amax 6): ties 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    x = torch.zeros(32)
    x[0] = 6.0
    x[1:8] = torch.tensor(ties)
    x[8:15] = -torch.tensor(ties)
    x[15:18] = torch.tensor([0.26, 0.74, 4.99])
    packed, scale = quantize_mxfp4(x)
    assert scale.item() == 127
    out = dequantize_mxfp4(packed, scale)
    assert out[1:8].tolist() == want and out[8:15].tolist() == [-w for w in want]
    assert out[15:18].tolist() == [0.5, 0.5, 4.0]
    assert [int(c) for c in unpack_fp4(packed)[1:8]] == [0, 2, 2, 4, 4, 6, 6]
    # Saturation of the value encoder itself (the block scale keeps |x / scale| <= 6 in the public op).
    enc = _fp4_encode(torch.tensor([6.0, 6.5, 100.0, 1e30, -7.0]))
    assert enc.tolist() == [7, 7, 7, 7, 15]


def test_fp4_signed_zero_and_zero_block():
    x = torch.zeros(2, 32)
    x[0, :3] = torch.tensor([-0.0, -1e-6, 6.0])
    packed, scale = quantize_mxfp4(x)
    codes = unpack_fp4(packed)
    assert codes[0, :4].tolist() == [8, 8, 7, 0]  # IEEE sign kept: -0 and tiny negatives give code 8
    # All-zero block: scale 2^ceil(log2(1e-4 / 6)) = 2^-15, byte 112.
    assert scale[1].item() == 112 and (codes[1] == 0).all()
    out = dequantize_mxfp4(packed, scale)
    assert out[0, 0].item() == 0.0 and torch.signbit(out[0, 0])


def test_fp4_empty():
    packed, scale = quantize_mxfp4(torch.zeros(0, 3, 64, dtype=torch.bfloat16))
    assert packed.shape == (0, 3, 32) and packed.dtype == torch.uint8 and scale.shape == (0, 3, 2)
    assert dequantize_mxfp4(packed, scale).shape == (0, 3, 64)


@settings(deadline=None)
@given(seed=st.integers(0, 2**31 - 1), log_mag=st.integers(-20, 20), rows=st.integers(0, 3),
       nblocks=st.integers(1, 4), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_mxfp4_matches_nearest_oracle(seed, log_mag, rows, nblocks, dtype):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, nblocks * 32, generator=g) * 2.0 ** log_mag).to(dtype)
    packed, scale = quantize_mxfp4(x)
    assert packed.shape == (rows, nblocks * 16) and scale.shape == (rows, nblocks) and scale.dtype == torch.uint8
    codes = unpack_fp4(packed)
    xb = x.double().reshape(rows, nblocks, 32)
    for r in range(rows):
        for j in range(nblocks):
            s = _oracle_scale(xb[r, j].abs().max().item(), 6.0)
            assert scale[r, j].item() == round(math.log2(s)) + 127
            want = [_oracle_fp4_code(v / s) for v in xb[r, j].tolist()]
            assert codes[r, j * 32:(j + 1) * 32].tolist() == want
    deq = dequantize_mxfp4(packed, scale)
    s_full = ue8m0_to_float(scale).repeat_interleave(32, dim=-1)
    # Steps of the FP4 grid are <= 1/2 of the lower magnitude above 1, and 0.5 below: half-step bound.
    assert ((deq - x.float()).abs() <= torch.maximum(x.float().abs() / 4, s_full * 0.25)).all()
