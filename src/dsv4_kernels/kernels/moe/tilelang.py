"""TileLang (GPU dialect) source of `mxfp4_grouped_gemm` (SPEC 5): FP8 activations times MXFP4 expert
weights, rows grouped by expert, fp32 accumulation, bf16 result; and `fp4_grouped_moe` composed of it and
the kernels of tilelang_quant.py and tilelang_route.py (end of this file). One source for sm_90a, sm_100a, gfx942
and gfx950, the bf16-dequantisation path of triton.py (README.md "which path serves which chip": Hopper
has no FP4 tensor cores; sm_100a and gfx950 run this portable path, their native MXFP4 MMA is not used).

grouped_gemm_kernel: grid (ceil(M / BLOCK_M), N / BLOCK_N), `threads` threads. A block owns rows
[r0, r0 + BLOCK_M) and columns [n0, n0 + BLOCK_N). Rows of one group are contiguous (the op's contract,
refused in checked mode otherwise), but a block may hold several groups (decode) or padding: the block
copies its rows' group ids to shared memory and walks them; every row j that opens a run (a valid id
different from row j - 1's) starts one pass over group ge = ids[j]: the K loop with the weights of ge
and the activation rows of ge (other rows read as 0), then the rows of ge are stored. A block of one
group (prefill) makes one pass, a block of padding none. A group whose run is broken by -1 padding rows
inside the block is computed once per piece (the same rows, the same values: redundant, not wrong).
Rows whose id is outside [0, G) (-1 padding included; nothing wraps) are stored as 0.

K loop (K / BLOCK_K steps): the packed weights [BLOCK_N, BLOCK_K / 8] and the FP8 activations [BLOCK_M,
BLOCK_K / 4], both read as int32 words, are copied to shared memory (TileLang makes these TMA loads from a
producer warpgroup on CUDA, so 2 x `threads` threads are launched there; cp.async on gfx950); every thread
then decodes its elements in registers and writes bf16 tiles: weight k is nibble k % 8 of word k / 8 (the
low nibble of byte k / 2 for even k, the high one for odd k), e2m1 -> fp32 by integer ops, times its ue8m0
scale (byte (k / 32) % 4 of scale word k / 128, read from global memory where it is used: 2^(byte - 127),
byte 255 -> NaN, byte 0 -> 2^-127); the activation byte decoded by integer ops in its encoding (e4m3fn: bias
7, S.1111.111 NaN; e4m3fnuz: bias 8, 0x80 NaN, no -0), times its fp32 block scale. Both products are exact
in bf16 (2 and 4 significant bits times a power of two; a non-power-of-two activation scale is rounded to
bf16 as in triton.py). T.gemm multiplies them on the bf16 tensor cores (wgmma / mma on CUDA, MFMA on ROCm)
into an fp32 fragment; the result is rounded to bf16 once. NaN in, NaN out: a NaN scale byte gives NaN
columns in that group's rows, a NaN activation byte or block scale a NaN row.

N and K are compile-time (one compile per weight shape: V4 has two GEMMs per model), M and G are
symbolic: one compile serves every token count and expert count, nothing is read back to the host
(CUDA-graph capturable). Built for N a multiple of BLOCK_N and K of BLOCK_K (every V4 size); supports()
refuses the rest with the reason.
"""

import functools

import torch
import tilelang
import tilelang.language as T

from dsv4_kernels import dispatch, platform
from dsv4_kernels.kernels import moe as shared

OP = "mxfp4_grouped_gemm"
# BLOCK_M rows, BLOCK_N output columns, BLOCK_K reduction step per block; threads per block; num_stages of
# the K loop's copy pipeline. Shared memory: BLOCK_M * BLOCK_K * 3 + BLOCK_N * BLOCK_K * 2.5 bytes plus the
# scales (about 45 KB at the defaults: within gfx942's 64 KB LDS). Repeated in ops/moe.py (a test keeps
# them equal) so that registering the op does not import tilelang.
DEFAULTS = {OP: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "threads": 128, "num_stages": 1}}
WEIGHT_BLOCK = 32
SCALE_WORD = 4 * WEIGHT_BLOCK   # K elements whose 4 ue8m0 scale bytes form one int32 word
F32, BF16, I32, U8 = "float32", "bfloat16", "int32", "uint8"
MAX_ROWS = 2**31 - 1
_HALF_BITS = 0x3F000000   # fp32 0.5
_SIGN_BIT = -2**31        # fp32 sign bit as an int32 (no signed shift overflow)


