"""Compressor reference (SPEC 2): pooling, the ratio-4 overlap, emission and the prefill state layout.

V4-Flash and V4-Pro share the compressor shapes; they differ only through d here (512 for the
attention compressor, 128 for the indexer compressor), so both widths are tested.
"""
import math

import pytest
import torch

from dsv4_kernels.reference.compressor import (
    _pool,
    compressor_decode,
    compressor_init_state,
    compressor_prefill,
)
from dsv4_kernels.testing import assert_close

RATIOS = (4, 128)
WIDTHS = (512, 128)
PREFILL_LENGTHS = (0, 1, 3, 4, 5, 127, 128, 129, 300)

# Reference and oracle both pool in fp64 and differ only in summation order and the final rounding
# to fp32: half an fp32 ulp (6e-8 relative) of the result, plus fp64 noise far below atol.
POOL_ATOL, POOL_RTOL = 1e-6, 1e-6


def _coff(ratio):
    return 2 if ratio == 4 else 1


def _inputs(seq_len, ratio, d, gen=None):
    """Realistic projections: kv of order 1, gate scores and ape of order a few."""
    width = _coff(ratio) * d
    kv = torch.randn(seq_len, width, generator=gen)
    score = 2.0 * torch.randn(seq_len, width, generator=gen)
    ape = 0.5 * torch.randn(ratio, width, generator=gen)
    return kv, score, ape


