"""Sparse MQA reference (SPEC 1, 1.2): every query head attends to the KV rows its index list names.

Per query t and head h, over the valid entries j of row t (0 <= idx < N, within topk_length[t]):

    s_j      = scale * <q[t,h], kv[idx_j]>
    out[t,h] = sum_j exp(s_j) kv[idx_j] / (sum_j exp(s_j) + exp(attn_sink[h]))
    lse[t,h] = log(sum_j exp(s_j))                      (natural log, sink excluded)

Precision: scores, exponentials and sums in fp32 (the spec's fp32 accumulation); `out` is rounded once
to bf16. The exponentials are taken against m = max_j s_j; the output's normaliser is rescaled to
M = max(m, attn_sink[h]), so neither a large sink nor large scores overflow, and a sink of -inf adds
exactly zero (plain softmax). Rows are processed in chunks of tokens so that the gathered KV rows stay
near 64 MiB of fp32 whatever T is.
"""
from __future__ import annotations

import torch

from dsv4_kernels.reference.formats import gather_kv_cache_fp8

__all__ = ["sparse_mqa", "sparse_mqa_fp8"]

GATHER_BUDGET_ELEMS = 1 << 24


def _attend_chunk(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor,
                  sink: torch.Tensor, scale: float):
    """One chunk of tokens: q [t, H, D], idx/valid [t, K] -> (out fp32 [t, H, D], lse fp32 [t, H])."""
    rows = kv[torch.where(valid, idx, 0)].float()                          # [t, K, D]
    rows = torch.where(valid[..., None], rows, 0.0)   # an invalid entry reads no row: 0 * NaN must not leak
    s = scale * torch.matmul(q.float(), rows.transpose(1, 2))              # [t, H, K]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)                                       # [t, H, 1], -inf if row empty
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)                                                   # masked entries give exactly 0
    total = p.sum(dim=-1, keepdim=True)                                    # sum_j exp(s_j - m)
    big = torch.maximum(m, sink[None, :, None])                            # max over scores and sink
    alpha = torch.exp(m - big)
    denom = total * alpha + torch.exp(sink[None, :, None] - big)
    has_any = valid.any(dim=-1)[:, None, None]                             # [t, 1, 1]
    weight = torch.where(has_any, alpha / torch.where(has_any, denom, torch.ones_like(denom)),
                         torch.zeros_like(denom))
    out = torch.matmul(p, rows) * weight                                   # [t, H, D]
    lse = torch.where(has_any, torch.log(total) + m, torch.full_like(m, float("inf")))
    return out, lse.squeeze(-1)


