"""Compressor reference (SPEC 2): the stages after pooling. RMSNorm + RoPE, the fused prefill/decode
forms, the FP8 cache store (d = 512) and the indexer's Hadamard + MXFP4 cache form (d = 128)."""
import math

import pytest
import torch

from dsv4_kernels.reference.compressor import (
    compressor_decode,
    compressor_init_state,
    compressor_norm_rope,
    compressor_prefill,
    indexer_cache_quantize,
)
from dsv4_kernels.reference.formats import (
    dequantize_mxfp4,
    gather_kv_cache_fp8,
    quantize_kv_cache_fp8,
)
from dsv4_kernels.reference.transforms import rope_tables
from dsv4_kernels.testing import bf16_ulp

RATIOS = (4, 128)
WIDTHS = (512, 128)
PREFILL_LENGTHS = (0, 1, 3, 4, 5, 127, 128, 129, 300)
MAX_POS = 512
TOKEN_BYTES, DATA_BYTES, SCALE_BYTES = 584, 576, 8


def _coff(ratio):
    return 2 if ratio == 4 else 1


def _inputs(seq_len, ratio, d):
    width = _coff(ratio) * d
    return (torch.randn(seq_len, width), 2.0 * torch.randn(seq_len, width),
            0.5 * torch.randn(ratio, width))


def _tables(num_positions, theta=10000.0):
    """fp64 formula, independent of transforms.rope_tables: angle = p * theta^(-2i/64), i < 32."""
    freqs = theta ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * freqs
    return torch.cos(angles).float(), torch.sin(angles).float()


def _norm_weight(d):
    return 1.0 + 0.2 * torch.randn(d)


def _oracle_norm_rope(entries, weight, cos, sin, positions, eps=1e-6):
    """fp64, pair by pair: y = bf16(x / sqrt(mean(x^2) + eps) * w); (a, b) -> (a c - b s, a s + b c)."""
    x = entries.double()
    y = (x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight.double()).bfloat16().double()
    out = y.clone()
    nope = y.shape[-1] - 64
    for i in range(32):
        c, s = cos[positions, i].double(), sin[positions, i].double()
        a, b = y[:, nope + 2 * i], y[:, nope + 2 * i + 1]
        out[:, nope + 2 * i] = a * c - b * s
        out[:, nope + 2 * i + 1] = a * s + b * c
    pair_mag = y[:, nope:].reshape(-1, 32, 2).abs().amax(dim=-1).repeat_interleave(2, dim=-1)
    return out.bfloat16(), pair_mag


@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("n", (0, 1, 3, 63))
def test_norm_rope_matches_fp64_formula(d, n):
    entries = 0.3 * torch.randn(n, d)
    weight = _norm_weight(d)
    cos, sin = _tables(MAX_POS)
    positions = torch.randint(0, MAX_POS, (n,))
    got = compressor_norm_rope(entries, weight, cos, sin, positions)
    assert got.dtype == torch.bfloat16 and got.shape == (n, d)
    want, pair_mag = _oracle_norm_rope(entries, weight, cos, sin, positions)
    err = (got.double() - want.double()).abs()
    # nope dims: fp32 vs fp64 norm, one rounding to bf16 -> equal or one bf16 ulp apart.
    assert bool((err[:, :-64] <= bf16_ulp(want[:, :-64]).double()).all())
    # rope dims: two bf16 ulps of the output (SPEC 6), plus one ulp of the pair's input because the
    # bf16 intermediate may round the other way in fp32 than in fp64 (a rotation passes that on).
    bound = 2 * bf16_ulp(want[:, -64:]).double() + bf16_ulp(pair_mag.float()).double()
    assert bool((err[:, -64:] <= bound).all())


def test_norm_rope_hand():
    """Entries of +-1 have RMS 1, so the bf16 normed value is exactly +-w. Position 0 (cos 1, sin 0)
    leaves pairs alone; position 4 with cos 0, sin 1 maps each pair (a, b) to (-b, a)."""
    d = 128
    sign = torch.where(torch.arange(d) % 3 == 0, -1.0, 1.0)
    weight = torch.tensor([0.5, 1.5, 2.0, 0.75])[torch.arange(d) % 4]
    cos, sin = torch.ones(8, 32), torch.zeros(8, 32)
    cos[4], sin[4] = 0.0, 1.0
    got = compressor_norm_rope(torch.stack([sign, sign]), weight, cos, sin, torch.tensor([0, 4]))
    normed = sign * weight
    assert torch.equal(got[0].float(), normed)
    rotated = normed.clone()
    rotated[64::2], rotated[65::2] = -normed[65::2], normed[64::2]
    assert torch.equal(got[1].float(), rotated)


