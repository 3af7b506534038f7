"""Compressor reference (SPEC 2): THE invariant. prefill(S) followed by decode of tokens S..S+n-1
emits exactly the entries prefill(S+n) emits and leaves the same state on every specified row.

Sizes: d = 512 (attention compressor) and d = 128 (indexer compressor), the only way V4-Flash and
V4-Pro differ for this op.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4_kernels.reference.compressor import compressor_decode, compressor_init_state, compressor_prefill
from dsv4_kernels.testing import assert_close

RATIOS = (4, 128)
WIDTHS = (512, 128)
PREFILL_LENGTHS = (0, 1, 3, 4, 5, 127, 128, 129, 300)

# prefill and decode pool the same fp32 rows in fp64 but in batches of different shapes; the fp32
# results can differ only through the final rounding, i.e. by at most one fp32 ulp (1.2e-7 relative).
ENTRY_ATOL, ENTRY_RTOL = 1e-30, 2.4e-7


def _coff(ratio):
    return 2 if ratio == 4 else 1


def _inputs(seq_len, ratio, d, gen=None):
    width = _coff(ratio) * d
    kv = torch.randn(seq_len, width, generator=gen)
    score = 2.0 * torch.randn(seq_len, width, generator=gen)
    ape = 0.5 * torch.randn(ratio, width, generator=gen)
    return kv, score, ape


def _specified_rows(ratio, num_tokens):
    """State rows SPEC 2 defines after num_tokens tokens: for r = 4 rows 0:4 (initial values or the
    last complete block) plus 4 .. 4 + rem; for r = 128 rows 0 .. rem."""
    rem = num_tokens % ratio
    return list(range(ratio + rem)) if ratio == 4 else list(range(rem))


def _check_invariant(ratio, d, seq_len, steps, gen=None):
    kv, score, ape = _inputs(seq_len + steps, ratio, d, gen)
    full, full_kv_state, full_score_state = compressor_prefill(kv, score, ape, ratio)
    head, kv_state, score_state = compressor_prefill(kv[:seq_len], score[:seq_len], ape, ratio)
    assert_close(head, full[:seq_len // ratio], ENTRY_ATOL, ENTRY_RTOL, "prefill prefix")

    kv_state, score_state = kv_state[None].clone(), score_state[None].clone()
    decoded = []
    for p in range(seq_len, seq_len + steps):
        entries, emitted = compressor_decode(kv_state, score_state, kv[p:p + 1], score[p:p + 1], ape,
                                             torch.tensor([p]), ratio)
        assert bool(emitted[0]) == ((p + 1) % ratio == 0)
        decoded.append(entries[emitted])
    decoded = torch.cat(decoded) if decoded else torch.zeros(0, d)
    assert_close(decoded, full[seq_len // ratio:], ENTRY_ATOL, ENTRY_RTOL, "decoded entries")

    rows = _specified_rows(ratio, seq_len + steps)
    assert torch.equal(kv_state[0, rows], full_kv_state[rows])
    assert torch.equal(score_state[0, rows], full_score_state[rows])


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("seq_len", PREFILL_LENGTHS)
def test_prefill_then_decode_equals_longer_prefill(ratio, d, seq_len):
    """n = r + 5 steps crosses at least one emission from every starting phase."""
    _check_invariant(ratio, d, seq_len, ratio + 5)


@pytest.mark.parametrize("ratio", RATIOS)
def test_decode_from_scratch_equals_prefill(ratio):
    """S = 0: the whole sequence decoded, including entry 0 of ratio 4 (no previous block)."""
    _check_invariant(ratio, 128, 0, 2 * ratio + 1)


@given(seed=st.integers(0, 2**31 - 1), ratio=st.sampled_from(RATIOS), d=st.sampled_from(WIDTHS),
       data=st.data())
@settings(deadline=None)
def test_invariant_property(seed, ratio, d, data):
    seq_len = data.draw(st.integers(0, 2 * ratio + 3), label="S")
    steps = data.draw(st.integers(0, ratio + 6), label="n")
    gen = torch.Generator().manual_seed(seed)
    _check_invariant(ratio, d, seq_len, steps, gen)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("d", WIDTHS)
def test_batched_decode_permuted_slots(ratio, d):
    """Five sequences of different prefill lengths decoded together in permuted state slots of a
    pool of eight; every sequence must match its own longer prefill, unused slots stay untouched."""
    coff = _coff(ratio)
    lengths = [0, 1, ratio - 1, ratio + 2, 2 * ratio + 3]
    steps = ratio + 3
    num_slots = 8
    slot_of = torch.randperm(num_slots)[:len(lengths)]
    ape = 0.5 * torch.randn(ratio, coff * d)
    seqs = [_inputs(s + steps, ratio, d)[:2] for s in lengths]

    kv_state = torch.randn(num_slots, coff * ratio, coff * d)
    score_state = torch.randn(num_slots, coff * ratio, coff * d)
    untouched = [s for s in range(num_slots) if s not in slot_of.tolist()]
    kv_before, score_before = kv_state[untouched].clone(), score_state[untouched].clone()
    for b, s in enumerate(lengths):
        _, kv_state[slot_of[b]], score_state[slot_of[b]] = compressor_prefill(seqs[b][0][:s], seqs[b][1][:s],
                                                                              ape, ratio)

    decoded = [[] for _ in lengths]
    for step in range(steps):
        positions = torch.tensor([s + step for s in lengths])
        kv = torch.stack([seqs[b][0][s + step] for b, s in enumerate(lengths)])
        score = torch.stack([seqs[b][1][s + step] for b, s in enumerate(lengths)])
        entries, emitted = compressor_decode(kv_state, score_state, kv, score, ape, positions, ratio,
                                             slot_ids=slot_of)
        assert torch.equal(emitted, (positions + 1) % ratio == 0)
        assert torch.equal(entries[~emitted], torch.zeros_like(entries[~emitted]))
        for b in emitted.nonzero().flatten().tolist():
            decoded[b].append(entries[b])

    for b, s in enumerate(lengths):
        full, full_kv_state, full_score_state = compressor_prefill(seqs[b][0], seqs[b][1], ape, ratio)
        got = torch.stack(decoded[b]) if decoded[b] else torch.zeros(0, d)
        assert_close(got, full[s // ratio:], ENTRY_ATOL, ENTRY_RTOL, f"sequence {b}")
        rows = _specified_rows(ratio, s + steps)
        assert torch.equal(kv_state[slot_of[b], rows], full_kv_state[rows])
        assert torch.equal(score_state[slot_of[b], rows], full_score_state[rows])
    assert torch.equal(kv_state[untouched], kv_before)
    assert torch.equal(score_state[untouched], score_before)


def test_default_slot_ids_are_arange():
    ratio, d = 4, 128
    kv, score, ape = _inputs(3, ratio, d)
    positions = torch.tensor([3, 7, 2])
    a = compressor_init_state(ratio, d, slots=3)
    b = [s.clone() for s in a]
    got, got_emitted = compressor_decode(*a, kv, score, ape, positions, ratio)
    want, want_emitted = compressor_decode(*b, kv, score, ape, positions, ratio, slot_ids=torch.arange(3))
    assert torch.equal(got, want) and torch.equal(got_emitted, want_emitted)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
