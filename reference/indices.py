"""Index lists for sparse MQA (SPEC 1.1): which KV rows each query attends to.

A query at position p attends to a window part and a compressed part, concatenated in that order:

- window: positions max(0, p - window + 1) .. p in ascending order, then -1 padding, always `window`
  slots (128 in V4). In prefill the raw row of position q is `raw_offset + q`; in decode the raw KV
  lives in a ring buffer of `window` slots and the row is `raw_offset + q % window`.
- compressed: entry j summarises positions [j*r, (j+1)*r - 1] and is visible to p only when
  (j + 1) * r <= p + 1 (its block is complete, the current token included). Entry j sits at row
  `compressed_offset + j`. Ratio 128 (HCA) uses every visible entry in order j = 0, 1, ...; ratio 4
  (CSA) uses the lightning indexer's top-k selection, given by the caller, with invisible entries
  masked to -1; ratio 0 or 1 (no compression) has no compressed part.

-1 marks an unused slot everywhere; sparse_mqa ignores it. A row whose position is negative (a padding
row of a batch) gets only -1.
"""
from __future__ import annotations

import torch

__all__ = ["WINDOW", "window_indices", "num_visible_compressed", "compressed_indices",
           "selected_compressed_indices", "compact_indices", "build_sparse_indices"]

WINDOW = 128

def _column(offset, like: torch.Tensor) -> torch.Tensor:
    """An int or [T] tensor offset as an int64 [T, 1] column on like's device."""
    return torch.as_tensor(offset, dtype=torch.int64, device=like.device).expand(like.shape[0])[:, None]