def _nan():
    return T.reinterpret(T.int32(0x7FC00000), F32)


def _byte(word, i):
    """Byte i (0..3) of an int32 word read from little-endian memory, as int32 0..255."""
    return (word >> (i * 8)) & 255


def _nibble(word, i):
    """Nibble i (0..7) of an int32 word: e2m1 code k of a packed row is nibble k % 8 of word k / 8 (the low
    nibble of byte k / 2 for even k)."""
    return (word >> (i * 4)) & 15


def _e2m1(code):
    """e2m1 code (int32 0..15: sign bit 3, exponent bits 2-1, mantissa bit 0) -> fp32 by integer ops: a
    normal code (exponent >= 1) is the fp32 bits (code & 7) << 22 plus 126 << 23, i.e. (1 + m/2) 2^(e-1);
    the subnormal code 1 is 0.5, code 0 is 0; the sign is bit 31 (code 8 is -0)."""
    em = code & 7
    bits = T.if_then_else(em >= 2, (em << 22) + (126 << 23), (em & 1) * _HALF_BITS)
    return T.reinterpret(bits | T.if_then_else((code & 8) != 0, _SIGN_BIT, T.int32(0)), F32)


def _ue8m0(byte):
    """ue8m0 scale byte (int32) -> fp32 2^(byte - 127); 255 -> NaN, 0 -> 2^-127 (an fp32 subnormal)."""
    return T.if_then_else(byte == 255, _nan(), T.if_then_else(
        byte == 0, T.float32(5.877471754111438e-39), T.reinterpret(byte << 23, F32)))


def _e4m3(byte, fnuz: bool):
    """FP8 byte (int32 0..255) -> exact fp32. e4m3fn: exponent bias 7, S.1111.111 is NaN, subnormals m 2^-9;
    e4m3fnuz: bias 8, 0x80 is NaN (no -0), subnormals m 2^-10. A normal code's magnitude is the fp32 bits
    (byte & 0x7F) << 20 plus (127 - bias) << 23."""
    em = byte & 0x7F
    if fnuz:
        mag = T.if_then_else(em >= 8, T.reinterpret((em << 20) + (119 << 23), F32),
                             T.cast(em, F32) * T.float32(0.0009765625))
        nan = byte == 0x80
    else:
        mag = T.if_then_else(em >= 8, T.reinterpret((em << 20) + (120 << 23), F32),
                             T.cast(em, F32) * T.float32(0.001953125))
        nan = em == 0x7F
    # the sign as a bit (a select of -mag and mag would duplicate the decode: lowering time)
    signed = T.reinterpret(T.reinterpret(mag, I32) | T.if_then_else(byte >= 0x80, _SIGN_BIT, T.int32(0)), F32)
    return T.if_then_else(nan, _nan(), signed)


