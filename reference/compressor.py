"""Fused compressor update (SPEC 2): every r raw tokens pooled into one compressed KV entry.

Pooling is a per-channel softmax over rows of (kv, score + ape) followed by a weighted sum. Ratio 4
overlaps windows: entry j pools the A halves ([:d]) of block j-1 with the B halves ([d:]) of block j.
The decode state holds the rows of the block being filled (and, for ratio 4, the previous block).
After pooling come RMSNorm, RoPE on the last 64 dims at position j*r, and for d = 512 the FP8 cache
store; `indexer_cache_quantize` is the d = 128 (indexer) cache form.
"""
from __future__ import annotations

import torch

from .formats import quantize_mxfp4, store_kv_cache_fp8
from .transforms import apply_rope_interleaved

__all__ = [
    "compressor_init_state",
    "compressor_prefill",
    "compressor_prefill_batched",
    "compressor_decode",
    "compressor_norm_rope",
    "indexer_cache_quantize",
    "decode_rows_valid",
    "batched_sequences_valid",
    "walsh_hadamard_fp32",
]

ROPE_DIM = 64
INDEXER_DIM = 128
FP4_BLOCK = 32


def _coff(ratio: int) -> int:
    return 2 if ratio == 4 else 1


def _pool(kv_rows: torch.Tensor, score_rows: torch.Tensor) -> torch.Tensor:
    """[..., R, d] fp32 each -> [..., d] fp32: softmax over the R rows per channel, weighted sum of kv.

    Computed in fp64 and rounded once. Rows with score -inf get weight 0 (their kv is 0).
    """
    weights = torch.softmax(score_rows.double(), dim=-2)
    return (weights * kv_rows.double()).sum(dim=-2).float()


def _overlap_rows(prev: torch.Tensor, cur: torch.Tensor, d: int) -> torch.Tensor:
    """Ratio 4 pooling rows: [..., 4, 2d] previous block and [..., 4, 2d] current block -> [..., 8, d]."""
    return torch.cat([prev[..., :d], cur[..., d:]], dim=-2)


def _finish(pooled, positions, norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size, cache_slots):
    """Optional fused stages on pooled [n, d] fp32: norm + RoPE (-> bf16), then the FP8 cache store."""
    if norm_weight is None:
        return pooled
    out = compressor_norm_rope(pooled, norm_weight, rope_cos, rope_sin, positions)
    if kv_cache is not None:
        store_kv_cache_fp8(kv_cache, cache_slots, out, block_size=cache_block_size)
    return out