def window_indices(positions: torch.Tensor, window: int = WINDOW, ring: bool = False,
                   offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Sliding-window part: the current token and up to window - 1 previous raw tokens.

    Args:
        positions: [T] int64 (or int32) position of each query in its sequence.
        window: number of slots (128 in V4); also the ring buffer size when ring is True.
        ring: False for prefill (raw row of position q is offset + q); True for decode (raw KV in a ring
            buffer of `window` slots, row offset + q % window).
        offset: int or [T] int64, row of raw position 0 (prefill) or of ring slot 0 (decode) in the pool.
    Returns:
        [T, window] int32. Slot w holds position max(0, p - window + 1) + w if that is <= p, else -1, so
        valid entries come first in ascending position order (oldest first, also across the ring's
        wrap-around). T = 0 gives [0, window].
    """
    p = positions.long()[:, None]                                            # [T, 1]
    q = (p - window + 1).clamp(min=0) + torch.arange(window, device=positions.device)[None, :]
    rows = q % window if ring else q
    rows = rows + _column(offset, positions)
    return torch.where(q <= p, rows, -1).to(torch.int32)


def num_visible_compressed(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Number of compressed entries a query at position p may use: floor((p + 1) / ratio), 0 when p < 0.

    Args:
        positions: [T] int64 (or int32).
        ratio: compression ratio; 0 or 1 means no compression (always 0 entries).
    Returns:
        [T] int64; entries 0 .. n-1 are exactly those with (j + 1) * ratio <= p + 1.
    """
    p = positions.long()
    if ratio <= 1:
        return torch.zeros_like(p)
    return torch.div(p + 1, ratio, rounding_mode="floor").clamp(min=0)


def compressed_indices(positions: torch.Tensor, ratio: int, width: int | None = None,
                       offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Compressed part with every visible entry (HCA layers, ratio 128).

    Args:
        positions: [T] int64 (or int32) query positions.
        ratio: compression ratio (> 1; 0 or 1 gives width 0 unless width is given, then all -1).
        width: number of slots. None means the largest visible count over the rows (0 for T = 0); a
            fixed width (e.g. max context // ratio) keeps decode shapes static. Rows with more visible
            entries than width keep the first width entries.
        offset: int or [T] int64, pool row of compressed entry 0.
    Returns:
        [T, width] int32: slot j holds offset + j if entry j is visible, else -1.
    """
    n = num_visible_compressed(positions, ratio)
    if width is None:
        width = int(n.max()) if n.numel() else 0
    j = torch.arange(width, device=positions.device)[None, :]
    return torch.where(j < n[:, None], j + _column(offset, positions), -1).to(torch.int32)


def selected_compressed_indices(positions: torch.Tensor, ratio: int, selection: torch.Tensor,
                                offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Compressed part from an indexer top-k selection (CSA layers, ratio 4), causality enforced.

    Args:
        positions: [T] int64 (or int32) query positions.
        ratio: compression ratio (> 1).
        selection: [T, k] integer entry ids j (0-based within the compressed entries) in the caller's
            order; negative means no entry. Duplicates are kept (sparse_mqa counts each occurrence).
        offset: int or [T] int64, pool row of compressed entry 0.
    Returns:
        [T, k] int32: offset + j where j >= 0 and (j + 1) * ratio <= p + 1, else -1; order kept.
    """
    j = selection.long()
    visible = (j >= 0) & (j < num_visible_compressed(positions, ratio)[:, None])
    return torch.where(visible, j + _column(offset, positions), -1).to(torch.int32)


def compact_indices(indices: torch.Tensor):
    """Move each row's valid (>= 0) entries to the front, keeping their order, and count them.

    sparse_mqa(..., compacted, topk_length=lengths) equals sparse_mqa(..., indices): the same entries
    are used, and entries past the length are -1 anyway. Entries >= N cannot be recognised here and
    count as valid (sparse_mqa still ignores them).

    Args:
        indices: [T, K] integer index rows.
    Returns:
        (compacted [T, K] int32 with -1 after the valid entries, lengths [T] int32).
    """
    valid = indices >= 0
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
    compacted = torch.where(valid.gather(-1, order), indices.gather(-1, order), -1)
    return compacted.to(torch.int32), valid.sum(dim=-1).to(torch.int32)


def build_sparse_indices(positions: torch.Tensor, ratio: int, *, decode: bool = False,
                         compressed_selection: torch.Tensor | None = None, num_compressed: int | None = None,
                         raw_offset: int | torch.Tensor = 0,
                         compressed_offset: int | torch.Tensor | None = None,
                         window: int = WINDOW) -> torch.Tensor:
    """Full index list of SPEC 1.1: window part then compressed part, for prefill or batched decode.

    Pool layouts (rows of the flat `kv` that sparse_mqa reads):
        prefill, one sequence: [raw tokens 0 .. S-1 | compressed entries 0 .. S//r - 1]; the defaults
            (raw_offset 0, compressed_offset = last position + 1 = S) describe it when positions are
            arange(S), or the tail positions of a chunked prefill whose pool holds all S raw tokens.
        decode, one sequence: [ring buffer of `window` slots | compressed entries]; position q's raw KV
            is in slot q % window. Default compressed_offset = raw_offset + window.
        batches: give raw_offset and compressed_offset per row ([T] int64) to place each sequence's
            region anywhere in the pool, e.g. sequence b's ring at b * (window + E) and its entries at
            b * (window + E) + window for a per-sequence capacity of E entries.

    Args:
        positions: [T] int64 (or int32) position of each query in its own sequence (prefill: one row
            per token; decode: one row per sequence). A negative position is a padding row: all -1.
        ratio: compress ratio of the layer: 0 or 1 (window only), 4 (CSA) or 128 (HCA); any r > 1 works.
        decode: False reads raw rows directly, True through the ring buffer.
        compressed_selection: [T, k] entry ids picked by the indexer (CSA); invisible and negative ids
            become -1. None means every visible entry (HCA). Ignored when ratio <= 1.
        num_compressed: width of the all-visible compressed part; None means the largest visible count
            over the rows. Ignored when compressed_selection is given or ratio <= 1.
        raw_offset: int or [T] int64, pool row of raw position 0 (prefill) or ring slot 0 (decode).
        compressed_offset: int or [T] int64, pool row of compressed entry 0; None gives the
            single-sequence defaults above.
        window: window length and ring size (128 in V4).
    Returns:
        [T, window + C] int32 with C = 0 (ratio <= 1), k (selection given) or the all-visible width.
        T = 0 gives [0, window + C] (C = 0 unless fixed by the selection or num_compressed).
    """
    parts = [window_indices(positions, window, ring=decode, offset=raw_offset)]
    if ratio > 1:
        if compressed_offset is None:
            if decode:
                compressed_offset = _column(raw_offset, positions)[:, 0] + window
            else:
                last = int(positions.max()) if positions.numel() else -1
                compressed_offset = _column(raw_offset, positions)[:, 0] + last + 1
        if compressed_selection is not None:
            parts.append(selected_compressed_indices(positions, ratio, compressed_selection, compressed_offset))
        else:
            parts.append(compressed_indices(positions, ratio, num_compressed, compressed_offset))
    return torch.cat(parts, dim=1)
