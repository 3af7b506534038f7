"""The 584-byte FP8 KV cache (SPEC 1.2): byte layout by hand, round-trip error, pages and slots."""
from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv4_kernels.reference.formats import (
    KV_TOKEN_BYTES, dequantize_kv_cache_fp8, gather_kv_cache_fp8, quantize_kv_cache_fp8, store_kv_cache_fp8,
)


def _bf16_bytes(v: float) -> list[int]:
    """Little-endian bytes of an exactly-bf16 value: the high half of its fp32 encoding."""
    return list(struct.pack("<f", v)[2:4])


def _fp8_byte(v: float) -> int:
    """e4m3fn encoding of an exactly representable value, from sign/exponent/mantissa by hand."""
    if v == 0:
        return 0x80 if math.copysign(1.0, v) < 0 else 0
    sign = 0x80 if v < 0 else 0
    m, e = math.frexp(abs(v))  # |v| = m 2^e, m in [0.5, 1)
    if e - 1 >= -6:  # normal: 1.mmm * 2^(e-1), bias 7
        return sign | ((e - 1 + 7) << 3) | int((m * 2 - 1) * 8)
    return sign | int(abs(v) / 2.0 ** -9)  # subnormal: k * 2^-9


def _hand_token() -> tuple[torch.Tensor, list[int], list[int]]:
    """One kv row built from exact e4m3fn values c: tile t < 6 holds c * 2^(t-5) with amax 448 * 2^(t-5),
    so its scale is 2^(t-5) (byte 122 + t) and the stored bytes are those of c. Tile 6 holds c * 2^-13
    with amax 5 * 2^-13 < 0.0448: FlashMLA's rule floors its scale at 2^ceil(log2(1e-4)) = 2^-13 (byte
    114), where the activation rule would give 2^-19. Returns the row, its 448 fp8 bytes, 7 scale bytes."""
    big = [448.0, -1.0, 0.5, 3.0, -0.0, 0.015625, 2.0 ** -9, -240.0]
    small = [0.0, 1.0, -2.0, 5.0]
    nope, fp8_bytes, scale_bytes = [], [], []
    for t in range(7):
        pattern, scale = (big, 2.0 ** (t - 5)) if t < 6 else (small, 2.0 ** -13)
        for j in range(64):
            c = pattern[j % len(pattern)]
            nope.append(c * scale)
            fp8_bytes.append(_fp8_byte(c))
        scale_bytes.append(122 + t if t < 6 else 114)
    rope = [0.5 * (i - 32) + 0.25 for i in range(64)]  # exact in bf16
    row = torch.tensor(nope + rope, dtype=torch.float64).to(torch.bfloat16)
    assert row.double().tolist() == nope + rope  # every chosen value is exact in bf16
    return row, fp8_bytes, scale_bytes


def test_kv_hand_token_byte_layout():
    row, fp8_bytes, scale_bytes = _hand_token()
    assert fp8_bytes[:8] == [0x7E, 0xB8, 0x30, 0x44, 0x80, 0x08, 0x01, 0xF7]  # 448 -1 0.5 3 -0 2^-6 2^-9 -240
    rope_bytes = sum((_bf16_bytes(v) for v in row[448:].float().tolist()), [])
    assert rope_bytes[:2] == [0x7C, 0xC1]  # -15.75 = bf16 0xC17C, little-endian
    bs = 64
    pages = torch.zeros(2, bs * KV_TOKEN_BYTES, dtype=torch.uint8)
    slot = bs + 5  # page 1, row 5
    store_kv_cache_fp8(pages, torch.tensor([slot]), row.unsqueeze(0), bs)
    page = pages[1].tolist()
    base = 5 * 576
    assert page[base:base + 448] == fp8_bytes
    assert page[base + 448:base + 576] == rope_bytes
    sbase = bs * 576 + 5 * 8
    assert page[sbase:sbase + 7] == scale_bytes
    assert page[sbase + 7] == 0  # pad byte
    written = set(range(base, base + 576)) | set(range(sbase, sbase + 8))
    assert all(b == 0 for i, b in enumerate(page) if i not in written)
    assert (pages[0] == 0).all()
    assert KV_TOKEN_BYTES == 584 and pages.shape[1] == 64 * 584


def test_kv_hand_token_dequantises_exactly():
    row, _, _ = _hand_token()
    pages = quantize_kv_cache_fp8(row.unsqueeze(0))
    assert pages.shape == (1, 64 * 584) and pages.dtype == torch.uint8
    out = dequantize_kv_cache_fp8(pages, 1)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 512)
    assert torch.equal(out[0], row)


def _roundtrip_bound(kv: torch.Tensor, pages: torch.Tensor, bs: int) -> torch.Tensor:
    """Per-element bound: half an fp8 step = 2^-4 relative, or half the smallest subnormal 2^-10 times the
    tile scale; the scale is read back from the bytes and checked against FlashMLA's rule in fp64."""
    n = kv.shape[0]
    scales = torch.empty(n, 7, dtype=torch.float64)
    for i in range(n):
        p, r = divmod(i, bs)
        for t in range(7):
            byte = int(pages[p, bs * 576 + r * 8 + t])
            amax = kv[i, t * 64:(t + 1) * 64].double().abs().max().item()
            assert byte - 127 == math.ceil(math.log2(max(amax / 448, 1e-4)))
            scales[i, t] = 2.0 ** (byte - 127)
    return torch.maximum(kv[:, :448].double().abs() * 2.0 ** -4, scales.repeat_interleave(64, dim=1) * 2.0 ** -10)


