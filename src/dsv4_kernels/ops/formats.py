"""Number-format ops (SPEC "Number formats", 1.2, 7 "Formats"): FP8 block quantisation, MXFP4
quantisation and dequantisation, and the paged 584-byte FP8 KV cache. Only the reference
implementation exists so far; kernels must reproduce its bytes exactly.

Bad values (issue 11): the quantisers take any value. A block holding a NaN or an infinity is not an
error, not even in checked mode (DSV4K_CHECK=1): NaN in, NaN out by design (SPEC "Number formats",
"Non-finite input"). None of these ops takes an id or index tensor, so checked mode adds nothing to them
(the KV-cache store with slots, reference.formats.store_kv_cache_fp8, is reached through the compressor
ops, whose checked mode refuses bad cache slots)."""
from __future__ import annotations

import math

import torch

from dsv4_kernels import dispatch
from dsv4_kernels.dispatch import Implementation
from dsv4_kernels.ladder import OpCheck, register_check
from dsv4_kernels.ops import _checks, _library
from dsv4_kernels.oracles import formats as oracle
from dsv4_kernels.reference.formats import FP8_MAX, KV_NOPE_DIM, KV_ROPE_DIM, KV_TILE, KV_TOKEN_BYTES
from dsv4_kernels.reference.formats import quantize_kv_cache_fp8 as reference_quantize_kv

__all__ = ["quantize_fp8_blockwise", "quantize_mxfp4", "dequantize_mxfp4", "quantize_kv_cache_fp8",
           "dequantize_kv_cache_fp8", "compare_exact", "FP8_FORMATS", "MXFP4_BLOCK", "KV_DIM"]

OP_FP8 = "quantize_fp8_blockwise"
OP_MXFP4 = "quantize_mxfp4"
OP_DEQUANT_MXFP4 = "dequantize_mxfp4"
OP_KV = "quantize_kv_cache_fp8"
OP_DEQUANT_KV = "dequantize_kv_cache_fp8"

FP8_FORMATS = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MXFP4_BLOCK = 32
KV_DIM = KV_NOPE_DIM + KV_ROPE_DIM  # 512


def _last_dim(name: str, x: torch.Tensor, multiple: int, what: str) -> int:
    """x has at least one dimension and its last one is a positive multiple of `multiple`."""
    if x.dim() < 1:
        raise ValueError(f"{name}: expected at least 1 dimension (shape [..., K]), got 0 dimensions")
    k = x.shape[-1]
    if k < 1 or k % multiple:
        raise ValueError(f"{name}: expected a last dimension that is a positive multiple of {what}, "
                         f"got shape {tuple(x.shape)}")
    return k


def validate_fp8_blockwise(x, block_size, fmt) -> None:
    _checks.tensor("x", x, FLOAT_DTYPES)
    block_size = _checks.integer("block_size", block_size, minimum=1)
    _last_dim("x", x, block_size, f"block_size {block_size} (K / block_size scales)")
    _checks.one_of("fmt", fmt, FP8_FORMATS)


def validate_mxfp4(x, block_size) -> None:
    _checks.tensor("x", x, FLOAT_DTYPES)
    _checks.one_of("block_size", _checks.integer("block_size", block_size), (MXFP4_BLOCK,))
    _last_dim("x", x, MXFP4_BLOCK, f"the MXFP4 block {MXFP4_BLOCK}")


