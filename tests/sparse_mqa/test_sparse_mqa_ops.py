"""sparse_mqa and sparse_mqa_fp8 as public ops: every implementation against the reference, validation
before launch, the torch.library registration, torch.compile, and the ladder's cases against the oracle."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_kernels import dispatch, ladder
from dsv4_kernels.ops import sparse_mqa as ops
from dsv4_kernels.oracles import sparse_mqa as oracle
from dsv4_kernels.reference import indices as reference_indices
from dsv4_kernels.reference.formats import dequantize_kv_cache_fp8, quantize_kv_cache_fp8
from dsv4_kernels.reference.sparse_mqa import sparse_mqa as reference
from dsv4_kernels.reference.sparse_mqa import sparse_mqa_fp8 as reference_fp8
from dsv4_kernels.testing import assert_close, assert_same_nonfinite, bf16_ulp

D = 512
INF = float("inf")


def random_inputs(T, H, N, K, gen=None, lengths=False, scale=None):
    """q, kv ~ N(0, 1): with the default scale 512^-0.5 the logits are of order 1 (SPEC 6)."""
    q = torch.randn(T, H, D, generator=gen).to(torch.bfloat16)
    kv = torch.randn(N, D, generator=gen).to(torch.bfloat16)
    indices = torch.randint(-3, N + 3, (T, K), generator=gen, dtype=torch.int32)
    sink = 2 * torch.randn(H, generator=gen)
    topk_length = torch.randint(-1, K + 2, (T,), generator=gen, dtype=torch.int32) if lengths else None
    return q, kv, indices, sink, scale, topk_length


def _to(device, args):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


# Labelled inputs (q, kv, indices, attn_sink, softmax_scale, topk_length): the ladder's cases (V4-Flash
# and V4-Pro decode, per-rank H = 8 with odd K, an HCA prefill, zero tokens) plus more edges.
EXTRA = {
    "tp-heads-H32-K200": lambda: random_inputs(3, 32, 150, 200, lengths=True),
    "H120-odd-T7-K63": lambda: random_inputs(7, 120, 41, 63, scale=0.05),
    "empty-K0": lambda: random_inputs(3, 8, 20, 0),
    "empty-pool-N0": lambda: random_inputs(2, 16, 0, 9),
}
LABELS = list(ops.CASE_LABELS) + list(EXTRA)


def inputs(label):
    return EXTRA[label]() if label in EXTRA else ops._inputs(label)


def fp8_inputs(label):
    if label not in EXTRA:
        return ops.fp8_inputs(label)
    q, kv, indices, sink, scale, lengths = EXTRA[label]()
    return q, quantize_kv_cache_fp8(kv, 16), indices, sink, scale, lengths, 16


def check_outputs(impl, device, out, lse, expected):
    T, H = expected[1].shape
    assert out.shape == (T, H, D) and out.dtype == torch.bfloat16 and out.device.type == device.type
    assert lse.shape == (T, H) and lse.dtype == torch.float32 and lse.device.type == device.type
    if impl == "reference" and device.type == "cpu":
        assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])   # the same code, bit for bit
    else:
        ops.compare(out.cpu(), expected[0])
        ops.compare(lse.cpu(), expected[1])


# Interpreter time (CI budget): labels whose Triton run repeats what another test of the same kernel
# already runs through the interpreter, with where it is covered.
INTERPRETER_COVERED = {
    ("sparse_mqa", "pro-decode-H128-K1152"): "sparse_mqa_fp8 runs this V4-Pro shape through the same kernel, "
                                             "test_sparse_mqa_kernels.py the bf16 pool at H = 128",
    ("sparse_mqa", "prefill-H16-hca"): "sparse_mqa_fp8 runs it; test_sparse_mqa_kernels.py has an HCA prefill chunk",
    ("sparse_mqa_fp8", "H120-odd-T7-K63"): "sparse_mqa runs it through the same kernel (the FP8 path is "
                                           "head-count agnostic; H = 24 and 128 run in test_sparse_mqa_kernels.py)",
}


def _skip_covered(op, impl, device, label):
    reason = INTERPRETER_COVERED.get((op, label))
    if impl == "triton" and device.type == "cpu" and reason:
        pytest.skip(f"interpreter time: {reason}")


@pytest.mark.op("sparse_mqa")
@pytest.mark.parametrize("label", LABELS)
def test_matches_reference(impl, device, label):
    _skip_covered("sparse_mqa", impl, device, label)
    args = inputs(label)
    out, lse = ops.sparse_mqa(*_to(device, args), impl=impl)
    check_outputs(impl, device, out, lse, reference(*args))


@pytest.mark.op("sparse_mqa_fp8")
@pytest.mark.parametrize("label", LABELS)
def test_fp8_matches_reference(impl, device, label):
    _skip_covered("sparse_mqa_fp8", impl, device, label)
    args = fp8_inputs(label)
    out, lse = ops.sparse_mqa_fp8(*_to(device, args), impl=impl)
    check_outputs(impl, device, out, lse, reference_fp8(*args))


@pytest.mark.op("sparse_mqa_fp8")
@pytest.mark.parametrize("label", ["flash-decode-H64-K640", "tp8-odd-H8-K100"])
def test_fp8_equals_bf16_op_on_dequantised_cache(impl, device, label):
    q, cache, indices, sink, scale, lengths, block_size = fp8_inputs(label)
    kv = dequantize_kv_cache_fp8(cache, cache.shape[0] * block_size, block_size)
    expected = reference(q, kv, indices, sink, scale, lengths)
    out, lse = ops.sparse_mqa_fp8(*_to(device, (q, cache, indices, sink, scale, lengths, block_size)), impl=impl)
    check_outputs(impl, device, out, lse, expected)


@pytest.mark.op("sparse_mqa")
def test_empty_rows(impl, device):
    T, H, N, K = 4, 8, 30, 12
    q, kv, indices, sink, _, _ = random_inputs(T, H, N, K)
    indices[1] = -1
    indices[2] = torch.tensor([N, N + 1, -1, -5, 1000, -1, N, -3, 2 ** 31 - 1, -2 ** 31, N, N + 9])
    lengths = torch.tensor([K, K, K, 0], dtype=torch.int32)
    sink[:] = 5.0                                   # a sink does not make an empty row non-zero
    out, lse = ops.sparse_mqa(*_to(device, (q, kv, indices, sink, None, lengths)), impl=impl)
    out, lse = out.cpu(), lse.cpu()
    for t in (1, 2, 3):
        assert torch.all(out[t] == 0) and torch.all(lse[t] == INF)
    assert torch.all(torch.isfinite(lse[0]))
    for k_or_n in ((q, kv, indices[:, :0].contiguous(), sink), (q, kv[:0], indices, sink)):
        out, lse = ops.sparse_mqa(*_to(device, k_or_n), impl=impl)
        assert torch.all(out.cpu() == 0) and torch.all(lse.cpu() == INF)


@pytest.mark.op("sparse_mqa_fp8")
def test_fp8_empty_cache(impl, device):
    q, kv, indices, sink, _, _ = random_inputs(3, 8, 5, 4)
    cache = torch.zeros(0, 64 * 584, dtype=torch.uint8)
    out, lse = ops.sparse_mqa_fp8(*_to(device, (q, cache, indices, sink)), impl=impl)
    assert torch.all(out.cpu() == 0) and torch.all(lse.cpu() == INF)


@pytest.mark.op("sparse_mqa")
@given(seed=st.integers(0, 2 ** 31 - 1), T=st.integers(0, 3), H=st.sampled_from([8, 16, 24]),
       N=st.integers(0, 40), K=st.integers(0, 50), lengths=st.booleans(),
       scale=st.one_of(st.none(), st.floats(0.02, 0.1)))
def test_any_shape(impl, device, seed, T, H, N, K, lengths, scale):
    args = random_inputs(T, H, N, K, torch.Generator().manual_seed(seed), lengths, scale)
    out, lse = ops.sparse_mqa(*_to(device, args), impl=impl)
    check_outputs(impl, device, out, lse, reference(*args))


@pytest.mark.op("sparse_mqa_fp8")
@given(seed=st.integers(0, 2 ** 31 - 1), T=st.integers(0, 3), N=st.integers(0, 40), K=st.integers(0, 50),
       block_size=st.sampled_from([1, 7, 64]), lengths=st.booleans())
def test_fp8_any_shape(impl, device, seed, T, N, K, block_size, lengths):
    q, kv, indices, sink, scale, topk_length = random_inputs(T, 8, N, K, torch.Generator().manual_seed(seed),
                                                             lengths)
    args = (q, quantize_kv_cache_fp8(kv, block_size), indices, sink, scale, topk_length, block_size)
    out, lse = ops.sparse_mqa_fp8(*_to(device, args), impl=impl)
    check_outputs(impl, device, out, lse, reference_fp8(*args))


@pytest.mark.parametrize("op, labels", [("sparse_mqa", ops.CASE_LABELS), ("sparse_mqa_fp8", ops.FP8_CASE_LABELS)])
def test_ladder_cases_pass(op, labels):
    summary = ladder.run_cases(op, "reference", torch.device("cpu"))
    assert summary.startswith(f"{len(labels)} cases match")


def test_ladder_cases_shapes():
    shapes = {label: (args[0].shape, args[2].shape) for label, args, _ in ops._cases(torch.device("cpu"))}
    assert shapes["flash-decode-H64-K640"] == ((2, 64, D), (2, 128 + 512))
    assert shapes["pro-decode-H128-K1152"] == ((1, 128, D), (1, 128 + 1024))
    assert shapes["tp8-odd-H8-K100"] == ((5, 8, D), (5, 100))
    assert shapes["zero-tokens"][0][0] == 0
    for label, args, kwargs in ops._fp8_cases(torch.device("cpu")):
        assert args[1].dtype in (torch.uint8, torch.float8_e4m3fn) and args[1].shape[1] >= args[6] * 584, label
        if label == "two-cache-H64":
            assert args[1].shape[1] == ops.FLASHMLA_PAGE_BYTES and args[1].dtype == torch.float8_e4m3fn
            assert kwargs["extra_kv_cache"].stride(0) == ops.FLASHMLA_PAGE_BYTES
        if label == "padded-pages-H16":
            assert args[1].stride(0) == ops.FLASHMLA_PAGE_BYTES and args[1].shape[1] == 64 * 584


# The reference (fp32, out rounded once) against the unrounded fp64 oracle: out within half a bf16 ulp
# plus 1e-5 for the fp32 arithmetic that can carry a value across a rounding midpoint (logits of order
# 1, |kv| of order 1, K <= 1152: the fp32 error is below 1e-6); lse within 1e-5 + 1e-6 |e| (fp32 lse of
# magnitude <= ~10 has spacing ~1e-6). Tighter than the ladder's SPEC 6 bound, so a reference drift
# shows here first.
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("label", LABELS)
def test_reference_within_half_ulp_of_fp64_oracle(label, fp8):
    if fp8:
        args = fp8_inputs(label)
        out, lse = reference_fp8(*args)
        exact_out, exact_lse = oracle.sparse_mqa_fp8_fp64(*args)
    else:
        args = inputs(label)
        out, lse = reference(*args)
        exact_out, exact_lse = oracle.sparse_mqa_fp64(*args)
    assert_same_nonfinite(out, exact_out, "out")
    err = (out.double() - exact_out).abs()
    assert torch.all(err <= 0.5 * bf16_ulp(exact_out.float()).double() + 1e-5), err.max()
    assert_close(lse, exact_lse, atol=1e-5, rtol=1e-6, what="lse")


def test_oracle_decodes_cache_bytes_exactly():
    kv = (torch.randn(70, D) * torch.logspace(-3, 3, D)).to(torch.bfloat16)
    cache = quantize_kv_cache_fp8(kv, 16)
    decoded = oracle.decode_kv_cache_fp8(cache, 16)
    assert decoded.shape == (80, D)
    assert torch.equal(decoded.to(torch.bfloat16), dequantize_kv_cache_fp8(cache, 80, 16))
    assert torch.equal(decoded[:, 448:].to(torch.bfloat16), kv[:, 448:].new_zeros(80, 64).index_copy(
        0, torch.arange(70), kv[:, 448:]))                          # rope bytes are the raw bf16 values


def test_compare_rejects_what_it_must():
    q, kv, indices, sink, _, _ = ops._inputs("tp8-odd-H8-K100")
    out, lse = reference(q, kv, indices, sink)
    ops.compare(out, out.clone())
    ops.compare(lse, lse.clone())
    with pytest.raises(AssertionError, match="exceed abs"):
        ops.compare((out.float() * 1.05).to(torch.bfloat16), out)            # 5 % off: beyond 2/128
    with pytest.raises(AssertionError, match="cos-diff"):
        small = torch.full_like(out, 1e-3)
        ops.compare((small + 6e-4 * torch.randn_like(small).sign()).to(torch.bfloat16), small)
    with pytest.raises(AssertionError, match=r"\+inf positions differ"):
        ops.compare(torch.where(torch.isinf(lse), 0.0, lse), lse)
    with pytest.raises(AssertionError, match="exceed abs"):
        ops.compare(lse + 1e-3, lse)
    with pytest.raises(AssertionError, match="expected torch.float32"):
        ops.compare(lse.double(), lse)
    with pytest.raises(AssertionError):                                       # the oracle sees a sink change
        shifted = oracle.sparse_mqa(q, kv, indices, sink + 0.5)
        ops.compare(out, shifted[0])


def base_args(T=3, H=8, N=20, K=10):
    q, kv, indices, sink, _, _ = random_inputs(T, H, N, K)
    return {"q": q, "kv": kv, "indices": indices, "attn_sink": sink, "softmax_scale": 0.05,
            "topk_length": torch.full((T,), K, dtype=torch.int32)}


def fp8_base_args():
    args = base_args()
    args["kv_cache"] = quantize_kv_cache_fp8(args.pop("kv"), 16)
    args["block_size"] = 16
    return args


def noncontiguous(x):
    """The same values, every stride doubled."""
    return torch.stack((x, x), dim=-1)[..., 0]


HEAD_SET = "one of 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128"
COMMON_RULES = [
    ("q", lambda a: a["q"].tolist(), "q: expected a torch.Tensor, got list"),
    ("q", lambda a: a["q"].half(), "q: expected dtype torch.bfloat16, got torch.float16"),
    ("q", lambda a: a["q"][0], "q: expected 3 dimensions, got 2 (shape (8, 512))"),
    ("q", lambda a: a["q"][..., :256].contiguous(), "q: expected shape (*, *, 512), got (3, 8, 256)"),
    ("q", lambda a: torch.zeros(3, 12, D, dtype=torch.bfloat16), f"({HEAD_SET}), got H = 12"),
    ("q", lambda a: torch.zeros(3, 136, D, dtype=torch.bfloat16), "multiple of 8 from 8 to 128"),
    ("q", lambda a: torch.zeros(3, 0, D, dtype=torch.bfloat16), "got H = 0 (shape (3, 0, 512))"),
    ("q", lambda a: noncontiguous(a["q"]), "q: expected a contiguous tensor"),
    ("indices", lambda a: a["indices"].long(), "indices: expected dtype torch.int32, got torch.int64"),
    ("indices", lambda a: a["indices"][0], "indices: expected 2 dimensions, got 1"),
    ("indices", lambda a: torch.zeros(4, 10, dtype=torch.int32), "indices: expected shape (3, *), got (4, 10)"),
    ("indices", lambda a: noncontiguous(a["indices"]), "indices: expected a contiguous tensor"),
    ("attn_sink", lambda a: a["attn_sink"].bfloat16(), "attn_sink: expected dtype torch.float32, got torch.bfloat16"),
    ("attn_sink", lambda a: a["attn_sink"][None], "attn_sink: expected 1 dimensions, got 2"),
    ("attn_sink", lambda a: torch.zeros(16), "attn_sink: expected shape (8,), got (16,)"),
    ("attn_sink", lambda a: noncontiguous(a["attn_sink"]), "attn_sink: expected a contiguous tensor"),
    ("topk_length", lambda a: a["topk_length"].long(), "topk_length: expected dtype torch.int32, got torch.int64"),
    ("topk_length", lambda a: a["topk_length"][None], "topk_length: expected 1 dimensions, got 2"),
    ("topk_length", lambda a: torch.zeros(4, dtype=torch.int32), "topk_length: expected shape (3,), got (4,)"),
    ("topk_length", lambda a: noncontiguous(a["topk_length"]), "topk_length: expected a contiguous tensor"),
    ("softmax_scale", lambda a: 0.0, "softmax_scale: expected None or a positive finite float, got 0.0"),
    ("softmax_scale", lambda a: -0.05, "softmax_scale: expected None or a positive finite float, got -0.05"),
    ("softmax_scale", lambda a: INF, "softmax_scale: expected None or a positive finite float, got inf"),
    ("softmax_scale", lambda a: float("nan"), "softmax_scale: expected None or a positive finite float, got nan"),
    ("softmax_scale", lambda a: True, "softmax_scale: expected None or a positive finite float, got bool"),
    ("softmax_scale", lambda a: torch.tensor(0.05), "softmax_scale: expected None or a positive finite float, got Tensor"),
    ("indices", lambda a: a["indices"].to("meta"), "indices: expected device cpu (the device of q), got meta"),
    ("attn_sink", lambda a: a["attn_sink"].to("meta"), "attn_sink: expected device cpu (the device of q), got meta"),
    ("topk_length", lambda a: a["topk_length"].to("meta"), "topk_length: expected device cpu (the device of q), got meta"),
]
BF16_RULES = COMMON_RULES + [
    ("kv", lambda a: a["kv"].float(), "kv: expected dtype torch.bfloat16, got torch.float32"),
    ("kv", lambda a: a["kv"][None], "kv: expected 2 dimensions, got 3"),
    ("kv", lambda a: a["kv"][:, :448].contiguous(), "kv: expected shape (*, 512), got (20, 448)"),
    ("kv", lambda a: noncontiguous(a["kv"]), "kv: expected a contiguous tensor"),
    ("kv", lambda a: a["kv"].to("meta"), "kv: expected device cpu (the device of q), got meta"),
]
FP8_RULES = COMMON_RULES + [
    ("kv_cache", lambda a: a["kv_cache"].view(torch.int8),
     "kv_cache: expected dtype torch.uint8 or torch.float8_e4m3fn, got torch.int8"),
    ("kv_cache", lambda a: a["kv_cache"].view(torch.float8_e4m3fnuz),
     "kv_cache: expected dtype torch.uint8 or torch.float8_e4m3fn, got torch.float8_e4m3fnuz"),
    ("kv_cache", lambda a: a["kv_cache"].flatten(), "kv_cache: expected 2 dimensions, got 1"),
    ("kv_cache", lambda a: a["kv_cache"][:, :9343],
     "kv_cache: expected shape (*, >= 9344) (pages of at least block_size 16 * 584 bytes), got (2, 9343)"),
    ("kv_cache", lambda a: noncontiguous(a["kv_cache"]),
     "kv_cache: expected the bytes of a page to be contiguous (stride 1 in dim 1), got strides (18688, 2)"),
    ("kv_cache", lambda a: a["kv_cache"].view(-1)[:2 * 9344 - 100].as_strided((2, 9344), (9244, 1)),
     "kv_cache: expected a page stride >= the page width 9344 (pages must not overlap), got strides (9244, 1)"),
    ("kv_cache", lambda a: a["kv_cache"].to("meta"), "kv_cache: expected device cpu (the device of q), got meta"),
    ("block_size", lambda a: 0, "block_size: expected an int >= 1, got 0"),
    ("block_size", lambda a: -16, "block_size: expected an int >= 1, got -16"),
    ("block_size", lambda a: 16.0, "block_size: expected an int, got float 16.0"),
    ("block_size", lambda a: True, "block_size: expected an int, got bool True"),
]


@pytest.mark.parametrize("name, bad, message", BF16_RULES, ids=[m for _, _, m in BF16_RULES])
def test_bad_input_is_refused_before_launch(name, bad, message):
    args = base_args()
    args[name] = bad(args)
    with pytest.raises(ValueError) as err:
        ops.sparse_mqa(**args)
    assert message in str(err.value)


@pytest.mark.parametrize("name, bad, message", FP8_RULES, ids=[m for _, _, m in FP8_RULES])
def test_fp8_bad_input_is_refused_before_launch(name, bad, message):
    args = fp8_base_args()
    args[name] = bad(args)
    with pytest.raises(ValueError) as err:
        ops.sparse_mqa_fp8(**args)
    assert message in str(err.value)


def _with(rows, *entries):
    """rows: a [T, K] int32 tensor; entries: ((t, j), value) pairs set in a copy."""
    out = rows.clone()
    for (t, j), v in entries:
        out[t, j] = v
    return out


# Data-dependent bad calls (issue 11), base_args shapes (T = 3, K = 10, N = 20; FP8: 2 pages * 16 = 32
# slots): refused only in checked mode, naming argument, expected range, first bad position and value;
# on the default path equal to the call with those entries replaced by -1 and topk_length clamped to
# [0, K]. (label, changes given the base args, message parts)
CHECKED = [
    ("index-N", lambda a: {"indices": _with(a["indices"], ((1, 3), 20))},
     ["indices: expected values in [0, 20) (rows of kv, N = 20) or -1, got 20 at position (1, 3) "
      "(DSV4K_CHECK=1 checked mode)"]),
    ("index-minus-2", lambda a: {"indices": _with(a["indices"], ((0, 0), -2))}, ["got -2 at position (0, 0)"]),
    ("index-minus-N", lambda a: {"indices": _with(a["indices"], ((2, 9), -20))}, ["got -20 at position (2, 9)"]),
    ("length-K+1", lambda a: {"topk_length": torch.tensor([10, 3, 11], dtype=torch.int32)},
     ["topk_length: expected values in [0, 11) (entries used of the K = 10 of indices), got 11 at position (2,)"]),
    ("length-minus-1", lambda a: {"topk_length": torch.tensor([-1, 3, 10], dtype=torch.int32)},
     ["topk_length: expected values in [0, 11)", "got -1 at position (0,)"]),
]


def _clean(args, changes):
    """The default path's meaning of a bad call: invalid indices -> -1, topk_length clamped to [0, K]."""
    n = args["kv"].shape[0] if "kv" in args else args["kv_cache"].shape[0] * args["block_size"]
    fixed = {}
    if "indices" in changes:
        i = changes["indices"]
        fixed["indices"] = torch.where((i >= 0) & (i < n), i, torch.full_like(i, -1))
    if "topk_length" in changes:
        fixed["topk_length"] = changes["topk_length"].clamp(0, args["indices"].shape[1])
    return fixed


