"""Bad values in the compressor ops (issue 11): slots, positions and cache slots outside their range are
masked on the default path (nothing read, nothing written, never wrapped to another sequence's row) and
refused in checked mode (DSV4K_CHECK=1) with the argument, the expected range, the position and the value.
The tables here are the family's data-dependent bad-input table: a new kernel extends them."""
from __future__ import annotations

import pytest
import torch

import dsv4_kernels as dk
from dsv4_kernels.reference import compressor as ref
from dsv4_kernels.reference.transforms import rope_tables

TOKEN_BYTES = 584
pytestmark = pytest.mark.guard_bands  # outputs between canary bands: a store past the last row fails here
BLOCK = 4
PAGES = 2
ROPE_ROWS = 400


def _decode(ratio=4, d=None, batch=3, slots=4, fused=False, **changes):
    """A decode step whose rows all emit (positions p with (p + 1) % ratio == 0) unless changed; d is
    512 for the fused form (the FP8 cache holds d = 512 entries), else 128."""
    d = d or (512 if fused else 128)
    gen = torch.Generator().manual_seed(ratio * 1000 + d)
    coff = 2 if ratio == 4 else 1
    kv_state, score_state = ref.compressor_init_state(ratio, d, slots=slots)
    kv_state.normal_(generator=gen)
    score_state.normal_(generator=gen)
    args = dict(kv_state=kv_state, score_state=score_state,
                kv=torch.randn(batch, coff * d, generator=gen), score=torch.randn(batch, coff * d, generator=gen),
                ape=torch.randn(ratio, coff * d, generator=gen),
                positions=torch.arange(1, batch + 1, dtype=torch.int64) * ratio - 1, ratio=ratio,
                slot_ids=torch.arange(batch, dtype=torch.int64).flip(0))
    if fused:
        cos, sin = rope_tables(torch.arange(ROPE_ROWS))
        args.update(norm_weight=torch.ones(d), rope_cos=cos, rope_sin=sin, cache_block_size=BLOCK,
                    kv_cache=torch.zeros(PAGES, BLOCK * TOKEN_BYTES, dtype=torch.uint8),
                    cache_slots=torch.arange(batch, dtype=torch.int64))
    for key, value in changes.items():
        args[key] = value(args) if callable(value) else value
    return args


def _set(name, index, value):
    def change(args):
        t = args[name].clone()
        t[index] = value
        return t
    return change


def _norm_rope(**changes):
    cos, sin = rope_tables(torch.arange(10))
    args = dict(entries=torch.randn(3, 128), norm_weight=torch.ones(128), rope_cos=cos, rope_sin=sin,
                positions=torch.tensor([0, 4, 8]))
    args.update(changes)
    return args


# (label, op, arguments, message fragments in checked mode)
CHECKED = [
    ("decode-slot-minus-one", dk.compressor_decode, _decode(slot_ids=_set("slot_ids", 1, -1)),
     ["slot_ids: expected values in [0, 4) (state slots), got -1 at position (1,)"]),
    ("decode-slot-past-end", dk.compressor_decode, _decode(slot_ids=_set("slot_ids", 2, 4)),
     ["slot_ids: expected values in [0, 4)", "got 4 at position (2,)"]),
    ("decode-slot-repeated", dk.compressor_decode, _decode(slot_ids=torch.tensor([1, 0, 1])),
     ["slot_ids: expected distinct values, got 1 at position (2,)"]),
    ("decode-position-negative", dk.compressor_decode, _decode(positions=_set("positions", 0, -1)),
     ["positions: expected values in [0, ", "got -1 at position (0,)"]),
    ("decode-position-past-rope", dk.compressor_decode, _decode(fused=True, positions=_set("positions", 1, 403)),
     ["positions: expected values in [0, 403) (p >= 0, p + 1 - ratio < rope rows), got 403 at position (1,)"]),
    ("decode-cache-slot-past-end", dk.compressor_decode, _decode(fused=True, cache_slots=_set("cache_slots", 2, 8)),
     ["cache_slots: expected values in [0, 8) (cache pages x cache_block_size) or -1, got 8 at position (2,)"]),
    ("decode-cache-slot-minus-two", dk.compressor_decode,
     _decode(fused=True, cache_slots=_set("cache_slots", 0, -2)), ["cache_slots:", "got -2 at position (0,)"]),
    ("decode-cache-slot-repeated", dk.compressor_decode,
     _decode(fused=True, cache_slots=torch.tensor([5, 5, 6])), ["cache_slots: expected distinct values",
                                                               "got 5 at position (1,)"]),
    ("norm-rope-position-negative", dk.compressor_norm_rope, _norm_rope(positions=torch.tensor([0, -1, 8])),
     ["positions: expected values in [0, 10) (rows of rope_cos), got -1 at position (1,)"]),
    ("norm-rope-position-past-table", dk.compressor_norm_rope, _norm_rope(positions=torch.tensor([0, 4, 10])),
     ["positions: expected values in [0, 10)", "got 10 at position (2,)"]),
]


def _clone(args):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.parametrize("label, op, args, fragments", CHECKED, ids=[c[0] for c in CHECKED])
def test_checked_mode_names_the_first_bad_value(monkeypatch, label, op, args, fragments):
    monkeypatch.setenv("DSV4K_CHECK", "1")
    args = _clone(args)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with dk.dispatch.recording() as calls, pytest.raises(ValueError) as err:
        op(**args)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert not calls
    assert all(torch.equal(args[k], v) for k, v in before.items()), "a refused call wrote to its inputs"


