"""The SPEC 1.1 index builders as public helpers: the reference functions (reference/indices.py) behind
the same argument checks as the ops, so a float position, a python list, a window of 0 or a wrong row
count is refused with the argument's name, the expected and the actual value instead of being truncated
or failing deep inside torch. They read no tensor values except where the docstring says so
(build_sparse_indices' default compressed offset, compressed_indices with width=None)."""
from __future__ import annotations

import torch

from dsv4_kernels.ops import _checks
from dsv4_kernels.reference import indices as ref
from dsv4_kernels.reference.indices import WINDOW

__all__ = ["WINDOW", "window_indices", "num_visible_compressed", "compressed_indices",
           "selected_compressed_indices", "compact_indices", "build_sparse_indices"]

RATIOS = (0, 1, 4, 128)  # SPEC 0: 0 and 1 mean no compression
INT_DTYPES = (torch.int32, torch.int64)


def _positions(positions) -> int:
    _checks.tensor("positions", positions, INT_DTYPES, ndim=1, contiguous=False)
    return positions.shape[0]


def _ratio(ratio) -> None:
    _checks.integer("ratio", ratio)
    _checks.one_of("ratio", ratio, RATIOS)


def _offset(name: str, offset, positions: torch.Tensor, optional: bool = False) -> None:
    """An int, or a [T] int64 tensor on the device of positions."""
    if offset is None and optional:
        return
    if isinstance(offset, torch.Tensor):
        _checks.tensor(name, offset, torch.int64, ndim=1, contiguous=False)
        _checks.shape(name, offset, (positions.shape[0],))
        _checks.same_device(positions=positions, **{name: offset})
        return
    if isinstance(offset, bool) or not isinstance(offset, int):
        expected = "None, " if optional else ""
        raise ValueError(f"{name}: expected {expected}an int or a [{positions.shape[0]}] int64 tensor, "
                         f"got {type(offset).__name__} {offset!r}")


def _index_table(name: str, x, rows: int | None = None, like: torch.Tensor | None = None) -> None:
    _checks.tensor(name, x, INT_DTYPES, ndim=2, contiguous=False)
    if rows is not None:
        _checks.shape(name, x, (rows, None))
    if like is not None:
        _checks.same_device(positions=like, **{name: x})


def window_indices(positions: torch.Tensor, window: int = WINDOW, ring: bool = False,
                   offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Sliding-window part: the current token and up to window - 1 previous raw tokens.

    positions: [T] int32 or int64 tensor, each query's position in its sequence (negative: a padding
        row, all -1). window: int >= 1 (128 in V4), also the ring size when ring is True. ring: bool,
        False for prefill (row offset + q), True for decode (row offset + q % window). offset: int or
        [T] int64 on positions' device.
    Returns [T, window] int32 (reference.indices.window_indices). Raises ValueError on a bad argument.
    """
    _positions(positions)
    _checks.integer("window", window, minimum=1)
    _checks.boolean("ring", ring)
    _offset("offset", offset, positions)
    return ref.window_indices(positions, window, ring, offset)


def num_visible_compressed(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """floor((p + 1) / ratio) compressed entries visible at position p (0 for p < 0 or ratio 0 and 1).

    positions: [T] int32 or int64 tensor. ratio: 0, 1, 4 or 128. Returns [T] int64.
    """
    _positions(positions)
    _ratio(ratio)
    return ref.num_visible_compressed(positions, ratio)


def compressed_indices(positions: torch.Tensor, ratio: int, width: int | None = None,
                       offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Compressed part with every visible entry (HCA layers).

    positions: [T] int32 or int64 tensor. ratio: 0, 1, 4 or 128. width: None (the largest visible count,
    read back from the device: not for CUDA-graph capture) or an int >= 0. offset: int or [T] int64.
    Returns [T, width] int32 (reference.indices.compressed_indices).
    """
    _positions(positions)
    _ratio(ratio)
    if width is not None:
        _checks.integer("width", width, minimum=0)
    _offset("offset", offset, positions)
    return ref.compressed_indices(positions, ratio, width, offset)


def selected_compressed_indices(positions: torch.Tensor, ratio: int, selection: torch.Tensor,
                                offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Compressed part from an indexer top-k selection (CSA layers), causality enforced.

    positions: [T] int32 or int64 tensor. ratio: 0, 1, 4 or 128. selection: [T, k] int32 or int64 entry
    ids on positions' device (negative: no entry). offset: int or [T] int64.
    Returns [T, k] int32 (reference.indices.selected_compressed_indices).
    """
    T = _positions(positions)
    _ratio(ratio)
    _index_table("selection", selection, rows=T, like=positions)
    _offset("offset", offset, positions)
    return ref.selected_compressed_indices(positions, ratio, selection, offset)


def compact_indices(indices: torch.Tensor):
    """Valid (>= 0) entries of each row moved to the front, with the row lengths.

    indices: [T, K] int32 or int64 tensor. Returns (compacted [T, K] int32, lengths [T] int32)
    (reference.indices.compact_indices).
    """
    _index_table("indices", indices)
    return ref.compact_indices(indices)


def build_sparse_indices(positions: torch.Tensor, ratio: int, *, decode: bool = False,
                         compressed_selection: torch.Tensor | None = None, num_compressed: int | None = None,
                         raw_offset: int | torch.Tensor = 0,
                         compressed_offset: int | torch.Tensor | None = None,
                         window: int = WINDOW) -> torch.Tensor:
    """The full SPEC 1.1 index list (window part, then compressed part) for prefill or batched decode.

    positions: [T] int32 or int64 tensor (negative: padding row). ratio: 0, 1 (window only), 4 or 128.
    decode: bool. compressed_selection: None or [T, k] int32/int64 on positions' device.
    num_compressed: None or an int >= 0. raw_offset: int or [T] int64. compressed_offset: None, int or
    [T] int64 (None in prefill reads the largest position back from the device). window: int >= 1.
    Returns [T, window + C] int32; the layouts are in reference.indices.build_sparse_indices.
    """
    T = _positions(positions)
    _ratio(ratio)
    _checks.boolean("decode", decode)
    if compressed_selection is not None:
        _index_table("compressed_selection", compressed_selection, rows=T, like=positions)
    if num_compressed is not None:
        _checks.integer("num_compressed", num_compressed, minimum=0)
    _offset("raw_offset", raw_offset, positions)
    _offset("compressed_offset", compressed_offset, positions, optional=True)
    _checks.integer("window", window, minimum=1)
    return ref.build_sparse_indices(positions, ratio, decode=decode, compressed_selection=compressed_selection,
                                    num_compressed=num_compressed, raw_offset=raw_offset,
                                    compressed_offset=compressed_offset, window=window)