def _fix(args):
    """Base args whose indices are all valid or -1 (random_inputs draws some from [-3, N + 3))."""
    n = args["kv"].shape[0] if "kv" in args else args["kv_cache"].shape[0] * args["block_size"]
    i = args["indices"]
    return {**args, "indices": torch.where((i >= 0) & (i < n), i, torch.full_like(i, -1))}


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("label, change, message", CHECKED, ids=[c[0] for c in CHECKED])
def test_bad_values_are_refused_in_checked_mode_and_masked_otherwise(monkeypatch, fp8, label, change, message):
    args = _fix(fp8_base_args() if fp8 else base_args())
    fn = ops.sparse_mqa_fp8 if fp8 else ops.sparse_mqa
    changes = change(args)
    if fp8 and label == "index-N":   # one past the FP8 cache instead: 2 pages * 16 slots
        changes = {"indices": _with(args["indices"], ((1, 3), 32))}
        message = ["indices: expected values in [0, 32) (slots of kv_cache, 2 pages * block_size 16) or -1, "
                   "got 32 at position (1, 3)"]
    monkeypatch.delenv("DSV4K_CHECK", raising=False)
    out, lse = fn(**{**args, **changes})
    want_out, want_lse = fn(**{**args, **_clean(args, changes)})
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    monkeypatch.setenv("DSV4K_CHECK", "1")
    with dispatch.recording() as calls, pytest.raises(ValueError) as err:
        fn(**{**args, **changes})
    for part in message:
        assert part in str(err.value)
    assert not calls
    got = fn(**{**args, **_clean(args, changes)})                 # the masked call passes checked mode
    assert torch.equal(got[0], want_out)


