"""TileLang (GPU dialect) source of indexer_cache_quantize (SPEC 2): Hadamard rotation (scale 128^-0.5) of
d = 128 bf16 entries, then MXFP4 (e2m1 codes, block 32, ue8m0 scales), one launch; one source for sm_90a,
sm_100a, gfx942 and gfx950. The numerics are those of triton_indexer.py (README.md); the thread layout is
this file's own.

indexer_kernel: grid ceil(n / ROWS), `threads` threads per block, ROWS = threads / 32: a group of 32 lanes
per row (a warp on CUDA, half a wavefront on ROCm; the shuffles have width 32). Lane l owns values
[4 l, 4 l + 4) of its row in fp32 registers (one 8-byte bf16 load):
1. the fast Walsh-Hadamard transform in the reference's order: stages h = 1 and 2 within the thread's 4
   values, stages h = 4 .. 64 across lanes (partner lane l ^ (h / 4) by xor shuffle; the lane with bit h
   clear keeps a + b, its partner a - b, a being the value at the lower index): each output is the
   reference's tree of fp32 additions, whatever the layout. Then one multiplication by fp32(128^-0.5),
   built from its bits (0x3DB504F3) so that no decimal literal can round it;
2. per block of 32 values (8 lanes): the amax of the finite values and a non-finite flag by 3 xor
   shuffles; the ue8m0 byte of 2^ceil(log2(max(amax, 1e-4) / 6)) from the fp32 bits of max(amax, 1e-4)
   (biased exponent - 2, + 1 when the mantissa bits exceed 0x400000: no division, triton_indexer.py);
3. codes |v| * 2^-e (exact), seven compares against the e2m1 midpoints (ties to the even code), the IEEE
   sign bit; a non-finite block gets scale byte 255 and codes 0;
4. two packed bytes per lane (low nibble = even index) in one 2-byte store; lanes 0, 8, 16, 24 store the
   4 scale bytes. Rows past n load zeros, run the shuffles with their group and store nothing.

n is symbolic (one compile serves every row count; nothing is read back to the host).
"""
import functools

import torch
import tilelang
import tilelang.language as T

from dsv4_kernels import dispatch, platform
from dsv4_kernels.kernels import compressor as shared
from dsv4_kernels.kernels.compressor.tilelang_common import BF16, F32, U8, U32

OP = "indexer_cache_quantize"
DEFAULTS = {OP: {"threads": 256}}
D = 128
ROT_SCALE_BITS = 0x3DB504F3      # fp32(128^-0.5)
AMAX_FLOOR_BITS = 0x38D1B717     # fp32(1e-4)


