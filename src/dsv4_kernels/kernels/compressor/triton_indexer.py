"""Triton source of indexer_cache_quantize (SPEC 2): the indexer cache form of d = 128 entries, Hadamard
rotation (scale 128^-0.5) then MXFP4, in one launch; one source for sm_90a, sm_100a, gfx942 and gfx950.

indexer_kernel, one program per BLOCK_ROWS rows (the last block masked):
1. the bf16 rows, upcast to fp32 (exact) into registers [BLOCK_ROWS, 128];
2. the fast Walsh-Hadamard transform in the reference's order (reference/compressor.py:
   walsh_hadamard_fp32): stages h = 1, 2, ..., 64, each replacing the pairs (v[i], v[i + h]), bit h of i
   clear, by (v[i] + v[i + h], v[i] - v[i + h]) in fp32 (a reshape to [.., 2, h], a permute that puts the
   pair axis last, tl.split, tl.join), then one fp32 multiplication by fp32(128^-0.5). Additions are
   never contracted (no multiply feeds them), so every output is the reference's tree of fp32 roundings;
3. per block of 32: a non-finite flag (exponent bits all ones) and the amax of the finite values; the
   ue8m0 byte of 2^ceil(log2(max(amax, 1e-4) / 6)) from the fp32 bits of A = max(amax, 1e-4): with
   A = M * 2^E, M in [1, 2), the correctly rounded fp32 quotient A / 6 is a power of two only for M = 1.5
   and lies above 2^(E-2) exactly when M > 1.5, so the byte is biased(E) - 2 + (mantissa bits >
   0x400000). This equals the reference (fp32 division, then frexp) for every A, with no division;
4. codes: |v| * 2^-e (exact), the nearest e2m1 magnitude by seven fp32 compares against the midpoints
   (ties to the even code: > at 0.25, 1.25, 2.5, 5; >= at 0.75, 1.75, 3.5), saturating at 6, the sign
   from the IEEE bit of v (-0 gives code 8); a non-finite block gets scale byte 255 and codes 0, as
   reference/formats.py's quantize_mxfp4 (NaN in gives the NaN scale, never a finite block);
5. packing with integer ops: low nibble = even index, 64 bytes and 4 scale bytes per row.
The interpreter has no fp4 or fp8 type; everything past the rotation is integer and compare arithmetic,
so the interpreter and the GPUs give the same bytes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4_kernels import dispatch, platform
from dsv4_kernels.kernels._triton_util import FP_FUSION

OP = "indexer_cache_quantize"
D = 128
# fp32(128^-0.5), as reference/compressor.py's INDEXER_SCALE: the literal rounds to these bits (0x3DB504F3)
ROT_SCALE = tl.constexpr(0.08838834764831845)
AMAX_FLOOR = tl.constexpr(1e-4)


@triton.jit
def _butterfly(v, ROWS: tl.constexpr, H: tl.constexpr):
    # one stage: (v[i], v[i + H]) -> (v[i] + v[i + H], v[i] - v[i + H]) for every i with bit H clear
    w = tl.permute(tl.reshape(v, (ROWS, 128 // (2 * H), 2, H)), (0, 1, 3, 2))
    a, b = tl.split(w)
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (ROWS, 128))


@triton.jit
def indexer_kernel(x_ptr, packed_ptr, scale_ptr, n, BLOCK_ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ok = rows < n
    c = tl.arange(0, 128)
    v = tl.load(x_ptr + rows[:, None] * 128 + c[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    v = _butterfly(v, BLOCK_ROWS, 1)
    v = _butterfly(v, BLOCK_ROWS, 2)
    v = _butterfly(v, BLOCK_ROWS, 4)
    v = _butterfly(v, BLOCK_ROWS, 8)
    v = _butterfly(v, BLOCK_ROWS, 16)
    v = _butterfly(v, BLOCK_ROWS, 32)
    v = _butterfly(v, BLOCK_ROWS, 64)
    v = tl.reshape(v * ROT_SCALE, (BLOCK_ROWS, 4, 32))

    bits = v.to(tl.uint32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    bad = tl.max(tl.where(finite, 0, 1), axis=2)                                   # [BR, 4]
    a = tl.abs(v)
    amax = tl.maximum(tl.max(tl.where(finite, a, 0.0), axis=2), AMAX_FLOOR)
    abits = amax.to(tl.uint32, bitcast=True)
    sbyte = (abits >> 23) - 2 + ((abits & 0x7FFFFF) > 0x400000).to(tl.uint32)     # 2^(sbyte - 127) >= A / 6
    inv = ((254 - sbyte) << 23).to(tl.float32, bitcast=True)                       # 2^(127 - sbyte), exact
    q = a * inv[:, :, None]
    code = ((q > 0.25).to(tl.uint32) + (q >= 0.75).to(tl.uint32) + (q > 1.25).to(tl.uint32)
            + (q >= 1.75).to(tl.uint32) + (q > 2.5).to(tl.uint32) + (q >= 3.5).to(tl.uint32)
            + (q > 5.0).to(tl.uint32))
    code = tl.where(bad[:, :, None] != 0, 0, code | ((bits >> 31) << 3))
    sbyte = tl.where(bad != 0, 255, sbyte)

    lo, hi = tl.split(tl.reshape(code, (BLOCK_ROWS, 64, 2)))
    tl.store(packed_ptr + rows[:, None] * 64 + tl.arange(0, 64)[None, :], (lo | (hi << 4)).to(tl.uint8),
             mask=ok[:, None])
    tl.store(scale_ptr + rows[:, None] * 4 + tl.arange(0, 4)[None, :], sbyte.to(tl.uint8), mask=ok[:, None])


def indexer_cache_quantize(x):
    n = x.shape[0]
    packed = torch.empty((n, D // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((n, D // 32), dtype=torch.uint8, device=x.device)
    if n == 0:
        return packed, scale
    cfg = dispatch.config(dispatch.get(OP, "triton"), platform.device_info(x))
    indexer_kernel[(triton.cdiv(n, cfg["BLOCK_ROWS"]),)](
        x, packed, scale, n, BLOCK_ROWS=cfg["BLOCK_ROWS"], num_warps=cfg["num_warps"], enable_fp_fusion=FP_FUSION)
    return packed, scale


def codegen_indexer_cache_quantize(target) -> list:
    """The one form: bf16 rows in, packed codes and scale bytes out, the registered block shape."""
    from dsv4_kernels.codegen import TritonKernel
    cfg = dispatch.get(OP, "triton").defaults
    sig = {"x_ptr": "*bf16", "packed_ptr": "*u8", "scale_ptr": "*u8", "n": "i64"}
    return [TritonKernel(indexer_kernel, sig, {"BLOCK_ROWS": cfg["BLOCK_ROWS"]}, num_warps=cfg["num_warps"],
                         label=f"d128-rows{cfg['BLOCK_ROWS']}")]
