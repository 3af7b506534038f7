"""The SPEC 1.1 index builders validate like the ops (issue 11): a float position, a python list, a window
of 0 or 2.5, a ratio the model does not have, a wrong row count or another device is refused with the
argument's name, the expected and the actual value, instead of being truncated or failing in torch."""
from __future__ import annotations

import pytest
import torch

import dsv4_kernels as dk
from dsv4_kernels.ops import indices
from dsv4_kernels.reference import indices as ref

POS = torch.arange(5)
META = torch.device("meta")

BAD = [
    (dk.window_indices, dict(positions=POS.float()), "positions: expected dtype torch.int32 or torch.int64, got torch.float32"),
    (dk.window_indices, dict(positions=[0, 1, 2]), "positions: expected a torch.Tensor, got list"),
    (dk.window_indices, dict(positions=POS[None]), "positions: expected 1 dimensions, got 2"),
    (dk.window_indices, dict(positions=POS, window=0), "window: expected an int >= 1, got 0"),
    (dk.window_indices, dict(positions=POS, window=2.5), "window: expected an int, got float 2.5"),
    (dk.window_indices, dict(positions=POS, ring=1), "ring: expected a bool, got int 1"),
    (dk.window_indices, dict(positions=POS, offset=1.0), "offset: expected an int or a [5] int64 tensor, got float"),
    (dk.window_indices, dict(positions=POS, offset=torch.arange(4)), "offset: expected shape (5,), got (4,)"),
    (dk.window_indices, dict(positions=POS, offset=torch.arange(5, device=META)),
     "offset: expected device cpu (the device of positions), got meta"),
    (dk.compressed_indices, dict(positions=POS, ratio=5), "ratio: expected one of 0, 1, 4, 128, got 5"),
    (dk.compressed_indices, dict(positions=POS, ratio=4.0), "ratio: expected an int, got float 4.0"),
    (dk.compressed_indices, dict(positions=POS, ratio=4, width=-1), "width: expected an int >= 0, got -1"),
    (dk.selected_compressed_indices, dict(positions=POS, ratio=4, selection=torch.zeros(4, 2, dtype=torch.int64)),
     "selection: expected shape (5, *), got (4, 2)"),
    (dk.selected_compressed_indices, dict(positions=POS, ratio=4, selection=torch.zeros(5, 2)),
     "selection: expected dtype torch.int32 or torch.int64, got torch.float32"),
    (dk.selected_compressed_indices, dict(positions=POS, ratio=4, selection=[[0]] * 5),
     "selection: expected a torch.Tensor, got list"),
    (dk.compact_indices, dict(indices=torch.zeros(5, dtype=torch.int64)), "indices: expected 2 dimensions, got 1"),
    (dk.compact_indices, dict(indices=torch.zeros(5, 3)), "indices: expected dtype torch.int32 or torch.int64"),
    (dk.build_sparse_indices, dict(positions=POS, ratio=3), "ratio: expected one of 0, 1, 4, 128, got 3"),
    (dk.build_sparse_indices, dict(positions=POS, ratio=4, decode="yes"), "decode: expected a bool, got str 'yes'"),
    (dk.build_sparse_indices, dict(positions=POS, ratio=128, num_compressed=2.0),
     "num_compressed: expected an int, got float 2.0"),
    (dk.build_sparse_indices, dict(positions=POS, ratio=4, compressed_selection=torch.zeros(6, 2, dtype=torch.int32)),
     "compressed_selection: expected shape (5, *), got (6, 2)"),
    (dk.build_sparse_indices, dict(positions=POS, ratio=4, compressed_offset="5"),
     "compressed_offset: expected None, an int or a [5] int64 tensor, got str '5'"),
    (dk.build_sparse_indices, dict(positions=POS, ratio=128, raw_offset=torch.zeros(5, dtype=torch.int32)),
     "raw_offset: expected dtype torch.int64, got torch.int32"),
    (dk.build_sparse_indices, dict(positions=POS, ratio=0, window=0), "window: expected an int >= 1, got 0"),
]


@pytest.mark.parametrize("fn, kwargs, message", BAD, ids=[f"{f.__name__}-{i}" for i, (f, _, _) in enumerate(BAD)])
def test_bad_argument_is_refused(fn, kwargs, message):
    with pytest.raises(ValueError) as err:
        fn(**kwargs)
    assert message in str(err.value)


def test_the_checked_helpers_return_what_the_references_return():
    pos = torch.tensor([-1, 0, 3, 130, 257])
    selection = torch.tensor([[0, 5], [0, -1], [0, 1], [31, 32], [64, 63]])
    offset = torch.arange(5) * 1000
    assert indices.build_sparse_indices is dk.build_sparse_indices
    for got, want in [
        (dk.window_indices(pos, 128, True, offset), ref.window_indices(pos, 128, True, offset)),
        (dk.compressed_indices(pos, 128, 3), ref.compressed_indices(pos, 128, 3)),
        (dk.selected_compressed_indices(pos, 4, selection, 7), ref.selected_compressed_indices(pos, 4, selection, 7)),
        (dk.build_sparse_indices(pos, 4, decode=True, compressed_selection=selection, raw_offset=offset),
         ref.build_sparse_indices(pos, 4, decode=True, compressed_selection=selection, raw_offset=offset)),
        (dk.build_sparse_indices(pos, 0), ref.build_sparse_indices(pos, 0)),
        (indices.num_visible_compressed(pos, 4), ref.num_visible_compressed(pos, 4)),
    ]:
        assert torch.equal(got, want)
    compacted, lengths = dk.compact_indices(dk.build_sparse_indices(pos, 128))
    assert lengths.tolist() == [0, 1, 4, 129, 130]
