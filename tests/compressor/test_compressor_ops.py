"""Public compressor ops (SPEC 2, 7) through every implementation: compressor_prefill, compressor_decode,
compressor_norm_rope and indexer_cache_quantize against the reference with each op's tolerance (the
OpCheck compare), the states and the FP8 cache bytes they write in place, the prefill/decode
invariant, validation, torch.library registration, torch.compile, and the ladder's oracle check.

V4-Flash and V4-Pro share the compressor shapes (d = 512 attention compressor, d = 128 indexer
compressor, ratios 4 and 128; Flash's layers 0 and 1 have ratio 0, i.e. no compressor), so the grids
run both widths and both ratios, with zero tokens and odd lengths.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv4_kernels import dispatch, ladder
from dsv4_kernels.ops import compressor as ops
from dsv4_kernels.reference import compressor as ref
from dsv4_kernels.reference.formats import gather_kv_cache_fp8, store_kv_cache_fp8
from dsv4_kernels.reference.transforms import rope_tables
from dsv4_kernels.testing import bf16_ulp

RATIOS = (4, 128)
WIDTHS = (512, 128)
OPS = ("compressor_prefill", "compressor_prefill_batched", "compressor_decode", "compressor_norm_rope", "indexer_cache_quantize")
MAX_POS = 1024
TOKEN_BYTES = 584


def _coff(ratio):
    return 2 if ratio == 4 else 1


def _inputs(seq_len, ratio, d, device="cpu", gen=None):
    """Realistic projections: kv of order 1, gate scores and ape of order a few."""
    width = _coff(ratio) * d
    kv = torch.randn(seq_len, width, generator=gen).to(device)
    score = (2.0 * torch.randn(seq_len, width, generator=gen)).to(device)
    ape = (0.5 * torch.randn(ratio, width, generator=gen)).to(device)
    return kv, score, ape


def _tables(device="cpu"):
    cos, sin = rope_tables(torch.arange(MAX_POS))
    return cos.to(device), sin.to(device)


def _norm_weight(d, device="cpu"):
    return (1.0 + 0.2 * torch.randn(d)).to(device)


def _compare_prefill(out, expected):
    """The OpCheck rule: entries with the SPEC 6 tolerance of their dtype, states exactly."""
    for i, (o, e) in enumerate(zip(out, expected)):
        assert o.device == out[0].device
        try:
            ladder.get_check("compressor_prefill").comparison(i)(o.cpu(), e.cpu())
        except AssertionError as exc:
            raise AssertionError(f"output {i}: {exc}") from None


def test_prefill_check_compares_each_output_by_its_position():
    """At S = 16384, ratio 128, d = 128 the entries are [128, 128], a state's shape: the check must still
    compare them with the pooling tolerance (by position, not by shape) and the states exactly."""
    check = ladder.get_check("compressor_prefill")
    entries = torch.randn(128, 128)
    check.comparison(0)(entries + 1e-6 * entries.abs(), entries)   # within atol 2e-5 + rtol 1e-4
    with pytest.raises(AssertionError, match="state"):
        check.comparison(1)(entries + 1e-6 * entries.abs(), entries)


def _compare(op, out, expected):
    ladder.get_check(op).compare(out.cpu(), expected.cpu())


def _specified_rows(ratio, positions, slot_ids, slots):
    """[slots, coff*r] bool: state rows SPEC 2 defines after one decode step. Slots the step does not
    name keep every row; a named slot keeps ratio 4 rows 0:4 plus rows 4..4+p mod 4 unless it emitted,
    ratio 128 rows 0..p mod 128 unless it emitted (then the next block has no row yet)."""
    mask = torch.ones(slots, _coff(ratio) * ratio, dtype=torch.bool)
    for p, s in zip(positions.tolist(), slot_ids.tolist()):
        phase = p % ratio
        mask[s] = False
        if ratio == 4:
            mask[s, :4] = True
        if phase != ratio - 1:
            first = 4 if ratio == 4 else 0
            mask[s, :first + phase + 1] = True
    return mask


def _prefilled_states(ratio, d, lengths, slot_ids, slots, device, gen=None):
    """States [slots, ...] in which slot slot_ids[b] (default b) holds the reference prefill of a random
    sequence of lengths[b] tokens, the other slots fresh; plus the next token of each sequence (kv and
    score rows [B, coff*d]) and ape. All on `device`."""
    kv_state, score_state = ref.compressor_init_state(ratio, d, slots=slots)
    width = _coff(ratio) * d
    ape = 0.5 * torch.randn(ratio, width, generator=gen)
    step_kv, step_score = torch.zeros(len(lengths), width), torch.zeros(len(lengths), width)
    ids = range(len(lengths)) if slot_ids is None else slot_ids.tolist()
    for b, (seq_len, slot) in enumerate(zip(lengths, ids)):
        kv, score, _ = _inputs(seq_len + 1, ratio, d, gen=gen)
        _, kv_state[slot], score_state[slot] = ref.compressor_prefill(kv[:seq_len], score[:seq_len], ape, ratio)
        step_kv[b], step_score[b] = kv[seq_len], score[seq_len]
    return tuple(t.to(device) for t in (kv_state, score_state, step_kv, step_score, ape))


# Prefill: entries with the op's tolerance, the state exactly.

@pytest.mark.op("compressor_prefill")
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("seq_len", (0, 1, 5, 13, 127, 130, 257))
def test_prefill_matches_reference(impl, device, ratio, d, seq_len):
    kv, score, ape = _inputs(seq_len, ratio, d, device)
    out = ops.compressor_prefill(kv, score, ape, ratio, impl=impl)
    coff = _coff(ratio)
    assert out[0].shape == (seq_len // ratio, d) and out[0].dtype == torch.float32
    assert out[1].shape == out[2].shape == (coff * ratio, coff * d)
    assert all(o.device == kv.device and o.dtype == torch.float32 for o in out)
    _compare_prefill(out, ref.compressor_prefill(kv.cpu(), score.cpu(), ape.cpu(), ratio))


@pytest.mark.op("compressor_prefill")
@pytest.mark.parametrize("ratio", RATIOS)
def test_prefill_zero_tokens_gives_a_fresh_state(impl, device, ratio):
    kv, score, ape = _inputs(0, ratio, 512, device)
    entries, kv_state, score_state = ops.compressor_prefill(kv, score, ape, ratio, impl=impl)
    fresh = ref.compressor_init_state(ratio, 512)
    assert entries.shape == (0, 512)
    assert torch.equal(kv_state.cpu(), fresh[0]) and torch.equal(score_state.cpu(), fresh[1])


@pytest.mark.op("compressor_prefill")
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("d", WIDTHS)
def test_prefill_fused_matches_reference(impl, device, ratio, d):
    seq_len = 3 * ratio + 1
    kv, score, ape = _inputs(seq_len, ratio, d, device)
    weight, (cos, sin) = _norm_weight(d, device), _tables(device)
    out = ops.compressor_prefill(kv, score, ape, ratio, weight, cos, sin, impl=impl)
    assert out[0].dtype == torch.bfloat16 and out[0].shape == (3, d)
    cpu = [t.cpu() for t in (kv, score, ape)]
    _compare_prefill(out, ref.compressor_prefill(*cpu, ratio, weight.cpu(), cos.cpu(), sin.cpu()))


@pytest.mark.op("compressor_prefill")
def test_prefill_hand_values(impl, device):
    """Equal scores make every softmax uniform: entries are plain means of the pooled rows. Ratio 4
    entry 0 averages the B halves of block 0 only (its previous-block rows have score -inf)."""
    d = 128
    kv = torch.randn(8, 2 * d, device=device)
    zeros = torch.zeros(8, 2 * d, device=device)
    entries, _, _ = ops.compressor_prefill(kv, zeros, zeros[:4], 4, impl=impl)
    want0 = kv[:4, d:].double().mean(dim=0)
    want1 = torch.cat([kv[:4, :d], kv[4:, d:]]).double().mean(dim=0)
    torch.testing.assert_close(entries.double(), torch.stack([want0, want1]), atol=2e-5, rtol=1e-4)

    kv = torch.randn(130, 512, device=device)
    ape = torch.zeros(128, 512, device=device)
    entries, kv_state, score_state = ops.compressor_prefill(kv, torch.zeros_like(kv), ape, 128, impl=impl)
    torch.testing.assert_close(entries.double(), kv[:128].double().mean(dim=0, keepdim=True), atol=2e-5, rtol=1e-4)
    assert torch.equal(kv_state[:2], kv[128:]) and torch.equal(score_state[:2], torch.zeros(2, 512, device=device))


@pytest.mark.op("compressor_prefill")
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("block_size", (64, 16))
def test_prefill_fp8_cache_bytes(impl, device, ratio, block_size):
    """The cache holds exactly the SPEC 1.2 form of the returned bf16 entries at cache_slots, a negative
    slot stores nothing, and every other byte is left as it was."""
    seq_len = 5 * ratio + 3
    kv, score, ape = _inputs(seq_len, ratio, 512, device)
    weight, (cos, sin) = _norm_weight(512, device), _tables(device)
    pages = torch.randint(0, 256, (4, block_size * TOKEN_BYTES), dtype=torch.uint8)
    slots = torch.randperm(4 * block_size)[:5]
    slots[2] = -1
    cache = pages.clone().to(device)
    entries, kv_state, score_state = ops.compressor_prefill(kv, score, ape, ratio, weight, cos, sin, cache,
                                                            block_size, slots.to(device), impl=impl)
    cpu = [t.cpu() for t in (kv, score, ape)]
    _compare_prefill((entries, kv_state, score_state),
                     ref.compressor_prefill(*cpu, ratio, weight.cpu(), cos.cpu(), sin.cpu()))
    want = pages.clone()
    store_kv_cache_fp8(want, slots, entries.cpu(), block_size)
    assert torch.equal(cache.cpu(), want)
    keep = slots >= 0
    stored = gather_kv_cache_fp8(cache.cpu(), slots[keep], block_size)
    assert torch.equal(stored[:, 448:], entries.cpu()[keep][:, 448:])  # rope dims are stored as bf16


# Decode: outputs with the op's tolerance, states on every specified row exactly.

def _decode_both(impl, device, ratio, d, lengths, slot_ids, slots, fused=False, block_size=16, require=None,
                 cache=True):
    """Run the public op and the reference on separate copies of the same states (and cache). require:
    the require_supported fixture, to skip an implementation that refuses these arguments."""
    kv_state, score_state, kv, score, ape = _prefilled_states(ratio, d, lengths, slot_ids, slots, device)
    positions = torch.tensor(lengths, dtype=torch.int64)
    extra, extra_ref, pages = (), (), None
    if fused:
        weight, (cos, sin) = _norm_weight(d), _tables()
        pages = torch.randint(0, 256, (3, block_size * TOKEN_BYTES), dtype=torch.uint8)
        cache_slots = torch.randperm(3 * block_size)[:len(lengths)]
        extra_ref = (weight, cos, sin, pages.clone(), block_size, cache_slots)
        extra = (weight.to(device), cos.to(device), sin.to(device), pages.clone().to(device), block_size,
                 cache_slots.to(device))  # a cache of its own: .to(cpu) would share the reference's
        if not cache:
            extra_ref, extra = extra_ref[:3], extra[:3]
    states = (kv_state.clone(), score_state.clone())
    ids = None if slot_ids is None else slot_ids.to(device)
    if require is not None:
        require("compressor_decode", impl, *states, kv, score, ape, positions.to(device), ratio, ids, *extra)
    out = ops.compressor_decode(*states, kv, score, ape, positions.to(device), ratio, ids, *extra, impl=impl)
    ref_states = (kv_state.cpu(), score_state.cpu())
    expected = ref.compressor_decode(*ref_states, kv.cpu(), score.cpu(), ape.cpu(), positions, ratio,
                                     slot_ids, *extra_ref)
    return out, expected, states, ref_states, positions, extra, extra_ref, pages


def _check_decode(out, expected, states, ref_states, ratio, positions, slot_ids, slots):
    assert out[1].dtype == torch.bool and out[1].shape == positions.shape
    _compare("compressor_decode", out[1], expected[1])
    _compare("compressor_decode", out[0], expected[0])
    ids = torch.arange(positions.shape[0]) if slot_ids is None else slot_ids
    rows = _specified_rows(ratio, positions, ids, slots)
    for name, got, want in zip(("kv_state", "score_state"), states, ref_states):
        assert torch.equal(got.cpu()[rows], want[rows]), name


@pytest.mark.op("compressor_decode")
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("d", WIDTHS)
def test_decode_matches_reference(impl, device, ratio, d):
    """Five sequences in permuted slots of seven: first-block emission, later emissions, mid-block
    tokens and a sequence's first token; slots 1 and 5 are not named and must stay as they were."""
    lengths = (ratio - 1, 3 * ratio - 1, ratio + 1, 0, 2 * ratio + 2)
    slot_ids = torch.tensor([4, 0, 6, 2, 3])
    out, expected, states, ref_states, positions, *_ = _decode_both(impl, device, ratio, d, lengths, slot_ids, 7)
    assert out[0].dtype == torch.float32 and out[0].shape == (5, d)
    assert out[1].tolist() == [True, True, False, False, False]
    _check_decode(out, expected, states, ref_states, ratio, positions, slot_ids, 7)


