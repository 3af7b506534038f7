"""The batched compressor prefill (SPEC 2, 7): a ragged batch of chunks, each continuing its sequence from
its own state slot, through every implementation.

The invariants: prefill(S1) then a chunk of S2 tokens from position S1 equals prefill(S1 + S2), entries
and state, for S1 not a multiple of r, with sequences of different lengths and ratios; a batch of one
token per sequence equals compressor_decode; bf16 inputs equal their fp32 upcast. Plus the fused form
with the FP8 cache bytes, invalid chunks, padding rows, zero tokens, validation and checked mode.
V4-Flash and V4-Pro share the compressor shapes (d 512 and 128, ratios 4 and 128).
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv4_kernels import ladder
from dsv4_kernels.ops import compressor as ops
from dsv4_kernels.reference import compressor as ref
from dsv4_kernels.reference.transforms import rope_tables

TOKEN_BYTES = 584


def _coff(ratio):
    return 2 if ratio == 4 else 1


def _seq(n, ratio, d, gen=None):
    width = _coff(ratio) * d
    return torch.randn(n, width, generator=gen), 2.0 * torch.randn(n, width, generator=gen)


def _ape(ratio, d, gen=None):
    return 0.5 * torch.randn(ratio, _coff(ratio) * d, generator=gen)


def _specified(ratio, length):
    """State rows SPEC 2 defines after `length` tokens (ratio 4 rows 0:4: the last complete block, or the
    initial kv 0 / score -inf that entry 0 pools)."""
    rows = list(range(ratio)) if ratio == 4 and length >= 1 else []
    first = ratio if ratio == 4 else 0
    return rows + list(range(first, first + length % ratio))


def _same_rows(a, b, rows):
    a, b = a[rows], b[rows]
    return torch.equal(torch.nan_to_num(a, neginf=-7.0), torch.nan_to_num(b, neginf=-7.0))


def _compare_entries(got, want):
    ladder.get_check("compressor_prefill_batched").compare(got.cpu(), want.cpu())


class Batch:
    """Sequences with a prefix already in the state (reference prefill) and a chunk to prefill now."""

    def __init__(self, ratio, d, prefixes, chunks, gen=None, slots=None, perm=True, garbage=True):
        self.ratio, self.d, self.prefixes, self.chunks = ratio, d, list(prefixes), list(chunks)
        batch = len(prefixes)
        self.slots = slots or batch + 2
        self.slot_ids = (torch.randperm(self.slots, generator=gen)[:batch] if perm
                         else torch.arange(batch, dtype=torch.int64))
        self.ape = _ape(ratio, d, gen)
        self.seqs = [_seq(p + c, ratio, d, gen) for p, c in zip(prefixes, chunks)]
        kv_state, score_state = ref.compressor_init_state(ratio, d, self.slots)
        if garbage:   # rows and slots the op must never read: unspecified rows of used slots included
            kv_state.fill_(123.0)
            score_state.fill_(7.0)
        for (kv, score), p, s in zip(self.seqs, prefixes, self.slot_ids.tolist()):
            if p:
                _, kvs, scs = ref.compressor_prefill(kv[:p], score[:p], self.ape, ratio)
                rows = _specified(ratio, p)
                kv_state[s, rows], score_state[s, rows] = kvs[rows], scs[rows]
        self.kv_state, self.score_state = kv_state, score_state
        empty = torch.zeros(0, _coff(ratio) * d)
        self.kv = torch.cat([empty] + [kv[p:] for (kv, _), p in zip(self.seqs, prefixes)])
        self.score = torch.cat([empty] + [score[p:] for (_, score), p in zip(self.seqs, prefixes)])
        self.cu = torch.tensor([0] + torch.tensor(chunks, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
        self.starts = torch.tensor(prefixes, dtype=torch.int64)

    def run(self, impl, device, dtype=torch.float32, **kw):
        states = self.kv_state.clone().to(device), self.score_state.clone().to(device)
        out = ops.compressor_prefill(self.kv.to(dtype).to(device), self.score.to(dtype).to(device),
                                     self.ape.to(device), self.ratio, cu_seqlens=self.cu.to(device),
                                     kv_state=states[0], score_state=states[1],
                                     start_positions=self.starts.to(device), slot_ids=self.slot_ids.to(device),
                                     impl=impl, **kw)
        return out, states

    def check_against_full_prefills(self, entries, emitted, kv_state, score_state):
        """Each chunk's entries and its slot equal the single prefill of the whole sequence."""
        entries, emitted, kv_state, score_state = (t.cpu() for t in (entries, emitted, kv_state, score_state))
        for b, ((kv, score), p) in enumerate(zip(self.seqs, self.prefixes)):
            full, kvs, scs = ref.compressor_prefill(kv, score, self.ape, self.ratio)
            lo, hi = int(self.cu[b]), int(self.cu[b + 1])
            positions = torch.arange(p, p + hi - lo)
            assert emitted[lo:hi].tolist() == ((positions + 1) % self.ratio == 0).tolist(), f"chunk {b}"
            _compare_entries(entries[lo:hi][emitted[lo:hi]], full[p // self.ratio:])
            rows = _specified(self.ratio, p + hi - lo)
            slot = int(self.slot_ids[b])
            assert _same_rows(kv_state[slot], kvs, rows) and _same_rows(score_state[slot], scs, rows), f"chunk {b}"
        untouched = sorted(set(range(self.slots)) - set(self.slot_ids.tolist()))
        assert torch.equal(kv_state[untouched], self.kv_state[untouched])
        assert torch.equal(score_state[untouched], self.score_state[untouched])


# Chunks continuing prefixes that are not multiples of r, a chunk from position 0 (ratio 4: entry 0 has
# no previous block), an empty chunk, chunks inside one block, several blocks, permuted slots.
GRID = {4: ((5, 0, 2, 9, 130, 1, 8), (7, 3, 0, 11, 6, 1, 4)),
        128: ((100, 0, 128, 3, 260), (160, 129, 1, 0, 124))}


@pytest.mark.op("compressor_prefill_batched")
@pytest.mark.parametrize("ratio", (4, 128))
@pytest.mark.parametrize("d", (128, 512))
def test_chunks_continue_their_sequences(impl, device, ratio, d):
    prefixes, chunks = GRID[ratio]
    if d == 512:   # the wide form on a shorter grid (interpreter time)
        prefixes, chunks = prefixes[:3], chunks[:3]
    batch = Batch(ratio, d, prefixes, chunks, torch.Generator().manual_seed(ratio + d))
    (entries, emitted), states = batch.run(impl, device)
    assert entries.shape == (batch.kv.shape[0], d) and entries.dtype == torch.float32
    assert emitted.dtype == torch.bool and entries.device == states[0].device
    batch.check_against_full_prefills(entries, emitted, *states)
    assert not entries.cpu()[~emitted.cpu()].any()


@pytest.mark.op("compressor_prefill_batched")
@settings(max_examples=6)
@given(lengths=st.lists(st.integers(1, 200), min_size=1, max_size=3), cuts=st.lists(st.integers(0, 200), min_size=3,
       max_size=3), ratio=st.sampled_from((4, 128)), seed=st.integers(0, 2**31 - 1))
def test_any_chunking_equals_one_prefill(impl, device, lengths, cuts, ratio, seed):
    """Sequences of different lengths cut at arbitrary points: the second chunk continues the first."""
    gen = torch.Generator().manual_seed(seed)
    prefixes = [min(c, n) for c, n in zip(cuts, lengths)]
    batch = Batch(ratio, 128, prefixes, [n - p for n, p in zip(lengths, prefixes)], gen)
    (entries, emitted), states = batch.run(impl, device)
    batch.check_against_full_prefills(entries, emitted, *states)


@pytest.mark.op("compressor_prefill_batched")
@pytest.mark.parametrize("ratio", (4, 128))
def test_one_token_per_chunk_is_a_decode_step(impl, device, ratio):
    batch = Batch(ratio, 128, (3, 127, 0, 8) if ratio == 4 else (127, 3, 0, 255), (1, 1, 1, 1),
                  torch.Generator().manual_seed(5), garbage=False)   # decode reads a new sequence's fresh rows
    (entries, emitted), (kv_state, score_state) = batch.run(impl, device)
    states = batch.kv_state.clone(), batch.score_state.clone()
    want, want_emitted = ref.compressor_decode(*states, batch.kv, batch.score, batch.ape, batch.starts, ratio,
                                               batch.slot_ids)
    assert torch.equal(emitted.cpu(), want_emitted)
    _compare_entries(entries, want)
    for b, (p, s) in enumerate(zip(batch.prefixes, batch.slot_ids.tolist())):
        rows = _specified(ratio, p + 1)
        assert _same_rows(kv_state.cpu()[s], states[0][s], rows)
        assert _same_rows(score_state.cpu()[s], states[1][s], rows)


@pytest.mark.op("compressor_prefill_batched")
def test_bf16_inputs_equal_their_fp32_upcast(impl, device):
    batch = Batch(4, 128, (5, 0), (9, 6), torch.Generator().manual_seed(7))
    batch.kv, batch.score = batch.kv.bfloat16().float(), batch.score.bfloat16().float()
    (e16, m16), s16 = batch.run(impl, device, dtype=torch.bfloat16)
    (e32, m32), s32 = batch.run(impl, device)
    assert torch.equal(e16, e32) and torch.equal(m16, m32)
    assert all(torch.equal(a, b) for a, b in zip(s16, s32))


@pytest.mark.op("compressor_prefill")
def test_single_sequence_form_takes_bf16(impl, device):
    kv, score = _seq(13, 4, 128)
    kv, score, ape = kv.bfloat16(), score.bfloat16(), _ape(4, 128)
    got = ops.compressor_prefill(kv.to(device), score.to(device), ape.to(device), 4, impl=impl)
    want = ref.compressor_prefill(kv.float(), score.float(), ape, 4)
    _compare_entries(got[0], want[0])
    assert all(torch.equal(g.cpu().nan_to_num(neginf=-7), w.nan_to_num(neginf=-7)) for g, w in zip(got[1:], want[1:]))


@pytest.mark.op("compressor_prefill_batched")
@pytest.mark.parametrize("ratio", (4, 128))
def test_fused_form_stores_the_fp8_cache_bytes(impl, device, ratio):
    prefixes, chunks = ((6, 0, 3), (7, 4, 9)) if ratio == 4 else ((100, 0), (160, 130))
    batch = Batch(ratio, 512, prefixes, chunks, torch.Generator().manual_seed(11))
    cos, sin = rope_tables(torch.arange(512))
    weight = 1.0 + 0.2 * torch.randn(512)
    block = 16
    total = batch.kv.shape[0]
    token_slots = torch.randperm(4 * block)[:total] if total <= 4 * block else torch.randperm(total)
    token_slots[0] = -1
    pages = torch.full((max(4, total // block + 1), block * TOKEN_BYTES), 0xAB, dtype=torch.uint8)
    want_pages = pages.clone()
    states = batch.kv_state.clone(), batch.score_state.clone()
    want = ref.compressor_prefill_batched(batch.kv, batch.score, batch.ape, ratio, batch.cu, *states, batch.starts,
                                          batch.slot_ids, weight, cos, sin, want_pages, block, token_slots)
    got_pages = pages.clone().to(device)
    (entries, emitted), _ = batch.run(impl, device, norm_weight=weight.to(device), rope_cos=cos.to(device),
                                      rope_sin=sin.to(device), kv_cache=got_pages, cache_block_size=block,
                                      cache_slots=token_slots.to(device))
    assert entries.dtype == torch.bfloat16 and torch.equal(emitted.cpu(), want[1])
    _compare_entries(entries, want[0])
    assert torch.equal(got_pages.cpu(), want_pages)
    assert (want_pages != pages).any()


@pytest.mark.op("compressor_prefill_batched")
def test_invalid_chunks_and_padding_rows_touch_nothing(impl, device):
    """Chunk 0 names a slot past the state, chunk 1 a negative start, chunk 3 runs past the RoPE tables
    (fused form); rows past cu_seqlens[B] (CUDA-graph padding) belong to no chunk. Only chunk 2 runs."""
    batch = Batch(4, 512, (5, 2, 6, 40), (7, 3, 6, 4), torch.Generator().manual_seed(3), slots=5, perm=False)
    batch.slot_ids[0] = 9
    batch.starts[1] = -2
    batch.cu = torch.cat([batch.cu, batch.cu[-1:]])          # an empty fifth chunk
    batch.kv = torch.cat([batch.kv, torch.randn(5, 1024)])   # five padding rows
    batch.score = torch.cat([batch.score, torch.randn(5, 1024)])
    batch.starts = torch.cat([batch.starts, torch.tensor([0])])
    batch.slot_ids = torch.cat([batch.slot_ids, torch.tensor([4])])
    cos, sin = rope_tables(torch.arange(30))    # chunk 3 ends at 44: 44 - 4 >= 30 rows
    weight = torch.ones(512)
    (entries, emitted), (kv_state, score_state) = batch.run(impl, device, norm_weight=weight.to(device),
                                                            rope_cos=cos.to(device), rope_sin=sin.to(device))
    entries, emitted = entries.cpu(), emitted.cpu()
    lo, hi = int(batch.cu[2]), int(batch.cu[3])
    assert emitted.tolist() == [lo <= t < hi and (6 + t - lo + 1) % 4 == 0 for t in range(len(emitted))]
    assert not entries[~emitted].any()
    changed = [s for s in range(5) if not torch.equal(kv_state.cpu()[s], batch.kv_state[s])
               or not torch.equal(score_state.cpu()[s], batch.score_state[s])]
    assert changed == [2]


@pytest.mark.op("compressor_prefill_batched")
@pytest.mark.parametrize("chunks", ((0, 0), ()), ids=["empty-chunks", "no-chunks"])
def test_zero_tokens_change_nothing(impl, device, chunks):
    batch = Batch(128, 128, (3,) * len(chunks), chunks, torch.Generator().manual_seed(1))
    (entries, emitted), states = batch.run(impl, device)
    assert entries.shape == (0, 128) and emitted.shape == (0,)
    assert torch.equal(states[0].cpu(), batch.kv_state) and torch.equal(states[1].cpu(), batch.score_state)


def _args(**changes):
    batch = Batch(4, 128, (5, 0), (7, 3), torch.Generator().manual_seed(2), perm=False)
    args = dict(kv=batch.kv, score=batch.score, ape=batch.ape, ratio=4, cu_seqlens=batch.cu,
                kv_state=batch.kv_state, score_state=batch.score_state, start_positions=batch.starts,
                slot_ids=batch.slot_ids)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, message", [
    (dict(cu_seqlens=None), "kv_state: belongs to the batched form; expected None without cu_seqlens"),
    (dict(kv_state=None), "kv_state: expected [slots, coff*ratio, coff*d] fp32 state with cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0.0, 7.0, 10.0])), "cu_seqlens: expected dtype torch.int32 or torch.int64"),
    (dict(cu_seqlens=torch.zeros(0, dtype=torch.int32)), "cu_seqlens: expected [B + 1] cumulative lengths"),
    (dict(start_positions=torch.tensor([5, 0], dtype=torch.int32)), "start_positions: expected dtype torch.int64"),
    (dict(slot_ids=torch.tensor([0, 1, 2])), "slot_ids: expected shape (2,), got (3,)"),
    (dict(score_state=torch.zeros(3, 8, 256)), "score_state: expected shape (4, 8, 256), got (3, 8, 256)"),
    (dict(kv_state=torch.zeros(4, 8, 512)), "kv_state: expected shape (*, 8, 256), got (4, 8, 512)"),
    (dict(slot_ids=None, kv_state=torch.zeros(1, 8, 256), score_state=torch.zeros(1, 8, 256)),
     "kv_state: expected at least 2 slots"),
])
def test_bad_metadata_is_refused_before_launch(changes, message):
    with pytest.raises(ValueError) as err:
        ops.compressor_prefill(**_args(**changes))
    assert message in str(err.value)


def test_fused_batched_form_takes_one_cache_slot_per_token():
    cos, sin = rope_tables(torch.arange(64))
    args = _args(kv=torch.randn(10, 1024), score=torch.randn(10, 1024), ape=torch.randn(4, 1024),
                 kv_state=torch.zeros(4, 8, 1024), score_state=torch.zeros(4, 8, 1024), norm_weight=torch.ones(512),
                 rope_cos=cos, rope_sin=sin, kv_cache=torch.zeros(1, 16 * TOKEN_BYTES, dtype=torch.uint8),
                 cache_block_size=16, cache_slots=torch.arange(2))
    with pytest.raises(ValueError, match=r"cache_slots: expected shape \(10,\), got \(2,\)"):
        ops.compressor_prefill(**args)


@pytest.mark.parametrize("changes, message", [
    (dict(cu_seqlens=torch.tensor([0, 7, 5], dtype=torch.int32)),
     "cu_seqlens: expected non-decreasing values (cumulative lengths), got 5 at position (2,)"),
    (dict(cu_seqlens=torch.tensor([0, 7, 11], dtype=torch.int32)), "cu_seqlens: expected values in [0, 11)"),
    (dict(start_positions=torch.tensor([5, -1])), "start_positions: expected values in [0, "),
    (dict(slot_ids=torch.tensor([1, 1])), "slot_ids: expected distinct values, got 1 at position (1,)"),
    (dict(slot_ids=torch.tensor([0, 4])), "slot_ids: expected values in [0, 4) (state slots), got 4"),
])
def test_checked_mode_refuses_bad_values(monkeypatch, changes, message):
    monkeypatch.setenv("DSV4K_CHECK", "1")
    with pytest.raises(ValueError) as err:
        ops.compressor_prefill(**_args(**changes))
    assert message in str(err.value)


def test_checked_mode_refuses_chunks_past_the_rope_tables_and_repeated_cache_slots(monkeypatch):
    monkeypatch.setenv("DSV4K_CHECK", "1")
    cos, sin = rope_tables(torch.arange(5))
    kv, score = torch.randn(10, 1024), torch.randn(10, 1024)
    base = dict(kv=kv, score=score, ape=torch.randn(4, 1024), kv_state=torch.zeros(4, 8, 1024),
                score_state=torch.zeros(4, 8, 1024), norm_weight=torch.ones(512), rope_cos=cos, rope_sin=sin)
    with pytest.raises(ValueError, match=r"start_positions \+ chunk length - ratio: expected values in .* got 8"):
        ops.compressor_prefill(**_args(**base))      # chunk 0 ends at 5 + 7 = 12: 12 - 4 >= 5 rope rows
    cos, sin = rope_tables(torch.arange(64))
    slots = torch.full((10,), -1)
    slots[[2, 6]] = 3        # tokens at positions 7 and 3 (chunk 1) both emit into slot 3
    with pytest.raises(ValueError, match="cache_slots: expected distinct values"):
        ops.compressor_prefill(**_args(**dict(base, rope_cos=cos, rope_sin=sin, cache_block_size=16, cache_slots=slots,
                                              kv_cache=torch.zeros(1, 16 * TOKEN_BYTES, dtype=torch.uint8))))
    slots[6] = -1
    slots[5] = 3             # position 2 of chunk 1 does not emit: its slot is never read
    ops.compressor_prefill(**_args(**dict(base, rope_cos=cos, rope_sin=sin, cache_block_size=16, cache_slots=slots,
                                          kv_cache=torch.zeros(1, 16 * TOKEN_BYTES, dtype=torch.uint8))))


def test_validation_reads_no_values():
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in _args().items()}
    ops.validate_prefill_batched(**meta)


def test_torch_library_op_is_complete():
    a = _args()
    torch.library.opcheck(torch.ops.dsv4.compressor_prefill_batched.default,
                          (a["kv"], a["score"], a["ape"], 4, a["cu_seqlens"], a["kv_state"], a["score_state"],
                           a["start_positions"], a["slot_ids"], None, None, None, None, 64, None, "reference"),
                          test_utils=("test_schema", "test_faketensor"))
