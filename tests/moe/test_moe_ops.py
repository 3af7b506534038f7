"""The FP4 MoE ops through the public API (SPEC 5, SPEC 7 "FP4 MoE"): every implementation against the
reference with the SPEC 5 tolerance (calc_diff < 0.01), hand cases for the clamp, the routing weight
and padding rows, validation, the torch.library registration, torch.compile and the ladder cases (the
reference against the fp64 oracle with an elementwise bound as well).

Weights: V4-Flash and V4-Pro dim / I with two experts, and the true expert counts (256, 384) at small
dim / I, never full V4-Pro weights (8 GB)."""
from __future__ import annotations

import math

import pytest
import torch

from dsv4_kernels import dispatch, ladder
from dsv4_kernels.ops import moe as ops
from dsv4_kernels.ops.moe import fp4_grouped_moe, mxfp4_grouped_gemm
from dsv4_kernels.oracles import moe as oracle
from dsv4_kernels.reference import moe as reference
from dsv4_kernels.reference.formats import pack_fp4, quantize_fp8_blockwise


def _to(device, *args):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


# Labels with full V4 weights (dim x I of 4096 x 2048 or 7168 x 3072): the Triton interpreter decodes
# about two million weights a second, so a kernel on them costs minutes on the CPU. Those cases run on
# devices (test_moe_device.py); the interpreter runs V4 hidden sizes with a small I (test_moe_kernels.py).
_FULL_WEIGHTS = ("flash-w", "pro-w", "flash-E2", "pro-E2")


def _skip_full_weights_in_interpreter(impl: str, device, label: str | None = None) -> None:
    if impl != "reference" and device.type == "cpu" and (label is None or label.startswith(_FULL_WEIGHTS)):
        pytest.skip(f"{impl} through the Triton interpreter: full V4 expert weights cost minutes on the CPU "
                    f"(covered by test_moe_kernels.py at V4 hidden sizes with I 128, and by the device tests)")


def _check(compare, out: torch.Tensor, expected: torch.Tensor, impl: str) -> None:
    """The op's tolerance against the reference; the reference through the public op must be identical."""
    compare(out.cpu(), expected)
    if impl == "reference":
        assert torch.equal(out.cpu(), expected)


@pytest.mark.op("mxfp4_grouped_gemm")
@pytest.mark.parametrize("label", ops.GEMM_LABELS)
def test_grouped_gemm_matches_reference(impl, device, label, require_supported):
    _skip_full_weights_in_interpreter(impl, device, label)
    args = ops.gemm_inputs(label, "cpu")
    require_supported(ops.OP_GEMM, impl, *_to(device, *args))   # TileLang: N % 64, K % 128
    c = mxfp4_grouped_gemm(*_to(device, *args), impl=impl)
    M, N = args[0].shape[0], args[2].shape[1]
    assert c.dtype == torch.bfloat16 and c.shape == (M, N) and c.device == device
    _check(ops.compare_gemm, c, reference.mxfp4_grouped_gemm(*args), impl)
    padding = (args[4] < 0) | (args[4] >= args[2].shape[0])
    assert (c.cpu()[padding] == 0).all()


@pytest.mark.op("mxfp4_grouped_gemm")
def test_grouped_gemm_hand_case(impl, device, require_supported):
    a = torch.ones(4, 32).to(torch.float8_e4m3fn)
    a_scale = torch.tensor([[1.0], [2.0], [1.0], [0.5]])
    b = torch.zeros(2, 2, 16, dtype=torch.uint8)
    b_scale = torch.zeros(2, 2, 1, dtype=torch.uint8)
    b[0, 0], b_scale[0, 0] = 0x22, 127  # all 1.0
    b[0, 1], b_scale[0, 1] = 0x33, 126  # all 1.5 * 0.5
    b[1, 0], b_scale[1, 0] = 0xAA, 130  # all -1.0 * 8
    b[1, 1], b_scale[1, 1] = 0xA2, 127  # +1 at even k (low nibble), -1 at odd k
    m_indices = torch.tensor([1, 0, -1, 0], dtype=torch.int32)
    require_supported(ops.OP_GEMM, impl, *_to(device, a, a_scale, b, b_scale, m_indices), 32)
    c = mxfp4_grouped_gemm(*_to(device, a, a_scale, b, b_scale, m_indices), act_block_size=32, impl=impl)
    assert c.cpu().tolist() == [[-256.0, 0.0], [64.0, 48.0], [0.0, 0.0], [16.0, 12.0]]


@pytest.mark.op("fp4_grouped_moe")
@pytest.mark.parametrize("label", ops.MOE_LABELS)
def test_moe_matches_reference(impl, device, label, require_supported):
    _skip_full_weights_in_interpreter(impl, device, label)
    args = ops.moe_inputs(label, "cpu")
    require_supported(ops.OP_MOE, impl, *_to(device, *args))   # TileLang: dim and I multiples of 128
    y = fp4_grouped_moe(*_to(device, *args), impl=impl)
    assert y.dtype == torch.bfloat16 and y.shape == args[0].shape and y.device == device
    _check(ops.compare_moe, y, reference.fp4_grouped_moe(*args), impl)