@pytest.mark.op("compressor_decode")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")  # the interpreter's amax of the NaN tile
def test_decode_fp8_cache_bytes_at_the_edges_of_e4m3(impl, device, require_supported):
    """Cache bytes equal the reference's where e4m3fn is hardest: tiles whose small values fall to
    subnormal codes (below 2^-6 of the scale), a tile at the 1e-4 scale floor, and a NaN tile."""
    ratio, d, block = 4, 512, 16
    kv_state, score_state, kv, score, ape = _prefilled_states(ratio, d, (3, 7), None, 2, "cpu")
    weight = torch.ones(d)
    weight[:64:2] = 1e-5          # tile 0: half its values ~2^-17 of the others: subnormal codes
    weight[64:128] = 1e-6         # tile 1: amax / 448 below 1e-4: the scale floor
    kv[1, :d] = kv[1, :d] * 0     # row 1's first-half channels pool to (almost) nothing: still finite
    weight[128:192] = float("nan")  # tile 2: NaN (weight NaN -> entries NaN there)
    cos, sin = _tables()
    pages = torch.randint(0, 256, (2, block * TOKEN_BYTES), dtype=torch.uint8)
    cache_slots = torch.tensor([17, 2])
    positions = torch.tensor([3, 7])
    args = lambda dev, pg: (kv.to(dev), score.to(dev), ape.to(dev), positions.to(dev), ratio, None, weight.to(dev),
                            cos.to(dev), sin.to(dev), pg, block, cache_slots.to(dev))
    states = (kv_state.clone().to(device), score_state.clone().to(device))
    got_pages = pages.clone().to(device)
    require_supported("compressor_decode", impl, *states, *args(device, got_pages))
    out = ops.compressor_decode(*states, *args(device, got_pages), impl=impl)
    want_pages = pages.clone()
    want = ref.compressor_decode(kv_state.clone(), score_state.clone(), *args("cpu", want_pages))
    _compare("compressor_decode", out[0].cpu(), want[0])
    assert torch.equal(got_pages.cpu(), want_pages)
    data = want_pages[:, :block * 576].view(2, block, 576)
    scales = want_pages[:, block * 576:].view(2, block, 8)
    codes = data[1, 1, :64] & 0x7F
    assert ((codes > 0) & (codes < 8)).any(), "the test must reach subnormal e4m3 codes"
    assert scales[1, 1, 1].item() == 127 - 13 and scales[1, 1, 2].item() == 255  # 2^-13 >= 1e-4; NaN tile


