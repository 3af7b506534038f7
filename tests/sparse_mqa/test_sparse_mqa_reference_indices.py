"""Index-list builders of SPEC 1.1: window and compressed parts, ring buffer, causality."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv4_kernels.reference.indices import (build_sparse_indices, compact_indices, compressed_indices,
                                            num_visible_compressed, selected_compressed_indices,
                                            window_indices)
from dsv4_kernels.reference.sparse_mqa import sparse_mqa
from dsv4_kernels.testing import assert_close, bf16_ulp

INF = float("inf")


def window_row(valid, width=128):
    return list(valid) + [-1] * (width - len(valid))


def test_prefill_hand_checked_hca_style():
    # S = 10, ratio 4, every visible entry: entry 0 (tokens 0..3) from i = 3, entry 1 (4..7) from i = 7;
    # entry 2 would need token 11. Compressed rows start after the 10 raw rows.
    idx = build_sparse_indices(torch.arange(10), 4)
    assert idx.dtype == torch.int32 and idx.shape == (10, 128 + 2)
    expected_compressed = [[-1, -1]] * 3 + [[10, -1]] * 4 + [[10, 11]] * 3
    for i in range(10):
        assert idx[i].tolist() == window_row(range(i + 1)) + expected_compressed[i], i


def test_prefill_hand_checked_small_window_and_selection():
    # window 4 slides: query i sees max(0, i-3)..i. The indexer picks entries [1, 0, 2, -1] for every
    # query; entry 1 is visible from i = 7, entry 0 from i = 3, entry 2 never (needs i >= 11).
    selection = torch.tensor([[1, 0, 2, -1]] * 10)
    idx = build_sparse_indices(torch.arange(10), 4, compressed_selection=selection, window=4)
    expected = [
        [0, -1, -1, -1, -1, -1, -1, -1],
        [0, 1, -1, -1, -1, -1, -1, -1],
        [0, 1, 2, -1, -1, -1, -1, -1],
        [0, 1, 2, 3, -1, 10, -1, -1],
        [1, 2, 3, 4, -1, 10, -1, -1],
        [2, 3, 4, 5, -1, 10, -1, -1],
        [3, 4, 5, 6, -1, 10, -1, -1],
        [4, 5, 6, 7, 11, 10, -1, -1],
        [5, 6, 7, 8, 11, 10, -1, -1],
        [6, 7, 8, 9, 11, 10, -1, -1],
    ]
    assert idx.tolist() == expected


def test_decode_ring_buffer_wraps():
    # Positions 130, 127, 128, 5 and a padding row (-1); ratio 128 with room for 2 entries per sequence.
    positions = torch.tensor([130, 127, 128, 5, -1])
    idx = build_sparse_indices(positions, 128, decode=True, num_compressed=2)
    assert idx.shape == (5, 130)
    assert idx[0].tolist() == list(range(3, 128)) + [0, 1, 2] + [128, -1]      # positions 3..130
    assert idx[1].tolist() == list(range(128)) + [128, -1]                     # entry 0 complete at 127
    assert idx[2].tolist() == list(range(1, 128)) + [0] + [128, -1]            # positions 1..128
    assert idx[3].tolist() == window_row(range(6)) + [-1, -1]
    assert idx[4].tolist() == [-1] * 130


def test_batched_decode_with_per_sequence_regions():
    # Sequence b owns pool rows [b * 140, b * 140 + 140): a 128-slot ring, then 12 entry rows (ratio 4).
    region = 140
    positions = torch.tensor([47, 200, 0])
    offsets = torch.arange(3) * region
    selection = torch.tensor([[11, 3, 0], [49, 11, 0], [0, 1, 2]])
    idx = build_sparse_indices(positions, 4, decode=True, compressed_selection=selection, raw_offset=offsets,
                               compressed_offset=offsets + 128)
    assert idx[0].tolist() == window_row(range(48)) + [128 + 11, 128 + 3, 128 + 0]
    ring = [140 + (p % 128) for p in range(73, 201)]
    assert idx[1].tolist() == ring + [140 + 128 + 49, 140 + 128 + 11, 140 + 128 + 0]
    assert idx[2].tolist() == window_row([280]) + [-1, -1, -1]
    # The default compressed offset of decode is the end of the ring.
    default = build_sparse_indices(positions, 4, decode=True, compressed_selection=selection, raw_offset=offsets)
    assert torch.equal(default, idx)


@pytest.mark.parametrize("ratio", [0, 1])
@pytest.mark.parametrize("decode", [False, True])
def test_no_compression_gives_window_only(ratio, decode):
    positions = torch.tensor([0, 5, 127, 128, 300])
    idx = build_sparse_indices(positions, ratio, decode=decode, compressed_selection=torch.zeros(5, 3))
    assert torch.equal(idx, window_indices(positions, ring=decode))
    assert idx.shape == (5, 128)


def test_zero_queries():
    empty = torch.zeros(0, dtype=torch.int64)
    assert build_sparse_indices(empty, 128).shape == (0, 128)
    assert build_sparse_indices(empty, 128, decode=True, num_compressed=8).shape == (0, 136)
    assert build_sparse_indices(empty, 4, compressed_selection=torch.zeros(0, 512)).shape == (0, 640)


def test_compact_indices():
    idx = torch.tensor([[-1, 4, -1, 2, 2, -1], [-1, -1, -1, -1, -1, -1], [0, 1, 2, 3, 4, 5]], dtype=torch.int32)
    compacted, lengths = compact_indices(idx)
    assert compacted.tolist() == [[4, 2, 2, -1, -1, -1], [-1] * 6, [0, 1, 2, 3, 4, 5]]
    assert lengths.tolist() == [3, 0, 6]


def test_compacted_list_gives_same_attention():
    T, H, D = 10, 8, 512
    positions = torch.arange(T)
    idx = build_sparse_indices(positions, 4, window=4)
    q = torch.randn(T, H, D).to(torch.bfloat16)
    kv = torch.randn(T + T // 4, D).to(torch.bfloat16)
    sink = torch.randn(H)
    out, lse = sparse_mqa(q, kv, idx, sink)
    compacted, lengths = compact_indices(idx)
    out2, lse2 = sparse_mqa(q, kv, compacted, sink, topk_length=lengths)
    # Same entries in the same order, but the fp32 sums may be blocked differently for the shorter
    # effective rows: allow one bf16 ulp on out (half from each rounding) and a few fp32 ulps on lse.
    assert torch.all((out.double() - out2.double()).abs() <= bf16_ulp(out.float()).double())
    assert_close(lse2, lse, atol=0.0, rtol=1e-6, what="lse")


def test_prefill_window_only_is_causal_sliding_window_attention():
    # With window 128 >= S and sink -inf, sparse MQA over the built list is dense causal attention.
    S, H, D = 20, 8, 512
    q = torch.randn(S, H, D).to(torch.bfloat16)
    kv = torch.randn(S, D).to(torch.bfloat16)
    out, lse = sparse_mqa(q, kv, build_sparse_indices(torch.arange(S), 0), torch.full((H,), -INF))
    logits = (q.double() @ kv.double().T) * D ** -0.5                      # [S, H, S]
    future = torch.arange(S)[None, :] > torch.arange(S)[:, None]
    logits = logits.masked_fill(future[:, None, :], -INF)
    dense = torch.softmax(logits, dim=-1) @ kv.double()
    # fp32 reference vs fp64: half a bf16 ulp of rounding plus 1e-5 for fp32 arithmetic (see the main
    # test file for the derivation).
    assert torch.all((out.double() - dense).abs() <= 0.5 * bf16_ulp(dense.float()).double() + 1e-5)
    assert_close(lse, torch.logsumexp(logits, dim=-1), atol=1e-5, rtol=1e-6, what="lse")


def window_positions(entry, p, window, ring, offset):
    """Positions a window entry can stand for: the one position in prefill, those in (p - window, p] in
    the ring slot's residue class in decode."""
    row = entry - offset
    if not ring:
        return [row]
    return [x for x in range(max(0, p - window + 1), p + 1) if x % window == row]


