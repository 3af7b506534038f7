"""Benchmark cases of the FP4 grouped MoE (SPEC 5): mxfp4_grouped_gemm and fp4_grouped_moe.

Both models (dim 4096 / 7168, E = 256 / 384 experts, top-6, I = 2048 / 3072; the CPU grid keeps dim and
E but shrinks I so that the reference GEMMs stay fast). Routing is balanced and deterministic: token t
uses experts (t * k + j) mod E, so a call touches U = min(E, T * k) experts. Only those experts'
weights are written: the op reads nothing else, and a full V4-Pro weight set is 12.7 GB. Activations
are FP8 with block 128 (the reference granularity).

Byte model: FP4 weights at 0.5 byte per value plus one ue8m0 byte per 32 values, for the U touched
experts only; FP8 activations 1 byte per value plus an fp32 scale per block; bf16 x and outputs;
int32 expert ids and fp32 routing weights. The fused MoE keeps its intermediate h on chip.
FLOP model: 2 M N K per GEMM over the M = T * k routed rows (gate-up N = 2 I, K = dim; down N = dim,
K = I), i.e. 6 T k I dim for the whole MoE; the SwiGLU and quantisation arithmetic (O(T k I), under
0.1% of it) is not counted. FP8 x FP4 tensor-core instructions run at the FP8 rate, so the FP8 peak
applies.
"""
from __future__ import annotations

import torch

from dsv4_kernels.bench.case import Case, generator, seed_of
from dsv4_kernels.shapes import MODELS, Grid, ModelConfig

FAMILY = "moe"
ACT_BLOCK = 128
FP4_BLOCK = 32
# ue8m0 scale bytes of weights of RMS 1 / sqrt(K): 2^ceil(log2(amax / 6)) lands near 2^-6 .. 2^-8.
SCALE_BYTES = (119, 120, 121)


def touched_experts(rows: int, experts: int) -> int:
    return min(experts, rows)


def fp4_weight_bytes(experts: int, n: int, k: int) -> int:
    """Packed e2m1 values (0.5 byte each) plus ue8m0 scales (1 byte per 32 values)."""
    return experts * n * (k // 2 + k // FP4_BLOCK)


def grouped_gemm_bytes(rows: int, n: int, k: int, experts: int, act_block: int = ACT_BLOCK) -> int:
    a = rows * k + rows * (k // act_block) * 4
    return a + rows * 4 + fp4_weight_bytes(touched_experts(rows, experts), n, k) + rows * n * 2


def grouped_gemm_flops(rows: int, n: int, k: int) -> int:
    return 2 * rows * n * k


def moe_bytes(tokens: int, dim: int, inter: int, experts: int, topk: int) -> int:
    used = touched_experts(tokens * topk, experts)
    weights = fp4_weight_bytes(used, 2 * inter, dim) + fp4_weight_bytes(used, dim, inter)
    return tokens * dim * 2 + tokens * topk * 8 + weights + tokens * dim * 2


def moe_flops(tokens: int, dim: int, inter: int, topk: int) -> int:
    return 6 * tokens * topk * inter * dim


def _fp4_weights(experts: int, n: int, k: int, used: torch.Tensor, gen, device):
    """[E, n, k/2] packed and [E, n, k/32] scales; random codes and realistic scales for `used` experts,
    the others left unwritten (never read)."""
    packed = torch.empty(experts, n, k // 2, dtype=torch.uint8, device=device)
    scale = torch.empty(experts, n, k // FP4_BLOCK, dtype=torch.uint8, device=device)
    for e in used.tolist():
        packed[e] = torch.randint(0, 256, (n, k // 2), generator=gen, device=device, dtype=torch.uint8)
        choice = torch.randint(0, len(SCALE_BYTES), (n, k // FP4_BLOCK), generator=gen, device=device)
        scale[e] = (SCALE_BYTES[0] + choice).to(torch.uint8)
    return packed, scale


def _routing(tokens: int, model: ModelConfig, device) -> torch.Tensor:
    k, E = model.experts_per_token, model.experts
    slots = torch.arange(tokens * k, device=device, dtype=torch.int64).view(tokens, k)
    return (slots % E).to(torch.int32)


def _moe_inputs(model: ModelConfig, tokens: int, inter: int, seed: int):
    def make(device):
        gen = generator(device, seed)
        dim, E, k = model.hidden, model.experts, model.experts_per_token
        ids = _routing(tokens, model, device)
        used = torch.unique(ids.long())
        w13, s13 = _fp4_weights(E, 2 * inter, dim, used, gen, device)
        w2, s2 = _fp4_weights(E, dim, inter, used, gen, device)
        x = torch.randn(tokens, dim, generator=gen, device=device, dtype=torch.bfloat16)
        w = torch.rand(tokens, k, generator=gen, device=device) + 0.1
        w = w / w.sum(dim=1, keepdim=True) * model.routed_scaling_factor
        return (x, ids, w, w13, s13, w2, s2), {"act_block_size": ACT_BLOCK}
    return make


def _gemm_inputs(model: ModelConfig, tokens: int, n: int, k: int, seed: int):
    def make(device):
        from dsv4_kernels.reference.formats import quantize_fp8_blockwise
        gen = generator(device, seed)
        E = model.experts
        rows = tokens * model.experts_per_token
        used = touched_experts(rows, E)
        m_indices = (torch.arange(rows, device=device, dtype=torch.int64) * used // max(rows, 1)).to(torch.int32)
        b, b_scale = _fp4_weights(E, n, k, torch.arange(used, device=device), gen, device)
        a, a_scale = quantize_fp8_blockwise(torch.randn(rows, k, generator=gen, device=device), ACT_BLOCK)
        return (a, a_scale, b, b_scale, m_indices), {"act_block_size": ACT_BLOCK}
    return make


def cases(grid: Grid) -> list[Case]:
    out = []
    sizes = [("decode", b) for b in grid.moe_batches] + [("prefill", t) for t in grid.moe_tokens]
    for model in MODELS:
        dim, E, k = model.hidden, model.experts, model.experts_per_token
        inter = grid.moe_intermediate or model.moe_intermediate
        for phase, t in sizes:
            label = f"{model.name}-{phase}-I{inter}-T{t}"
            shape = {"T": t, "dim": dim, "I": inter, "E": E, "topk": k, "act_block_size": ACT_BLOCK,
                     "experts_touched": touched_experts(t * k, E)}
            op = "fp4_grouped_moe"
            out.append(Case(op, FAMILY, label, model.name, phase, t, f"I{inter}", shape,
                            bytes=moe_bytes(t, dim, inter, E, k), flops=moe_flops(t, dim, inter, k), compute="fp8",
                            make_inputs=_moe_inputs(model, t, inter, seed_of(op, label))))
            op = "mxfp4_grouped_gemm"
            for name, n, kk in (("w13", 2 * inter, dim), ("w2", dim, inter)):
                rows = t * k
                glabel = f"{model.name}-{phase}-{name}-N{n}-K{kk}-T{t}"
                gshape = {"M": rows, "N": n, "K": kk, "G": E, "act_block_size": ACT_BLOCK,
                          "experts_touched": touched_experts(rows, E)}
                out.append(Case(op, FAMILY, glabel, model.name, phase, t, f"{name}-I{inter}", gshape,
                                bytes=grouped_gemm_bytes(rows, n, kk, E), flops=grouped_gemm_flops(rows, n, kk),
                                compute="fp8", make_inputs=_gemm_inputs(model, t, n, kk, seed_of(op, glabel))))
    return out