@pytest.mark.op("compressor_decode")
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("d", WIDTHS)
def test_decode_fused_norm_rope(impl, device, ratio, d):
    """The fused form without the cache: bf16 entries RMS-normed and RoPE'd at the block's first position
    (0, 2r and 5r here, so every rope pair turns), states as the reference's."""
    lengths = (ratio - 1, 3 * ratio - 1, ratio + 1, 6 * ratio - 1)
    slot_ids = torch.tensor([3, 0, 2, 1])
    out, expected, states, ref_states, positions, *_ = _decode_both(impl, device, ratio, d, lengths, slot_ids, 4,
                                                                     fused=True, cache=False)
    assert out[0].dtype == torch.bfloat16 and out[1].tolist() == [True, True, False, True]
    _check_decode(out, expected, states, ref_states, ratio, positions, slot_ids, 4)


@pytest.mark.op("compressor_decode")
@pytest.mark.parametrize("ratio", RATIOS)
def test_decode_default_slot_ids(impl, device, ratio):
    lengths = (2 * ratio - 1, 1, ratio + 2)
    out, expected, states, ref_states, positions, *_ = _decode_both(impl, device, ratio, 128, lengths, None, 4)
    _check_decode(out, expected, states, ref_states, ratio, positions, None, 4)


@pytest.mark.op("compressor_decode")
def test_decode_zero_tokens_leaves_states_alone(impl, device):
    kv_state = torch.randn(3, 8, 1024, device=device)
    score_state = torch.randn(3, 8, 1024, device=device)
    before = (kv_state.clone(), score_state.clone())
    empty = torch.zeros(0, 1024, device=device)
    entries, emitted = ops.compressor_decode(kv_state, score_state, empty, empty, torch.zeros(4, 1024, device=device),
                                             torch.zeros(0, dtype=torch.int64, device=device), 4, impl=impl)
    assert entries.shape == (0, 512) and emitted.shape == (0,) and emitted.dtype == torch.bool
    assert torch.equal(kv_state, before[0]) and torch.equal(score_state, before[1])


