"""TileLang (GPU dialect) source of sigmoid_gate: one compile serves every length (symbolic n, int32)."""
import functools

import torch
import tilelang
import tilelang.language as T

from dsv4_kernels import dispatch, platform

TL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def make_kernel(dtype: str, block: int, threads: int):
    n = T.symbolic("n")

    @T.prim_func
    def sigmoid_gate_kernel(X: T.Tensor((n,), dtype), G: T.Tensor((n,), dtype), O: T.Tensor((n,), dtype)):
        with T.Kernel(T.ceildiv(n, block), threads=threads) as bx:
            for i in T.Parallel(block):
                idx = bx * block + i
                if idx < n:
                    x = T.Cast("float32", X[idx])
                    g = T.Cast("float32", G[idx])
                    O[idx] = T.Cast(dtype, x / (1.0 + T.exp(-g)))  # x * sigmoid(gate)

    return sigmoid_gate_kernel


@functools.lru_cache(maxsize=None)
def _compiled(dtype: str, block: int, threads: int, target: str):
    return tilelang.compile(make_kernel(dtype, block, threads), target=target)


def sigmoid_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    cfg = dispatch.config(dispatch.get("sigmoid_gate", "tilelang"), platform.device_info(x))
    target = platform.tilelang_target(x)
    kernel = _compiled(TL_DTYPES[x.dtype], cfg["BLOCK"], cfg["threads"], target)
    kernel(x.view(-1), gate.view(-1), out.view(-1))
    return out


def codegen(target) -> list:
    from dsv4_kernels.codegen import TileLangKernel
    cfg = dispatch.get("sigmoid_gate", "tilelang").defaults
    return [TileLangKernel(make_kernel(t, cfg["BLOCK"], cfg["threads"]), label=t) for t in ("bfloat16", "float32")]