def make_indexer_kernel(threads: int):
    """indexer_cache_quantize for `threads` threads per block (a multiple of 32 in [32, 1024]).

    Arguments: X [n, 128] bf16; PK [n, 64] uint8 (packed codes); SC [n, 4] uint8 (ue8m0 scale bytes).
    """
    if threads % 32 or not 32 <= threads <= 1024:
        raise ValueError(f"indexer kernel: threads must be a multiple of 32 in [32, 1024], got {threads}")
    ROWS = threads // 32
    n = T.dynamic("n")

    @T.prim_func
    def indexer_kernel(X: T.Tensor((n, D), BF16), PK: T.Tensor((n, D // 2), U8), SC: T.Tensor((n, D // 32), U8)):
        with T.Kernel(T.ceildiv(n, ROWS), threads=threads) as bx:
            tx = T.get_thread_binding()
            lane = tx % 32
            row = bx * ROWS + tx // 32
            xb = T.alloc_local((4,), BF16)
            v = T.alloc_local((4,), F32)
            w = T.alloc_local((4,), F32)
            bits = T.alloc_local((4,), U32)
            code = T.alloc_local((4,), U32)
            pk = T.alloc_local((2,), U8)
            red = T.alloc_local((2,), F32)       # amax, partner's amax
            flag = T.alloc_local((2,), U32)      # non-finite flag, partner's flag
            sb = T.alloc_local((2,), U32)        # scale byte, bits of 2^-e
            if row < n:
                for k in T.vectorized(4):
                    xb[k] = X[row, lane * 4 + k]
            else:
                for k in T.unroll(4):
                    xb[k] = T.cast(0, BF16)
            for k in T.unroll(4):
                v[k] = T.cast(xb[k], F32)
            # stage h = 1: pairs (0, 1), (2, 3); stage h = 2: pairs (0, 2), (1, 3)
            w[0] = v[0] + v[1]
            w[1] = v[0] - v[1]
            w[2] = v[2] + v[3]
            w[3] = v[2] - v[3]
            v[0] = w[0] + w[2]
            v[1] = w[1] + w[3]
            v[2] = w[0] - w[2]
            v[3] = w[1] - w[3]
            # stages h = 4 .. 64: lane bit m = h / 4
            for s in T.unroll(5):
                for k in T.unroll(4):
                    w[k] = T.shfl_xor(v[k], 1 << s, 32)
                for k in T.unroll(4):
                    v[k] = T.if_then_else((lane >> s) & 1 == 0, v[k] + w[k], w[k] - v[k])
            for k in T.unroll(4):
                v[k] = v[k] * T.reinterpret(T.uint32(ROT_SCALE_BITS), F32)
                bits[k] = T.reinterpret(v[k], U32)
            # block amax of the finite values and the non-finite flag over the block's 8 lanes
            red[0] = T.float32(0)
            flag[0] = T.uint32(0)
            for k in T.unroll(4):
                if (bits[k] & T.uint32(0x7F800000)) == T.uint32(0x7F800000):
                    flag[0] = T.uint32(1)
                else:
                    red[0] = T.max(red[0], T.abs(v[k]))
            for o in T.unroll(3):
                red[1] = T.shfl_xor(red[0], 1 << o, 32)
                flag[1] = T.shfl_xor(flag[0], 1 << o, 32)
                red[0] = T.max(red[0], red[1])
                flag[0] = T.max(flag[0], flag[1])
            red[0] = T.max(red[0], T.reinterpret(T.uint32(AMAX_FLOOR_BITS), F32))
            sb[0] = (T.reinterpret(red[0], U32) >> 23) - T.uint32(2) + T.cast(
                (T.reinterpret(red[0], U32) & T.uint32(0x7FFFFF)) > T.uint32(0x400000), U32)
            sb[1] = (T.uint32(254) - sb[0]) << 23
            for k in T.unroll(4):
                w[k] = T.abs(v[k]) * T.reinterpret(sb[1], F32)
                code[k] = (T.cast(w[k] > T.float32(0.25), U32) + T.cast(w[k] >= T.float32(0.75), U32)
                           + T.cast(w[k] > T.float32(1.25), U32) + T.cast(w[k] >= T.float32(1.75), U32)
                           + T.cast(w[k] > T.float32(2.5), U32) + T.cast(w[k] >= T.float32(3.5), U32)
                           + T.cast(w[k] > T.float32(5.0), U32))
                code[k] = T.if_then_else(flag[0] != 0, T.uint32(0), code[k] | ((bits[k] >> 31) << 3))
            for j in T.unroll(2):
                pk[j] = T.cast(code[2 * j] | (code[2 * j + 1] << 4), U8)
            if row < n:
                for j in T.vectorized(2):
                    PK[row, lane * 2 + j] = pk[j]
                if lane % 8 == 0:
                    SC[row, lane // 8] = T.cast(T.if_then_else(flag[0] != 0, T.uint32(255), sb[0]), U8)

    return indexer_kernel


@functools.lru_cache(maxsize=None)
def _compiled(target: str, threads: int):
    return tilelang.compile(make_indexer_kernel(threads), target=target)


def indexer_cache_quantize(x):
    n = x.shape[0]
    packed = torch.empty((n, D // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((n, D // 32), dtype=torch.uint8, device=x.device)
    if n == 0:
        return packed, scale
    cfg = dispatch.config(dispatch.get(OP, "tilelang"), platform.device_info(x))
    _compiled(platform.tilelang_target(x), cfg["threads"])(x, packed, scale)
    return packed, scale


INT32_MAX = 2**31 - 1


def supports_indexer_cache_quantize(x) -> str | None:
    """What indexer_kernel was built for: contiguous [n, 128] bf16 rows, 8-byte aligned (its 4-value loads
    are unchecked), and an int32 row count."""
    reason = shared.supports_indexer_cache_quantize(x)
    if reason:
        return reason
    if x.shape[0] > INT32_MAX:
        return f"{x.shape[0]} rows exceed the int32 row count of the TileLang kernel ({INT32_MAX})"
    if x.data_ptr() % 8:
        return f"x: the TileLang kernel uses 8-byte loads, data_ptr {x.data_ptr():#x} is not 8-byte aligned"
    return None


def codegen_indexer_cache_quantize(target) -> list:
    from dsv4_kernels.codegen import TileLangKernel
    cfg = dict(dispatch.get(OP, "tilelang").defaults)
    return [TileLangKernel(make_indexer_kernel(cfg["threads"]), label=f"d128-threads{cfg['threads']}")]