def _const_weights(n_experts: int, rows: int, k: int, code: int, scale_byte: int = 127):
    """MXFP4 weights whose every element is FP4 code `code` times 2^(scale_byte - 127)."""
    packed = pack_fp4(torch.full((n_experts, rows, k), code, dtype=torch.uint8))
    return packed, torch.full((n_experts, rows, k // 32), scale_byte, dtype=torch.uint8)


@pytest.mark.op("fp4_grouped_moe")
@pytest.mark.parametrize("block", [32, 128])
def test_moe_hand_clamp_and_weight_before_down(impl, device, block, require_supported):
    """dim = I = block, x = 1, all weights 1: g = u = dim clamp to 10. h = silu(10) * 10 * w: w = 0.5 ->
    49.9977 -> bf16 50 -> FP8 (scale 2^-3) 400, a tie between 384 and 416 -> 384 -> 48 per column; w = 0.3
    -> 29.9986 -> bf16 30 -> 30. Applying w after the down projection would give 28.8 per column for 0.3."""
    dim = inter = block
    x = torch.ones(2, dim, dtype=torch.bfloat16)
    w13, w13_s = _const_weights(1, 2 * inter, dim, code=2)
    w2, w2_s = _const_weights(1, dim, inter, code=2)
    ids = torch.tensor([[0, -1], [0, 0]], dtype=torch.int32)  # row 1: a duplicate id counts twice
    weights = torch.tensor([[0.5, 0.9], [0.5, 0.3]])
    require_supported(ops.OP_MOE, impl, *_to(device, x, ids, weights, w13, w13_s, w2, w2_s), block)
    y = fp4_grouped_moe(*_to(device, x, ids, weights, w13, w13_s, w2, w2_s), act_block_size=block, impl=impl).cpu()
    assert (y[0] == inter * 48.0).all() and (y[1] == inter * (48.0 + 30.0)).all()


@pytest.mark.op("fp4_grouped_moe")
def test_moe_swiglu_limit_at_or_below_zero_disables_the_clamp(impl, device):
    """The reference's convention, documented on the op: swiglu_limit <= 0 means no clamp (not clamp to 0)."""
    dim = inter = 128
    x = torch.ones(1, dim, dtype=torch.bfloat16)
    w13, w13_s = _const_weights(1, 2 * inter, dim, code=2)
    w2, w2_s = _const_weights(1, dim, inter, code=2)
    args = _to(device, x, torch.zeros(1, 1, dtype=torch.int32), torch.full((1, 1), 0.25), w13, w13_s, w2, w2_s)
    clamped = fp4_grouped_moe(*args, swiglu_limit=10.0, impl=impl).cpu()
    off0 = fp4_grouped_moe(*args, swiglu_limit=0.0, impl=impl).cpu()
    off_neg = fp4_grouped_moe(*args, swiglu_limit=-3.0, impl=impl).cpu()
    assert torch.equal(off0, off_neg)
    # Unclamped: g = u = 128, h = silu(128) * 128 * 0.25 = 4096 per channel, y = 128 * 4096.
    assert (off0 == 128 * 4096.0).all() and (clamped.float() < off0.float() / 50).all()


@pytest.mark.op("fp4_grouped_moe")
def test_moe_untouched_experts_are_not_read(impl, device):
    """The true V4-Pro expert count at small dim: unused experts hold NaN scales (byte 255), so reading
    one would poison the output."""
    E, dim, inter = 384, 256, 128
    w13 = torch.zeros(E, 2 * inter, dim // 2, dtype=torch.uint8)
    w13_s = torch.full((E, 2 * inter, dim // 32), 255, dtype=torch.uint8)
    w2 = torch.zeros(E, dim, inter // 2, dtype=torch.uint8)
    w2_s = torch.full((E, dim, inter // 32), 255, dtype=torch.uint8)
    for e in (0, 137, E - 1):
        (w13[e], w13_s[e]), (w2[e], w2_s[e]) = ((w[0] for w in ops.random_weights(1, 2 * inter, dim, "cpu")),
                                                (w[0] for w in ops.random_weights(1, dim, inter, "cpu")))
    ids = torch.tensor([[E - 1, 0, -1, 137, E, -1], [137, 137, E - 1, 0, -1, -1]], dtype=torch.int32)
    weights = torch.softmax(torch.randn(2, 6), dim=-1) * 2.5
    x = torch.randn(2, dim).to(torch.bfloat16)
    args = (x, ids, weights, w13, w13_s, w2, w2_s)
    y = fp4_grouped_moe(*_to(device, *args), impl=impl).cpu()
    assert y.isfinite().all()
    _check(ops.compare_moe, y, reference.fp4_grouped_moe(*args), impl)


def test_compare_catches_a_missing_clamp_wrong_rows_and_two_ulps():
    g = torch.Generator().manual_seed(3)
    x = (40.0 * torch.randn(3, 256, generator=g)).to(torch.bfloat16)  # gate/up of order 40: most clamp
    ids = torch.tensor([[0, 1], [1, -1], [0, 0]], dtype=torch.int32)
    weights = torch.rand(3, 2, generator=g) + 0.1
    w13, w13_s = ops.random_weights(2, 256, 256, "cpu")
    w2, w2_s = ops.random_weights(2, 256, 128, "cpu")
    args = (x, ids, weights, w13, w13_s, w2, w2_s)
    y = reference.fp4_grouped_moe(*args)
    expected = oracle.fp4_grouped_moe(*args)
    ops.compare_moe(y, expected)
    with pytest.raises(AssertionError, match="calc_diff"):  # no clamp
        ops.compare_moe(reference.fp4_grouped_moe(*args, swiglu_limit=0.0), expected)
    # One element two bf16 ulps off: calc_diff does not see it, the oracle's elementwise bound does.
    nudged = y.clone()
    nudged[1, 7] = (nudged[1, 7].float() * (1 + 2 * 2.0 ** -7)).to(torch.bfloat16)
    ops.compare_moe(nudged, y)  # against the reference, as for a kernel: within calc_diff
    with pytest.raises(AssertionError, match=r"1 of 768 elements beyond the oracle bound, first at \(1, 7\)"):
        ops.compare_moe(nudged, expected)
    a, a_scale = quantize_fp8_blockwise(x, 128)
    m_indices = torch.tensor([1, 0, -1], dtype=torch.int32)
    c_exp = oracle.mxfp4_grouped_gemm(a, a_scale, w13, w13_s, m_indices)
    c = reference.mxfp4_grouped_gemm(a, a_scale, w13, w13_s, m_indices)
    ops.compare_gemm(c, c_exp)
    with pytest.raises(AssertionError, match="calc_diff"):
        ops.compare_gemm(torch.roll(c, 1, dims=1), c_exp)  # outputs of the wrong weight rows
    c[0, 3] = (c[0, 3].float() * (1 + 2 * 2.0 ** -7)).to(torch.bfloat16)  # two ulps: beyond half an ulp
    ops.compare_gemm(c, reference.mxfp4_grouped_gemm(a, a_scale, w13, w13_s, m_indices))
    with pytest.raises(AssertionError, match=r"1 of 768 elements beyond the oracle bound, first at \(0, 3\)"):
        ops.compare_gemm(c, c_exp)


def _gemm_args() -> dict:
    a, a_scale = quantize_fp8_blockwise(torch.randn(3, 256).to(torch.bfloat16), 128)
    return dict(a=a, a_scale=a_scale, b=torch.zeros(2, 64, 128, dtype=torch.uint8),
                b_scale=torch.full((2, 64, 8), 127, dtype=torch.uint8),
                m_indices=torch.tensor([0, 1, -1], dtype=torch.int32), act_block_size=128)


def _moe_args() -> dict:
    E, dim, inter = 4, 256, 128
    return dict(x=torch.randn(3, dim).to(torch.bfloat16), topk_ids=torch.tensor([[0, 3, -1, 1, 2, -1]] * 3,
                                                                                  dtype=torch.int32),
                topk_weights=torch.rand(3, 6), w13=torch.zeros(E, 2 * inter, dim // 2, dtype=torch.uint8),
                w13_scale=torch.full((E, 2 * inter, dim // 32), 127, dtype=torch.uint8),
                w2=torch.zeros(E, dim, inter // 2, dtype=torch.uint8),
                w2_scale=torch.full((E, dim, inter // 32), 127, dtype=torch.uint8), act_block_size=128,
                swiglu_limit=10.0, act_fmt=None)


def _u8(*shape):
    return torch.zeros(*shape, dtype=torch.uint8)


BAD = [
    ("gemm", "act_block_size", lambda a: 64, "act_block_size: expected one of 32, 128, got 64"),
    ("gemm", "act_block_size", lambda a: 128.0, "act_block_size: expected an int, got float 128.0"),
    ("gemm", "a", lambda a: a.to(torch.bfloat16),
     "a: expected dtype torch.float8_e4m3fn or torch.float8_e4m3fnuz, got torch.bfloat16"),
    ("gemm", "a", lambda a: a.float().to(torch.float8_e5m2),
     "a: expected dtype torch.float8_e4m3fn or torch.float8_e4m3fnuz, got torch.float8_e5m2"),
    ("gemm", "a", lambda a: a[0], "a: expected 2 dimensions, got 1"),
    ("gemm", "a", lambda a: torch.zeros(3, 192).to(torch.float8_e4m3fn),
     "a: expected shape (M, K) with K a positive multiple of act_block_size 128, got (3, 192)"),
    ("gemm", "a", lambda a: torch.zeros(256, 3).to(torch.float8_e4m3fn).t(), "a: expected a contiguous tensor"),
    ("gemm", "a_scale", lambda a: a.double(), "a_scale: expected dtype torch.float32, got torch.float64"),
    ("gemm", "a_scale", lambda a: torch.ones(3, 8), "a_scale: expected shape (3, 2), got (3, 8)"),
    ("gemm", "a_scale", lambda a: torch.ones(2, 2), "a_scale: expected shape (3, 2), got (2, 2)"),
    ("gemm", "b", lambda a: a.to(torch.int8), "b: expected dtype torch.uint8, got torch.int8"),
    ("gemm", "b", lambda a: a[0], "b: expected 3 dimensions, got 2"),
    ("gemm", "b", lambda a: _u8(2, 64, 64), "b: expected shape (*, *, 128), got (2, 64, 64)"),
    ("gemm", "b", lambda a: _u8(0, 64, 128), "b: expected shape (G, N, K/2) with G >= 1 groups and N >= 1 rows, "
                                             "got (0, 64, 128)"),
    ("gemm", "b", lambda a: _u8(2, 0, 128), "with G >= 1 groups and N >= 1 rows, got (2, 0, 128)"),
    ("gemm", "b", lambda a: _u8(2, 128, 64).transpose(1, 2), "b: expected a contiguous tensor"),
    ("gemm", "b_scale", lambda a: _u8(2, 64, 2), "b_scale: expected shape (2, 64, 8), got (2, 64, 2)"),
    ("gemm", "b_scale", lambda a: _u8(3, 64, 8), "b_scale: expected shape (2, 64, 8), got (3, 64, 8)"),
    ("gemm", "b_scale", lambda a: a.float(), "b_scale: expected dtype torch.uint8, got torch.float32"),
    ("gemm", "m_indices", lambda a: a.long(), "m_indices: expected dtype torch.int32, got torch.int64"),
    ("gemm", "m_indices", lambda a: torch.zeros(4, dtype=torch.int32), "m_indices: expected shape (3,), got (4,)"),
    ("gemm", "m_indices", lambda a: a[:, None], "m_indices: expected shape (3,), got (3, 1)"),
    ("gemm", "m_indices", lambda a: a.to("meta"), "m_indices: expected device cpu (the device of a), got meta"),
    ("gemm", "b_scale", lambda a: a.to("meta"), "b_scale: expected device cpu (the device of a), got meta"),
    ("moe", "act_block_size", lambda a: 64, "act_block_size: expected one of 32, 128, got 64"),
    ("moe", "act_block_size", lambda a: None, "act_block_size: expected an int, got NoneType None"),
    ("moe", "x", lambda a: a.float(), "x: expected dtype torch.bfloat16, got torch.float32"),
    ("moe", "x", lambda a: a[None], "x: expected 2 dimensions, got 3"),
    ("moe", "x", lambda a: torch.zeros(3, 200, dtype=torch.bfloat16),
     "x: expected shape (T, dim) with dim a positive multiple of act_block_size 128, got (3, 200)"),
    ("moe", "x", lambda a: torch.zeros(256, 3, dtype=torch.bfloat16).t(), "x: expected a contiguous tensor"),
    ("moe", "topk_ids", lambda a: a.long(), "topk_ids: expected dtype torch.int32, got torch.int64"),
    ("moe", "topk_ids", lambda a: a[0], "topk_ids: expected 2 dimensions, got 1"),
    ("moe", "topk_ids", lambda a: torch.zeros(4, 6, dtype=torch.int32), "topk_ids: expected shape (3, *), got (4, 6)"),
    ("moe", "topk_ids", lambda a: a[:, :0].contiguous(), "topk_ids: expected shape (T, k) with k >= 1, got (3, 0)"),
    ("moe", "topk_ids", lambda a: torch.zeros(6, 3, dtype=torch.int32).t(), "topk_ids: expected a contiguous tensor"),
    ("moe", "topk_weights", lambda a: a.to(torch.bfloat16), "topk_weights: expected dtype torch.float32, got "
                                                             "torch.bfloat16"),
    ("moe", "topk_weights", lambda a: a[:, :5].contiguous(), "topk_weights: expected shape (3, 6), got (3, 5)"),
    ("moe", "topk_weights", lambda a: a[:2], "topk_weights: expected shape (3, 6), got (2, 6)"),
    ("moe", "w13", lambda a: a.to(torch.int8), "w13: expected dtype torch.uint8, got torch.int8"),
    ("moe", "w13", lambda a: a[0], "w13: expected 3 dimensions, got 2"),
    ("moe", "w13", lambda a: _u8(4, 256, 64), "w13: expected shape (*, *, 128), got (4, 256, 64)"),
    ("moe", "w13", lambda a: _u8(0, 256, 128), "w13: expected shape (E, 2I, dim/2) with E >= 1 experts, "
                                               "got (0, 256, 128)"),
    ("moe", "w13", lambda a: _u8(4, 192, 128), "w13: expected shape (E, 2I, dim/2) with I a positive multiple of "
                                               "act_block_size 128, got (4, 192, 128)"),
    ("moe", "w13", lambda a: _u8(4, 0, 128), "with I a positive multiple of act_block_size 128, got (4, 0, 128)"),
    ("moe", "w13", lambda a: _u8(4, 128, 256).transpose(1, 2), "w13: expected a contiguous tensor"),
    ("moe", "w13_scale", lambda a: _u8(4, 256, 4), "w13_scale: expected shape (4, 256, 8), got (4, 256, 4)"),
    ("moe", "w13_scale", lambda a: _u8(3, 256, 8), "w13_scale: expected shape (4, 256, 8), got (3, 256, 8)"),
    ("moe", "w13_scale", lambda a: a.float(), "w13_scale: expected dtype torch.uint8, got torch.float32"),
    ("moe", "w2", lambda a: _u8(4, 256, 128), "w2: expected shape (4, 256, 64), got (4, 256, 128)"),
    ("moe", "w2", lambda a: _u8(4, 128, 64), "w2: expected shape (4, 256, 64), got (4, 128, 64)"),
    ("moe", "w2", lambda a: _u8(5, 256, 64), "w2: expected shape (4, 256, 64), got (5, 256, 64)"),
    ("moe", "w2", lambda a: a.to(torch.int32), "w2: expected dtype torch.uint8, got torch.int32"),
    ("moe", "w2", lambda a: _u8(4, 64, 256).transpose(1, 2), "w2: expected a contiguous tensor"),
    ("moe", "w2_scale", lambda a: _u8(4, 256, 8), "w2_scale: expected shape (4, 256, 4), got (4, 256, 8)"),
    ("moe", "w2_scale", lambda a: a.to("meta"), "w2_scale: expected device cpu (the device of x), got meta"),
    ("moe", "topk_weights", lambda a: a.to("meta"), "topk_weights: expected device cpu (the device of x), got meta"),
    ("moe", "swiglu_limit", lambda a: math.inf, "swiglu_limit: expected a finite float (<= 0 disables the clamp), "
                                                "got inf"),
    ("moe", "swiglu_limit", lambda a: math.nan, "swiglu_limit: expected a finite float (<= 0 disables the clamp), "
                                                "got nan"),
    ("moe", "swiglu_limit", lambda a: "10", "swiglu_limit: expected a finite float (<= 0 disables the clamp), "
                                            "got str '10'"),
    ("moe", "swiglu_limit", lambda a: True, "swiglu_limit: expected a finite float (<= 0 disables the clamp), "
                                            "got bool True"),
    ("moe", "expert_map", lambda a: torch.zeros(5, dtype=torch.int64), "expert_map: expected dtype torch.int32, "
                                                                       "got torch.int64"),
    ("moe", "expert_map", lambda a: torch.zeros(1, 5, dtype=torch.int32), "expert_map: expected 1 dimensions, got 2"),
    ("moe", "expert_map", lambda a: torch.zeros(0, dtype=torch.int32), "expert_map: expected shape (E_global,) with "
                                                                       "E_global >= 1, got (0,)"),
    ("moe", "expert_map", lambda a: torch.zeros(5, dtype=torch.int32).to("meta"),
     "expert_map: expected device cpu (the device of x), got meta"),
    ("moe", "act_fmt", lambda a: "e5m2", "act_fmt: expected one of e4m3fn, e4m3fnuz, got 'e5m2'"),
    ("moe", "act_fmt", lambda a: torch.float8_e4m3fn, "act_fmt: expected one of e4m3fn, e4m3fnuz or None, got dtype"),
]


@pytest.mark.parametrize("op, name, bad, message", BAD, ids=[f"{o}-{n}-{i}" for i, (o, n, _, _) in enumerate(BAD)])
def test_bad_argument_is_refused_before_launch(op, name, bad, message):
    args = _gemm_args() if op == "gemm" else _moe_args()
    args[name] = bad(args.get(name))
    fn = mxfp4_grouped_gemm if op == "gemm" else fp4_grouped_moe
    with dispatch.recording() as calls, pytest.raises(ValueError) as err:
        fn(**args)
    assert message in str(err.value)
    assert not calls


def test_valid_arguments_of_the_refusal_table_run():
    with dispatch.recording() as calls:
        mxfp4_grouped_gemm(**_gemm_args())
        fp4_grouped_moe(**_moe_args())
        fp4_grouped_moe(**{**_moe_args(), "act_block_size": 32, "swiglu_limit": 0})  # an int limit is a real too
    chosen = dispatch.select("fp4_grouped_moe", tuple(_moe_args().values())).chosen.name  # triton where it runs
    assert calls == {("mxfp4_grouped_gemm", chosen): 1, ("fp4_grouped_moe", chosen): 2}


# Data-dependent bad calls (issue 11): refused only in checked mode (DSV4K_CHECK=1), naming the argument,
# the expected range, the first bad position and its value; masked on the default path, where they give
# what the same call with -1 in their place gives. (op, argument, bad value, its position, message parts)
CHECKED = [
    ("gemm", "m_indices", [0, 2, -1], "m_indices: expected values in [0, 2) (groups of b, G = 2) or -1, got 2 "
                                      "at position (1,) (DSV4K_CHECK=1 checked mode)"),
    ("gemm", "m_indices", [0, -2, -1], "m_indices: expected values in [0, 2) (groups of b, G = 2) or -1, got -2 "
                                       "at position (1,)"),
    ("gemm", "m_indices", [-1, -1, -3], "got -3 at position (2,)"),
    ("gemm", "m_indices", [1, 1, 2 ** 31 - 1], f"got {2 ** 31 - 1} at position (2,)"),
    ("gemm", "m_indices", [0, 1, 0], "m_indices: expected the rows of each group contiguous (-1 padding rows may "
                                     "sit anywhere), got 0 at position (2,)"),
    ("moe", "topk_ids", [[0, 3, -1, 1, 2, -1]] * 2 + [[0, 3, -1, 1, 4, -1]],
     "topk_ids: expected values in [0, 4) (experts of w13, E = 4) or -1, got 4 at position (2, 4) "
     "(DSV4K_CHECK=1 checked mode)"),
    ("moe", "topk_ids", [[0, 3, -2, 1, 2, -1]] * 3, "got -2 at position (0, 2)"),
    ("moe", "topk_ids", [[0, 3, -1, 1, 2, -1], [-4, -5, 0, 0, 0, 0], [0] * 6], "got -4 at position (1, 0)"),
    ("moe", "topk_ids", [[0, 3, -1, 1, 2, -(2 ** 31)]] * 3, f"got {-(2 ** 31)} at position (0, 5)"),
    # With expert_map [E_global = 6] -> local [0, 4): ids range over E_global, map entries over E.
    ("ep", "topk_ids", [[0, 5, -1, 1, 2, -1], [6, 0, 0, 0, 0, 0], [0] * 6],
     "topk_ids: expected values in [0, 6) (global experts of expert_map, E_global = 6) or -1, got 6 at "
     "position (1, 0)"),
    ("ep", "expert_map", [3, -1, 0, 4, 2, 1],
     "expert_map: expected values in [0, 4) (local experts of w13, E = 4) or -1, got 4 at position (3,)"),
    ("ep", "expert_map", [3, -1, 0, -3, 2, 1], "expert_map: expected values in [0, 4)", ),
]
_EP_MAP = [3, -1, 0, 1, 2, -1]
_EP_IDS = [[0, 5, -1, 1, 2, 4], [3, 0, 1, 2, 4, 5], [2] * 6]


def _masked(values, low, high):
    t = torch.tensor(values, dtype=torch.int32)
    return t, torch.where((t >= low) & (t < high), t, torch.full_like(t, -1))


@pytest.mark.parametrize("op, name, values, message", CHECKED, ids=[f"{o}-{i}" for i, (o, *_) in enumerate(CHECKED)])
def test_bad_ids_are_refused_in_checked_mode_and_masked_otherwise(monkeypatch, op, name, values, message):
    # The op layer's checked mode, on the reference: the kernels' masking of the same ids is tested in
    # test_moe_kernels.py (permutation of out-of-range and -1 ids and map entries, GEMM padding rows).
    monkeypatch.setenv("DSV4K_IMPL", "fp4_grouped_moe=reference,mxfp4_grouped_gemm=reference")
    args = _gemm_args() if op == "gemm" else _moe_args()
    fn = mxfp4_grouped_gemm if op == "gemm" else fp4_grouped_moe
    if op == "ep":
        args["topk_ids"] = torch.tensor(_EP_IDS, dtype=torch.int32)
        args["expert_map"] = torch.tensor(_EP_MAP, dtype=torch.int32)
    if op != "gemm":   # nonzero weights, so that a wrongly used slot would show
        args["w13"], args["w13_scale"] = ops.random_weights(4, 256, 256, "cpu")
        args["w2"], args["w2_scale"] = ops.random_weights(4, 256, 128, "cpu")
    else:
        args["b"], args["b_scale"] = ops.random_weights(2, 64, 256, "cpu")
    bad, masked = _masked(values, 0, {"gemm": 2, "moe": 4, "ep": 4 if name == "expert_map" else 6}[op])
    monkeypatch.delenv("DSV4K_CHECK", raising=False)
    out = fn(**{**args, name: bad})
    assert torch.equal(out, fn(**{**args, name: masked}))
    monkeypatch.setenv("DSV4K_CHECK", "1")
    with dispatch.recording() as calls, pytest.raises(ValueError) as err:
        fn(**{**args, name: bad})
    assert message in str(err.value)
    assert not calls
    if not torch.equal(bad, masked):                               # ids in range (-1 included) pass checked mode
        assert torch.equal(fn(**{**args, name: masked}), out)


@pytest.mark.op("fp4_grouped_moe")
def test_moe_expert_map_equals_local_ids(impl, device):
    """Expert parallelism: global ids through expert_map give what the mapped local ids give; remote
    experts (-1) and global ids outside [0, E_global) contribute nothing."""
    w13, w13_s = ops.random_weights(4, 256, 256, "cpu")
    w2, w2_s = ops.random_weights(4, 256, 128, "cpu")
    x = torch.randn(4, 256).to(torch.bfloat16)
    ids = torch.tensor(_EP_IDS + [[6, -2, 5, 3, -1, 9]], dtype=torch.int32)
    weights = torch.rand(4, 6) + 0.1
    emap = torch.tensor(_EP_MAP, dtype=torch.int32)
    local = torch.tensor([[_EP_MAP[i] if 0 <= i < 6 else -1 for i in row] for row in ids.tolist()], dtype=torch.int32)
    y = fp4_grouped_moe(*_to(device, x, ids, weights, w13, w13_s, w2, w2_s), expert_map=emap.to(device), impl=impl)
    want = fp4_grouped_moe(x, local, weights, w13, w13_s, w2, w2_s, impl="reference")
    _check(ops.compare_moe, y, want, impl)
    assert not torch.equal(want[3], torch.zeros_like(want[3]))          # global id 3 -> local 1 is used
    assert not torch.equal(want, fp4_grouped_moe(x, ids.clamp(-1, 3), weights, w13, w13_s, w2, w2_s))


@pytest.mark.op("fp4_grouped_moe")
@pytest.mark.parametrize("checked", [False, True], ids=["default", "checked"])
def test_moe_nan_in_nan_out(impl, device, monkeypatch, checked):
    """A NaN weight of a valid slot or an inf in x makes that token's row all NaN, in checked mode too;
    the weight of an invalid slot (-1) is not read; other tokens are unchanged."""
    if checked:
        monkeypatch.setenv("DSV4K_CHECK", "1")
    w13, w13_s = ops.random_weights(3, 256, 256, "cpu")
    w2, w2_s = ops.random_weights(3, 256, 128, "cpu")
    x = torch.randn(5, 256).to(torch.bfloat16)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [1, -1], [-1, -1]], dtype=torch.int32)
    weights = torch.rand(5, 2) + 0.1
    bad_x, bad_w = x.clone(), weights.clone()
    bad_w[1, 1] = float("nan")                  # valid slot: token 1 NaN
    bad_x[2, 200] = float("inf")                # token 2 NaN
    bad_w[3, 1] = float("nan")                  # slot id -1: not read
    bad_x[4, 0] = float("nan")                  # no valid slot: y = 0
    y = fp4_grouped_moe(*_to(device, bad_x, ids, bad_w, w13, w13_s, w2, w2_s), impl=impl).cpu()
    clean = fp4_grouped_moe(*_to(device, x, ids, weights, w13, w13_s, w2, w2_s), impl=impl).cpu()
    assert y[1:3].isnan().all()
    assert torch.equal(y[[0, 3, 4]], clean[[0, 3, 4]]) and (y[4] == 0).all()


@pytest.mark.op("mxfp4_grouped_gemm")
def test_grouped_gemm_nan_rows_and_padding(impl, device):
    """A non-finite activation block (NaN scale) makes its row NaN; a padding row (-1, -2, G) stays 0
    even when its activations are NaN."""
    x = torch.randn(5, 256).to(torch.bfloat16)
    x[1, 3] = float("nan")
    x[2, 0] = float("-inf")
    x[4, 7] = float("inf")
    a, a_scale = quantize_fp8_blockwise(x, 32)
    b, b_scale = ops.random_weights(2, 64, 256, "cpu")
    m_indices = torch.tensor([0, 0, -2, 1, 2], dtype=torch.int32)
    c = mxfp4_grouped_gemm(*_to(device, a, a_scale, b, b_scale, m_indices), act_block_size=32, impl=impl).cpu()
    assert c[1].isnan().all() and (c[[2, 4]] == 0).all() and c[[0, 3]].isfinite().all()


@pytest.mark.parametrize("T", [0, 3])
def test_torch_library_ops_are_complete(T):
    m = _moe_args()
    w13, w13_s = ops.random_weights(4, 256, 256, "cpu")
    w2, w2_s = ops.random_weights(4, 256, 128, "cpu")
    torch.library.opcheck(torch.ops.dsv4.fp4_grouped_moe.default,
                          (m["x"][:T], m["topk_ids"][:T], m["topk_weights"][:T], w13, w13_s, w2, w2_s, 128, 10.0,
                           None, "e4m3fn", "reference"), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.dsv4.fp4_grouped_moe.default,
                          (m["x"][:T], m["topk_ids"][:T], m["topk_weights"][:T], w13, w13_s, w2, w2_s, 128, 10.0,
                           torch.tensor([3, -1, 0, 1, 2], dtype=torch.int32), "e4m3fnuz", "reference"),
                          test_utils=("test_schema", "test_faketensor"))
    # The grouped GEMM takes a float8 input, which opcheck's test_schema cannot compare before and after
    # the call on CPU (torch.allclose is not implemented for float8): the fake tensor check runs through
    # opcheck, and what test_schema would check (no input mutated, the output aliases no input) is checked
    # here by hand.
    a, a_scale = quantize_fp8_blockwise(torch.randn(T, 256).to(torch.bfloat16), 32)
    b, b_scale = ops.random_weights(2, 64, 256, "cpu")
    args = (a, a_scale, b, b_scale, torch.tensor([0, 1, -1], dtype=torch.int32)[:T], 32, "reference")
    op = torch.ops.dsv4.mxfp4_grouped_gemm.default
    torch.library.opcheck(op, args, test_utils=("test_faketensor",))
    before = [t.view(torch.uint8).clone() if t.dtype == torch.float8_e4m3fn else t.clone() for t in args[:5]]
    c = op(*args)
    for t, saved in zip(args[:5], before):
        assert torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t, saved)
        assert T == 0 or c.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    assert "mxfp4_grouped_gemm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor m_indices, " \
           "SymInt act_block_size, str impl) -> Tensor" in str(op._schema)


def test_torch_compile_traces_without_graph_breaks():
    torch._dynamo.reset()
    w13, w13_s = ops.random_weights(3, 256, 256, "cpu")
    w2, w2_s = ops.random_weights(3, 256, 128, "cpu")

    def moe_layer(x, ids, weights, a, a_scale, m_indices):
        y = fp4_grouped_moe(x, ids, weights, w13, w13_s, w2, w2_s, 32, 10.0, impl="reference")
        c = mxfp4_grouped_gemm(a, a_scale, w13, w13_s, m_indices, 128, impl="reference")
        return y.float() * 2, c + 1

    x = torch.randn(4, 256).to(torch.bfloat16)
    a, a_scale = quantize_fp8_blockwise(x, 128)
    args = (x, torch.tensor([[0, 2], [1, -1], [2, 2], [-1, -1]], dtype=torch.int32), torch.rand(4, 2), a, a_scale,
            torch.tensor([0, 0, 2, -1], dtype=torch.int32))
    compiled = torch.compile(moe_layer, fullgraph=True, backend="eager")
    for got, want in zip(compiled(*args), moe_layer(*args)):
        assert torch.equal(got, want)
    explain = torch._dynamo.explain(moe_layer)(*args)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


@pytest.mark.op("mxfp4_grouped_gemm")
def test_grouped_gemm_ladder_cases(impl, device):
    _skip_full_weights_in_interpreter(impl, device)
    refused = []   # cases outside what the kernel was built for (TileLang: N % 64, K % 128), named by the ladder
    if impl != "reference":
        guard = dispatch.get(ops.OP_GEMM, impl).supports
        refused = [label for label in ops.GEMM_LABELS if guard(*_to(device, *ops.gemm_inputs(label, "cpu")))]
    summary = ladder.run_cases(ops.OP_GEMM, impl, device)
    assert f"{len(ops.GEMM_LABELS) - len(refused)} cases match" in summary, summary
    assert all(label in summary for label in refused), summary


@pytest.mark.op("fp4_grouped_moe")
def test_moe_ladder_cases(impl, device):
    _skip_full_weights_in_interpreter(impl, device)
    refused = []   # cases outside what the kernel was built for (TileLang: dim, I % 128), named by the ladder
    if impl != "reference":
        guard = dispatch.get(ops.OP_MOE, impl).supports
        refused = [label for label in ops.MOE_LABELS if guard(*_to(device, *ops.moe_inputs(label, "cpu")))]
    summary = ladder.run_cases(ops.OP_MOE, impl, device)
    assert f"{len(ops.MOE_LABELS) - len(refused)} cases match" in summary, summary
    assert all(label in summary for label in refused), summary


def test_ladder_cases_cover_both_models_zero_tokens_and_true_expert_counts():
    torch.manual_seed(0)
    seen = set()
    for label in ops.MOE_LABELS:
        x, ids, _, w13, _, w2, *_ = ops.moe_inputs(label, "cpu")
        seen.add((x.shape[1], w2.shape[2] * 2, w13.shape[0], x.shape[0]))
    dims = {(d, i) for d, i, _, _ in seen}
    assert {(4096, 2048), (7168, 3072)} <= dims
    assert {0, 1, 3} <= {t for _, _, _, t in seen}
    assert {256, 384} <= {e for _, _, e, _ in seen}


@pytest.mark.op("fp4_grouped_moe")
@pytest.mark.parametrize("block", [32, 128])
def test_moe_act_fmt_both_encodings_against_the_oracle(impl, device, block):
    """act_fmt selects the FP8 encoding of both activation quantisations. e4m3fnuz (max 240, bias 8) takes
    other block scales and bytes than e4m3fn (max 448, bias 7) but, as both round to 3 mantissa bits with
    power-of-two scales, nearly always the same values: each encoding matches the fp64 oracle of its own
    (elementwise bound). None is the device's native encoding (e4m3fn on CPU and CUDA)."""
    if impl != "reference" and device.type == "cpu" and block == 128:
        pytest.skip("interpreter time: block 128 with e4m3fnuz runs in test_moe_kernels.py (V4-Pro dim)")
    w13, w13_s = ops.random_weights(3, 256, 256, "cpu")
    w2, w2_s = ops.random_weights(3, 256, 128, "cpu")
    x = (3.0 * torch.randn(4, 256)).to(torch.bfloat16)
    ids = torch.tensor([[0, 2], [1, -1], [2, 2], [0, 1]], dtype=torch.int32)
    weights = torch.rand(4, 2) + 0.1
    args = (x, ids, weights, w13, w13_s, w2, w2_s, block, 10.0, None)
    outs = {}
    for fmt in ops.ACT_FMTS:
        outs[fmt] = fp4_grouped_moe(*_to(device, *args), act_fmt=fmt, impl=impl).cpu()
        expected = oracle.fp4_grouped_moe(*args, act_fmt=fmt)
        if impl == "reference":
            ops.compare_moe(outs[fmt], expected)
        else:
            _check(ops.compare_moe, outs[fmt], reference.fp4_grouped_moe(*args, act_fmt=fmt), impl)
    native = fp4_grouped_moe(*_to(device, *args), impl=impl).cpu()
    from dsv4_kernels import platform
    assert torch.equal(native, outs[platform.device_info(device).fp8_encoding])


@pytest.mark.op("mxfp4_grouped_gemm")
def test_grouped_gemm_reads_e4m3fnuz_bytes(impl, device):
    """The same values quantised as e4m3fnuz (other bytes, other scales) give the product of their own
    encoding: the fnuz result matches the oracle's fnuz decode, and differs from reading its bytes as e4m3fn."""
    x = torch.randn(4, 256).to(torch.bfloat16)
    b, b_scale = ops.random_weights(2, 64, 256, "cpu")
    m_indices = torch.tensor([0, 1, 1, -1], dtype=torch.int32)
    a, a_scale = quantize_fp8_blockwise(x, 32, "e4m3fnuz")
    assert a.dtype == torch.float8_e4m3fnuz
    c = mxfp4_grouped_gemm(*_to(device, a, a_scale, b, b_scale, m_indices), act_block_size=32, impl=impl).cpu()
    expected = oracle.mxfp4_grouped_gemm(a, a_scale, b, b_scale, m_indices, 32)
    ops.compare_gemm(c, expected)
    as_fn = oracle.mxfp4_grouped_gemm(a.view(torch.uint8).view(torch.float8_e4m3fn), a_scale, b, b_scale, m_indices, 32)
    with pytest.raises(AssertionError):
        ops.compare_gemm(c, as_fn)
