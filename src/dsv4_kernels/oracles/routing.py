"""fp64 oracles for MoE routing (SPEC 3), written independently of reference/routing.py.

s = sqrt(softplus(x)) element by element with Python's math module (fp64), rounded once to fp32.
Score top-k sorts every token's experts with Python's sort on the tuple (-key, index), key = fp32 s +
fp32 bias; the weights are Python-float quotients of the fp32 s values. Hash top-k reads the table row
of each token id as a list. The *_fp64 functions return fp64 weights (tests compare against them with
their own tolerance); score_topk and hash_topk round them once to fp32 and return the reference's
outputs and dtypes, for the verification ladder.
"""
from __future__ import annotations

import math

import torch

__all__ = ["sqrt_softplus", "normalised_weights", "score_topk_fp64", "hash_topk_fp64", "score_topk", "hash_topk"]


def sqrt_softplus(logits: torch.Tensor) -> torch.Tensor:
    """sqrt(softplus(x)) element by element in Python floats (fp64), rounded once to fp32."""
    vals = [x if x > 20.0 else math.log1p(math.exp(x)) for x in logits.double().flatten().tolist()]
    return torch.tensor([math.sqrt(v) for v in vals], dtype=torch.float32).view(logits.shape)


def normalised_weights(s_row: list[float], ids: list[int], rsf: float, apply: bool = False,
                       renormalize: bool = True) -> list[float]:
    """s[e] (/ (sum of s over ids + 1e-20) when renormalize) (* rsf when apply) for each e in ids
    (repeated ids count each time)."""
    total = sum(s_row[e] for e in ids) + 1e-20 if renormalize else 1.0
    return [s_row[e] / total * (rsf if apply else 1.0) for e in ids]


def _shared(rsf: float, apply: bool, n_shared: int) -> list[float]:
    return [1.0 if apply else 1.0 / rsf] * n_shared


def score_topk_fp64(logits, bias, topk, rsf, n_shared, apply=False, renormalize=True):
    """(weights [T, topk + n_shared] fp64, ids [T, topk + n_shared] int32): sort by (-key, index)."""
    s = sqrt_softplus(logits)
    key = (s + bias).tolist()
    s = s.tolist()
    E = logits.shape[1]
    ids, weights = [], []
    for t in range(logits.shape[0]):
        row = sorted(range(E), key=lambda e: (-key[t][e], e))[:topk]
        ids.append(row + [E + j for j in range(n_shared)])
        weights.append(normalised_weights(s[t], row, rsf, apply, renormalize) + _shared(rsf, apply, n_shared))
    shape = (logits.shape[0], topk + n_shared)
    return (torch.tensor(weights, dtype=torch.float64).view(shape),
            torch.tensor(ids, dtype=torch.int32).view(shape))


def hash_topk_fp64(logits, input_ids, tid2eid, n_shared, rsf, apply=False):
    """(weights [T, k + n_shared] fp64, ids [T, k + n_shared] int32): table rows in table order."""
    s = sqrt_softplus(logits).tolist()
    E, k = logits.shape[1], tid2eid.shape[1]
    ids, weights = [], []
    for t, tok in enumerate(input_ids.tolist()):
        row = tid2eid[tok].tolist()
        ids.append(row + [E + j for j in range(n_shared)])
        weights.append(normalised_weights(s[t], row, rsf, apply) + _shared(rsf, apply, n_shared))
    shape = (len(ids), k + n_shared)
    return (torch.tensor(weights, dtype=torch.float64).view(shape),
            torch.tensor(ids, dtype=torch.int32).view(shape))


def score_topk(router_logits, bias, topk=6, routed_scaling_factor=1.0, num_fused_shared_experts=0,
               apply_routed_scaling_factor_on_output=False, renormalize=True):
    """The op's signature and outputs: (weights fp32, ids int32), weights rounded once from fp64."""
    w, ids = score_topk_fp64(router_logits.float().cpu(), bias.cpu(), topk, routed_scaling_factor,
                             num_fused_shared_experts, apply_routed_scaling_factor_on_output, renormalize)
    return w.float(), ids


def hash_topk(router_logits, input_ids, tid2eid, num_fused_shared_experts=0, routed_scaling_factor=1.0,
              apply_routed_scaling_factor_on_output=False):
    """The op's signature and outputs: (weights fp32, ids int32), weights rounded once from fp64."""
    w, ids = hash_topk_fp64(router_logits.float().cpu(), input_ids.cpu(), tid2eid.cpu(), num_fused_shared_experts,
                            routed_scaling_factor, apply_routed_scaling_factor_on_output)
    return w.float(), ids