def test_checked_mode_ignores_entries_past_topk_length(monkeypatch):
    """Entries a row does not use (j >= topk_length[t]) are never read, so checked mode lets them be."""
    monkeypatch.setenv("DSV4K_CHECK", "1")
    args = _fix(base_args())
    args["topk_length"] = torch.tensor([10, 4, 0], dtype=torch.int32)
    args["indices"] = _with(args["indices"], ((1, 4), 99), ((1, 9), -7), ((2, 0), 20))
    ops.sparse_mqa(**args)
    with pytest.raises(ValueError, match=r"got 99 at position \(1, 4\)"):
        ops.sparse_mqa(**{**args, "topk_length": torch.tensor([10, 5, 0], dtype=torch.int32)})


@pytest.mark.op("sparse_mqa_fp8")
def test_fp8_reads_nothing_outside_the_cache_view(impl, device):
    """The cache is a view into a larger buffer whose pages around it dequantise to NaN: indices just
    past the view, far past it, or negative must read none of it (out stays finite and equals the call
    with -1 there)."""
    q, kv, _, sink, _, _ = random_inputs(3, 8, 40, 6)
    view_pages = quantize_kv_cache_fp8(kv, 16)                           # 3 pages, 48 slots
    poison = quantize_kv_cache_fp8(torch.full((16, D), float("nan"), dtype=torch.bfloat16), 16)
    buffer = torch.cat((poison, view_pages, poison, poison)).to(device)
    cache = buffer[1:4]
    indices = torch.tensor([[48, 5, -1, 63, 64, 7], [-16, 2, -48, -49, 1 << 30, 47], [0, 1, 2, 3, 4, 95]],
                           dtype=torch.int32)
    masked = torch.where((indices >= 0) & (indices < 48), indices, torch.full_like(indices, -1))
    out, lse = ops.sparse_mqa_fp8(q.to(device), cache, indices.to(device), sink.to(device), block_size=16, impl=impl)
    want_out, want_lse = ops.sparse_mqa_fp8(q.to(device), cache, masked.to(device), sink.to(device), block_size=16,
                                            impl=impl)
    assert out.isfinite().all() and lse.isfinite().all()
    assert torch.equal(out.cpu(), want_out.cpu()) and torch.equal(lse.cpu(), want_lse.cpu())