@settings(deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), T=st.integers(0, 6), decode=st.booleans(),
       ratio=st.sampled_from([0, 1, 2, 4, 128]), window=st.sampled_from([1, 4, 8, 128]),
       use_selection=st.booleans(), max_pos=st.integers(0, 700))
def test_causality_and_completeness(seed, T, decode, ratio, window, use_selection, max_pos):
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(-2, max_pos + 1, (T,), generator=gen)
    raw_offset = torch.randint(0, 1000, (T,), generator=gen)
    comp_offset = raw_offset + 5000
    n_entries = max_pos // max(ratio, 1) + 3
    selection = torch.randint(-1, n_entries, (T, 9), generator=gen) if use_selection else None
    idx = build_sparse_indices(positions, ratio, decode=decode, compressed_selection=selection,
                               raw_offset=raw_offset, compressed_offset=comp_offset, window=window)
    assert idx.dtype == torch.int32 and idx.shape[0] == T
    for t in range(T):
        p, off, coff = int(positions[t]), int(raw_offset[t]), int(comp_offset[t])
        win, comp = idx[t, :window].tolist(), idx[t, window:].tolist()
        seen = []
        for entry in win:
            if entry == -1:
                continue
            candidates = window_positions(entry, p, window, decode, off)
            # Each window entry is one past-or-current position inside the window, never a future one.
            assert len(candidates) == 1 and p - window < candidates[0] <= p, (entry, p)
            seen += candidates
        # Ascending, no repeats, and every position of the window present.
        assert seen == list(range(max(0, p - window + 1), p + 1))
        assert win[len(seen):] == [-1] * (window - len(seen))
        if ratio <= 1:
            assert comp == []
            continue
        visible = [entry - coff for entry in comp if entry != -1]
        assert all(j >= 0 and (j + 1) * ratio <= p + 1 for j in visible), (visible, p)
        if use_selection:
            expected = [j if j >= 0 and (j + 1) * ratio <= p + 1 else None for j in selection[t].tolist()]
            assert [e - coff if e != -1 else None for e in comp] == expected
        else:
            assert visible == list(range(int(num_visible_compressed(positions[t:t + 1], ratio)[0])))
            assert visible == list(range(max(0, (p + 1) // ratio)))


def test_helpers_agree_with_entry_point():
    positions = torch.tensor([3, 250, 511])
    assert num_visible_compressed(positions, 128).tolist() == [0, 1, 4]
    assert num_visible_compressed(positions, 4).tolist() == [1, 62, 128]
    hca = compressed_indices(positions, 128, width=5, offset=7)
    assert hca.tolist() == [[-1] * 5, [7, -1, -1, -1, -1], [7, 8, 9, 10, -1]]
    csa = selected_compressed_indices(positions, 4, torch.tensor([[0, 1], [61, 62], [127, 128]]), offset=7)
    assert csa.tolist() == [[7, -1], [68, -1], [134, -1]]
    full = build_sparse_indices(positions, 128, num_compressed=5, compressed_offset=7)
    assert torch.equal(full, torch.cat([window_indices(positions), hca], dim=1))