@pytest.mark.op("compressor_decode")
@pytest.mark.parametrize("ratio", RATIOS)
def test_decode_fused_fp8_cache(impl, device, ratio, require_supported):
    """Fused decode: bf16 entries as the reference's; the cache gets the SPEC 1.2 form of the emitted
    entries at their cache_slots, and the slots of rows that do not emit are never written."""
    lengths = (ratio - 1, 5, 4 * ratio - 1, ratio + 1)
    slot_ids = torch.tensor([1, 3, 0, 2])
    out, expected, states, ref_states, positions, extra, extra_ref, pages = _decode_both(
        impl, device, ratio, 512, lengths, slot_ids, 4, fused=True, require=require_supported)
    assert out[0].dtype == torch.bfloat16
    _check_decode(out, expected, states, ref_states, ratio, positions, slot_ids, 4)
    emitted = out[1].cpu()
    assert emitted.tolist() == [True, False, True, False]
    want = pages.clone()
    store_kv_cache_fp8(want, extra_ref[5][emitted], out[0].cpu()[emitted], extra_ref[4])
    assert torch.equal(extra[3].cpu(), want)
    assert torch.equal(out[0].cpu()[~emitted], torch.zeros(2, 512, dtype=torch.bfloat16))


# The invariant: prefill(S) then decode of tokens S..S+n-1 emits what prefill(S+n) emits.

def _prefill_impl(impl):
    """The prefill of the same implementation when it has one, else the reference."""
    return impl if impl in {i.name for i in dispatch.implementations("compressor_prefill")} else "reference"