def make_gemm_kernel(N: int, K: int, act_block: int, fnuz: bool, block_m: int, block_n: int, block_k: int,
                     threads: int, num_stages: int):
    """grouped_gemm_kernel for one weight shape (see the module docstring). Arguments: A [M, K] uint8 (FP8
    bytes), AS [M, K / act_block] fp32, B [G, N, K / 2] uint8, BS [G, N, K / 32] uint8, MI [M] int32,
    C [M, N] bf16 (written)."""
    if act_block not in (32, 128):
        raise ValueError(f"act_block must be 32 or 128, got {act_block}")
    if block_k % SCALE_WORD:
        raise ValueError(f"BLOCK_K must be a multiple of {SCALE_WORD} (4 scale bytes per word), got {block_k}")
    if N % block_n or K % block_k:
        raise ValueError(f"N must be a multiple of BLOCK_N {block_n} and K of BLOCK_K {block_k}, got N {N}, K {K}")
    BM, BN, BK = block_m, block_n, block_k
    KT = K // BK            # K steps
    M = T.dynamic("M")
    G = T.dynamic("G")

    @T.prim_func
    def grouped_gemm_kernel(A: T.Tensor((M, K // 4), I32), AS: T.Tensor((M, K // act_block), F32),
                            B: T.Tensor((G, N, K // 8), I32), BS: T.Tensor((G, N, K // SCALE_WORD), I32),
                            MI: T.Tensor((M,), I32), C: T.Tensor((M, N), BF16)):
        with T.Kernel(T.ceildiv(M, BM), N // BN, threads=threads) as (bm, bn):
            r0 = bm * BM
            n0 = bn * BN
            ids = T.alloc_shared((BM,), I32)
            a_raw = T.alloc_shared((BM, BK // 4), I32)    # 4 FP8 bytes per word, little endian
            b_raw = T.alloc_shared((BN, BK // 8), I32)    # 8 e2m1 nibbles per word, k even in the low nibble
            a_bf = T.alloc_shared((BM, BK), BF16)
            b_bf = T.alloc_shared((BN, BK), BF16)
            acc = T.alloc_fragment((BM, BN), F32)
            for i in T.Parallel(BM):   # the rows' groups; rows past M and ids outside [0, G) are -1
                ids[i] = T.if_then_else(r0 + i < M, T.if_then_else(
                    T.And(MI[r0 + i] >= 0, MI[r0 + i] < G), MI[r0 + i], -1), -1)
            for i, j in T.Parallel(BM, BN):   # padding rows are 0; the passes below overwrite their rows
                if r0 + i < M and ids[i] < 0:
                    C[r0 + i, n0 + j] = T.cast(0, BF16)
            for s in T.serial(BM):
                ge = ids[s]
                if ge >= 0 and (s == 0 or ids[s - 1] != ge):   # row s opens a run of group ge: one pass
                    T.clear(acc)
                    for kt in T.Pipelined(KT, num_stages=num_stages):
                        T.copy(A[r0, kt * (BK // 4)], a_raw)
                        T.copy(B[ge, n0, kt * (BK // 8)], b_raw)
                        for i, k in T.Parallel(BM, BK):
                            abyte = _byte(a_raw[i, k // 4], k % 4)
                            a_bf[i, k] = T.if_then_else(
                                ids[i] == ge, T.cast(_e4m3(abyte, fnuz) * AS[r0 + i, (kt * BK + k) // act_block], BF16),
                                T.cast(0, BF16))
                        for j, k in T.Parallel(BN, BK):
                            code = _nibble(b_raw[j, k // 8], k % 8)
                            # scale byte (k / 32) % 4 of word k / 128 of the step (read where it is used:
                            # a shared buffer filled here would be written by the TMA producer on CUDA)
                            sword = BS[ge, n0 + j, kt * (BK // SCALE_WORD) + k // SCALE_WORD]
                            sbyte = _byte(sword, (k // WEIGHT_BLOCK) % 4)
                            b_bf[j, k] = T.cast(_e2m1(code) * _ue8m0(sbyte), BF16)
                        T.gemm(a_bf, b_bf, acc, transpose_B=True)
                    for i, j in T.Parallel(BM, BN):
                        if ids[i] == ge:
                            C[r0 + i, n0 + j] = T.cast(acc[i, j], BF16)

    return grouped_gemm_kernel


@functools.lru_cache(maxsize=None)
def _compiled(target: str, *params):
    return tilelang.compile(make_gemm_kernel(*params), target=target)


def _config(t: torch.Tensor) -> dict:
    return dispatch.config(dispatch.get(OP, "tilelang"), platform.device_info(t))


def _params(cfg: dict) -> tuple:
    return cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["threads"], cfg["num_stages"]


def mxfp4_grouped_gemm(a, a_scale, b, b_scale, m_indices, act_block_size=128):
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=torch.bfloat16, device=a.device)
    if M == 0:
        return c
    kernel = _compiled(platform.tilelang_target(a), N, K, int(act_block_size), a.dtype == torch.float8_e4m3fnuz, *_params(_config(a)))
    # the bytes as little-endian int32 words: 4 FP8 codes, 8 e2m1 codes, 4 scale bytes per word (K % 128 == 0)
    kernel(a.view(torch.uint8).view(torch.int32), a_scale, b.view(torch.int32), b_scale.view(torch.int32),
           m_indices, c)
    return c


# arch (platform.DeviceInfo.arch) -> the compile target this source is built and checked for (README.md)
SERVED_ARCHS = {"sm_90": "sm_90a", "sm_100": "sm_100a", "gfx942": "gfx942", "gfx950": "gfx950"}


def supports_mxfp4_grouped_gemm(a, a_scale, b, b_scale, m_indices, act_block_size=128) -> str | None:
    """What grouped_gemm_kernel was built for, beyond kernels/moe's contract (either FP8 encoding, act
    block 32 or 128, contiguous operands): N a multiple of BLOCK_N and K of BLOCK_K (every V4 GEMM), fewer
    than 2^31 - BLOCK_M rows (the row count is an int32 argument), 16-byte aligned a and b (TMA / 16-byte
    vector copies, unchecked on the device), a 4-byte aligned b_scale (read as int32 words), and one of the chips it serves: sm_90a (H100/H200: no FP4
    tensor cores, so this bf16 path), sm_100a (B200; its native MXFP4 MMA is not used), gfx942 (MI300X,
    e4m3fnuz activations) and gfx950 (MI355X, the same portable path)."""
    reason = shared.supports_mxfp4_grouped_gemm(a, a_scale, b, b_scale, m_indices, act_block_size)
    if reason:
        return reason
    cfg = dict(dispatch.get(OP, "tilelang").defaults) if a.device.type == "cpu" else _config(a)
    M, K = a.shape
    N = b.shape[1]
    if N % cfg["BLOCK_N"] or K % cfg["BLOCK_K"] or cfg["BLOCK_K"] % SCALE_WORD:
        return (f"built for N a multiple of BLOCK_N {cfg['BLOCK_N']} and K of BLOCK_K {cfg['BLOCK_K']} (every V4 "
                f"GEMM), got N = {N}, K = {K}")
    if M > MAX_ROWS - cfg["BLOCK_M"]:
        return f"{M} rows exceed the int32 row count of the TileLang kernel ({MAX_ROWS - cfg['BLOCK_M']})"
    for name, t, nbytes in (("a", a, 16), ("b", b, 16), ("b_scale", b_scale, 4)):
        if t.data_ptr() % nbytes:
            return (f"{name}: the TileLang kernel reads it in {nbytes}-byte " +
                    ("vectors (TMA on CUDA)" if nbytes == 16 else "words") +
                    f", data_ptr {t.data_ptr():#x} is not {nbytes}-byte aligned")
    arch = platform.device_info(a).arch.split(":")[0]
    if arch not in SERVED_ARCHS:
        return f"built and checked for {', '.join(SERVED_ARCHS.values())}, got a device of arch {arch}"
    return None


# One spec per target, together every V4 GEMM shape once: (label, N, K, act_block). The gate/up GEMM has
# N = 2I, K = dim; the down GEMM N = dim, K = I (V4-Flash dim 4096, I 2048; V4-Pro dim 7168, I 3072).
# gfx942 compiles the e4m3fnuz decode (its native encoding), the others e4m3fn.
CODEGEN_SHAPES = {
    "sm_90a": ("flash-w13-N4096-K4096-b128", 4096, 4096, 128),
    "sm_100a": ("pro-w2-N7168-K3072-b32", 7168, 3072, 32),
    "gfx942": ("pro-w13-N6144-K7168-b128-fnuz", 6144, 7168, 128),
    "gfx950": ("flash-w2-N4096-K2048-b32", 4096, 2048, 32),
}


def codegen_mxfp4_grouped_gemm(target) -> list:
    from dsv4_kernels.codegen import TileLangKernel
    label, N, K, act_block = CODEGEN_SHAPES[target.name]
    cfg = dict(dispatch.get(OP, "tilelang").defaults)
    return [TileLangKernel(make_gemm_kernel(N, K, act_block, target.name == "gfx942", *_params(cfg)), label=label)]


# ------------------------------------------------------------------------------------ fp4_grouped_moe
# The routed experts from TileLang sources alone, six launches as triton.py's prefill form: permute
# (tilelang_route.py) -> x quantised straight into expert-sorted order (tilelang_quant.py, the gather form:
# sorted row r holds its token's quantised x row, so this GEMM needs no gather) -> gate/up grouped GEMM ->
# clamp + SwiGLU + routing weight + FP8 requantisation -> down grouped GEMM -> combine. Every buffer is sized
# by T, k, E, dim and I; nothing is read back to the host.

def fp4_grouped_moe(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, act_block_size=128,
                    swiglu_limit=10.0, expert_map=None, act_fmt=None):
    from dsv4_kernels.kernels.moe import tilelang_quant as tq
    from dsv4_kernels.kernels.moe import tilelang_route as tr
    T, dim = x.shape
    y = torch.empty((T, dim), dtype=torch.bfloat16, device=x.device)
    if T == 0:
        return y
    fmt = act_fmt if act_fmt is not None else platform.device_info(x).fp8_encoding
    E = w13.shape[0]
    route = tr.permute(topk_ids, topk_weights, E, expert_map)
    xq, xs = tq.quantize_fp8(x, act_block_size, fmt, rows=route["tokens"])
    gu = mxfp4_grouped_gemm(xq, xs, w13, w13_scale, route["experts"], act_block_size)
    hq, hs = tq.swiglu_quant(gu, route["experts"], route["weights"], E, act_block_size, fmt, swiglu_limit)
    ys = mxfp4_grouped_gemm(hq.view(tq.FP8_DTYPE[fmt]), hs, w2, w2_scale, route["experts"], act_block_size)
    return tr.combine(ys, route["inv"])


def supports_fp4_grouped_moe(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, act_block_size=128,
                             swiglu_limit=10.0, expert_map=None, act_fmt=None) -> str | None:
    """kernels/moe's contract, plus what the TileLang kernels were built for: dim and I multiples of 128
    (the grouped GEMM's BLOCK_K, and its BLOCK_N 64 for 2I and dim: every V4 size), T * k below the GEMM's
    row limit, and a chip the grouped GEMM serves (SERVED_ARCHS)."""
    reason = shared.supports_fp4_grouped_moe(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale,
                                             act_block_size, swiglu_limit, expert_map, act_fmt)
    if reason:
        return reason
    dim, inter = x.shape[1], w2.shape[2] * 2
    cfg = dict(dispatch.get(OP, "tilelang").defaults) if x.device.type == "cpu" else _config(x)
    if dim % cfg["BLOCK_K"] or inter % cfg["BLOCK_K"]:
        return (f"built for dim and I multiples of BLOCK_K {cfg['BLOCK_K']} (every V4 size), got dim = {dim}, "
                f"I = {inter}")
    if topk_ids.numel() > MAX_ROWS - cfg["BLOCK_M"]:
        return f"T * k = {topk_ids.numel()} rows exceed the int32 row count of the TileLang grouped GEMM"
    arch = platform.device_info(x).arch.split(":")[0]
    if arch not in SERVED_ARCHS:
        return f"built and checked for {', '.join(SERVED_ARCHS.values())}, got a device of arch {arch}"
    return None


def codegen_fp4_grouped_moe(target) -> list:
    """The MoE's own TileLang kernels (the grouped GEMM is mxfp4_grouped_gemm's job): the x quantisation
    (gather form), SwiGLU + requantisation, permutation and combine, at the V4 shapes each file names."""
    from dsv4_kernels.kernels.moe import tilelang_quant as tq
    from dsv4_kernels.kernels.moe import tilelang_route as tr
    return tq.codegen_quantize_fp8(target) + tq.codegen_swiglu_quant(target) + tr.codegen_route(target)
