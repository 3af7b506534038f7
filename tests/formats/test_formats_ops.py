"""The number-format ops through the public API (SPEC "Number formats", 1.2, 7 "Formats"): every
implementation against the reference (bit-exact: the formats define every byte), hand values for ties,
signed zeros and saturation, validation, the torch.library registration, torch.compile and the
ladder cases (the reference against the fp64 oracle)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv4_kernels import dispatch, ladder
from dsv4_kernels.ops import formats as ops
from dsv4_kernels.ops.formats import (compare_exact, dequantize_kv_cache_fp8, dequantize_mxfp4,
                                      quantize_fp8_blockwise, quantize_kv_cache_fp8, quantize_mxfp4)
from dsv4_kernels.oracles import formats as oracle
from dsv4_kernels.reference import formats as reference

FP8_DTYPE = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}
# (rows, K): V4-Flash and V4-Pro hidden sizes at T = 3, 1 and 0, an odd token count and an odd K.
SHAPES = {"flash-T3": (3, 4096), "pro-T3": (3, 7168), "pro-T1": (1, 7168), "flash-T0": (0, 4096),
          "odd-63x96": (63, 96), "odd-3d-5x7x160": (5, 7, 160)}


def _values(shape, dtype, block, spread=4.0) -> torch.Tensor:
    """Gaussian values whose per-block magnitudes span many binades (fp16 gets a narrower spread)."""
    if dtype == torch.float16:
        spread = 1.0
    k = shape[-1]
    rows = torch.Size(shape[:-1]).numel()
    mag = torch.exp(spread * torch.randn(rows, k // block)).repeat_interleave(block, dim=-1)
    return (torch.randn(rows, k) * mag).to(dtype).reshape(shape)


def _same(out, expected) -> None:
    """Each output position with the ops' bit-exact rule."""
    out = out if isinstance(out, tuple) else (out,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(out) == len(expected)
    for o, e in zip(out, expected):
        compare_exact(o.cpu(), e)


@pytest.mark.op("quantize_fp8_blockwise")
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("fmt", ["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_quantize_fp8_blockwise_matches_reference(impl, device, shape, fmt, block, dtype):
    if shape[-1] % block:
        block = 32
    x = _values(shape, dtype, block)
    q, scale = quantize_fp8_blockwise(x.to(device), block, fmt, impl=impl)
    assert q.dtype == FP8_DTYPE[fmt] and q.shape == x.shape and q.device == device
    assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], shape[-1] // block)
    _same((q, scale), reference.quantize_fp8_blockwise(x, block, fmt))


@pytest.mark.op("quantize_fp8_blockwise")
@pytest.mark.parametrize("fmt", ["e4m3fn", "e4m3fnuz"])
def test_quantize_fp8_hand_ties_signed_zero_and_zero_block(impl, device, fmt):
    fmt_max = {"e4m3fn": 448.0, "e4m3fnuz": 240.0}[fmt]
    # Block 0: amax = fmt_max (scale 1). 1.0625 is the midpoint of 1.0 (mantissa 000) and 1.125 (001):
    # ties go to even, 1.0. 1.1875 lies between 1.125 (001) and 1.25 (010): even is 1.25.
    # Block 1: all zero (the scale of amax = 1e-4). Block 2: amax 3 -> scale 2^ceil(log2(3 / fmt_max)).
    x = torch.zeros(3, 32)
    x[0, :6] = torch.tensor([fmt_max, 1.0625, -1.1875, -0.0, 0.0, -fmt_max])
    x[2, :2] = torch.tensor([3.0, -1.5])
    q, scale = quantize_fp8_blockwise(x.reshape(1, 96).to(device), 32, fmt, impl=impl)
    q, scale = q.cpu().float().reshape(3, 32), scale.cpu().reshape(3)
    assert q[0, :3].tolist() == [fmt_max, 1.0, -1.25]
    neg_zero_sign = torch.signbit(q[0, 3]).item()
    assert neg_zero_sign == (fmt == "e4m3fn")  # e4m3fnuz has no -0
    assert scale[0].item() == 1.0 and (q[1] == 0).all()
    assert scale[1].item() == {"e4m3fn": 2.0 ** -22, "e4m3fnuz": 2.0 ** -21}[fmt]
    k = {"e4m3fn": -7, "e4m3fnuz": -6}[fmt]  # 3 / 448 = 2^-7.2 ; 3 / 240 = 2^-6.3
    assert scale[2].item() == 2.0 ** k and q[2, :2].tolist() == [3.0 * 2 ** -k, -1.5 * 2 ** -k]


@pytest.mark.op("quantize_mxfp4")
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_quantize_mxfp4_matches_reference(impl, device, shape, dtype):
    x = _values(shape, dtype, 32)
    packed, scale = quantize_mxfp4(x.to(device), impl=impl)
    assert packed.dtype == scale.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], shape[-1] // 2) and scale.shape == (*shape[:-1], shape[-1] // 32)
    _same((packed, scale), reference.quantize_mxfp4(x, 32))


@pytest.mark.op("quantize_mxfp4")
def test_quantize_mxfp4_hand_ties_and_nibble_order(impl, device):
    # amax 6 -> scale byte 127; midpoints tie to the even code; -0 and -0.1 round to code 8 (-0).
    x = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.0, -0.1, 0.0, -6.0] + [0.0] * 20)
    packed, scale = quantize_mxfp4(x[None].to(device), impl=impl)
    codes = [(b >> s) & 0xF for b in packed.cpu()[0].tolist() for s in (0, 4)]  # low nibble first
    assert codes[:12] == [7, 0, 2, 2, 4, 4, 6, 6, 8, 8, 0, 15]
    assert scale.cpu().tolist() == [[127]]


