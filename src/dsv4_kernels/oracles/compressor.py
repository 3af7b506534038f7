"""fp64 oracles of the compressor family (SPEC 2), written apart from reference/compressor.py.

- Pooling is an online softmax: the (kv, score) rows of one entry are listed explicitly and folded in
  one at a time with a running maximum, per channel. Entry 0 of ratio 4 simply has no previous-block
  rows (the reference pads them with kv 0, score -inf); the B halves are folded in before the A halves.
- The prefill state is assembled row by row from the SPEC 2 description; decode works per sequence on
  an fp64 copy of its state rows.
- RoPE is a complex multiplication; fp64 values are rounded to bf16 with one correct rounding.
- The Hadamard rotation is a butterfly (fast Walsh-Hadamard transform); FP4 codes are chosen as the
  nearest e2m1 magnitude by distance, ties to the even code; the ue8m0 scale is the smallest power of
  two p with 6 p >= max(amax, 1e-4).

Every function takes the arguments of the public op of the same name and returns the same outputs
with the same dtypes; none of them writes to its arguments (the FP8 cache store is not modelled:
kv_cache and its companions are accepted and ignored, the cache is checked by the tests).
"""
from __future__ import annotations

import math

import torch

__all__ = ["compressor_prefill", "compressor_prefill_batched", "compressor_decode", "compressor_norm_rope", "indexer_cache_quantize"]

ROPE_DIM = 64
_NEG_INF = float("-inf")
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _coff(ratio: int) -> int:
    return 2 if ratio == 4 else 1