def test_validation_reads_no_tensor_values():
    """Every check is metadata only: validating meta tensors (which hold no values) passes."""
    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in base_args(T=2, H=128, K=1152).items()}
    ops.validate(**args)
    fp8 = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in fp8_base_args().items()}
    ops.validate_fp8(**fp8)


def test_accepted_edges():
    args = base_args()
    ops.sparse_mqa(**{**args, "softmax_scale": None, "topk_length": None})
    ops.sparse_mqa(**{**args, "softmax_scale": 1})                               # an int scale is a real
    for H in (8, 64, 128):
        q = torch.zeros(3, H, D, dtype=torch.bfloat16)
        ops.sparse_mqa(**{**args, "q": q, "attn_sink": torch.zeros(H)})
    ops.sparse_mqa(**{**args, "indices": torch.zeros(3, 0, dtype=torch.int32)})  # K = 0
    ops.sparse_mqa(**{**args, "kv": torch.zeros(0, D, dtype=torch.bfloat16)})    # N = 0
    fp8 = fp8_base_args()
    ops.sparse_mqa_fp8(**{**fp8, "kv_cache": quantize_kv_cache_fp8(torch.zeros(5, D, dtype=torch.bfloat16), 1),
                          "block_size": 1})


def test_torch_library_ops_are_complete():
    """Schema and fake implementation pass torch's own op checker, with and without the optionals."""
    q, kv, indices, sink, _, lengths = random_inputs(3, 8, 40, 33, lengths=True)
    cache = quantize_kv_cache_fp8(kv, 16)
    for optionals in ((0.05, lengths), (None, None)):
        torch.library.opcheck(torch.ops.dsv4.sparse_mqa.default, (q, kv, indices, sink, *optionals, "reference"),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.dsv4.sparse_mqa_fp8.default,
                              (q, cache, indices, sink, *optionals, 16, None, None, None, "reference"),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.dsv4.sparse_mqa_fp8.default,
                              (q, ops.padded_pages(cache, 9600, slice_view=True), indices, sink, *optionals, 16,
                               cache, indices[:, :7].contiguous(), optionals[1],
                               "reference"),
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_without_graph_breaks():
    torch._dynamo.reset()

    def layer(q, kv, cache, indices, sink, lengths):
        out, lse = ops.sparse_mqa(q, kv, indices, sink, topk_length=lengths, impl="reference")
        out8, lse8 = ops.sparse_mqa_fp8(q, cache, indices, sink, 0.04, lengths, 16, impl="reference")
        two, lse2 = ops.sparse_mqa_fp8(q, cache, indices, sink, 0.04, lengths, 16, cache[:, :16 * 584], indices,
                                       lengths, impl="reference")
        return out.float() + out8.float() + two.float(), lse - lse8 + lse2

    q, kv, indices, sink, _, lengths = random_inputs(2, 16, 50, 40, lengths=True)
    cache = quantize_kv_cache_fp8(kv, 16)
    args = (q, kv, cache, indices, sink, lengths)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    for got, want in zip(compiled(*args), layer(*args)):
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
    explain = torch._dynamo.explain(layer)(*args)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def test_dispatch_registration():
    args = tuple(base_args().values())
    assert dispatch.explain("sparse_mqa", *args).chosen.name == "triton"      # the interpreter is on in tests
    for op in ("sparse_mqa", "sparse_mqa_fp8"):
        ref = dispatch.get(op, "reference")
        assert ref.language == "reference" and set(ref.backends) == {"cpu", "cuda", "rocm", "ascend"}
        kernel = dispatch.get(op, "triton")
        assert kernel.language == "triton" and set(kernel.backends) == {"cpu", "cuda", "rocm"}
        assert ladder.get_check(op).oracle is not None


def test_index_builders_are_reexported_validated():
    from dsv4_kernels.ops import indices as checked
    for name in ("WINDOW", "build_sparse_indices", "window_indices", "num_visible_compressed",
                 "compressed_indices", "selected_compressed_indices", "compact_indices"):
        assert getattr(ops, name) is getattr(checked, name) and name in ops.__all__
        assert hasattr(reference_indices, name)
    indices = ops.build_sparse_indices(torch.arange(3), 0)
    assert indices.shape == (3, 128) and indices.dtype == torch.int32