@pytest.mark.parametrize("label, op, args, fragments", CHECKED, ids=[c[0] for c in CHECKED])
def test_the_default_path_runs_the_same_calls_masked(monkeypatch, label, op, args, fragments):
    monkeypatch.delenv("DSV4K_CHECK", raising=False)
    op(**_clone(args))


def test_checked_mode_passes_valid_calls(monkeypatch):
    monkeypatch.setenv("DSV4K_CHECK", "1")
    dk.compressor_decode(**_decode(fused=True))
    dk.compressor_decode(**_decode(ratio=128, slot_ids=None, positions=torch.tensor([0, 127, 300])))
    dk.compressor_norm_rope(**_norm_rope())


# The RoPE tables bound positions only in the fused forms.
INVALID_ROWS = [(form, bad) for form in ("fp32", "norm-rope", "fp8-cache")
                for bad in ("slot_minus_one", "slot_past_end", "position_negative", "rope_past_table")
                if not (form == "fp32" and bad == "rope_past_table")]


@pytest.mark.parametrize("ratio", [4, 128])
@pytest.mark.parametrize("form, bad", INVALID_ROWS, ids=[f"{f}-{b}" for f, b in INVALID_ROWS])
def test_an_invalid_decode_row_reads_and_writes_nothing(ratio, bad, form):
    """Row 1 is invalid: every state row and every cache byte it could reach is unchanged, it does not
    emit and its entries row is zero; the other rows give what a call without row 1 gives. Run through
    the dispatcher: the Triton kernel where it serves the form (fp32, norm-rope), else the reference."""
    change = {"slot_minus_one": dict(slot_ids=_set("slot_ids", 1, -1)),
              "slot_past_end": dict(slot_ids=_set("slot_ids", 1, 4)),
              "position_negative": dict(positions=_set("positions", 1, -ratio - 1)),
              "rope_past_table": dict(positions=_set("positions", 1, ROPE_ROWS + 2 * ratio - 1))}[bad]
    args = _decode(ratio=ratio, d=512, fused=True, **change)
    if form != "fp8-cache":
        for name in ("kv_cache", "cache_slots", "cache_block_size"):
            del args[name]
    if form == "fp32":
        for name in ("norm_weight", "rope_cos", "rope_sin"):
            del args[name]
    keep = torch.tensor([0, 2])
    alone = _clone(args)
    for name in ("kv", "score", "positions", "slot_ids", "cache_slots"):
        if name in alone:
            alone[name] = alone[name][keep]
    entries, emitted = dk.compressor_decode(**args)
    want_entries, want_emitted = dk.compressor_decode(**alone)
    assert emitted.tolist() == [True, False, True]
    assert torch.equal(entries[1], torch.zeros_like(entries[1]))
    assert torch.equal(entries[keep], want_entries) and torch.equal(emitted[keep], want_emitted)
    for name in ("kv_state", "score_state", "kv_cache"):
        if name in args:
            assert torch.equal(args[name], alone[name]), f"{name}: the invalid row wrote to it"


def test_an_out_of_range_cache_slot_skips_the_store_and_wraps_nowhere():
    args = _decode(d=512, fused=True, cache_slots=torch.tensor([-2, 8, 3]))
    untouched = _decode(d=512, fused=True, cache_slots=torch.tensor([-1, -1, 3]))
    dk.compressor_decode(**args)
    dk.compressor_decode(**untouched)
    assert torch.equal(args["kv_cache"], untouched["kv_cache"])
    assert args["kv_cache"].any(), "the valid row was stored"


def test_norm_rope_masks_a_position_outside_the_tables():
    args = _norm_rope(positions=torch.tensor([9, -1, 10]))
    out = dk.compressor_norm_rope(**args)
    assert torch.equal(out[1:], torch.zeros_like(out[1:])), "rows outside the tables must be zero, not wrapped"
    want = dk.compressor_norm_rope(**_norm_rope(entries=args["entries"][:1], positions=torch.tensor([9])))
    assert torch.equal(out[:1], want)


INIT_STATE_BAD = [
    (dict(ratio=0, d=512), "ratio: expected one of 4, 128, got 0: ratio 0 and 1 mean no compression"),
    (dict(ratio=1, d=512), "ratio: expected one of 4, 128, got 1"),
    (dict(ratio=5, d=512), "ratio: expected one of 4, 128, got 5"),
    (dict(ratio=4.0, d=512), "ratio: expected an int, got float 4.0"),
    (dict(ratio=4, d=0), "d: expected one of 512, 128, got 0"),
    (dict(ratio=4, d=100), "d: expected one of 512, 128, got 100"),
    (dict(ratio=4, d="512"), "d: expected an int, got str '512'"),
    (dict(ratio=128, d=128, slots=-1), "slots: expected an int >= 0, got -1"),
    (dict(ratio=128, d=128, slots=2.5), "slots: expected an int, got float 2.5"),
    (dict(ratio=128, d=128, device="nowhere"), "device: expected None, a torch.device or a device string, got str"),
]


@pytest.mark.parametrize("args, message", INIT_STATE_BAD, ids=[m.split(":")[0] + f"-{i}"
                                                               for i, (_, m) in enumerate(INIT_STATE_BAD)])
def test_init_state_refuses_bad_arguments(args, message):
    with pytest.raises(ValueError) as err:
        dk.compressor_init_state(**args)
    assert message in str(err.value)
