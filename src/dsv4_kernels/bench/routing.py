"""Benchmark cases of MoE routing (SPEC 3): score_topk (layers >= 3) and hash_topk (layers 0-2).

Both models (E = 256 / 384 experts, top-6, routed_scaling_factor 1.5 / 2.5), decode batches and prefill
token counts. V4-Flash cases use its large, nearly uniform bias (about 8.08), as the model does.

Byte model: score_topk reads the [T, E] fp32 logits and the [E] bias; hash_topk reads the int64 token
ids, the token's table row (k int32) and only the k gathered logits (the ideal traffic; a kernel that
streams whole logit rows moves T * E * 4 instead). Both write [T, k] fp32 weights and int32 ids.
FLOP model: sqrt(softplus(x)) as 3 FLOPs (exp, log1p, sqrt), the bias add 1 (score_topk, every expert),
the normalisation 3 per routed slot (sum, divide, scale). Top-k selection is compares, not FLOPs.
"""
from __future__ import annotations

import torch

from dsv4_kernels.bench.case import Case, generator, seed_of
from dsv4_kernels.shapes import MODELS, Grid, ModelConfig

FAMILY = "routing"
SCORE_FLOPS_PER_EXPERT = 4      # softplus (2) + sqrt (1) + bias add (1)
HASH_FLOPS_PER_SLOT = 3         # softplus (2) + sqrt (1) on the gathered logits only
NORM_FLOPS_PER_SLOT = 3


def score_topk_bytes(tokens: int, experts: int, topk: int) -> int:
    return tokens * experts * 4 + experts * 4 + tokens * topk * 8


def score_topk_flops(tokens: int, experts: int, topk: int) -> int:
    return tokens * (SCORE_FLOPS_PER_EXPERT * experts + NORM_FLOPS_PER_SLOT * topk)


def hash_topk_bytes(tokens: int, topk: int, id_bytes: int = 8) -> int:
    return tokens * id_bytes + tokens * topk * 4 + tokens * topk * 4 + tokens * topk * 8


def hash_topk_flops(tokens: int, topk: int) -> int:
    return tokens * topk * (HASH_FLOPS_PER_SLOT + NORM_FLOPS_PER_SLOT)


def _bias(model: ModelConfig, gen, device) -> torch.Tensor:
    noise = torch.randn(model.experts, generator=gen, device=device)
    return 8.08 + 0.003 * noise if model.name == "flash" else 0.1 * noise


def _inputs(op: str, model: ModelConfig, tokens: int, seed: int):
    def make(device):
        gen = generator(device, seed)
        logits = 2.0 * torch.randn(tokens, model.experts, generator=gen, device=device)
        k, rsf = model.experts_per_token, model.routed_scaling_factor
        if op == "score_topk":
            return (logits, _bias(model, gen, device), k, rsf), {}
        ids = torch.randint(0, model.vocab, (tokens,), generator=gen, device=device)
        table = torch.randint(0, model.experts, (model.vocab, k), generator=gen, device=device, dtype=torch.int32)
        return (logits, ids, table), {"routed_scaling_factor": rsf}
    return make


def cases(grid: Grid) -> list[Case]:
    out = []
    sizes = [("decode", b) for b in grid.decode_batches] + [("prefill", t) for t in grid.prefill_tokens]
    for op in ("score_topk", "hash_topk"):
        for model in MODELS:
            E, k = model.experts, model.experts_per_token
            for phase, t in sizes:
                label = f"{model.name}-{phase}-E{E}-T{t}"
                shape = {"T": t, "E": E, "topk": k}
                if op == "score_topk":
                    nbytes, flops = score_topk_bytes(t, E, k), score_topk_flops(t, E, k)
                else:
                    nbytes, flops = hash_topk_bytes(t, k), hash_topk_flops(t, k)
                out.append(Case(op, FAMILY, label, model.name, phase, t, f"E{E}", shape, bytes=nbytes, flops=flops,
                                compute="none", make_inputs=_inputs(op, model, t, seed_of(op, label))))
    return out