def test_norm_rope_with_transforms_tables():
    """The tables the other reference builds index by position: same result as the fp64 formula's."""
    d = 512
    entries = 0.3 * torch.randn(5, d)
    weight = _norm_weight(d)
    cos, sin = rope_tables(torch.arange(MAX_POS))
    my_cos, my_sin = _tables(MAX_POS)
    assert cos.shape == sin.shape == (MAX_POS, 32)
    positions = torch.tensor([0, 4, 128, 300, 508])
    got = compressor_norm_rope(entries, weight, cos, sin, positions)
    want = compressor_norm_rope(entries, weight, my_cos, my_sin, positions)
    assert bool(((got.float() - want.float()).abs() <= bf16_ulp(want)).all())


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("seq_len", PREFILL_LENGTHS)
def test_fused_prefill_equals_norm_rope_of_unfused(ratio, d, seq_len):
    kv, score, ape = _inputs(seq_len, ratio, d)
    weight = _norm_weight(d)
    cos, sin = _tables(MAX_POS)
    plain, kv_state, score_state = compressor_prefill(kv, score, ape, ratio)
    fused, fused_kv_state, fused_score_state = compressor_prefill(kv, score, ape, ratio, weight, cos, sin)
    assert fused.dtype == torch.bfloat16 and fused.shape == (seq_len // ratio, d)
    positions = torch.arange(seq_len // ratio) * ratio
    assert torch.equal(fused, compressor_norm_rope(plain, weight, cos, sin, positions))
    assert torch.equal(fused_kv_state, kv_state) and torch.equal(fused_score_state, score_state)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("d", WIDTHS)
def test_fused_decode_equals_norm_rope_of_unfused(ratio, d):
    coff = _coff(ratio)
    batch = 4
    weight = _norm_weight(d)
    cos, sin = _tables(MAX_POS)
    ape = 0.5 * torch.randn(ratio, coff * d)
    positions = torch.tensor([ratio - 1, ratio, 3 * ratio - 1, 2 * ratio + 1])
    plain_states = compressor_init_state(ratio, d, slots=batch)
    for s in plain_states:
        s.copy_(torch.randn_like(s))
    fused_states = [s.clone() for s in plain_states]
    kv, score = torch.randn(batch, coff * d), 2.0 * torch.randn(batch, coff * d)
    plain, emitted = compressor_decode(*plain_states, kv, score, ape, positions, ratio)
    fused, fused_emitted = compressor_decode(*fused_states, kv, score, ape, positions, ratio,
                                             norm_weight=weight, rope_cos=cos, rope_sin=sin)
    assert torch.equal(emitted, torch.tensor([True, False, True, False]))
    assert torch.equal(fused_emitted, emitted)
    assert fused.dtype == torch.bfloat16 and fused.shape == (batch, d)
    want = compressor_norm_rope(plain[emitted], weight, cos, sin, positions[emitted] + 1 - ratio)
    assert torch.equal(fused[emitted], want)
    assert torch.equal(fused[~emitted], torch.zeros(2, d, dtype=torch.bfloat16))
    assert all(torch.equal(a, b) for a, b in zip(plain_states, fused_states))


def _slot_byte_mask(num_pages, block_size, slots):
    """Bytes of a cache [num_pages, block_size * 584] that belong to the given flat slots (SPEC 1.2)."""
    mask = torch.zeros(num_pages, block_size * TOKEN_BYTES, dtype=torch.bool)
    for s in slots.tolist():
        page, row = divmod(s, block_size)
        mask[page, row * DATA_BYTES:(row + 1) * DATA_BYTES] = True
        start = block_size * DATA_BYTES + row * SCALE_BYTES
        mask[page, start:start + SCALE_BYTES] = True
    return mask


def _check_cache_rows(pages, slots, entries, block_size):
    """The stored rows equal quantize_kv_cache_fp8 of the same bf16 rows, and lie within the FP8 bound."""
    got = gather_kv_cache_fp8(pages, slots, block_size)
    assert torch.equal(got, gather_kv_cache_fp8(quantize_kv_cache_fp8(entries, block_size),
                                                torch.arange(entries.shape[0]), block_size))
    assert torch.equal(got[:, 448:], entries[:, 448:])
    x = entries[:, :448].double()
    err = (got[:, :448].double() - x).abs()
    tile_amax = x.abs().reshape(-1, 7, 64).amax(dim=-1).repeat_interleave(64, dim=-1)
    # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4; below the normal range the spacing is
    # scale * 2^-9 with scale < 2 * max(amax / 448, 1e-4), so half a step is below that term.
    bound = x.abs() * 2.0 ** -4 + (tile_amax / 448).clamp_min(1e-4) * 2.0 ** -9
    assert bool((err <= bound).all())


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("seq_len", (0, 4, 129, 300))
@pytest.mark.parametrize("block_size", (64, 16))
def test_fused_prefill_cache_store(ratio, seq_len, block_size):
    d = 512
    kv, score, ape = _inputs(seq_len, ratio, d)
    weight = _norm_weight(d)
    cos, sin = _tables(MAX_POS)
    n = seq_len // ratio
    num_pages = 6
    slots = torch.randperm(num_pages * block_size)[:n]
    pages = torch.randint(0, 256, (num_pages, block_size * TOKEN_BYTES), dtype=torch.uint8)
    before = pages.clone()
    entries, _, _ = compressor_prefill(kv, score, ape, ratio, weight, cos, sin, pages, block_size, slots)
    unfused, _, _ = compressor_prefill(kv, score, ape, ratio, weight, cos, sin)
    assert torch.equal(entries, unfused)
    _check_cache_rows(pages, slots, entries, block_size)
    untouched = ~_slot_byte_mask(num_pages, block_size, slots)
    assert torch.equal(pages[untouched], before[untouched])


@pytest.mark.parametrize("ratio", RATIOS)
def test_fused_decode_cache_store_only_emitted(ratio):
    """cache_slots of rows that do not emit are never written."""
    d, block_size, num_pages = 512, 64, 2
    coff = _coff(ratio)
    weight = _norm_weight(d)
    cos, sin = _tables(MAX_POS)
    ape = 0.5 * torch.randn(ratio, coff * d)
    positions = torch.tensor([2 * ratio - 1, 0, ratio + 1, ratio - 1, 3])
    states = compressor_init_state(ratio, d, slots=5)
    for s in states:
        s.copy_(torch.randn_like(s))
    slots = torch.tensor([70, 3, 64, 127, 5])
    pages = torch.randint(0, 256, (num_pages, block_size * TOKEN_BYTES), dtype=torch.uint8)
    before = pages.clone()
    kv, score = torch.randn(5, coff * d), 2.0 * torch.randn(5, coff * d)
    entries, emitted = compressor_decode(*states, kv, score, ape, positions, ratio, None, weight, cos, sin,
                                         pages, block_size, slots)
    assert torch.equal(emitted, (positions + 1) % ratio == 0)
    _check_cache_rows(pages, slots[emitted], entries[emitted], block_size)
    untouched = ~_slot_byte_mask(num_pages, block_size, slots[emitted])
    assert torch.equal(pages[untouched], before[untouched])


def _hadamard_128():
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(7):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(128)


@pytest.mark.parametrize("n", (0, 1, 3, 100))
def test_indexer_fp4_round_trip(n):
    """Indexer entries (d = 128, normed and RoPE'd) -> Hadamard -> MXFP4; checked against an fp64
    Sylvester-matrix rotation and the e2m1 rounding bound, and rotated back to the input."""
    cos, sin = _tables(MAX_POS)
    x = compressor_norm_rope(0.3 * torch.randn(n, 128), _norm_weight(128), cos, sin,
                             torch.randint(0, MAX_POS, (n,)))
    packed, scale = indexer_cache_quantize(x)
    assert packed.dtype == scale.dtype == torch.uint8
    assert packed.shape == (n, 64) and scale.shape == (n, 4)
    h = _hadamard_128()
    rotated = x.double() @ h
    amax = rotated.abs().reshape(n, 4, 32).amax(dim=-1)
    want_scale = 127 + torch.ceil(torch.log2(amax.clamp_min(1e-4) / 6))
    assert torch.equal(scale.double(), want_scale)

    deq = dequantize_mxfp4(packed, scale).double()
    step = torch.exp2(want_scale - 127).repeat_interleave(32, dim=-1)
    # e2m1 spacing is 0.5 below 2, 1 below 4, 2 up to 6: half a step <= max(0.25, |v| / 4) in scale
    # units; the small slack covers fp32 vs fp64 rotation at a rounding midpoint.
    bound = step * torch.clamp(rotated.abs() / step / 4, min=0.25) * (1 + 1e-5) + 1e-7
    assert bool(((deq - rotated).abs() <= bound).all())
    back = deq @ h
    assert bool(((back - x.double()).norm(dim=-1) <= bound.norm(dim=-1)).all())
