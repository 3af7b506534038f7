"""Benchmark cases of the number formats (SPEC "Number formats", 1.2, 7 "Formats"): FP8 block and MXFP4
quantisation of activations [T, dim] (both models' hidden sizes; FP8 in the device's encoding), and the
FP8 KV cache of N 512-d rows.

Byte model: bf16 input 2 bytes per value; FP8 output 1 byte per value plus an fp32 scale per block;
MXFP4 0.5 byte per value plus a ue8m0 byte per 32 values; fp32 dequantised output 4 bytes per value;
the KV cache 584 bytes per token, a quantised cache written in whole pages of 64 tokens.
FLOP model: one multiply per quantised or dequantised value (by the inverse scale or the scale); the
amax reductions, exponent arithmetic and rounding are compares and bit operations, not FLOPs. The KV
cache scales only its 448 nope values.
"""
from __future__ import annotations

import torch

from dsv4_kernels.bench.case import Case, generator, seed_of
from dsv4_kernels.platform import device_info
from dsv4_kernels.reference.formats import KV_NOPE_DIM, KV_TOKEN_BYTES
from dsv4_kernels.shapes import MODELS, Grid

FAMILY = "formats"
FP8_BLOCK = 128
FP4_BLOCK = 32
KV_BLOCK = 64
KV_DIM = 512


def fp8_quant_bytes(tokens: int, k: int, block: int = FP8_BLOCK) -> int:
    return tokens * k * 2 + tokens * k + tokens * (k // block) * 4


def mxfp4_quant_bytes(tokens: int, k: int) -> int:
    return tokens * k * 2 + tokens * k // 2 + tokens * k // FP4_BLOCK


def mxfp4_dequant_bytes(tokens: int, k: int) -> int:
    return tokens * k // 2 + tokens * k // FP4_BLOCK + tokens * k * 4


def kv_quant_bytes(tokens: int, block: int = KV_BLOCK) -> int:
    pages = -(-tokens // block)
    return tokens * KV_DIM * 2 + pages * block * KV_TOKEN_BYTES


def kv_dequant_bytes(tokens: int) -> int:
    return tokens * KV_TOKEN_BYTES + tokens * KV_DIM * 2


def _activation_inputs(op: str, tokens: int, k: int, seed: int):
    def make(device):
        gen = generator(device, seed)
        x = torch.randn(tokens, k, generator=gen, device=device, dtype=torch.bfloat16)
        if op == "quantize_fp8_blockwise":
            return (x, FP8_BLOCK), {"fmt": device_info(device).fp8_encoding}   # e4m3fnuz on gfx942
        if op == "quantize_mxfp4":
            return (x, FP4_BLOCK), {}
        from dsv4_kernels.reference.formats import quantize_mxfp4
        return quantize_mxfp4(x, FP4_BLOCK), {}
    return make


def _kv_inputs(op: str, tokens: int, seed: int):
    def make(device):
        gen = generator(device, seed)
        kv = torch.randn(tokens, KV_DIM, generator=gen, device=device, dtype=torch.bfloat16)
        if op == "quantize_kv_cache_fp8":
            return (kv, KV_BLOCK), {}
        from dsv4_kernels.reference.formats import quantize_kv_cache_fp8
        return (quantize_kv_cache_fp8(kv, KV_BLOCK), tokens, KV_BLOCK), {}
    return make


ACTIVATION_OPS = {"quantize_fp8_blockwise": (fp8_quant_bytes, f"blk{FP8_BLOCK}"),
                  "quantize_mxfp4": (mxfp4_quant_bytes, f"blk{FP4_BLOCK}"),
                  "dequantize_mxfp4": (mxfp4_dequant_bytes, f"blk{FP4_BLOCK}")}
KV_OPS = {"quantize_kv_cache_fp8": kv_quant_bytes, "dequantize_kv_cache_fp8": kv_dequant_bytes}


def cases(grid: Grid) -> list[Case]:
    out = []
    sizes = [("decode", b) for b in grid.decode_batches] + [("prefill", t) for t in grid.prefill_tokens]
    for op, (model_bytes, block) in ACTIVATION_OPS.items():
        for model in MODELS:
            k = model.hidden
            for phase, t in sizes:
                label = f"{model.name}-{phase}-K{k}-{block}-T{t}"
                out.append(Case(op, FAMILY, label, model.name, phase, t, f"K{k}-{block}", {"T": t, "K": k},
                                bytes=model_bytes(t, k), flops=t * k, compute="none",
                                make_inputs=_activation_inputs(op, t, k, seed_of(op, label))))
    for op, model_bytes in KV_OPS.items():
        for phase, t in sizes:
            label = f"v4-{phase}-N{t}"
            out.append(Case(op, FAMILY, label, "v4", phase, t, f"blk{KV_BLOCK}", {"N": t, "block_size": KV_BLOCK},
                            bytes=model_bytes(t), flops=t * KV_NOPE_DIM, compute="none",
                            make_inputs=_kv_inputs(op, t, seed_of(op, label))))
    return out