def validate_dequant_mxfp4(packed, scale) -> None:
    _checks.tensor("packed", packed, torch.uint8)
    half = _last_dim("packed", packed, MXFP4_BLOCK // 2,
                     f"{MXFP4_BLOCK // 2} (K / 2 bytes with K a multiple of the MXFP4 block {MXFP4_BLOCK})")
    _checks.tensor("scale", scale, torch.uint8)
    _checks.shape("scale", scale, (*packed.shape[:-1], half // (MXFP4_BLOCK // 2)))
    _checks.same_device(packed=packed, scale=scale)


def validate_kv(kv, block_size) -> None:
    _checks.tensor("kv", kv, torch.bfloat16, ndim=2)
    _checks.shape("kv", kv, (None, KV_DIM))
    _checks.integer("block_size", block_size, minimum=1)


def validate_dequant_kv(pages, num_tokens, block_size) -> None:
    block_size = _checks.integer("block_size", block_size, minimum=1)
    _checks.tensor("pages", pages, torch.uint8, ndim=2)
    _checks.shape("pages", pages, (None, block_size * KV_TOKEN_BYTES))
    num_tokens = _checks.integer("num_tokens", num_tokens, minimum=0)
    slots = pages.shape[0] * block_size
    if num_tokens > slots:
        raise ValueError(f"num_tokens: expected 0 <= num_tokens <= {slots} (pages.shape[0] * block_size = "
                         f"{pages.shape[0]} * {block_size}), got {num_tokens}")


for _op in (OP_FP8, OP_MXFP4, OP_DEQUANT_MXFP4, OP_KV, OP_DEQUANT_KV):
    dispatch.register(Implementation(
        _op, "reference", "reference", ("cpu", "cuda", "rocm", "ascend"),
        entry=f"dsv4_kernels.reference.formats:{_op}", priority=0))


@_library.custom_op("dsv4::quantize_fp8_blockwise", mutates_args=())
def _quantize_fp8_blockwise_op(x: torch.Tensor, block_size: int, fmt: str,
                               impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = dispatch.call(OP_FP8, x, block_size, fmt, impl=impl or None)
    return q, scale


@_quantize_fp8_blockwise_op.register_fake
def _(x, block_size, fmt, impl):
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    return (x.new_empty(x.shape, dtype=FP8_FORMATS[fmt]),
            x.new_empty((*lead, k // block_size), dtype=torch.float32))


@_library.custom_op("dsv4::quantize_mxfp4", mutates_args=())
def _quantize_mxfp4_op(x: torch.Tensor, block_size: int, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    packed, scale = dispatch.call(OP_MXFP4, x, block_size, impl=impl or None)
    return packed, scale


@_quantize_mxfp4_op.register_fake
def _(x, block_size, impl):
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    return (x.new_empty((*lead, k // 2), dtype=torch.uint8),
            x.new_empty((*lead, k // block_size), dtype=torch.uint8))


@_library.custom_op("dsv4::dequantize_mxfp4", mutates_args=())
def _dequantize_mxfp4_op(packed: torch.Tensor, scale: torch.Tensor, impl: str) -> torch.Tensor:
    return dispatch.call(OP_DEQUANT_MXFP4, packed, scale, impl=impl or None)


@_dequantize_mxfp4_op.register_fake
def _(packed, scale, impl):
    return packed.new_empty((*packed.shape[:-1], 2 * packed.shape[-1]), dtype=torch.float32)


@_library.custom_op("dsv4::quantize_kv_cache_fp8", mutates_args=())
def _quantize_kv_cache_fp8_op(kv: torch.Tensor, block_size: int, impl: str) -> torch.Tensor:
    return dispatch.call(OP_KV, kv, block_size, impl=impl or None)


@_quantize_kv_cache_fp8_op.register_fake
def _(kv, block_size, impl):
    pages = (kv.shape[0] + block_size - 1) // block_size
    return kv.new_empty((pages, block_size * KV_TOKEN_BYTES), dtype=torch.uint8)


@_library.custom_op("dsv4::dequantize_kv_cache_fp8", mutates_args=())
def _dequantize_kv_cache_fp8_op(pages: torch.Tensor, num_tokens: int, block_size: int, impl: str) -> torch.Tensor:
    return dispatch.call(OP_DEQUANT_KV, pages, num_tokens, block_size, impl=impl or None)


@_dequantize_kv_cache_fp8_op.register_fake
def _(pages, num_tokens, block_size, impl):
    return pages.new_empty((num_tokens, KV_DIM), dtype=torch.bfloat16)


def quantize_fp8_blockwise(x: torch.Tensor, block_size: int = 128, fmt: str = "e4m3fn", *,
                           impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 block quantisation along the last dimension with power-of-two scales (SPEC "Number formats").

    Per block of block_size consecutive elements along K:
        scale = 2^ceil(log2(max(amax, 1e-4) / fmt_max))      (fmt_max 448 for e4m3fn, 240 for e4m3fnuz)
        q     = x / scale rounded to nearest, ties to even, saturating at +-fmt_max

    Args:
        x: [..., K] bf16, fp16 or fp32, contiguous, at least one dimension; K a positive multiple of
            block_size. Leading dimensions may be empty (T = 0). Any values: a block holding a NaN or
            +-inf gets scale NaN and q = the format's NaN byte (0x7F e4m3fn, 0x80 e4m3fnuz) for all its
            elements, so it dequantises to NaN; the other blocks are unaffected. This is never an
            error, in checked mode (DSV4K_CHECK=1) neither.
        block_size: a positive int dividing K (the project uses 128, and 32 as in DeepGEMM).
        fmt: "e4m3fn" (OCP FP8: CUDA, ROCm gfx950, Ascend) or "e4m3fnuz" (ROCm gfx942). The bytes of the
            two encodings differ: use the one the consuming kernel's device reads.
        impl: run this implementation ("reference") or raise; None lets the dispatcher choose.
    Returns:
        q: [..., K] torch.float8_e4m3fn or torch.float8_e4m3fnuz (following fmt). -0 stays -0 in e4m3fn;
            e4m3fnuz has no -0 and stores +0 (for -0 and for negative values that round to 0).
        scale: [..., K / block_size] fp32, exact powers of two. An all-zero block gets the scale of
            amax = 1e-4 (2^-22 for e4m3fn, 2^-21 for e4m3fnuz) and q = 0.
    Raises:
        ValueError naming the argument, the expected and the actual value for a wrong dtype, layout,
        rank, a block_size that is not a positive int dividing K, or an fmt other than the two names.
    """
    known = _quantize_fp8_blockwise_op.known((x, block_size, fmt), impl)
    if known is None:
        validate_fp8_blockwise(x, block_size, fmt)
    return _quantize_fp8_blockwise_op.run(known, (x, block_size, fmt), impl, x, int(block_size), fmt)


def quantize_mxfp4(x: torch.Tensor, block_size: int = 32, *,
                   impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 quantisation along the last dimension: e2m1 values with one ue8m0 scale per 32 elements.

    Per block of 32: scale = 2^ceil(log2(max(amax, 1e-4) / 6)); each value x / scale is rounded to the
    nearest of {0, 0.5, 1, 1.5, 2, 3, 4, 6}, ties to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
    1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), saturating at 6, with the IEEE sign of x as the sign bit
    (-0, and negative values that round to 0, give code 8 = -0).

    Args:
        x: [..., K] bf16, fp16 or fp32, contiguous; K a positive multiple of 32; leading dims may be
            empty. Any values: a block holding a NaN or +-inf gets scale byte 255 (NaN) and code 0 for
            all its elements, so it dequantises to NaN; never an error, in checked mode neither.
        block_size: must be 32 (the MXFP4 block; the argument exists for the SPEC 7 signature).
        impl: run this implementation ("reference") or raise.
    Returns:
        packed: [..., K / 2] uint8, two codes per byte: low nibble = even index, high nibble = odd index.
        scale: [..., K / 32] uint8 ue8m0 bytes (value 2^(byte - 127)).
    Raises:
        ValueError for a wrong dtype, layout or rank, a block_size other than 32, or K not a positive
        multiple of 32.
    """
    known = _quantize_mxfp4_op.known((x, block_size), impl)
    if known is None:
        validate_mxfp4(x, block_size)
    return _quantize_mxfp4_op.run(known, (x, block_size), impl, x, int(block_size))


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """Inverse of quantize_mxfp4: FP4 value * 2^(scale byte - 127), exact in fp32.

    Args:
        packed: [..., K / 2] uint8, contiguous, at least one dimension; K a positive multiple of 32.
        scale: [..., K / 32] uint8 ue8m0 bytes, contiguous, same leading shape and device as packed.
        impl: run this implementation ("reference") or raise.
    Returns:
        [..., K] fp32. Code 8 gives -0.0 (times the scale). Scale byte 255 (quantize_mxfp4's mark of a
        block that held a NaN or an infinity) gives NaN for its whole block, whatever the codes; byte 0
        gives 2^-127 (fp32 subnormal products, exact); 6 * 2^127 and above overflow to +-inf.
    Raises:
        ValueError for a wrong dtype, layout, rank, a last dimension of packed that is not a positive
        multiple of 16, a scale shape other than (*packed.shape[:-1], K / 32), or different devices.
    """
    known = _dequantize_mxfp4_op.known((packed, scale), impl)
    if known is None:
        validate_dequant_mxfp4(packed, scale)
    return _dequantize_mxfp4_op.run(known, (packed, scale), impl, packed, scale)


def quantize_kv_cache_fp8(kv: torch.Tensor, block_size: int = 64, *, impl: str | None = None) -> torch.Tensor:
    """Build a paged FP8 KV cache (SPEC 1.2) from N rows; token i goes to page i // block_size, slot
    i % block_size.

    Per token (584 bytes): the first 448 dims (nope) as e4m3fn with one ue8m0 scale per 64 values,
    FlashMLA's rule scale = 2^ceil(log2(max(amax / 448, 1e-4))) (it differs from the block rule of
    quantize_fp8_blockwise only for tiles with amax < 0.0448); the last 64 dims (rope) as raw bf16 (128
    bytes, little-endian). In a page of block_size tokens the first block_size * 576 bytes hold
    [448 nope bytes | 128 rope bytes] per token, then block_size * 8 bytes hold [7 scale bytes | 1 zero
    pad byte] per token. The bytes are e4m3fn on every device (gfx942 kernels decode them as e4m3fn).

    Args:
        kv: [N, 512] bf16, contiguous; N may be 0. Any values: a nope tile of 64 holding a NaN or +-inf
            gets scale byte 255 and e4m3fn NaN bytes (0x7F), so it dequantises to NaN; the rope part
            keeps its bf16 bits (NaN and +-inf included). Never an error, in checked mode neither.
        block_size: tokens per page, a positive int (64 in V4).
        impl: run this implementation ("reference") or raise.
    Returns:
        [ceil(N / block_size), block_size * 584] uint8. Slots past N in the last page are zero bytes
        (they dequantise to 0). N = 0 gives a [0, block_size * 584] cache.
    Raises:
        ValueError for a wrong dtype, rank, shape (last dimension 512), layout, or a block_size that is
        not a positive int.
    """
    known = _quantize_kv_cache_fp8_op.known((kv, block_size), impl)
    if known is None:
        validate_kv(kv, block_size)
    return _quantize_kv_cache_fp8_op.run(known, (kv, block_size), impl, kv, int(block_size))


def dequantize_kv_cache_fp8(pages: torch.Tensor, num_tokens: int, block_size: int = 64, *,
                            impl: str | None = None) -> torch.Tensor:
    """Dequantise the first num_tokens slots of a paged FP8 KV cache (inverse of quantize_kv_cache_fp8).

    Args:
        pages: [P, block_size * 584] uint8, contiguous, in the SPEC 1.2 layout (see quantize_kv_cache_fp8).
            P may be 0.
        num_tokens: an int, 0 <= num_tokens <= P * block_size (a shape relation, checked). Token n is read
            from page n // block_size, slot n % block_size; slots never written dequantise from whatever
            bytes they hold (zero bytes give a zero row).
        block_size: tokens per page, a positive int.
        impl: run this implementation ("reference") or raise.
    Returns:
        [num_tokens, 512] bf16: nope = e4m3fn value * 2^(scale byte - 127) (exact in bf16 for caches built
        by quantize_kv_cache_fp8), rope = the stored bf16 values. Arbitrary bytes follow the formats: an
        e4m3fn NaN byte or scale byte 255 gives NaN (255: the whole tile of 64), products beyond the bf16
        range give +-inf. Only slots < num_tokens are read (no index is taken, so none can wrap).
    Raises:
        ValueError for a wrong dtype, rank, layout, a row length other than block_size * 584, a
        block_size or num_tokens that is not an int in range.
    """
    args = (pages, num_tokens, block_size)
    known = _dequantize_kv_cache_fp8_op.known(args, impl)
    if known is None:
        validate_dequant_kv(*args)
    return _dequantize_kv_cache_fp8_op.run(known, args, impl, pages, int(num_tokens), int(block_size))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def compare_exact(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-exact equality, the tolerance of every format op (SPEC "Number formats" defines each byte):
    quantised bytes and scales are a deterministic function of the input (one rounding each, ties to
    even), and dequantised values are exact products of a code and a power of two, so a correct kernel
    has no freedom. NaN positions must match (their payloads may differ); every other element must have
    the same bits, so -0 versus +0 and e4m3fn versus e4m3fnuz bytes are told apart."""
    if out.dtype != expected.dtype or out.shape != expected.shape:
        raise AssertionError(f"got {out.dtype} {tuple(out.shape)}, expected {expected.dtype} {tuple(expected.shape)}")
    if out.dtype.is_floating_point and out.element_size() > 1:
        nan_o, nan_e = out.float().isnan(), expected.float().isnan()
    else:  # bytes, integers and FP8 (whose NaN is a byte pattern): every element's bits
        nan_o = nan_e = torch.zeros(out.shape, dtype=torch.bool)
    bad = (nan_o != nan_e) | (~nan_e & ~nan_o & (_bits(out) != _bits(expected)))
    if bad.any():
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{int(bad.sum())} of {out.numel()} elements differ in their bits, first at {pos}: "
                             f"actual {out[pos].float().item()!r} (bits {int(_bits(out)[pos])}), expected "
                             f"{expected[pos].float().item()!r} (bits {int(_bits(expected)[pos])})")


def _magnitudes(rows: int, k: int, block: int, gen_scale: float, device) -> torch.Tensor:
    """Per-block magnitudes spread over many binades: exp(N(0, gen_scale)) repeated over each block."""
    return torch.exp(gen_scale * torch.randn(rows, k // block, device=device)).repeat_interleave(block, dim=-1)


def _plant_ties(x: torch.Tensor, block: int, magnitudes: torch.Tensor, fmt_max: float) -> None:
    """Row 0 of x [..., K] (K >= 2 * block): its first block holds fmt_max (so the scale is exactly 1),
    exact midpoints between neighbouring codes of `magnitudes` (ties) of both signs, a -0 and a +0; its
    second block is all zero."""
    flat = x.view(-1, x.shape[-1])
    pick = torch.linspace(0, len(magnitudes) - 2, min(len(magnitudes) - 1, block - 3)).round().long()
    mids = (magnitudes[pick] + magnitudes[pick + 1]) / 2
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64, device=x.device).repeat(len(pick))[:len(pick)]
    flat[0, :2 * block] = 0.0
    flat[0, 0] = fmt_max
    flat[0, 1:1 + len(pick)] = (mids * signs).to(x.dtype)
    flat[0, 1 + len(pick)] = -0.0


def _plant_nonfinite(x: torch.Tensor, block: int) -> None:
    """x [R >= 4, K >= 2 * block], in place: row 1's first block gets a NaN, a +inf and a -inf, row 2's
    second block one +inf, row 3's last block one -inf; row 0 and every other block stay finite."""
    inf = float("inf")
    x[1, 0], x[1, 1], x[1, 2] = float("nan"), inf, -inf
    x[2, block + 5] = inf
    x[3, -1] = -inf


def _fp8_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    cases = []
    for label, shape, dtype, block, fmt in (
            ("flash-3x4096-bf16-b128-e4m3fn", (3, 4096), torch.bfloat16, 128, "e4m3fn"),
            ("pro-3x7168-bf16-b32-e4m3fnuz", (3, 7168), torch.bfloat16, 32, "e4m3fnuz"),
            ("pro-1x7168-fp32-b128-e4m3fn", (1, 7168), torch.float32, 128, "e4m3fn"),
            ("odd-2x5x96-fp16-b32-e4m3fn", (2, 5, 96), torch.float16, 32, "e4m3fn"),
            ("zero-tokens-0x4096", (0, 4096), torch.bfloat16, 128, "e4m3fnuz")):
        k, rows = shape[-1], math.prod(shape[:-1])
        gen = 1.0 if dtype == torch.float16 else 4.0  # fp16 has a narrow range
        x = (torch.randn(rows, k, device=device) * _magnitudes(rows, k, block, gen, device)).to(dtype).reshape(shape)
        if rows:
            _plant_ties(x, block, oracle.fp8_table(fmt)[:oracle.FMT[fmt][1] + 1].to(device), FP8_MAX[fmt])
        cases.append((label, (x, block, fmt), {}))
    for label, dtype, k, block, fmt in (("nonfinite-4x96-bf16-b32-e4m3fn", torch.bfloat16, 96, 32, "e4m3fn"),
                                        ("nonfinite-4x256-fp32-b128-e4m3fnuz", torch.float32, 256, 128, "e4m3fnuz")):
        x = torch.randn(4, k, device=device).to(dtype)
        _plant_ties(x, block, oracle.fp8_table(fmt)[:oracle.FMT[fmt][1] + 1].to(device), FP8_MAX[fmt])
        _plant_nonfinite(x, block)
        cases.append((label, (x, block, fmt), {}))
    return cases


def _mxfp4_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    cases = []
    for label, shape, dtype in (("flash-3x4096-bf16", (3, 4096), torch.bfloat16),
                                ("pro-3x7168-fp32", (3, 7168), torch.float32),
                                ("odd-2x3x96-fp16", (2, 3, 96), torch.float16),
                                ("zero-tokens-0x7168", (0, 7168), torch.bfloat16)):
        k, rows = shape[-1], math.prod(shape[:-1])
        gen = 1.0 if dtype == torch.float16 else 4.0
        x = (torch.randn(rows, k, device=device) * _magnitudes(rows, k, 32, gen, device)).to(dtype).reshape(shape)
        if rows:
            _plant_ties(x, 32, oracle.fp4_table()[:8].to(device), 6.0)
        cases.append((label, (x, 32), {}))
    x = torch.randn(4, 96, device=device).to(torch.float16)
    _plant_ties(x, 32, oracle.fp4_table()[:8].to(device), 6.0)
    _plant_nonfinite(x, 32)
    cases.append(("nonfinite-4x96-fp16", (x, 32), {}))
    return cases


def _dequant_mxfp4_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    cases = []
    for label, shape in (("flash-w13-rows-4x2048", (4, 2048)), ("pro-w2-rows-3x3584", (3, 3584)),
                         ("odd-2x3x48", (2, 3, 48)), ("zero-rows-0x2048", (0, 2048))):
        packed = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        scale = torch.randint(100, 140, (*shape[:-1], shape[-1] // 16), dtype=torch.uint8, device=device)
        if packed.numel():  # scale bytes 0 and 1 (fp32 subnormal products), 254 (6 * 2^127 = inf), 255 (NaN)
            scale.view(-1)[:4] = torch.tensor([0, 1, 254, 255], dtype=torch.uint8, device=device)
        cases.append((label, (packed, scale), {}))
    return cases


def _kv_rows(n: int, device) -> torch.Tensor:
    """[n, 512] bf16 with per-64 tiles over many binades, tiles with amax < 0.0448 (where FlashMLA's
    rule differs from the block rule), an all-zero tile and a -0."""
    kv = torch.randn(n, KV_DIM, device=device) * _magnitudes(n, KV_DIM, 64, 3.0, device)
    if n:
        kv[0, 64:128] *= 1e-3 / kv[0, 64:128].abs().max()
        kv[0, 128:192] = 0.0
        kv[0, 192] = -0.0
    return kv.to(torch.bfloat16)


def _kv_nonfinite_rows(device) -> torch.Tensor:
    """[5, 512] bf16: non-finite values in nope tiles (_plant_nonfinite with tiles of 64: rows 1 and 2;
    its row 3 -inf lands in the rope part) and a NaN, a +inf and a -inf in row 4's rope part (stored as
    they are)."""
    kv = _kv_rows(5, device)
    _plant_nonfinite(kv, KV_TILE)
    kv[4, KV_NOPE_DIM + 1], kv[4, KV_NOPE_DIM + 2], kv[4, -1] = float("nan"), float("inf"), float("-inf")
    return kv


def _kv_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    # The KV layout (head_dim 512 = 448 nope + 64 rope) is the same in V4-Flash and V4-Pro.
    return [("v4-N3-bs64", (_kv_rows(3, device), 64), {}),
            ("odd-N65-bs64-partial-page", (_kv_rows(65, device), 64), {}),
            ("odd-N7-bs3", (_kv_rows(7, device), 3), {}),
            ("zero-tokens-N0", (_kv_rows(0, device), 64), {}),
            ("nonfinite-N5-bs4", (_kv_nonfinite_rows(device), 4), {})]


def _dequant_kv_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    built = reference_quantize_kv(_kv_rows(70, "cpu"), 64).to(device)
    random_pages = torch.randint(0, 256, (3, 16 * KV_TOKEN_BYTES), dtype=torch.uint8, device=device)
    nonfinite = reference_quantize_kv(_kv_nonfinite_rows("cpu"), 4).to(device)
    return [("v4-N70-bs64-all-128-slots", (built, 128, 64), {}),
            ("v4-N70-bs64-first-65", (built, 65, 64), {}),
            ("random-bytes-P3-bs16-N37", (random_pages, 37, 16), {}),
            ("zero-tokens", (built, 0, 64), {}),
            ("empty-cache-P0", (built[:0], 0, 64), {}),
            ("nonfinite-N5-bs4", (nonfinite, 5, 4), {})]


register_check(OpCheck(OP_FP8, _fp8_cases, compare_exact, oracle=oracle.quantize_fp8_blockwise))
register_check(OpCheck(OP_MXFP4, _mxfp4_cases, compare_exact, oracle=oracle.quantize_mxfp4))
register_check(OpCheck(OP_DEQUANT_MXFP4, _dequant_mxfp4_cases, compare_exact, oracle=oracle.dequantize_mxfp4))
register_check(OpCheck(OP_KV, _kv_cases, compare_exact, oracle=oracle.quantize_kv_cache_fp8))
register_check(OpCheck(OP_DEQUANT_KV, _dequant_kv_cases, compare_exact, oracle=oracle.dequantize_kv_cache_fp8))
