"""sigmoid_gate in TileLang's Ascend dialect: UB tiles copied in, a SIMT vector region computes, copied out.

The Ascend dialect has no symbolic grid here: the kernel is specialised per length (the copy engine clips
the last tile), on a fixed number of AI-core blocks that stride over the tiles.
"""
import functools

import torch
import tilelang
import tilelang.ascend.language as T

from dsv4_kernels import dispatch

TL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def make_kernel(n: int, dtype: str, tile: int, blocks: int, threads: int):
    n_tiles = (n + tile - 1) // tile

    @T.prim_func
    def sigmoid_gate_kernel(X: T.Tensor((n,), dtype), G: T.Tensor((n,), dtype), O: T.Tensor((n,), dtype)):
        with T.Kernel(blocks) as bx:
            x_ub = T.alloc_shared((tile,), dtype)
            g_ub = T.alloc_shared((tile,), dtype)
            o_ub = T.alloc_shared((tile,), dtype)
            for it in T.serial(T.ceildiv(n_tiles - bx, blocks)):
                base = (it * blocks + bx) * tile
                T.copy(X[base:base + tile], x_ub)
                T.copy(G[base:base + tile], g_ub)
                with T.SimtVF(threads=threads):
                    for i in T.Parallel(tile):
                        x = T.Cast("float32", x_ub[i])
                        g = T.Cast("float32", g_ub[i])
                        o_ub[i] = T.Cast(dtype, x / (1.0 + T.exp(-g)))  # x * sigmoid(gate)
                T.copy(o_ub, O[base:base + tile])

    return sigmoid_gate_kernel


@functools.lru_cache(maxsize=64)
def _compiled(n: int, dtype: str, tile: int, blocks: int, threads: int):
    return tilelang.compile(make_kernel(n, dtype, tile, blocks, threads), target="ascend")


def sigmoid_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    cfg = dispatch.get("sigmoid_gate", "tilelang_ascend").defaults
    kernel = _compiled(x.numel(), TL_DTYPES[x.dtype], cfg["tile"], cfg["blocks"], cfg["threads"])
    kernel(x.view(-1), gate.view(-1), out.view(-1))
    return out


def codegen(target) -> list:
    from dsv4_kernels.codegen import TileLangKernel
    cfg = dispatch.get("sigmoid_gate", "tilelang_ascend").defaults
    # V4-Flash and V4-Pro hidden rows at a decode batch of 3 (an odd length: the last tile is partial).
    return [TileLangKernel(make_kernel(3 * hidden, "bfloat16", cfg["tile"], cfg["blocks"], cfg["threads"]),
                           label=f"bf16-n{3 * hidden}") for hidden in (4096, 7168)]