def _oracle_entries(kv, score, ape, ratio):
    """Loop formula in fp64: list the (kv, score) rows of each entry explicitly, then softmax by hand.

    The score bias is added in fp32 as the spec states (all of kv, score, ape are fp32 tensors).
    Entry 0 of ratio 4 simply has no previous-block rows (no -inf padding involved).
    """
    coff = _coff(ratio)
    d = kv.shape[1] // coff
    biased = score + ape[torch.arange(kv.shape[0]) % ratio]
    out = []
    for j in range(kv.shape[0] // ratio):
        rows = []
        if coff == 2:
            rows += [(kv[t, :d], biased[t, :d]) for t in range((j - 1) * ratio, j * ratio) if t >= 0]
            rows += [(kv[t, d:], biased[t, d:]) for t in range(j * ratio, (j + 1) * ratio)]
        else:
            rows += [(kv[t], biased[t]) for t in range(j * ratio, (j + 1) * ratio)]
        top = torch.stack([s.double() for _, s in rows]).max(dim=0).values
        num = torch.zeros(d, dtype=torch.float64)
        den = torch.zeros(d, dtype=torch.float64)
        for v, s in rows:
            w = torch.exp(s.double() - top)
            num += w * v.double()
            den += w
        out.append(num / den)
    return torch.stack(out) if out else torch.zeros(0, d, dtype=torch.float64)


def test_pool_core_hand():
    kv = torch.tensor([[[1.0, 2.0], [4.0, 8.0]]])
    score = torch.tensor([[[0.0, math.log(3.0)], [0.0, float("-inf")]]])
    # channel 0: equal weights -> (1 + 4) / 2; channel 1: the -inf row gets weight 0 -> 2
    assert_close(_pool(kv, score), torch.tensor([[2.5, 2.0]]), atol=0, rtol=1e-7)


def test_ratio128_hand():
    """Two blocks of 128 tokens, d = 2: the ape bias picks out phase 5 in channel 0 only."""
    seq_len = 2 * 128 + 3
    t = torch.arange(seq_len, dtype=torch.float32)
    kv = torch.stack([torch.where(t % 128 == 5, 130.0, 1.0), t], dim=1)
    score = torch.zeros(seq_len, 2)
    ape = torch.zeros(128, 2)
    ape[5, 0] = math.log(2.0)
    entries, _, _ = compressor_prefill(kv, score, ape, 128)
    # channel 0: weight 2/129 on 130, 1/129 on 127 ones -> 387/129 = 3; channel 1: mean of the block
    expected = torch.tensor([[3.0, 63.5], [3.0, 191.5]])
    assert entries.dtype == torch.float32 and entries.shape == (2, 2)
    assert_close(entries, expected, atol=POOL_ATOL, rtol=POOL_RTOL)


def test_ratio4_overlap_hand():
    """d = 1: A half kv_t = t, B half kv_t = 100 + t. ape triples the weight of the A half at
    phase 1 and of the B half at phase 2. Entry j pools A of block j-1 and B of block j."""
    t = torch.arange(12, dtype=torch.float32)
    kv = torch.stack([t, 100.0 + t], dim=1)
    score = torch.zeros(12, 2)
    ape = torch.zeros(4, 2)
    ape[1, 0] = math.log(3.0)
    ape[2, 1] = math.log(3.0)
    entries, _, _ = compressor_prefill(kv, score, ape, 4)
    expected = torch.tensor([
        [(100 + 101 + 3 * 102 + 103) / 6],                    # j = 0: B of tokens 0..3 only
        [(0 + 3 * 1 + 2 + 3 + 104 + 105 + 3 * 106 + 107) / 12],  # A of 0..3, B of 4..7 -> 53.5
        [(4 + 3 * 5 + 6 + 7 + 108 + 109 + 3 * 110 + 111) / 12],  # A of 4..7, B of 8..11 -> 57.5
    ])
    assert_close(entries, expected, atol=POOL_ATOL, rtol=POOL_RTOL)


@pytest.mark.parametrize("d", WIDTHS)
def test_ratio4_halves_feed_entries(d):
    """Perturbing the A half of token t changes only entry t//4 + 1; the B half only entry t//4."""
    kv, score, ape = _inputs(20, 4, d)
    base, _, _ = compressor_prefill(kv, score, ape, 4)
    for t in (0, 3, 6, 11, 16, 19):
        for half, target in ((slice(0, d), t // 4 + 1), (slice(d, 2 * d), t // 4)):
            for tensor_name in ("kv", "score"):
                kv2, score2 = kv.clone(), score.clone()
                (kv2 if tensor_name == "kv" else score2)[t, half] += 1.0
                moved, _, _ = compressor_prefill(kv2, score2, ape, 4)
                changed = (moved != base).any(dim=1).nonzero().flatten().tolist()
                assert changed == ([target] if target < 5 else []), (t, half, tensor_name, changed)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("seq_len", PREFILL_LENGTHS)
def test_prefill_matches_loop_oracle(ratio, d, seq_len):
    kv, score, ape = _inputs(seq_len, ratio, d)
    entries, kv_state, score_state = compressor_prefill(kv, score, ape, ratio)
    coff = _coff(ratio)
    assert entries.shape == (seq_len // ratio, d) and entries.dtype == torch.float32
    assert kv_state.shape == score_state.shape == (coff * ratio, coff * d)
    assert kv_state.dtype == score_state.dtype == torch.float32
    assert_close(entries, _oracle_entries(kv, score, ape, ratio).float(), atol=POOL_ATOL, rtol=POOL_RTOL)


def test_ape_goes_to_score_not_kv():
    """Equal scores everywhere: a constant ape shift changes nothing; the same shift on kv would."""
    kv, score, ape = _inputs(8, 4, 128)
    shifted = ape + 5.0
    a, _, _ = compressor_prefill(kv, score, ape, 4)
    b, _, _ = compressor_prefill(kv, score, shifted, 4)
    # score + ape is rounded to fp32 (one ulp of ~8 is 1e-6) before the softmax: spec pooling tolerance
    assert_close(b, a, atol=2e-5, rtol=1e-4)
    score = torch.zeros_like(score)
    ape = torch.zeros_like(ape)
    ape[2] = 1.0
    plain, _, _ = compressor_prefill(kv, score, torch.zeros_like(ape), 4)
    biased, _, _ = compressor_prefill(kv, score, ape, 4)
    assert not torch.allclose(plain, biased)


@pytest.mark.parametrize("ratio", RATIOS)
def test_emission_rule(ratio):
    """Decode position p emits entry p // r exactly when (p + 1) mod r == 0; other rows are zero."""
    d = 128
    steps = 2 * ratio + 2
    kv, score, ape = _inputs(steps, ratio, d)
    kv_state, score_state = compressor_init_state(ratio, d, slots=1)
    emitted_at = []
    for p in range(steps):
        entries, emitted = compressor_decode(kv_state, score_state, kv[p:p + 1], score[p:p + 1], ape,
                                             torch.tensor([p]), ratio)
        assert emitted.dtype == torch.bool and emitted.shape == (1,)
        assert entries.shape == (1, d) and entries.dtype == torch.float32
        if emitted[0]:
            emitted_at.append(p)
            assert entries.abs().sum() > 0
        else:
            assert torch.equal(entries, torch.zeros(1, d))
    assert emitted_at == [ratio - 1, 2 * ratio - 1]


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("seq_len", PREFILL_LENGTHS)
def test_prefill_entry_count(ratio, seq_len):
    kv, score, ape = _inputs(seq_len, ratio, 128)
    entries, _, _ = compressor_prefill(kv, score, ape, ratio)
    assert entries.shape[0] == seq_len // ratio


@pytest.mark.parametrize("d", WIDTHS)
def test_init_state(d):
    for ratio in RATIOS:
        coff = _coff(ratio)
        kv_state, score_state = compressor_init_state(ratio, d)
        assert kv_state.shape == (coff * ratio, coff * d) and kv_state.dtype == torch.float32
        assert torch.equal(kv_state, torch.zeros_like(kv_state))
        assert bool((score_state == float("-inf")).all())
        kv_state, score_state = compressor_init_state(ratio, d, slots=3)
        assert kv_state.shape == score_state.shape == (3, coff * ratio, coff * d)


@pytest.mark.parametrize("d", WIDTHS)
def test_prefill_state_layout_ratio4(d):
    """rows[0:4] = last complete block (kv, score + ape), rows[4:4+rem] = remainder (SPEC 2)."""
    for seq_len, last_block, rem in ((10, (4, 8), 2), (8, (4, 8), 0), (4, (0, 4), 0), (3, None, 3),
                                     (0, None, 0), (301, (296, 300), 1)):
        kv, score, ape = _inputs(seq_len, 4, d)
        biased = score + ape[torch.arange(seq_len) % 4]
        _, kv_state, score_state = compressor_prefill(kv, score, ape, 4)
        if last_block is None:
            assert torch.equal(kv_state[:4], torch.zeros(4, 2 * d))
            assert bool((score_state[:4] == float("-inf")).all())
        else:
            assert torch.equal(kv_state[:4], kv[slice(*last_block)])
            assert torch.equal(score_state[:4], biased[slice(*last_block)])
        cutoff = seq_len - rem
        assert torch.equal(kv_state[4:4 + rem], kv[cutoff:])
        assert torch.equal(score_state[4:4 + rem], biased[cutoff:])


@pytest.mark.parametrize("d", WIDTHS)
def test_prefill_state_layout_ratio128(d):
    for seq_len in (0, 1, 5, 128, 130, 300):
        kv, score, ape = _inputs(seq_len, 128, d)
        biased = score + ape[torch.arange(seq_len) % 128]
        _, kv_state, score_state = compressor_prefill(kv, score, ape, 128)
        rem = seq_len % 128
        assert torch.equal(kv_state[:rem], kv[seq_len - rem:])
        assert torch.equal(score_state[:rem], biased[seq_len - rem:])


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("d", WIDTHS)
def test_zero_tokens(ratio, d):
    coff = _coff(ratio)
    kv, score, ape = _inputs(0, ratio, d)
    entries, kv_state, score_state = compressor_prefill(kv, score, ape, ratio)
    assert entries.shape == (0, d) and entries.dtype == torch.float32
    fresh_kv, fresh_score = compressor_init_state(ratio, d)
    assert torch.equal(kv_state, fresh_kv) and torch.equal(score_state, fresh_score)

    states = compressor_init_state(ratio, d, slots=2)
    before = [s.clone() for s in states]
    entries, emitted = compressor_decode(*states, torch.zeros(0, coff * d), torch.zeros(0, coff * d), ape,
                                         torch.zeros(0, dtype=torch.int64), ratio)
    assert entries.shape == (0, d) and emitted.shape == (0,) and emitted.dtype == torch.bool
    assert all(torch.equal(a, b) for a, b in zip(states, before))