@pytest.mark.op("dequantize_mxfp4")
@pytest.mark.parametrize("shape", [(4, 2048), (3, 3584), (1, 3584), (0, 2048), (63, 48), (2, 5, 80)],
                         ids=["flash-K4096", "pro-K7168", "pro-T1", "zero-rows", "odd-63x96", "odd-3d"])
def test_dequantize_mxfp4_matches_reference(impl, device, shape):
    packed = torch.randint(0, 256, shape, dtype=torch.uint8)
    scale = torch.randint(90, 160, (*shape[:-1], shape[-1] // 16), dtype=torch.uint8)
    if packed.numel():
        scale.view(-1)[:4] = torch.tensor([0, 1, 254, 255], dtype=torch.uint8)  # subnormal, inf, NaN
    out = dequantize_mxfp4(packed.to(device), scale.to(device), impl=impl)
    assert out.dtype == torch.float32 and out.shape == (*shape[:-1], 2 * shape[-1])
    _same(out, reference.dequantize_mxfp4(packed, scale))


@pytest.mark.op("dequantize_mxfp4")
def test_mxfp4_round_trip_of_representable_values(impl, device):
    """Values that are FP4 codes times a power of two come back exactly, nibble order included."""
    codes = torch.randint(0, 16, (5, 7168), dtype=torch.uint8)
    exps = torch.randint(-10, 20, (5, 224)).repeat_interleave(32, dim=-1)  # amax 6 * 2^e above 1e-4
    x = reference.FP4_VALUES[codes.long()] * torch.exp2(exps.float())
    x[:, ::32] = 6.0 * torch.exp2(exps[:, ::32].float())  # each block's amax is 6 * 2^e: scale 2^e
    packed, scale = quantize_mxfp4(x.to(device), impl=impl)
    back = dequantize_mxfp4(packed, scale, impl=impl).cpu()
    assert torch.equal(back, x)


@pytest.mark.op("quantize_kv_cache_fp8")
@pytest.mark.parametrize("n, block_size", [(3, 64), (64, 64), (65, 64), (0, 64), (7, 3), (5, 1)])
def test_quantize_kv_cache_matches_reference(impl, device, n, block_size):
    kv = _values((n, 512), torch.bfloat16, 64, spread=3.0)
    if n:
        kv[0, 64:128] = (kv[0, 64:128].float() * 1e-3 / kv[0, 64:128].float().abs().max()).to(torch.bfloat16)
        kv[0, 128:192] = 0.0
    pages = quantize_kv_cache_fp8(kv.to(device), block_size, impl=impl)
    assert pages.dtype == torch.uint8 and pages.shape == (-(-n // block_size), block_size * 584)
    _same(pages, reference.quantize_kv_cache_fp8(kv, block_size))


@pytest.mark.op("quantize_kv_cache_fp8")
def test_kv_cache_uses_flashmla_scale_rule(impl, device):
    """A tile with amax 0.01: FlashMLA's rule gives 2^ceil(log2(1e-4)) = 2^-13 (byte 114), the block rule
    of quantize_fp8_blockwise would give 2^ceil(log2(0.01 / 448)) = 2^-15."""
    kv = torch.zeros(1, 512)
    kv[0, :64] = 0.01
    kv[0, 448:] = torch.linspace(-2, 2, 64)
    pages = quantize_kv_cache_fp8(kv.to(torch.bfloat16).to(device), 64, impl=impl).cpu()
    assert pages[0, 64 * 576].item() == 127 - 13
    assert pages[0, 64 * 576 + 7].item() == 0  # pad byte
    rope = pages[0, 448:576].view(torch.bfloat16)
    assert torch.equal(rope, kv[0, 448:].to(torch.bfloat16))


@pytest.mark.op("dequantize_kv_cache_fp8")
@pytest.mark.parametrize("n, block_size, num_tokens", [(70, 64, 128), (70, 64, 70), (70, 64, 0), (7, 3, 9),
                                                       (0, 64, 0)])
def test_dequantize_kv_cache_matches_reference(impl, device, n, block_size, num_tokens):
    pages = reference.quantize_kv_cache_fp8(_values((n, 512), torch.bfloat16, 64, spread=3.0), block_size)
    out = dequantize_kv_cache_fp8(pages.to(device), num_tokens, block_size, impl=impl)
    assert out.dtype == torch.bfloat16 and out.shape == (num_tokens, 512)
    _same(out, reference.dequantize_kv_cache_fp8(pages, num_tokens, block_size))


@pytest.mark.op("dequantize_kv_cache_fp8")
def test_dequantize_kv_cache_of_arbitrary_bytes(impl, device):
    """Any bytes: NaN fp8 bytes and scale byte 255 give NaN, the rest follows the formats exactly."""
    pages = torch.randint(0, 256, (3, 16 * 584), dtype=torch.uint8)
    out = dequantize_kv_cache_fp8(pages.to(device), 48, 16, impl=impl)
    _same(out, reference.dequantize_kv_cache_fp8(pages, 48, 16))


@pytest.mark.op("dequantize_kv_cache_fp8")
def test_kv_cache_round_trip_is_the_fp8_value(impl, device):
    kv = _values((65, 512), torch.bfloat16, 64, spread=3.0)
    pages = quantize_kv_cache_fp8(kv.to(device), 64, impl=impl)
    back = dequantize_kv_cache_fp8(pages, 65, 64, impl=impl).cpu()
    assert torch.equal(back[:, 448:], kv[:, 448:])  # rope: stored as is
    nope, got = kv[:, :448].float(), back[:, :448].float()
    tile_amax = nope.abs().reshape(65, 7, 64).amax(dim=-1).repeat_interleave(64, dim=-1)
    normal = nope.abs() > tile_amax / 1000  # above e4m3's subnormal range relative to the tile's scale
    assert ((got - nope).abs() <= 2.0 ** -4 * nope.abs())[normal].all()  # 3 mantissa bits: half an ulp


@st.composite
def _fp8_case(draw):
    block = draw(st.sampled_from([1, 16, 32, 128]))
    rows = draw(st.integers(0, 5))
    k = block * draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 300.0])) if dtype != torch.float16 else 1.0
    return (torch.randn(rows, k, generator=g) * scale).to(dtype), block, draw(st.sampled_from(["e4m3fn", "e4m3fnuz"]))


@pytest.mark.op("quantize_fp8_blockwise")
@given(case=_fp8_case())
@settings(deadline=None)
def test_quantize_fp8_any_block_matches_oracle_and_reference(impl, device, case):
    x, block, fmt = case
    out = quantize_fp8_blockwise(x.to(device), block, fmt, impl=impl)
    _same(out, reference.quantize_fp8_blockwise(x, block, fmt))
    _same(out, oracle.quantize_fp8_blockwise(x, block, fmt))


def test_compare_exact_tells_bits_apart():
    q = torch.tensor([1.0, -0.0, 448.0]).to(torch.float8_e4m3fn)
    compare_exact(q.clone(), q)
    with pytest.raises(AssertionError, match=r"1 of 3 elements differ in their bits, first at \(1,\)"):
        compare_exact(torch.tensor([1.0, 0.0, 448.0]).to(torch.float8_e4m3fn), q)   # +0 for -0
    with pytest.raises(AssertionError, match="got torch.float8_e4m3fnuz"):
        compare_exact(torch.tensor([1.0, 0.0, 240.0]).to(torch.float8_e4m3fnuz), q)
    v = torch.tensor([1.0, float("nan"), -0.0])
    compare_exact(v.clone(), v)
    with pytest.raises(AssertionError, match="differ in their bits"):
        compare_exact(torch.tensor([1.0, 0.0, -0.0]), v)                        # NaN position
    with pytest.raises(AssertionError, match="differ in their bits"):
        compare_exact(torch.tensor([1.0000001, float("nan"), -0.0]), v)          # one fp32 ulp
    with pytest.raises(AssertionError, match="differ in their bits"):
        compare_exact(torch.tensor([[7, 1]], dtype=torch.uint8), torch.tensor([[7, 2]], dtype=torch.uint8))


def _valid(op: str) -> dict:
    return {
        "quantize_fp8_blockwise": dict(x=torch.randn(3, 256).to(torch.bfloat16), block_size=128, fmt="e4m3fn"),
        "quantize_mxfp4": dict(x=torch.randn(3, 256), block_size=32),
        "dequantize_mxfp4": dict(packed=torch.randint(0, 256, (3, 128), dtype=torch.uint8),
                                 scale=torch.full((3, 8), 127, dtype=torch.uint8)),
        "quantize_kv_cache_fp8": dict(kv=torch.randn(5, 512).to(torch.bfloat16), block_size=64),
        "dequantize_kv_cache_fp8": dict(pages=torch.zeros(2, 64 * 584, dtype=torch.uint8), num_tokens=100,
                                        block_size=64),
    }[op]


FLOATS = "torch.bfloat16 or torch.float16 or torch.float32"
BAD = [
    ("quantize_fp8_blockwise", "x", lambda a: a.tolist(), "x: expected a torch.Tensor, got list"),
    ("quantize_fp8_blockwise", "x", lambda a: a.int(), f"x: expected dtype {FLOATS}, got torch.int32"),
    ("quantize_fp8_blockwise", "x", lambda a: a.double(), f"x: expected dtype {FLOATS}, got torch.float64"),
    ("quantize_fp8_blockwise", "x", lambda a: a[0, 0], "x: expected at least 1 dimension (shape [..., K]), got 0"),
    ("quantize_fp8_blockwise", "x", lambda a: torch.randn(256, 3).t(), "x: expected a contiguous tensor"),
    ("quantize_fp8_blockwise", "x", lambda a: torch.randn(3, 200),
     "x: expected a last dimension that is a positive multiple of block_size 128 (K / block_size scales), "
     "got shape (3, 200)"),
    ("quantize_fp8_blockwise", "x", lambda a: torch.randn(3, 0), "positive multiple of block_size 128"),
    ("quantize_fp8_blockwise", "block_size", lambda a: 0, "block_size: expected an int >= 1, got 0"),
    ("quantize_fp8_blockwise", "block_size", lambda a: 96, "multiple of block_size 96 (K / block_size scales), "
                                                           "got shape (3, 256)"),
    ("quantize_fp8_blockwise", "block_size", lambda a: 128.0, "block_size: expected an int, got float 128.0"),
    ("quantize_fp8_blockwise", "block_size", lambda a: True, "block_size: expected an int, got bool True"),
    ("quantize_fp8_blockwise", "fmt", lambda a: "e5m2", "fmt: expected one of e4m3fn, e4m3fnuz, got 'e5m2'"),
    ("quantize_fp8_blockwise", "fmt", lambda a: None, "fmt: expected one of e4m3fn, e4m3fnuz, got None"),
    ("quantize_mxfp4", "x", lambda a: a.to(torch.uint8), f"x: expected dtype {FLOATS}, got torch.uint8"),
    ("quantize_mxfp4", "x", lambda a: torch.randn(3, 48),
     "x: expected a last dimension that is a positive multiple of the MXFP4 block 32, got shape (3, 48)"),
    ("quantize_mxfp4", "x", lambda a: torch.randn(512, 3).t(), "x: expected a contiguous tensor"),
    ("quantize_mxfp4", "block_size", lambda a: 16, "block_size: expected one of 32, got 16"),
    ("quantize_mxfp4", "block_size", lambda a: 32.0, "block_size: expected an int, got float 32.0"),
    ("dequantize_mxfp4", "packed", lambda a: a.to(torch.int8), "packed: expected dtype torch.uint8, got torch.int8"),
    ("dequantize_mxfp4", "packed", lambda a: a[:, :24].contiguous(),
     "packed: expected a last dimension that is a positive multiple of 16 (K / 2 bytes with K a multiple of the "
     "MXFP4 block 32), got shape (3, 24)"),
    ("dequantize_mxfp4", "packed", lambda a: a[0, 0], "packed: expected at least 1 dimension"),
    ("dequantize_mxfp4", "packed", lambda a: torch.zeros(128, 3, dtype=torch.uint8).t(),
     "packed: expected a contiguous tensor"),
    ("dequantize_mxfp4", "scale", lambda a: a.float(), "scale: expected dtype torch.uint8, got torch.float32"),
    ("dequantize_mxfp4", "scale", lambda a: a[:, :4].contiguous(), "scale: expected shape (3, 8), got (3, 4)"),
    ("dequantize_mxfp4", "scale", lambda a: torch.zeros(4, 8, dtype=torch.uint8), "scale: expected shape (3, 8), "
                                                                                   "got (4, 8)"),
    ("dequantize_mxfp4", "scale", lambda a: a[:, None], "scale: expected shape (3, 8), got (3, 1, 8)"),
    ("dequantize_mxfp4", "scale", lambda a: torch.zeros(8, 3, dtype=torch.uint8).t(), "scale: expected a contiguous"),
    ("dequantize_mxfp4", "scale", lambda a: a.to("meta"),
     "scale: expected device cpu (the device of packed), got meta"),
    ("quantize_kv_cache_fp8", "kv", lambda a: a.float(), "kv: expected dtype torch.bfloat16, got torch.float32"),
    ("quantize_kv_cache_fp8", "kv", lambda a: torch.zeros(5, 576, dtype=torch.bfloat16),
     "kv: expected shape (*, 512), got (5, 576)"),
    ("quantize_kv_cache_fp8", "kv", lambda a: a[None], "kv: expected 2 dimensions, got 3"),
    ("quantize_kv_cache_fp8", "kv", lambda a: torch.zeros(512, 5, dtype=torch.bfloat16).t(),
     "kv: expected a contiguous tensor"),
    ("quantize_kv_cache_fp8", "block_size", lambda a: 0, "block_size: expected an int >= 1, got 0"),
    ("quantize_kv_cache_fp8", "block_size", lambda a: 64.0, "block_size: expected an int, got float 64.0"),
    ("dequantize_kv_cache_fp8", "pages", lambda a: a.to(torch.int8),
     "pages: expected dtype torch.uint8, got torch.int8"),
    ("dequantize_kv_cache_fp8", "pages", lambda a: a[:, 1:].contiguous(), "pages: expected shape (*, 37376), "
                                                                          "got (2, 37375)"),
    ("dequantize_kv_cache_fp8", "pages", lambda a: a.flatten(), "pages: expected 2 dimensions, got 1"),
    ("dequantize_kv_cache_fp8", "pages", lambda a: torch.zeros(64 * 584, 2, dtype=torch.uint8).t(),
     "pages: expected a contiguous tensor"),
    ("dequantize_kv_cache_fp8", "num_tokens", lambda a: 129,
     "num_tokens: expected 0 <= num_tokens <= 128 (pages.shape[0] * block_size = 2 * 64), got 129"),
    ("dequantize_kv_cache_fp8", "num_tokens", lambda a: -1, "num_tokens: expected an int >= 0, got -1"),
    ("dequantize_kv_cache_fp8", "num_tokens", lambda a: 3.0, "num_tokens: expected an int, got float 3.0"),
    ("dequantize_kv_cache_fp8", "num_tokens", lambda a: torch.tensor(3), "num_tokens: expected an int, got Tensor"),
    ("dequantize_kv_cache_fp8", "block_size", lambda a: 32, "pages: expected shape (*, 18688), got (2, 37376)"),
    ("dequantize_kv_cache_fp8", "block_size", lambda a: -64, "block_size: expected an int >= 1, got -64"),
]


@pytest.mark.parametrize("op, name, bad, message", BAD, ids=[f"{o}-{n}-{i}" for i, (o, n, _, _) in enumerate(BAD)])
def test_bad_argument_is_refused_before_launch(op, name, bad, message):
    args = _valid(op)
    args[name] = bad(args[name])
    with dispatch.recording() as calls, pytest.raises(ValueError) as err:
        getattr(ops, op)(**args)
    assert message in str(err.value)
    assert not calls


def test_valid_arguments_of_the_refusal_table_run():
    names = ("quantize_fp8_blockwise", "quantize_mxfp4", "dequantize_mxfp4", "quantize_kv_cache_fp8",
             "dequantize_kv_cache_fp8")
    with dispatch.recording() as calls:
        for op in names:
            getattr(ops, op)(**_valid(op))
    assert calls == {(op, "reference"): 1 for op in names}


@pytest.mark.parametrize("T", [0, 3])
def test_torch_library_ops_are_complete(T):
    x = torch.randn(T, 256).to(torch.bfloat16)
    packed, scale = reference.quantize_mxfp4(x, 32)
    pages = reference.quantize_kv_cache_fp8(torch.randn(T + 2, 512).to(torch.bfloat16), 4)
    calls = [
        (torch.ops.dsv4.quantize_fp8_blockwise.default, (x, 128, "e4m3fn", "reference")),
        (torch.ops.dsv4.quantize_fp8_blockwise.default, (x.float(), 32, "e4m3fnuz", "reference")),
        (torch.ops.dsv4.quantize_mxfp4.default, (x, 32, "reference")),
        (torch.ops.dsv4.dequantize_mxfp4.default, (packed, scale, "reference")),
        (torch.ops.dsv4.quantize_kv_cache_fp8.default, (torch.randn(T, 512).to(torch.bfloat16), 4, "reference")),
        (torch.ops.dsv4.dequantize_kv_cache_fp8.default, (pages, T + 1, 4, "reference")),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_without_graph_breaks():
    torch._dynamo.reset()

    def formats(x, kv):
        q, s = quantize_fp8_blockwise(x, 128, "e4m3fn", impl="reference")
        qz, sz = quantize_fp8_blockwise(x, 32, "e4m3fnuz", impl="reference")
        packed, scale = quantize_mxfp4(x, impl="reference")
        w = dequantize_mxfp4(packed, scale, impl="reference")
        pages = quantize_kv_cache_fp8(kv, 64, impl="reference")
        back = dequantize_kv_cache_fp8(pages, 70, 64, impl="reference")
        return q.float() * s.repeat_interleave(128, -1), qz.float() * sz.repeat_interleave(32, -1), w * 2, back + 1

    args = (torch.randn(3, 4096).to(torch.bfloat16), torch.randn(70, 512).to(torch.bfloat16))
    compiled = torch.compile(formats, fullgraph=True, backend="eager")
    for got, want in zip(compiled(*args), formats(*args)):
        assert torch.equal(got, want)
    explain = torch._dynamo.explain(formats)(*args)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


@pytest.mark.op("quantize_fp8_blockwise")
def test_quantize_fp8_blockwise_ladder_cases(impl, device):
    assert "7 cases match" in ladder.run_cases(ops.OP_FP8, impl, device)


@pytest.mark.op("quantize_mxfp4")
def test_quantize_mxfp4_ladder_cases(impl, device):
    assert "5 cases match" in ladder.run_cases(ops.OP_MXFP4, impl, device)


@pytest.mark.op("dequantize_mxfp4")
def test_dequantize_mxfp4_ladder_cases(impl, device):
    assert "4 cases match" in ladder.run_cases(ops.OP_DEQUANT_MXFP4, impl, device)


@pytest.mark.op("quantize_kv_cache_fp8")
def test_quantize_kv_cache_ladder_cases(impl, device):
    assert "5 cases match" in ladder.run_cases(ops.OP_KV, impl, device)


@pytest.mark.op("dequantize_kv_cache_fp8")
def test_dequantize_kv_cache_ladder_cases(impl, device):
    assert "6 cases match" in ladder.run_cases(ops.OP_DEQUANT_KV, impl, device)


def test_ladder_cases_plant_ties():
    """The ladder's quantiser cases hold exact ties (midpoints between codes at scale 1), so a kernel
    that rounds ties away from zero fails there, not only in the hand tests."""
    torch.manual_seed(0)
    for op in (ops.OP_FP8, ops.OP_MXFP4):
        for label, args, _ in ladder.get_check(op).cases(torch.device("cpu")):
            x = args[0]
            if x.numel() == 0:
                continue
            if op == ops.OP_FP8:
                table = oracle.fp8_table(args[2])[:oracle.FMT[args[2]][1] + 1]
            else:
                table = oracle.fp4_table()[:8]
            mids = set(((table[:-1] + table[1:]) / 2).tolist())
            first_block = x.reshape(-1, x.shape[-1])[0, :32].double().abs().tolist()
            assert sum(v in mids for v in first_block) >= 7, label


def test_ladder_cases_hold_nonfinite_blocks():
    """Each quantiser's ladder cases hold a block with a NaN, a +inf and a -inf (NaN in, NaN out is
    checked on every implementation against the oracle), and the KV cases also a non-finite rope."""
    torch.manual_seed(0)
    for op in (ops.OP_FP8, ops.OP_MXFP4, ops.OP_KV):
        xs = [args[0] for _, args, _ in ladder.get_check(op).cases(torch.device("cpu"))]
        assert any(x.isnan().any() and x.isposinf().any() and x.isneginf().any() for x in xs), op
    kv = [args[0] for _, args, _ in ladder.get_check(ops.OP_KV).cases(torch.device("cpu"))]
    assert any(not x[:, 448:].isfinite().all() for x in kv)
    built = dict((label, args) for label, args, _ in ladder.get_check(ops.OP_DEQUANT_KV).cases(torch.device("cpu")))
    pages, n, bs = built["nonfinite-N5-bs4"]
    assert reference.dequantize_kv_cache_fp8(pages, n, bs).isnan().any()    # built from non-finite rows