def _check_invariant(impl, device, ratio, d, lengths, steps, gen=None):
    """Several sequences decode together in permuted slots; each is compared with its own longer prefill
    (the decode under test, the prefill of the same implementation where there is one)."""
    prefill_impl = _prefill_impl(impl)
    batch = len(lengths)
    slots = batch + 1
    slot_ids = torch.randperm(slots, generator=gen)[:batch]
    coff = _coff(ratio)
    ape = (0.5 * torch.randn(ratio, coff * d, generator=gen)).to(device)
    seqs = [_inputs(n + steps, ratio, d, device, gen)[:2] for n in lengths]
    kv_state, score_state = ops.compressor_init_state(ratio, d, slots=slots, device=device)
    for (kv, score), n, s in zip(seqs, lengths, slot_ids.tolist()):
        _, kv_state[s], score_state[s] = ops.compressor_prefill(kv[:n], score[:n], ape, ratio, impl=prefill_impl)
    decoded = [[] for _ in lengths]
    ids = slot_ids.to(device)
    for step in range(steps):
        kv = torch.stack([s[0][n + step] for s, n in zip(seqs, lengths)])
        score = torch.stack([s[1][n + step] for s, n in zip(seqs, lengths)])
        positions = torch.tensor([n + step for n in lengths], dtype=torch.int64, device=device)
        entries, emitted = ops.compressor_decode(kv_state, score_state, kv, score, ape, positions, ratio, ids,
                                                 impl=impl)
        assert emitted.cpu().tolist() == [(p + 1) % ratio == 0 for p in positions.tolist()]
        for b in range(batch):
            if emitted[b]:
                decoded[b].append(entries[b])
    for b, ((kv, score), n) in enumerate(zip(seqs, lengths)):
        full = ops.compressor_prefill(kv, score, ape, ratio, impl=prefill_impl)
        got = torch.stack(decoded[b]) if decoded[b] else torch.zeros(0, d, device=device)
        _compare("compressor_decode", got, full[0][n // ratio:])
        rows = [r for r in range(coff * ratio) if _specified_rows(ratio, torch.tensor([n + steps - 1]),
                                                                  torch.tensor([0]), 1)[0, r]]
        s = int(slot_ids[b])
        assert torch.equal(kv_state[s, rows].cpu(), full[1][rows].cpu())
        assert torch.equal(score_state[s, rows].cpu(), full[2][rows].cpu())


@pytest.mark.op("compressor_decode")
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("d", WIDTHS)
def test_prefill_then_decode_equals_longer_prefill(impl, device, ratio, d):
    lengths = (0, 3, ratio - 2, 2 * ratio + 1) if ratio == 4 else (0, 1, 126, 253)
    _check_invariant(impl, device, ratio, d, lengths, steps=6 if ratio == 4 else 4)


@pytest.mark.op("compressor_decode")
@settings(max_examples=10)
@given(lengths=st.lists(st.integers(0, 140), min_size=1, max_size=3), steps=st.integers(1, 9),
       ratio=st.sampled_from(RATIOS), seed=st.integers(0, 2**31 - 1))
def test_invariant_any_lengths(impl, device, lengths, steps, ratio, seed):
    _check_invariant(impl, device, ratio, 128, tuple(lengths), steps, torch.Generator().manual_seed(seed))


# compressor_norm_rope and indexer_cache_quantize.

@pytest.mark.op("compressor_norm_rope")
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("n", (0, 1, 3, 63))
def test_norm_rope_matches_reference(impl, device, d, n):
    entries = 0.3 * torch.randn(n, d)
    weight, (cos, sin) = _norm_weight(d), _tables()
    positions = torch.randint(0, MAX_POS, (n,))
    args = (entries, weight, cos, sin, positions)
    out = ops.compressor_norm_rope(*(t.to(device) for t in args), impl=impl)
    assert out.dtype == torch.bfloat16 and out.shape == (n, d) and out.device == entries.to(device).device
    _compare("compressor_norm_rope", out, ref.compressor_norm_rope(*args))
    out = ops.compressor_norm_rope(*(t.to(device) for t in args), eps=1e-3, impl=impl)
    _compare("compressor_norm_rope", out, ref.compressor_norm_rope(*args, eps=1e-3))


@pytest.mark.op("indexer_cache_quantize")
@pytest.mark.parametrize("n", (0, 1, 7, 100))
def test_indexer_cache_quantize_matches_reference(impl, device, n):
    x = torch.randn(n, 128).to(torch.bfloat16)
    if n >= 7:
        x[0] = 0.0
        x[1, :32] = -0.0
    packed, scale = ops.indexer_cache_quantize(x.to(device), impl=impl)
    assert packed.shape == (n, 64) and scale.shape == (n, 4)
    assert packed.dtype == scale.dtype == torch.uint8
    want = ref.indexer_cache_quantize(x)
    assert torch.equal(packed.cpu(), want[0]) and torch.equal(scale.cpu(), want[1])


@pytest.mark.parametrize("slots", [None, 3])
def test_init_state_equals_the_reference_helper(slots):
    for ratio, d in ((4, 512), (128, 128)):
        for got, want in zip(ops.compressor_init_state(ratio, d, slots), ref.compressor_init_state(ratio, d, slots)):
            assert torch.equal(got, want)


# The verification ladder: the reference against the fp64 oracles, on the OpCheck cases.

@pytest.mark.parametrize("op", OPS)
def test_ladder_cases_pass_against_the_oracle(op):
    summary = ladder.run_cases(op, "reference", torch.device("cpu"))
    assert "cases match" in summary


def test_oracle_rounds_fp64_to_bf16_once():
    """torch rounds fp64 -> bf16 through fp32 (twice); the oracle's rounding is a single one."""
    from dsv4_kernels.oracles.compressor import _round_bf16
    above, below = 1 + 2**-8 + 2**-40, 1 + 2**-8 - 2**-40   # just either side of a bf16 midpoint
    got = _round_bf16(torch.tensor([above, below, 1 + 2**-8, 1 + 3 * 2**-8], dtype=torch.float64))
    assert got.tolist() == [1 + 2**-7, 1.0, 1.0, 1 + 2**-6]   # exact midpoints: ties to even


def test_decode_cases_are_fresh_each_call():
    first = ladder.get_check("compressor_decode").cases(torch.device("cpu"))
    second = ladder.get_check("compressor_decode").cases(torch.device("cpu"))
    assert all(a[1][0] is not b[1][0] for a, b in zip(first, second))
    labels = [c[0] for c in first]
    assert any("permuted" in lbl for lbl in labels) and "zero-tokens" in labels


def test_compare_rules_catch_differences():
    prefill = ladder.get_check("compressor_prefill")
    state = ref.compressor_init_state(4, 512)[1]
    nudged = state.clone()
    nudged[0, 0] = 1.0
    with pytest.raises(AssertionError, match="state"):
        prefill.comparison(1)(nudged, state)                   # states: exact
    entries = torch.randn(3, 512)
    check = prefill.comparison(0)
    check(entries * (1 + 5e-5), entries)                       # fp32 entries: rtol 1e-4
    with pytest.raises(AssertionError, match="fp32 entries"):
        check(entries * (1 + 1e-3), entries)
    bf = torch.randn(3, 512).bfloat16()
    norm_rope = ladder.get_check("compressor_norm_rope").compare
    up2 = (bf.float() + 2 * bf16_ulp(bf)).bfloat16()
    norm_rope(torch.cat([up2[:, :448], bf[:, 448:]], dim=1), bf)   # bf16: two ulps
    up3 = (bf.float() + 3 * bf16_ulp(bf)).bfloat16()
    with pytest.raises(AssertionError, match="two bf16 ulps"):
        norm_rope(torch.cat([up3[:, :448], bf[:, 448:]], dim=1), bf)
    codes = torch.randint(0, 256, (4, 64), dtype=torch.uint8)
    with pytest.raises(AssertionError, match="ids/bytes"):                # FP4 bytes: exact
        norm_rope(codes ^ (torch.arange(64) == 5).to(torch.uint8), codes)


# Validation: each rule, with the exact message fragment; no check reads tensor values.

def _prefill_args(ratio=4, d=512, seq_len=13):
    kv, score, ape = _inputs(seq_len, ratio, d)
    return dict(kv=kv, score=score, ape=ape, ratio=ratio)


def _fused_args(ratio=4, seq_len=13, block_size=16):
    args = _prefill_args(ratio, 512, seq_len)
    cos, sin = _tables()
    args.update(norm_weight=_norm_weight(512), rope_cos=cos[:300], rope_sin=sin[:300],
                kv_cache=torch.zeros(2, block_size * TOKEN_BYTES, dtype=torch.uint8), cache_block_size=block_size,
                cache_slots=torch.arange(seq_len // ratio))
    return args


def _decode_args(ratio=4, d=512, batch=3, slots=4):
    kv_state, score_state = ref.compressor_init_state(ratio, d, slots=slots)
    kv, score, ape = _inputs(batch, ratio, d)
    return dict(kv_state=kv_state, score_state=score_state, kv=kv, score=score, ape=ape,
                positions=torch.arange(batch), ratio=ratio, slot_ids=torch.arange(batch).flip(0))


def _norm_rope_args(n=3, d=512):
    cos, sin = _tables()
    return dict(entries=torch.randn(n, d), norm_weight=_norm_weight(d), rope_cos=cos[:300], rope_sin=sin[:300],
                positions=torch.arange(n))


def _with(make, **changes):
    def build():
        args = make()
        for key, change in changes.items():
            args[key] = change(args) if callable(change) else change
        return args
    return build


META = torch.device("meta")
PREFILL_RULES = [
    (_with(_prefill_args, ratio=0), "ratio: expected one of 4, 128, got 0: ratio 0 and 1 mean no compression"),
    (_with(_prefill_args, ratio=1), "ratio: expected one of 4, 128, got 1: ratio 0 and 1 mean no compression"),
    (_with(_prefill_args, ratio=8), "ratio: expected one of 4, 128, got 8"),
    (_with(_prefill_args, ratio=4.0), "ratio: expected an int, got float 4.0"),
    (_with(_prefill_args, kv=lambda a: a["kv"].tolist()), "kv: expected a torch.Tensor, got list"),
    (_with(_prefill_args, kv=lambda a: a["kv"].half()),
     "kv: expected dtype torch.float32 or torch.bfloat16, got torch.float16"),
    (_with(_prefill_args, kv=lambda a: a["kv"].bfloat16()), "score: expected dtype torch.bfloat16, got torch.float32"),
    (_with(_prefill_args, kv=lambda a: a["kv"][None]), "kv: expected 2 dimensions, got 3"),
    (_with(_prefill_args, kv=lambda a: a["kv"].t().contiguous().t()), "kv: expected a contiguous tensor"),
    (_with(_prefill_args, kv=lambda a: a["kv"][:, :1000].contiguous()),
     "kv: expected last dimension coff*d = 1024 or 256 (ratio 4: coff 2, d 512 or 128), got 1000"),
    (_with(_prefill_args, ratio=128, ape=torch.zeros(128, 1024)),
     "kv: expected last dimension coff*d = 512 or 128 (ratio 128: coff 1, d 512 or 128), got 1024"),
    (_with(_prefill_args, score=lambda a: a["score"][:12].contiguous()),
     "score: expected shape (13, 1024), got (12, 1024)"),
    (_with(_prefill_args, score=lambda a: a["score"].double()),
     "score: expected dtype torch.float32, got torch.float64"),
    (_with(_prefill_args, ape=torch.zeros(8, 1024)), "ape: expected shape (4, 1024), got (8, 1024)"),
    (_with(_prefill_args, ape=torch.zeros(4, 1024, dtype=torch.bfloat16)), "ape: expected dtype torch.float32"),
    (_with(_prefill_args, ape=torch.zeros(4, 1024, device=META)),
     "ape: expected device cpu (the device of kv), got meta"),
    (_with(_fused_args, kv_cache=None, cache_slots=None, rope_cos=None, rope_sin=None),
     "rope_cos: expected [P, 32] fp32 tables with norm_weight"),
    (_with(_fused_args, kv_cache=None, cache_slots=None, norm_weight=None),
     "norm_weight: expected a [d] fp32 tensor with rope_cos and rope_sin"),
    (_with(_fused_args, rope_sin=None),
     "rope_sin: expected a tensor together with rope_cos (both or neither), got None"),
    (_with(_fused_args, rope_cos=None),
     "rope_cos: expected a tensor together with rope_sin (both or neither), got None"),
    (_with(_fused_args, norm_weight=torch.ones(128)), "norm_weight: expected shape (512,), got (128,)"),
    (_with(_fused_args, norm_weight=torch.ones(512, dtype=torch.bfloat16)),
     "norm_weight: expected dtype torch.float32"),
    (_with(_fused_args, rope_cos=torch.ones(300, 64), rope_sin=torch.ones(300, 64)),
     "rope_cos: expected shape (*, 32), got (300, 64)"),
    (_with(_fused_args, rope_cos=lambda a: a["rope_cos"].double()),
     "rope_cos: expected dtype torch.float32, got torch.float64"),
    (_with(_fused_args, rope_sin=lambda a: a["rope_sin"][:200]), "rope_sin: expected shape (300, 32), got (200, 32)"),
    (_with(_fused_args, rope_cos=lambda a: a["rope_cos"][:8], rope_sin=lambda a: a["rope_sin"][:8]),
     "rope_cos: expected at least 9 rows (entries sit at positions up to 8), got 8"),
    (_with(_fused_args, rope_sin=lambda a: a["rope_sin"].to(META)),
     "rope_sin: expected device cpu (the device of kv), got meta"),
    (_with(_fused_args, norm_weight=None, rope_cos=None, rope_sin=None),
     "kv_cache: the FP8 cache store is part of the fused form only"),
    (_with(_fused_args, kv=lambda a: a["kv"][:, :256].contiguous(), score=lambda a: a["score"][:, :256].contiguous(),
           ape=lambda a: a["ape"][:, :256].contiguous(), norm_weight=torch.ones(128)),
     "kv_cache: the FP8 cache form (SPEC 1.2) holds d = 512 entries, got d = 128"),
    (_with(_fused_args, kv_cache=lambda a: a["kv_cache"].view(torch.int8)),
     "kv_cache: expected dtype torch.uint8, got torch.int8"),
    (_with(_fused_args, kv_cache=lambda a: a["kv_cache"][None]), "kv_cache: expected 2 dimensions, got 3"),
    (_with(_fused_args, cache_block_size=64), "kv_cache: expected shape (*, 37376), got (2, 9344)"),
    (_with(_fused_args, kv_cache=lambda a: a["kv_cache"].to(META)),
     "kv_cache: expected device cpu (the device of kv), got meta"),
    (_with(_fused_args, cache_block_size=0), "cache_block_size: expected an int >= 1, got 0"),
    (_with(_fused_args, cache_block_size=16.0), "cache_block_size: expected an int, got float 16.0"),
    (_with(_fused_args, cache_slots=None), "cache_slots: expected an int64 tensor [3] with kv_cache, got None"),
    (_with(_fused_args, kv_cache=None), "cache_slots: expected None without kv_cache, got a tensor"),
    (_with(_fused_args, cache_slots=lambda a: a["cache_slots"].int()),
     "cache_slots: expected dtype torch.int64, got torch.int32"),
    (_with(_fused_args, cache_slots=torch.arange(4)), "cache_slots: expected shape (3,), got (4,)"),
]
DECODE_RULES = [
    (_with(_decode_args, ratio=1), "ratio: expected one of 4, 128, got 1: ratio 0 and 1 mean no compression"),
    (_with(_decode_args, ratio=0), "ratio: expected one of 4, 128, got 0: ratio 0 and 1 mean no compression"),
    (_with(_decode_args, kv=lambda a: a["kv"][:, :640].contiguous()),
     "kv: expected last dimension coff*d = 1024 or 256 (ratio 4: coff 2, d 512 or 128), got 640"),
    (_with(_decode_args, kv_state=lambda a: a["kv_state"][0]), "kv_state: expected 3 dimensions, got 2"),
    (_with(_decode_args, kv_state=lambda a: a["kv_state"][:, :4].contiguous()),
     "kv_state: expected shape (*, 8, 1024), got (4, 4, 1024)"),
    (_with(_decode_args, kv_state=lambda a: a["kv_state"].double()),
     "kv_state: expected dtype torch.float32, got torch.float64"),
    (_with(_decode_args, kv_state=lambda a: a["kv_state"].transpose(0, 1).contiguous().transpose(0, 1)),
     "kv_state: expected a contiguous tensor"),
    (_with(_decode_args, score_state=lambda a: a["score_state"][:3].contiguous()),
     "score_state: expected shape (4, 8, 1024), got (3, 8, 1024)"),
    (_with(_decode_args, score_state=lambda a: a["score_state"].bfloat16()),
     "score_state: expected dtype torch.float32"),
    (_with(_decode_args, kv_state=lambda a: a["kv_state"][:2].contiguous(),
           score_state=lambda a: a["score_state"][:2].contiguous()),
     "kv: expected at most 2 rows (one per state slot; slot ids are distinct), got 3"),
    (_with(_decode_args, score=lambda a: a["score"][:2].contiguous()),
     "score: expected shape (3, 1024), got (2, 1024)"),
    (_with(_decode_args, ape=torch.zeros(4, 256)), "ape: expected shape (4, 1024), got (4, 256)"),
    (_with(_decode_args, positions=lambda a: a["positions"].int()),
     "positions: expected dtype torch.int64, got torch.int32"),
    (_with(_decode_args, positions=torch.arange(2)), "positions: expected shape (3,), got (2,)"),
    (_with(_decode_args, slot_ids=lambda a: a["slot_ids"].int()),
     "slot_ids: expected dtype torch.int64, got torch.int32"),
    (_with(_decode_args, slot_ids=torch.arange(4)), "slot_ids: expected shape (3,), got (4,)"),
    (_with(_decode_args, kv_state=lambda a: a["kv_state"].to(META)),
     "kv_state: expected device cpu (the device of kv), got meta"),
    (_with(_decode_args, slot_ids=lambda a: a["slot_ids"].to(META)),
     "slot_ids: expected device cpu (the device of kv), got meta"),
    (_with(_decode_args, positions=lambda a: a["positions"].to(META)),
     "positions: expected device cpu (the device of kv), got meta"),
    (_with(_decode_args, kv_cache=torch.zeros(1, 64 * TOKEN_BYTES, dtype=torch.uint8)),
     "kv_cache: the FP8 cache store is part of the fused form only"),
    (_with(_decode_args, norm_weight=torch.ones(512)), "rope_cos: expected [P, 32] fp32 tables with norm_weight"),
    (_with(_decode_args, norm_weight=torch.ones(512), rope_cos=_tables()[0], rope_sin=_tables()[1],
           kv_cache=torch.zeros(1, 64 * TOKEN_BYTES, dtype=torch.uint8), cache_slots=torch.arange(1)),
     "cache_slots: expected shape (3,), got (1,)"),
]
NORM_ROPE_RULES = [
    (_with(_norm_rope_args, entries=lambda a: a["entries"].bfloat16()),
     "entries: expected dtype torch.float32, got torch.bfloat16"),
    (_with(_norm_rope_args, entries=torch.zeros(512)), "entries: expected 2 dimensions, got 1"),
    (_with(_norm_rope_args, entries=torch.zeros(3, 256), norm_weight=torch.ones(256)),
     "entries: expected last dimension d = 512 or 128, got 256"),
    (_with(_norm_rope_args, norm_weight=torch.ones(511)), "norm_weight: expected shape (512,), got (511,)"),
    (_with(_norm_rope_args, rope_cos=lambda a: a["rope_cos"].bfloat16()),
     "rope_cos: expected dtype torch.float32, got torch.bfloat16"),
    (_with(_norm_rope_args, rope_cos=torch.ones(300, 33)), "rope_cos: expected shape (*, 32), got (300, 33)"),
    (_with(_norm_rope_args, rope_sin=torch.ones(301, 32)), "rope_sin: expected shape (300, 32), got (301, 32)"),
    (_with(_norm_rope_args, positions=lambda a: a["positions"].int()),
     "positions: expected dtype torch.int64, got torch.int32"),
    (_with(_norm_rope_args, positions=torch.arange(4)), "positions: expected shape (3,), got (4,)"),
    (_with(_norm_rope_args, eps=-1.0), "eps: expected a finite float >= 0, got -1.0"),
    (_with(_norm_rope_args, eps=float("nan")), "eps: expected a finite float >= 0, got nan"),
    (_with(_norm_rope_args, norm_weight=torch.ones(512, device=META)),
     "norm_weight: expected device cpu (the device of entries), got meta"),
]
INDEXER_RULES = [
    (lambda: dict(x=torch.zeros(3, 128)), "x: expected dtype torch.bfloat16, got torch.float32"),
    (lambda: dict(x=torch.zeros(3, 256, dtype=torch.bfloat16)), "x: expected shape (*, 128), got (3, 256)"),
    (lambda: dict(x=torch.zeros(2, 3, 128, dtype=torch.bfloat16)), "x: expected 2 dimensions, got 3"),
    (lambda: dict(x=torch.zeros(128, 3, dtype=torch.bfloat16).t()), "x: expected a contiguous tensor"),
]


def _rule_ids(rules):
    return [msg.split(":")[0] + "-" + str(i) for i, (_, msg) in enumerate(rules)]


@pytest.mark.parametrize("op, make, message", [
    *[(ops.compressor_prefill, m, msg) for m, msg in PREFILL_RULES],
    *[(ops.compressor_decode, m, msg) for m, msg in DECODE_RULES],
    *[(ops.compressor_norm_rope, m, msg) for m, msg in NORM_ROPE_RULES],
    *[(ops.indexer_cache_quantize, m, msg) for m, msg in INDEXER_RULES],
], ids=[f"prefill-{i}" for i in _rule_ids(PREFILL_RULES)] + [f"decode-{i}" for i in _rule_ids(DECODE_RULES)]
   + [f"norm_rope-{i}" for i in _rule_ids(NORM_ROPE_RULES)] + [f"indexer-{i}" for i in _rule_ids(INDEXER_RULES)])
def test_bad_input_is_refused_before_launch(op, make, message):
    with pytest.raises(ValueError) as err:
        op(**make())
    assert message in str(err.value)


def test_validation_reads_no_values():
    """Every check passes on meta tensors (no storage): none reads a value back to the host, so the
    decode step stays CUDA-graph safe."""
    def meta(args):
        return {k: v.to(META) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    ops.validate_prefill(**meta(_fused_args()))
    ops.validate_decode(**meta(_decode_args()))
    args = _decode_args()
    cos, sin = _tables()
    args.update(norm_weight=torch.ones(512), rope_cos=cos, rope_sin=sin, cache_block_size=16,
                kv_cache=torch.zeros(1, 16 * TOKEN_BYTES, dtype=torch.uint8), cache_slots=torch.arange(3))
    ops.validate_decode(**meta(args))
    ops.validate_norm_rope(**meta(_norm_rope_args()))
    ops.validate_indexer(torch.zeros(3, 128, dtype=torch.bfloat16, device=META))


# torch.library registration and torch.compile.

def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_library_ops_are_complete():
    cos, sin = _tables()
    kv, score, ape = _inputs(13, 4, 512)
    _opcheck(torch.ops.dsv4.compressor_prefill.default,
             (kv, score, ape, 4, None, None, None, None, 64, None, "reference"))
    pages = torch.zeros(2, 16 * TOKEN_BYTES, dtype=torch.uint8)
    _opcheck(torch.ops.dsv4.compressor_prefill.default,
             (kv, score, ape, 4, _norm_weight(512), cos, sin, pages, 16, torch.tensor([5, 0, 17]), "reference"))
    kv, score, ape = _inputs(130, 128, 128)
    _opcheck(torch.ops.dsv4.compressor_prefill.default,
             (kv, score, ape, 128, None, None, None, None, 64, None, "reference"))

    a = _decode_args()
    _opcheck(torch.ops.dsv4.compressor_decode.default,
             (a["kv_state"], a["score_state"], a["kv"], a["score"], a["ape"], torch.tensor([3, 0, 7]), 4,
              a["slot_ids"], None, None, None, None, 64, None, "reference"))
    _opcheck(torch.ops.dsv4.compressor_decode.default,
             (a["kv_state"], a["score_state"], a["kv"], a["score"], a["ape"], torch.tensor([3, 0, 7]), 4,
              None, _norm_weight(512), cos, sin, pages, 16, torch.tensor([1, 2, 3]), "reference"))
    n = _norm_rope_args()
    _opcheck(torch.ops.dsv4.compressor_norm_rope.default,
             (n["entries"], n["norm_weight"], n["rope_cos"], n["rope_sin"], n["positions"], 1e-6, "reference"))
    _opcheck(torch.ops.dsv4.indexer_cache_quantize.default,
             (torch.randn(5, 128).bfloat16(), "reference"))


def test_torch_compile_traces_without_graph_breaks():
    torch._dynamo.reset()
    cos, sin = _tables()
    weight = _norm_weight(128)

    def step(kv, score, ape, kv_state, score_state, step_kv, step_score, positions, slot_ids):
        entries, kvs, scs = ops.compressor_prefill(kv, score, ape, 4, impl="reference")
        out, emitted = ops.compressor_decode(kv_state, score_state, step_kv, step_score, ape, positions, 4, slot_ids,
                                             weight, cos, sin, impl="reference")
        normed = ops.compressor_norm_rope(entries, weight, cos, sin, torch.arange(entries.shape[0]) * 4,
                                          impl="reference")
        packed, scale = ops.indexer_cache_quantize(normed, impl="reference")
        return entries, kvs, scs, out, emitted, packed, scale

    kv, score, ape = _inputs(13, 4, 128)
    lengths = (7, 2, 11)
    slot_ids = torch.tensor([2, 0, 1])
    states = _prefilled_states(4, 128, lengths, slot_ids, 3, "cpu")[:4]
    positions = torch.tensor(lengths)

    def args():
        return (kv, score, ape, states[0].clone(), states[1].clone(), states[2], states[3], positions, slot_ids)

    compiled_args, eager_args = args(), args()
    got = torch.compile(step, fullgraph=True, backend="eager")(*compiled_args)
    want = step(*eager_args)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(compiled_args[3], eager_args[3]) and torch.equal(compiled_args[4], eager_args[4])
    explain = torch._dynamo.explain(step)(*args())
    assert explain.graph_break_count == 0 and explain.graph_count == 1