def sparse_mqa(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor,
               softmax_scale: float | None = None, topk_length: torch.Tensor | None = None):
    """Sparse multi-query attention over an index list per query (SPEC 1).

    Args:
        q: [T, H, D] bf16 queries (RoPE and per-head norm already applied). D = 512 in V4; any D works.
        kv: [N, D] bf16 pool of KV rows; each row is both key and value.
        indices: [T, K] int32 rows of kv per query. An entry < 0 or >= N is invalid and contributes
            nothing; it is never wrapped around (-2 or -N reads no row). Duplicates are kept: each
            occurrence adds its term again. K may be 0.
        attn_sink: [H] fp32 per-head logit added to the softmax denominator only, as exp(attn_sink[h]),
            not multiplied by the scale. -inf means no sink (plain softmax). Must not be +inf or NaN.
        softmax_scale: multiplier of q.kv; None means D ** -0.5.
        topk_length: optional [T] int32; row t uses only its first topk_length[t] entries, the value
            clamped to [0, K] (values <= 0 use none, values >= K use all K).
    Returns:
        out: [T, H, D] bf16. A row with no valid entry (all invalid, K = 0, N = 0 or topk_length 0)
            gives out = 0 for every head, whatever the sink.
        lse: [T, H] fp32, natural log of sum_j exp(s_j) without the sink; +inf for a row with no valid
            entry (FlashMLA's convention).
        T = 0 gives empty tensors of these shapes.
    """
    T, H, D = q.shape
    N = kv.shape[0]
    K = indices.shape[1]
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    out = torch.zeros(T, H, D, dtype=torch.bfloat16, device=q.device)
    lse = torch.full((T, H), float("inf"), dtype=torch.float32, device=q.device)
    if T == 0 or K == 0 or N == 0:
        return out, lse
    sink = attn_sink.float()
    positions = torch.arange(K, device=indices.device)
    chunk = max(1, GATHER_BUDGET_ELEMS // (K * D))
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        idx = indices[t0:t1].long()
        valid = (idx >= 0) & (idx < N)
        if topk_length is not None:
            valid &= positions[None, :] < topk_length[t0:t1, None].long()
        o, l = _attend_chunk(q[t0:t1], kv, idx, valid, sink, scale)
        out[t0:t1] = o.to(torch.bfloat16)
        lse[t0:t1] = l
    return out, lse


def sparse_mqa_fp8(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor,
                   softmax_scale: float | None = None, topk_length: torch.Tensor | None = None,
                   block_size: int = 64, extra_kv_cache: torch.Tensor | None = None,
                   extra_indices: torch.Tensor | None = None, extra_topk_length: torch.Tensor | None = None):
    """Sparse MQA over the paged FP8 KV cache (SPEC 1.2), optionally over a second cache (SPEC 1.3):
    sparse_mqa on the dequantised cache(s).

    Args:
        q: [T, H, 512] bf16 queries.
        kv_cache: [P, page_bytes] uint8 (or a float8_e4m3fn view of the same bytes) pages in the SPEC
            1.2 layout (see dsv4_kernels.reference.formats), page_bytes >= block_size * 584 and any page
            stride (FlashMLA pads pages to 37440 bytes at block 64); bytes past block_size * 584 of a
            page are never read. Token index n lives in page n // block_size, slot n % block_size.
        indices: [T, K] int32 token indices into the cache. The valid range is 0 <= n < P * block_size:
            every slot of every page counts as a row, including slots of the last page that were never
            written (their content is whatever bytes the page holds). Entries outside it are invalid.
        attn_sink, softmax_scale, topk_length: as in sparse_mqa.
        block_size: tokens per page (of both caches).
        extra_kv_cache, extra_indices [T, K2] int32, extra_topk_length [T] int32 or None: the second
            cache and its index list (SPEC 1.3), same rules as the first. None: one cache.
    Returns:
        (out [T, H, 512] bf16, lse [T, H] fp32), bit-identical to sparse_mqa on the dequantised rows with
        both lists as one (list 1, then list 2 renumbered past the first cache's rows, entries past their
        list's topk_length as -1): one softmax, one sink and one lse over the union of the valid entries;
        including the empty-row (out 0, lse +inf) and T = 0 cases.
    """
    # Dequantise only the rows the indices use (a real cache holds far more): the distinct valid indices
    # of each list become a small pool (first cache's rows, then the second's), and the lists are
    # renumbered into it. Same rows, same math, same bits as one pool of every row.
    lists = [(kv_cache, indices, topk_length)]
    if extra_kv_cache is not None:
        lists.append((extra_kv_cache, extra_indices, extra_topk_length))
    pools, renumbered, offset = [], [], 0
    for cache, idx, length in lists:
        valid = (idx >= 0) & (idx < cache.shape[0] * block_size)
        if length is not None:
            valid &= torch.arange(idx.shape[1], device=idx.device)[None, :] < length[:, None].long()
        used = torch.unique(idx[valid])                             # sorted distinct used indices
        pools.append(gather_kv_cache_fp8(cache, used, block_size))  # [distinct, 512]
        position = torch.searchsorted(used, torch.where(valid, idx, 0).to(used.dtype))
        renumbered.append(torch.where(valid, position + offset, -1))
        offset += used.numel()
    kv = torch.cat(pools)
    pool_indices = torch.cat(renumbered, dim=1).to(torch.int32)
    return sparse_mqa(q, kv, pool_indices, attn_sink, softmax_scale)