def _round_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp64 -> bf16 with a single round to nearest, ties to even.

    Going through fp32 rounds twice; the result is wrong exactly when the fp32 value lands on a bf16
    midpoint (low 16 bits 0x8000) that x itself is not on. Then x lies strictly on one side of the
    midpoint, and moving the fp32 value one step towards x makes the second rounding go that way.
    """
    f = x.float()
    midpoint = (f.view(torch.int32) & 0xFFFF) == 0x8000
    towards = torch.where(x > f.double(), float("inf"), _NEG_INF).float()
    f = torch.where(midpoint & (x != f.double()), torch.nextafter(f, towards), f)
    return f.to(torch.bfloat16)


def _online_pool(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """rows: (kv [d], score [d]) fp64 pairs -> [d] fp64, sum_i softmax_i(score) * kv_i per channel.

    One row at a time: m = running max, l = sum of exp(score - m), acc = sum of exp(score - m) * kv.
    A score of -inf contributes weight 0; a channel whose scores are all -inf ends as 0 / 0 = NaN
    (as torch.softmax gives NaN there).
    """
    d = rows[0][0].shape[0]
    device = rows[0][0].device
    m = torch.full((d,), _NEG_INF, dtype=torch.float64, device=device)
    l = torch.zeros(d, dtype=torch.float64, device=device)
    acc = torch.zeros(d, dtype=torch.float64, device=device)
    for v, s in rows:
        m_new = torch.maximum(m, s)
        alpha = torch.where(m == _NEG_INF, 0.0, torch.exp(m - m_new))
        p = torch.where(s == _NEG_INF, 0.0, torch.exp(s - m_new))
        l = l * alpha + p
        acc = acc * alpha + p * v
        m = m_new
    return acc / l


def _biased_row(score_row: torch.Tensor, ape_row: torch.Tensor) -> torch.Tensor:
    """sc' = sc + ape as the fp32 sum SPEC 2 stores (the fp64 sum of two fp32 values is exact, and its
    rounding to fp32 is the correctly rounded fp32 sum), returned as fp64."""
    return (score_row.double() + ape_row.double()).float().double()


def compressor_norm_rope(entries, norm_weight, rope_cos, rope_sin, positions, eps=1e-6):
    """[n, d] fp32 -> [n, d] bf16: bf16(x / sqrt(sum(x^2) / d + eps) * w), then the last 64 dims as
    complex numbers y[2i] + i y[2i+1] times cos + i sin at each position, rounded to bf16."""
    x = entries.double()
    n, d = x.shape
    mean_square = (x * x).sum(dim=1, keepdim=True) / d
    y = _round_bf16(x / torch.sqrt(mean_square + eps) * norm_weight.double())
    pairs = y[:, d - ROPE_DIM:].double().reshape(n, ROPE_DIM // 2, 2).contiguous()
    turn = torch.complex(rope_cos[positions].double(), rope_sin[positions].double())
    rotated = torch.view_as_real(torch.view_as_complex(pairs) * turn).reshape(n, ROPE_DIM)
    return torch.cat([y[:, :d - ROPE_DIM], _round_bf16(rotated)], dim=1)


def compressor_prefill(kv, score, ape, ratio, norm_weight=None, rope_cos=None, rope_sin=None,
                       kv_cache=None, cache_block_size=64, cache_slots=None):
    """Entries of the complete blocks and the decode state after S tokens (SPEC 2)."""
    coff = _coff(ratio)
    seq_len, width = kv.shape
    d = width // coff
    n = seq_len // ratio
    kv64 = kv.double()
    biased = [_biased_row(score[t], ape[t % ratio]) for t in range(seq_len)]

    pooled = []
    for j in range(n):
        block = range(j * ratio, (j + 1) * ratio)
        if coff == 1:
            rows = [(kv64[t], biased[t]) for t in block]
        else:
            rows = [(kv64[t, d:], biased[t][d:]) for t in block]
            if j > 0:
                rows += [(kv64[t, :d], biased[t][:d]) for t in range((j - 1) * ratio, j * ratio)]
        pooled.append(_online_pool(rows))
    entries = torch.stack(pooled).float() if pooled else torch.zeros(0, d, device=kv.device)
    if norm_weight is not None:
        positions = torch.tensor([j * ratio for j in range(n)], dtype=torch.int64, device=kv.device)
        entries = compressor_norm_rope(entries, norm_weight, rope_cos, rope_sin, positions)

    kv_state = torch.zeros(coff * ratio, width, device=kv.device)
    score_state = torch.full((coff * ratio, width), _NEG_INF, device=kv.device)
    if coff == 2 and n > 0:
        for i in range(ratio):
            kv_state[i] = kv[(n - 1) * ratio + i]
            score_state[i] = biased[(n - 1) * ratio + i].float()
    first_row = ratio if coff == 2 else 0
    for t in range(n * ratio, seq_len):
        kv_state[first_row + t - n * ratio] = kv[t]
        score_state[first_row + t - n * ratio] = biased[t].float()
    return entries, kv_state, score_state


def compressor_prefill_batched(kv, score, ape, ratio, cu_seqlens, kv_state, score_state, start_positions=None,
                               slot_ids=None, norm_weight=None, rope_cos=None, rope_sin=None, kv_cache=None,
                               cache_block_size=64, cache_slots=None):
    """Entries [N, d] and emitted [N] of a ragged batch, token by token: each valid chunk walks its tokens
    through an fp64 copy of its state (a fresh one when it starts at position 0), as SPEC 2's decode
    rules say, and pools where a block completes. The states are not written."""
    coff = _coff(ratio)
    total, width = kv.shape
    d = width // coff
    bounds = [min(max(int(c), 0), total) for c in cu_seqlens.tolist()]
    batch = len(bounds) - 1
    starts = [0] * batch if start_positions is None else [int(p) for p in start_positions.tolist()]
    slots = list(range(batch)) if slot_ids is None else [int(s) for s in slot_ids.tolist()]
    out = torch.zeros(total, d, dtype=torch.float64, device=kv.device)
    emitted = [False] * total
    first_row = ratio if coff == 2 else 0
    for b in range(batch):
        lo, hi = bounds[b], max(bounds[b], bounds[b + 1])
        start, slot = starts[b], slots[b]
        end = start + hi - lo
        if not (0 <= slot < kv_state.shape[0] and start >= 0) or (rope_cos is not None and
                                                                  end - ratio >= rope_cos.shape[0]):
            continue
        if start == 0:
            kv_rows = torch.zeros(coff * ratio, width, dtype=torch.float64, device=kv.device)
            sc_rows = torch.full((coff * ratio, width), _NEG_INF, dtype=torch.float64, device=kv.device)
        else:
            kv_rows, sc_rows = kv_state[slot].double().clone(), score_state[slot].double().clone()
        for t in range(lo, hi):
            phase = (start + t - lo) % ratio
            kv_rows[first_row + phase] = kv[t].double()
            sc_rows[first_row + phase] = _biased_row(score[t].float(), ape[phase])
            if phase != ratio - 1:
                continue
            emitted[t] = True
            if coff == 1:
                rows = [(kv_rows[i], sc_rows[i]) for i in range(ratio)]
            else:
                rows = [(kv_rows[ratio + i, d:], sc_rows[ratio + i, d:]) for i in range(ratio)]
                rows += [(kv_rows[i, :d], sc_rows[i, :d]) for i in range(ratio)]
            out[t] = _online_pool(rows)
            if coff == 2:  # after pooling: the rows above are views of the state
                kv_rows[:ratio], sc_rows[:ratio] = kv_rows[ratio:].clone(), sc_rows[ratio:].clone()
    entries = out.float()
    rows_out = [t for t in range(total) if emitted[t]]
    if norm_weight is not None:
        fused = torch.zeros(total, d, dtype=torch.bfloat16, device=kv.device)
        if rows_out:
            token_start = {}
            for b in range(batch):
                for t in range(bounds[b], max(bounds[b], bounds[b + 1])):
                    token_start[t] = starts[b] + t - bounds[b]
            at = torch.tensor([token_start[t] + 1 - ratio for t in rows_out], dtype=torch.int64, device=kv.device)
            fused[rows_out] = compressor_norm_rope(entries[rows_out], norm_weight, rope_cos, rope_sin, at)
        entries = fused
    return entries, torch.tensor(emitted, dtype=torch.bool, device=kv.device)


def compressor_decode(kv_state, score_state, kv, score, ape, positions, ratio, slot_ids=None,
                      norm_weight=None, rope_cos=None, rope_sin=None, kv_cache=None, cache_block_size=64,
                      cache_slots=None):
    """Entries [B, d] (zero rows where nothing is emitted) and emitted [B]; the states are not written."""
    coff = _coff(ratio)
    batch, width = kv.shape
    d = width // coff
    pos = [int(p) for p in positions.tolist()]
    slots = list(range(batch)) if slot_ids is None else [int(s) for s in slot_ids.tolist()]
    out = torch.zeros(batch, d, dtype=torch.float64, device=kv.device)
    emitted = [False] * batch
    for b in range(batch):
        phase = pos[b] % ratio
        kv_rows = kv_state[slots[b]].double().clone()
        sc_rows = score_state[slots[b]].double().clone()
        row = (ratio if coff == 2 else 0) + phase
        kv_rows[row] = kv[b].double()
        sc_rows[row] = _biased_row(score[b], ape[phase])
        if phase != ratio - 1:
            continue
        emitted[b] = True
        if coff == 1:
            rows = [(kv_rows[i], sc_rows[i]) for i in range(ratio)]
        else:
            rows = [(kv_rows[ratio + i, d:], sc_rows[ratio + i, d:]) for i in range(ratio)]
            rows += [(kv_rows[i, :d], sc_rows[i, :d]) for i in range(ratio)]
        out[b] = _online_pool(rows)
    entries = out.float()
    emitted_t = torch.tensor(emitted, dtype=torch.bool, device=kv.device)
    if norm_weight is not None:
        fused = torch.zeros(batch, d, dtype=torch.bfloat16, device=kv.device)
        rows_out = [b for b in range(batch) if emitted[b]]
        if rows_out:
            at = torch.tensor([(pos[b] // ratio) * ratio for b in rows_out], dtype=torch.int64, device=kv.device)
            fused[rows_out] = compressor_norm_rope(entries[rows_out], norm_weight, rope_cos, rope_sin, at)
        entries = fused
    return entries, emitted_t


def _walsh_hadamard(v: torch.Tensor) -> torch.Tensor:
    """[n, 2^k] fp64 -> v @ H, H the Sylvester-order Hadamard matrix, by butterflies (a, b) -> (a+b, a-b)."""
    n, size = v.shape
    h = 1
    while h < size:
        halves = v.reshape(n, size // (2 * h), 2, h)
        a, b = halves[:, :, 0], halves[:, :, 1]
        v = torch.stack((a + b, a - b), dim=2).reshape(n, size)
        h *= 2
    return v


def indexer_cache_quantize(x):
    """[n, 128] bf16 -> (packed [n, 64] uint8, scale [n, 4] uint8): Hadamard (scale 128^-0.5) in fp64,
    rounded to fp32, then MXFP4 with block 32."""
    n, size = x.shape
    rotated = (_walsh_hadamard(x.double()) / math.sqrt(size)).float().double()
    blocks = rotated.reshape(n, size // 32, 32)
    need = blocks.abs().amax(dim=-1).clamp_min(1e-4) / 6.0   # smallest power of two >= need
    mantissa, exponent = torch.frexp(need)                   # need = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    scale = torch.ldexp(torch.ones_like(need), exponent)
    values = blocks / scale.unsqueeze(-1)

    mags = torch.tensor(_E2M1, dtype=torch.float64, device=x.device)
    dist = (values.abs().unsqueeze(-1) - mags).abs()
    nearest = dist == dist.amin(dim=-1, keepdim=True)
    even = nearest & (torch.arange(8, device=x.device) % 2 == 0)
    code = torch.where(even.any(dim=-1), even.int().argmax(dim=-1), nearest.int().argmax(dim=-1))
    code = code + 8 * torch.signbit(values).int()
    pairs = code.reshape(n, size // 2, 2)
    packed = (pairs[..., 0] + 16 * pairs[..., 1]).to(torch.uint8)
    return packed, (exponent + 127).to(torch.uint8)