def compressor_init_state(ratio: int, d: int, slots: int | None = None,
                          device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh decode state (SPEC 2): kv = 0, score = -inf.

    Args:
        ratio: compression ratio r, 4 or 128.
        d: entry width, 512 (attention compressor) or 128 (indexer compressor).
        slots: number of sequences; None gives a single state without the leading dim.
        device: where to allocate.
    Returns:
        (kv_state, score_state), fp32, each [coff*r, coff*d] or [slots, coff*r, coff*d] with
        coff = 2 for r = 4 and 1 for r = 128.
    """
    coff = _coff(ratio)
    shape = (coff * ratio, coff * d) if slots is None else (slots, coff * ratio, coff * d)
    kv_state = torch.zeros(shape, dtype=torch.float32, device=device)
    score_state = torch.full(shape, float("-inf"), dtype=torch.float32, device=device)
    return kv_state, score_state


def compressor_prefill(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int,
                       norm_weight: torch.Tensor | None = None, rope_cos: torch.Tensor | None = None,
                       rope_sin: torch.Tensor | None = None, kv_cache: torch.Tensor | None = None,
                       cache_block_size: int = 64, cache_slots: torch.Tensor | None = None):
    """Compress the S tokens of one sequence from position 0, and build its decode state.

    Args:
        kv: [S, coff*d] fp32, the kv projections of tokens 0..S-1.
        score: [S, coff*d] fp32, the gate projections (score before the ape bias).
        ape: [r, coff*d] fp32; token t's score gets ape[t mod r].
        ratio: r, 4 (overlapping windows, coff = 2) or 128 (coff = 1). d = kv.shape[-1] // coff.
        norm_weight: optional [d] fp32; with rope_cos and rope_sin selects the fused form.
        rope_cos, rope_sin: optional [P, 32] fp32 tables indexed by position, P > (S//r - 1) * r.
        kv_cache: optional uint8 FP8 cache pages (SPEC 1.2, d = 512 only, fused form only), written
            in place: entry i goes to flat slot cache_slots[i] (page slot // cache_block_size).
        cache_block_size: tokens per cache page.
        cache_slots: [S//r] int64 flat cache slots, needed with kv_cache.
    Returns:
        entries: [S//r, d], fp32, or bf16 (compressor_norm_rope of the fp32 entries at positions
            j*r) in the fused form. Entry j pools tokens [j*r, (j+1)*r); for r = 4 it pools the A
            halves of block j-1 (kv 0, score -inf for j = 0) and the B halves of block j.
        kv_state, score_state: [coff*r, coff*d] fp32, the decode state after S tokens (SPEC 2):
            r = 4: rows 0:4 hold the last complete block (kv, score + ape), or the initial kv 0 /
            score -inf when S < 4; rows 4 .. 4 + S mod 4 hold the incomplete block.
            r = 128: rows 0 .. S mod 128 hold the incomplete block.
            The remaining rows are unspecified by the spec; here they hold kv 0, score -inf.
    Edge cases: S = 0 returns [0, d] entries and a fresh state; S < r returns no entries.
    """
    coff = _coff(ratio)
    seq_len, width = kv.shape
    d = width // coff
    n = seq_len // ratio
    cutoff = n * ratio
    kv = kv.float()
    phase = torch.arange(seq_len, device=kv.device) % ratio
    biased = score.float() + ape.float()[phase]

    kv_blocks = kv[:cutoff].reshape(n, ratio, width)
    sc_blocks = biased[:cutoff].reshape(n, ratio, width)
    if coff == 2:
        kv_prev = torch.cat([torch.zeros_like(kv_blocks[:1]), kv_blocks[:-1]])
        sc_prev = torch.cat([torch.full_like(sc_blocks[:1], float("-inf")), sc_blocks[:-1]])
        pooled = _pool(_overlap_rows(kv_prev, kv_blocks, d), _overlap_rows(sc_prev, sc_blocks, d))
    else:
        pooled = _pool(kv_blocks, sc_blocks)
    positions = torch.arange(n, device=kv.device, dtype=torch.int64) * ratio
    entries = _finish(pooled, positions, norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size,
                      cache_slots)

    kv_state, score_state = compressor_init_state(ratio, d, device=kv.device)
    offset = ratio if coff == 2 else 0
    if coff == 2 and n > 0:
        kv_state[:ratio] = kv_blocks[-1]
        score_state[:ratio] = sc_blocks[-1]
    rem = seq_len - cutoff
    kv_state[offset:offset + rem] = kv[cutoff:]
    score_state[offset:offset + rem] = biased[cutoff:]
    return entries, kv_state, score_state


def batched_sequences_valid(kv_state: torch.Tensor, cu_seqlens: torch.Tensor, start_positions: torch.Tensor,
                            ratio: int, slot_ids: torch.Tensor, rope_cos: torch.Tensor | None = None) -> torch.Tensor:
    """[B] bool: the sequences of a batched prefill that take part. A sequence is invalid (nothing read,
    nothing written, nothing emitted) when its slot id is outside [0, slots), its start position is
    negative, or, in the fused form, its last position p gives p + 1 - r past the last row of the RoPE
    tables (decode's rule for its one token). Never wrapped."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp(min=0)
    valid = (slot_ids >= 0) & (slot_ids < kv_state.shape[0]) & (start_positions >= 0)
    if rope_cos is not None:
        valid &= start_positions + lengths - ratio < rope_cos.shape[0]
    return valid


def _state_rows(kv_state, score_state, positions, start, ratio, coff):
    """The state rows holding positions q < start (SPEC 2 layout): the block of `start` sits at rows
    off + q mod r, the block before it (ratio 4) at rows q mod r; q < 0 is the virtual block (kv 0,
    score -inf), never read from the state."""
    offset = ratio if coff == 2 else 0
    in_start_block = positions // ratio == start // ratio
    rows = torch.where(in_start_block, offset, 0) + positions % ratio
    kv = kv_state[rows]
    sc = score_state[rows]
    virtual = (positions < 0)[:, None]
    return torch.where(virtual, 0.0, kv), torch.where(virtual, float("-inf"), sc)


def compressor_prefill_batched(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int,
                               cu_seqlens: torch.Tensor, kv_state: torch.Tensor, score_state: torch.Tensor,
                               start_positions: torch.Tensor | None = None, slot_ids: torch.Tensor | None = None,
                               norm_weight: torch.Tensor | None = None, rope_cos: torch.Tensor | None = None,
                               rope_sin: torch.Tensor | None = None, kv_cache: torch.Tensor | None = None,
                               cache_block_size: int = 64, cache_slots: torch.Tensor | None = None):
    """Prefill of a ragged batch: B chunks of tokens, each continuing its sequence from its own state.

    Args:
        kv, score: [N, coff*d] fp32 or bf16 (upcast first), the tokens of all chunks back to back;
            chunk b is rows cu_seqlens[b] .. cu_seqlens[b+1] - 1 (clamped to [0, N]).
        ape: [r, coff*d] fp32.
        ratio: r, 4 or 128.
        cu_seqlens: [B + 1] int32 or int64, non-decreasing cumulative chunk lengths.
        kv_state, score_state: [slots, coff*r, coff*d] fp32, read for the positions before each chunk
            and updated in place to the state after it (SPEC 2 layout).
        start_positions: [B] int64, the position of each chunk's first token (the length of the prefix
            already in the state); default zeros. A chunk starting at 0 never reads its state; when it
            has tokens it starts a new sequence there (ratio 4 rows 0:4 kv 0 / score -inf until a block
            completes).
        slot_ids: [B] int64, the state slot of each chunk; default arange(B).
        norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size: as in compressor_prefill.
        cache_slots: [N] int64 flat cache slot per token, read only where the token emits.
    Returns:
        entries: [N, d] fp32 (bf16 in the fused form): the row of the token at position p holds entry
            p // r when (p + 1) mod r == 0 (RoPE at p + 1 - r), zeros elsewhere.
        emitted: [N] bool.
    Tokens outside every valid chunk give zero rows and do not emit (batched_sequences_valid).
    """
    coff = _coff(ratio)
    total, width = kv.shape
    d = width // coff
    device = kv.device
    batch = cu_seqlens.shape[0] - 1
    if start_positions is None:
        start_positions = torch.zeros(batch, dtype=torch.int64, device=device)
    if slot_ids is None:
        slot_ids = torch.arange(batch, device=device)
    cu = cu_seqlens.to(torch.int64).clamp(0, total)
    valid = batched_sequences_valid(kv_state, cu, start_positions, ratio, slot_ids, rope_cos)
    kv, score, ape = kv.float(), score.float(), ape.float()
    offset = ratio if coff == 2 else 0
    entry_rows, entry_positions, pooled_rows = [], [], []
    for b in valid.nonzero()[:, 0].tolist():
        lo, hi = int(cu[b]), max(int(cu[b]), int(cu[b + 1]))
        start, slot = int(start_positions[b]), int(slot_ids[b])
        end = start + hi - lo
        first_pos = (start // ratio - (coff - 1)) * ratio     # the earliest position an entry pools
        chunk_pos = torch.arange(start, end, device=device)
        x_kv, x_sc = kv[lo:hi], score[lo:hi] + ape[chunk_pos % ratio]
        if start > 0 and first_pos < start:   # positions before the chunk come from the state
            before = torch.arange(first_pos, start, device=device)
            s_kv, s_sc = _state_rows(kv_state[slot], score_state[slot], before, start, ratio, coff)
            x_kv, x_sc = torch.cat([s_kv, x_kv]), torch.cat([s_sc, x_sc])
        else:
            first_pos = start
        base = first_pos // ratio            # block index of x row 0 (first_pos is a multiple of r here)
        nblocks = end // ratio - base
        blocks_kv = x_kv[:nblocks * ratio].reshape(nblocks, ratio, width)
        blocks_sc = x_sc[:nblocks * ratio].reshape(nblocks, ratio, width)
        first_entry = start // ratio
        if nblocks > 0 and end // ratio > first_entry:
            if coff == 2:
                prev_kv = torch.cat([torch.zeros_like(blocks_kv[:1]), blocks_kv[:-1]])
                prev_sc = torch.cat([torch.full_like(blocks_sc[:1], float("-inf")), blocks_sc[:-1]])
                pooled = _pool(_overlap_rows(prev_kv, blocks_kv, d), _overlap_rows(prev_sc, blocks_sc, d))
            else:
                pooled = _pool(blocks_kv, blocks_sc)
            js = torch.arange(first_entry, end // ratio, device=device)
            pooled_rows.append(pooled[js - base])
            entry_positions.append(js * ratio)
            entry_rows.append(lo + (js + 1) * ratio - 1 - start)
        if coff == 2 and end // ratio > 0:   # rows 0:4 <- the last complete block
            kv_state[slot, :ratio] = blocks_kv[-1]
            score_state[slot, :ratio] = blocks_sc[-1]
        elif coff == 2 and start == 0 and end > 0:   # a new sequence: entry 0's previous block is empty
            kv_state[slot, :ratio] = 0.0
            score_state[slot, :ratio] = float("-inf")
        tail = torch.arange(max(start, end - end % ratio), end, device=device)
        kv_state[slot, offset + tail % ratio] = kv[lo + tail - start]
        score_state[slot, offset + tail % ratio] = score[lo + tail - start] + ape[tail % ratio]

    rows = torch.cat(entry_rows) if entry_rows else torch.zeros(0, dtype=torch.int64, device=device)
    positions = torch.cat(entry_positions) if entry_positions else rows
    pooled = torch.cat(pooled_rows) if pooled_rows else torch.zeros(0, d, device=device)
    emit_cache_slots = None if cache_slots is None else cache_slots[rows]
    finished = _finish(pooled, positions, norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size,
                       emit_cache_slots)
    entries = torch.zeros(total, d, dtype=finished.dtype, device=device)
    entries[rows] = finished
    emitted = torch.zeros(total, dtype=torch.bool, device=device)
    emitted[rows] = True
    return entries, emitted


def compressor_decode(kv_state: torch.Tensor, score_state: torch.Tensor, kv: torch.Tensor,
                      score: torch.Tensor, ape: torch.Tensor, positions: torch.Tensor, ratio: int,
                      slot_ids: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                      rope_cos: torch.Tensor | None = None, rope_sin: torch.Tensor | None = None,
                      kv_cache: torch.Tensor | None = None, cache_block_size: int = 64,
                      cache_slots: torch.Tensor | None = None):
    """One decode step for B sequences: write each token into its state, pool where a block completes.

    Args:
        kv_state, score_state: [slots, coff*r, coff*d] fp32, updated in place (SPEC 2 layout).
        kv, score: [B, coff*d] fp32, this step's projections (score before the ape bias).
        ape: [r, coff*d] fp32.
        positions: [B] int64 >= 0, the position p of each token in its sequence.
        ratio: r, 4 or 128.
        slot_ids: [B] int64, distinct, the state slot of each sequence; default arange(B).
        A row with a slot id outside [0, slots), a negative position, or (fused form) an entry
        position p + 1 - r past the RoPE tables is invalid: it reads and writes nothing, does not
        emit, and its entries row is zero (decode_rows_valid).
        norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size: as in compressor_prefill.
        cache_slots: [B] int64 flat cache slots; read only where a row emits.
    Returns:
        entries: [B, d] fp32 (bf16 in the fused form); row b holds entry p // r when row b emits,
            else zeros. The fused form applies RoPE at position p + 1 - r.
        emitted: [B] bool, (p + 1) mod r == 0.
    State update: row (r if r == 4 else 0) + p mod r <- (kv, score + ape[p mod r]); on emission
    r = 128 pools rows 0:128; r = 4 pools rows[0:4, :d] ++ rows[4:8, d:] and then copies rows
    4:8 into rows 0:4 (rows 4:8 keep their values, unspecified until rewritten).
    Edge cases: B = 0 returns [0, d] entries and [0] emitted and leaves the states untouched.
    """
    coff = _coff(ratio)
    batch, width = kv.shape
    d = width // coff
    device = kv.device
    if slot_ids is None:
        slot_ids = torch.arange(batch, device=device)
    valid = decode_rows_valid(kv_state, positions, ratio, slot_ids, rope_cos)
    rows = valid.nonzero()[:, 0]
    slots, phase = slot_ids[rows], positions[rows] % ratio
    offset = ratio if coff == 2 else 0
    kv_state[slots, offset + phase] = kv[rows].float()
    score_state[slots, offset + phase] = score[rows].float() + ape.float()[phase]

    emitted = valid & (positions % ratio == ratio - 1)
    emit_slots = slot_ids[emitted]
    kv_rows = kv_state[emit_slots]
    sc_rows = score_state[emit_slots]
    if coff == 2:
        pooled = _pool(_overlap_rows(kv_rows[:, :ratio], kv_rows[:, ratio:], d),
                       _overlap_rows(sc_rows[:, :ratio], sc_rows[:, ratio:], d))
        kv_state[emit_slots, :ratio] = kv_rows[:, ratio:]
        score_state[emit_slots, :ratio] = sc_rows[:, ratio:]
    else:
        pooled = _pool(kv_rows, sc_rows)
    emit_cache_slots = None if cache_slots is None else cache_slots[emitted]
    finished = _finish(pooled, positions[emitted] + 1 - ratio, norm_weight, rope_cos, rope_sin,
                       kv_cache, cache_block_size, emit_cache_slots)
    entries = torch.zeros(batch, d, dtype=finished.dtype, device=device)
    entries[emitted] = finished
    return entries, emitted


def decode_rows_valid(kv_state: torch.Tensor, positions: torch.Tensor, ratio: int, slot_ids: torch.Tensor,
                      rope_cos: torch.Tensor | None = None) -> torch.Tensor:
    """[B] bool: the decode rows that take part in the step. A row is invalid (nothing read, nothing
    written, not emitted) when its slot id is outside [0, slots), its position is negative, or, in the
    fused form, its entry's RoPE position p + 1 - r is past the last row of the tables. Never wrapped."""
    valid = (slot_ids >= 0) & (slot_ids < kv_state.shape[0]) & (positions >= 0)
    if rope_cos is not None:
        valid &= positions + 1 - ratio < rope_cos.shape[0]
    return valid


def compressor_norm_rope(entries: torch.Tensor, norm_weight: torch.Tensor, rope_cos: torch.Tensor,
                         rope_sin: torch.Tensor, positions: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm then interleaved RoPE on the last 64 dims (SPEC 2, 6).

    Args:
        entries: [n, d] fp32 pooled entries, d >= 64.
        norm_weight: [d] fp32.
        rope_cos, rope_sin: [P, 32] tables indexed by position (fp32, or any float dtype).
        positions: [n] int64 in [0, P), the RoPE position of each entry (j*r for entry j); a row
            whose position is outside [0, P) reads no table row and comes out zero (never wrapped).
        eps: RMSNorm epsilon.
    Returns:
        [n, d] bf16: y = bf16(x * rsqrt(mean(x^2) + eps) * w) in fp32 math; then the last 64 dims,
        as pairs (y[2i], y[2i+1]), are rotated by the angle at `positions` in fp32 math on the bf16
        value and rounded to bf16. n = 0 gives [0, d].
    """
    x = entries.float()
    normed = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps) * norm_weight.float()
    normed = normed.to(torch.bfloat16)
    valid = (positions >= 0) & (positions < rope_cos.shape[0])
    safe = torch.where(valid, positions, 0)
    cos = rope_cos[safe].float()
    sin = rope_sin[safe].float()
    rotated = apply_rope_interleaved(normed[:, -ROPE_DIM:].float(), cos, sin).to(torch.bfloat16)
    out = torch.cat([normed[:, :-ROPE_DIM], rotated], dim=-1)
    return torch.where(valid[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


INDEXER_SCALE = torch.tensor(INDEXER_DIM ** -0.5, dtype=torch.float32)   # fp32(128^-0.5), bits 0x3DB504F3


def walsh_hadamard_fp32(x: torch.Tensor) -> torch.Tensor:
    """x @ H in fp32 by the fast Walsh-Hadamard transform, H the Sylvester-order Hadamard matrix
    (H[i, j] = (-1)^popcount(i & j), unnormalised), in one fixed order of fp32 operations.

    Args:
        x: [..., n] float tensor, n a power of two (upcast to fp32 first, exactly for bf16).
    Returns:
        [..., n] fp32. Stages h = 1, 2, 4, ..., n / 2 in that order; stage h replaces every pair
        (v[i], v[i + h]) with bit h of i clear by (v[i] + v[i + h], v[i] - v[i + h]), each rounded to fp32.
        Every output is thus a fixed tree of fp32 additions: any kernel that runs the same stages in the
        same order (however it distributes the pairs over threads) gives the same bits. Partial sums that
        overflow become +-inf (and inf - inf NaN), as fp32 arithmetic gives.
    """
    v = x.float()
    n = v.shape[-1]
    lead = v.shape[:-1]
    h = 1
    while h < n:
        pairs = v.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        v = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return v


def indexer_cache_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer cache form of d = 128 entries: Hadamard rotation (scale 128^-0.5), then MXFP4.

    Args:
        x: [n, 128] bf16, the indexer compressor's normed, RoPE'd entries.
    Returns:
        packed: [n, 64] uint8, two e2m1 codes per byte, low nibble = even index.
        scale: [n, 4] uint8 ue8m0, one per block of 32 rotated values.
    The rotation runs in fp32 on the bf16 values: walsh_hadamard_fp32 (stages h = 1 .. 64 in that order),
    then one fp32 multiplication by fp32(128^-0.5); it is quantised without rounding to bf16 first
    (quantize_mxfp4: scale 2^ceil(log2(max(amax, 1e-4) / 6)) from the fp32 quotient, nearest e2m1 value,
    ties to even, saturating at 6, IEEE sign bit). This fp32 order is the definition kernels reproduce bit
    for bit; it differs from the exactly rounded rotation (the fp64 oracle) by a few fp32 ulps, which moves
    a byte only for a value within those ulps of an e2m1 midpoint or a block amax at 6 * 2^k.
    A row holding a NaN or an infinity rotates to non-finite values in every block (each output mixes all
    128 inputs), so all 4 of its scale bytes are 255 (NaN) and all its codes 0. n = 0 gives [0, 64] and
    [0, 4].
    """
    rotated = walsh_hadamard_fp32(x) * INDEXER_SCALE.to(x.device)
    return quantize_mxfp4(rotated, block_size=FP4_BLOCK)
