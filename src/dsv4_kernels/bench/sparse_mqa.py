"""Benchmark cases of sparse MQA (SPEC 1): `sparse_mqa` (bf16 KV pool) and `sparse_mqa_fp8` (paged FP8 cache).

Decode: B sequences of `context` tokens, one query each. Every sequence owns a 128-slot raw ring and a
pool of compressed entries in one flat KV pool; its index list is the full ring plus the compressed
part (CSA: the indexer's picks spread over min(context // 4, 2 * index_topk) entries, -1 where fewer
than index_topk are visible; HCA: every visible entry). Prefill: one sequence from position 0, query i
uses rows max(0, i - 127)..i and the compressed entries visible after i + 1 tokens (CSA picks spread
over them, at most index_topk). Both models, CSA and HCA index lengths from `dsv4_kernels.shapes`.
V4-Pro CSA decode over the FP8 cache also runs in the engines' two-cache form (SPEC 1.3, variant
"-two-cache"): the same entries, the rings in one cache and the compressed entries in another.

Byte model (one call): q and out (bf16), lse (fp32), the whole index list (int32), attn_sink, and one
KV row per valid index entry: 1024 bytes bf16, 584 bytes in the FP8 cache (448 e4m3 + 64 bf16 + 8
scale bytes). Rows are counted once per query token (no reuse across tokens): exact for decode, where
sequences are disjoint, and the traffic of a kernel without cross-token reuse for prefill.
FLOP model: 4 * H * D per valid entry (q.k and p.v, two FLOPs per multiply-add); masked (-1) entries
cost nothing. Exponentials and the softmax bookkeeping are not counted.
"""
from __future__ import annotations

import torch

from dsv4_kernels.bench.case import Case, generator, seed_of
from dsv4_kernels.reference.formats import KV_TOKEN_BYTES, quantize_kv_cache_fp8
from dsv4_kernels.shapes import (CSA_RATIO, HCA_RATIO, MODELS, WINDOW, Grid, ModelConfig, decode_index_shape,
                                 prefill_index_width, prefill_valid_entries)

FAMILY = "sparse_mqa"
OPS = ("sparse_mqa", "sparse_mqa_fp8")
HEAD_DIM = 512
BF16_ROW_BYTES = 2 * HEAD_DIM
FP8_ROW_BYTES = KV_TOKEN_BYTES
FP8_BLOCK = 64
KINDS = ("csa", "hca")


def sparse_mqa_bytes(tokens: int, heads: int, width: int, valid: int, row_bytes: int = BF16_ROW_BYTES,
                     head_dim: int = HEAD_DIM) -> int:
    """tokens: T; width: K columns of the index list; valid: valid entries summed over all T rows."""
    q = out = tokens * heads * head_dim * 2
    lse = tokens * heads * 4
    return q + out + lse + tokens * width * 4 + heads * 4 + valid * row_bytes


def sparse_mqa_flops(heads: int, valid: int, head_dim: int = HEAD_DIM) -> int:
    return 4 * heads * head_dim * valid


def _spread(counts: torch.Tensor, picks: torch.Tensor, width: int, gen: torch.Generator) -> torch.Tensor:
    """[rows, width] int64: row r holds picks[r] distinct entries in [0, counts[r]), spread evenly from a
    random offset (entry j = floor((j + u) * counts / picks)), then -1."""
    rows = counts.shape[0]
    device = counts.device
    j = torch.arange(width, device=device, dtype=torch.float64)[None, :]
    u = torch.rand(rows, 1, generator=gen, device=device, dtype=torch.float64)
    c = counts[:, None].double()
    p = picks[:, None].clamp_min(1).double()
    entry = torch.floor((j + u) * c / p).long()
    return torch.where(j < picks[:, None].double(), entry, torch.full_like(entry, -1))


def decode_indices(batch: int, model: ModelConfig, kind: str, context: int, device, gen) -> tuple[torch.Tensor, int]:
    """(indices [B, K] int32, pool rows N) of the decode layout in the module docstring."""
    shape = decode_index_shape(model, kind, context)
    window_valid = min(context, WINDOW)
    if kind == "csa":
        visible = context // CSA_RATIO
        pool = min(visible, 2 * model.index_topk)
    else:
        visible = pool = context // HCA_RATIO
    picks = shape.valid - window_valid
    per_seq = WINDOW + pool
    base = torch.arange(batch, device=device, dtype=torch.int64)[:, None] * per_seq
    slot = torch.arange(WINDOW, device=device, dtype=torch.int64)[None, :]
    window = torch.where(slot < window_valid, base + slot, torch.full_like(slot, -1))
    comp = _spread(torch.full((batch,), pool, device=device), torch.full((batch,), picks, device=device),
                   shape.width - WINDOW, gen)
    comp = torch.where(comp >= 0, comp + base + WINDOW, comp)
    return torch.cat([window, comp], dim=1).to(torch.int32).contiguous(), batch * per_seq