@pytest.mark.parametrize("n,bs", [(1, 64), (3, 64), (63, 64), (64, 64), (100, 64), (70, 16), (5, 1)])
def test_kv_round_trip_and_partial_last_page(n, bs):
    kv = (torch.randn(n, 512) * torch.logspace(-3, 1, 512)).to(torch.bfloat16)
    pages = quantize_kv_cache_fp8(kv, bs)
    assert pages.shape == (math.ceil(n / bs), bs * 584)
    out = dequantize_kv_cache_fp8(pages, n, bs)
    assert torch.equal(out[:, 448:], kv[:, 448:])
    err = (out[:, :448].double() - kv[:, :448].double()).abs()
    assert (err <= _roundtrip_bound(kv, pages, bs)).all()
    # Pad tokens of the last page are zero bytes (data and scale area) and dequantise to zero.
    used = n - (pages.shape[0] - 1) * bs
    last = pages[-1]
    assert (last[used * 576:bs * 576] == 0).all() and (last[bs * 576 + used * 8:] == 0).all()
    full = dequantize_kv_cache_fp8(pages, pages.shape[0] * bs, bs)
    assert torch.equal(full[:n], out) and (full[n:] == 0).all()


def test_kv_empty():
    pages = quantize_kv_cache_fp8(torch.zeros(0, 512, dtype=torch.bfloat16))
    assert pages.shape == (0, 64 * 584) and pages.dtype == torch.uint8
    assert dequantize_kv_cache_fp8(pages, 0).shape == (0, 512)
    store_kv_cache_fp8(pages, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 512, dtype=torch.bfloat16))


def test_kv_store_scattered_slots_matches_contiguous_bytes():
    bs, n_pages, n = 16, 4, 11
    kv = torch.randn(n, 512).to(torch.bfloat16)
    slots = torch.randperm(n_pages * bs)[:n]
    slots_with_pad = torch.cat((slots[:5], torch.tensor([-1]), slots[5:]))  # -1: a padding token, skipped
    kv_with_pad = torch.cat((kv[:5], torch.full((1, 512), 7.0, dtype=torch.bfloat16), kv[5:]))
    pages = torch.zeros(n_pages, bs * 584, dtype=torch.uint8)
    store_kv_cache_fp8(pages, slots_with_pad, kv_with_pad, bs)
    ref = quantize_kv_cache_fp8(kv, bs)  # token i at slot i
    touched = torch.zeros(n_pages, bs * 584, dtype=torch.bool)
    for i, s in enumerate(slots.tolist()):
        p, r = divmod(s, bs)
        pi, ri = divmod(i, bs)
        assert torch.equal(pages[p, r * 576:(r + 1) * 576], ref[pi, ri * 576:(ri + 1) * 576])
        assert torch.equal(pages[p, bs * 576 + r * 8:bs * 576 + (r + 1) * 8],
                           ref[pi, bs * 576 + ri * 8:bs * 576 + (ri + 1) * 8])
        touched[p, r * 576:(r + 1) * 576] = True
        touched[p, bs * 576 + r * 8:bs * 576 + (r + 1) * 8] = True
    assert (pages[~touched] == 0).all()
    assert torch.equal(gather_kv_cache_fp8(pages, slots, bs), dequantize_kv_cache_fp8(ref, n, bs))
    # Overwriting a slot replaces its row.
    store_kv_cache_fp8(pages, slots[:1], kv[1:2], bs)
    assert torch.equal(gather_kv_cache_fp8(pages, slots[:1], bs), dequantize_kv_cache_fp8(ref, 2, bs)[1:])


def test_kv_gather_shapes_and_invalid_indices():
    bs = 8
    kv = torch.randn(20, 512).to(torch.bfloat16)
    pages = quantize_kv_cache_fp8(kv, bs)  # 3 pages, capacity 24
    idx = torch.tensor([[3, -1, 19], [24, 0, 3]], dtype=torch.int32)
    out = gather_kv_cache_fp8(pages, idx, bs)
    deq = dequantize_kv_cache_fp8(pages, 20, bs)
    assert out.shape == (2, 3, 512) and out.dtype == torch.bfloat16
    assert torch.equal(out[0, 0], deq[3]) and torch.equal(out[0, 2], deq[19]) and torch.equal(out[1, 1], deq[0])
    assert (out[0, 1] == 0).all() and (out[1, 0] == 0).all()


@settings(deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), bs=st.sampled_from([1, 16, 64]),
       log_mag=st.integers(-16, 12))
def test_kv_round_trip_property(seed, n, bs, log_mag):
    g = torch.Generator().manual_seed(seed)
    kv = (torch.randn(n, 512, generator=g) * 2.0 ** log_mag).to(torch.bfloat16)
    pages = quantize_kv_cache_fp8(kv, bs)
    out = dequantize_kv_cache_fp8(pages, n, bs)
    assert torch.equal(out[:, 448:], kv[:, 448:])
    err = (out[:, :448].double() - kv[:, :448].double()).abs()
    assert (err <= _roundtrip_bound(kv, pages, bs)).all()
    # Dequantised values are fp8 * power of two: exact in bf16, so a second round trip is the identity.
    assert torch.equal(dequantize_kv_cache_fp8(quantize_kv_cache_fp8(out, bs), n, bs), out)