def prefill_indices(tokens: int, model: ModelConfig, kind: str, device, gen) -> tuple[torch.Tensor, int]:
    """(indices [T, K] int32, pool rows N): raw rows 0..T-1, then the compressed entries."""
    width = prefill_index_width(model, kind, tokens)
    ratio = CSA_RATIO if kind == "csa" else HCA_RATIO
    pos = torch.arange(tokens, device=device, dtype=torch.int64)
    window = pos[:, None] - (WINDOW - 1) + torch.arange(WINDOW, device=device, dtype=torch.int64)[None, :]
    window = torch.where(window >= 0, window, torch.full_like(window, -1))
    visible = (pos + 1) // ratio
    picks = visible.clamp_max(model.index_topk) if kind == "csa" else visible
    comp = _spread(visible, picks, width - WINDOW, gen)
    comp = torch.where(comp >= 0, comp + tokens, comp)
    return torch.cat([window, comp], dim=1).to(torch.int32).contiguous(), tokens + tokens // ratio


def split_caches(indices: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The decode layout of decode_indices as an engine keeps it (SPEC 1.3): (window indices [B, 128] into
    a cache of B * 128 ring rows, compressed indices [B, K - 128] into a cache of B * pool rows, pool).
    The same entries, renumbered per cache; -1 stays -1."""
    batch = indices.shape[0]
    per_seq = rows // max(batch, 1)
    pool = per_seq - WINDOW
    seq = torch.arange(batch, device=indices.device, dtype=torch.int32)[:, None]
    window, comp = indices[:, :WINDOW], indices[:, WINDOW:]
    window = torch.where(window >= 0, window - seq * (per_seq - WINDOW), window)
    comp = torch.where(comp >= 0, comp - seq * WINDOW - WINDOW, comp)
    return window.contiguous(), comp.contiguous(), pool


def _make_inputs(model: ModelConfig, phase: str, kind: str, tokens: int, context: int, fp8: bool, seed: int,
                 two_cache: bool = False):
    def make(device: torch.device):
        gen = generator(device, seed)
        if phase == "decode" and two_cache:
            indices, rows = decode_indices(tokens, model, kind, context, device, gen)
            window, comp, pool = split_caches(indices, rows)
            q = torch.randn(tokens, model.heads, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16)
            ring = torch.randn(tokens * WINDOW, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16)
            entries = torch.randn(tokens * pool, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16)
            sink = torch.randn(model.heads, generator=gen, device=device)
            return ((q, quantize_kv_cache_fp8(ring, FP8_BLOCK), window, sink),
                    {"block_size": FP8_BLOCK, "extra_kv_cache": quantize_kv_cache_fp8(entries, FP8_BLOCK),
                     "extra_indices": comp})
        if phase == "decode":
            indices, rows = decode_indices(tokens, model, kind, context, device, gen)
        else:
            indices, rows = prefill_indices(tokens, model, kind, device, gen)
        # q, kv ~ N(0, 1): with the default scale 512 ** -0.5 the logits are of order 1, as in the model.
        q = torch.randn(tokens, model.heads, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16)
        kv = torch.randn(rows, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16)
        sink = torch.randn(model.heads, generator=gen, device=device)
        if fp8:
            return (q, quantize_kv_cache_fp8(kv, FP8_BLOCK), indices, sink), {"block_size": FP8_BLOCK}
        return (q, kv, indices, sink), {}
    return make


def _case(op: str, model: ModelConfig, phase: str, kind: str, tokens: int, context: int,
          two_cache: bool = False) -> Case:
    fp8 = op == "sparse_mqa_fp8"
    if phase == "decode":
        idx = decode_index_shape(model, kind, context)
        width, valid = idx.width, tokens * idx.valid
        variant = f"{kind}-ctx{context}" + ("-two-cache" if two_cache else "")
        label = f"{model.name}-decode-{variant}-B{tokens}"
    else:
        width, valid = prefill_index_width(model, kind, tokens), prefill_valid_entries(model, kind, tokens)
        variant, context = kind, tokens
        label = f"{model.name}-prefill-{kind}-T{tokens}"
    row_bytes = FP8_ROW_BYTES if fp8 else BF16_ROW_BYTES
    shape = {"T": tokens, "H": model.heads, "D": HEAD_DIM, "K": width, "valid": valid, "kind": kind,
             "context": context, "kv_row_bytes": row_bytes}
    return Case(op, FAMILY, label, model.name, phase, tokens, variant, shape,
                bytes=sparse_mqa_bytes(tokens, model.heads, width, valid, row_bytes),
                flops=sparse_mqa_flops(model.heads, valid), compute="bf16",
                make_inputs=_make_inputs(model, phase, kind, tokens, context, fp8, seed_of(op, label), two_cache))


def cases(grid: Grid) -> list[Case]:
    out = []
    for op in OPS:
        for model in MODELS:
            for kind in KINDS:
                for context in grid.contexts:
                    out += [_case(op, model, "decode", kind, b, context) for b in grid.decode_batches]
                    if op == "sparse_mqa_fp8" and model.name == "pro" and kind == "csa":   # the target
                        out += [_case(op, model, "decode", kind, b, context, two_cache=True)
                                for b in grid.decode_batches]
                out += [_case(op, model, "prefill", kind, t, t) for t in grid.attention_prefill_tokens]
    return out
