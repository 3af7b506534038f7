"""The TileLang FP8 quantisation kernels of the MoE (kernels/moe/tilelang_quant.py: quantize_fp8 with its
optional row gather, swiglu_quant), which the TileLang fp4_grouped_moe composes: their codegen is part of
its job (tests/test_codegen.py compiles it once; `codegen_artifacts` hands the artifacts here).

- CPU numerics: the kernels' own source built for TileLang's C target (cpu=True: the same prim_func with
  one thread, local arrays for the register fragments, T.grid for T.Parallel, bf16 passed as its bits),
  run through the public functions on CPU tensors and compared bit for bit with the reference
  quantize_fp8_blockwise and with triton_quant (interpreter): random rows of wide magnitude, ties at
  every FP8 rounding point, subnormal codes, signed zeros, saturation, NaN / inf blocks, all-zero and tiny
  blocks, both encodings and blocks, K with a partial last chunk, the gather (-1, out-of-range and
  repeated rows, zero rows, zero output rows), SwiGLU with the clamp on and off (NaN through the clamps),
  padding rows left unwritten. What the C build does not run: the fragment layout over 128 threads, the
  cross-thread max (tl::AllReduce) and the vector copies, which codegen checks.
- codegen (sm_90a and gfx942 by default, all four GPU targets with --all-targets): one kernel, symbolic
  row counts, the scale rule's constants, the NaN rule and byte, the e4m3fnuz sign rule, the exponent
  biases and subnormal shifts of the encoding, the cross-thread amax, the gather guard, the live-row
  guard, the clamps present or compiled out, the bf16 rounding, 16-byte loads and 8-byte stores on CUDA,
  no division in the x quantisation; cubins with no local memory on CUDA (HIP: source only).
"""
import re

import pytest
import torch

pytest.importorskip("tilelang", reason="tilelang is not installed (pip install 'dsv4-kernels[cuda]')")

from dsv4_kernels.codegen import Artifact  # noqa: E402
from dsv4_kernels.kernels.moe import tilelang_quant as tq  # noqa: E402
from dsv4_kernels.reference.formats import quantize_fp8_blockwise  # noqa: E402

TARGETS = ("sm_90a", "sm_100a", "gfx942", "gfx950")
FMTS = ("e4m3fn", "e4m3fnuz")
NAN_BYTE = {"e4m3fn": 0x7F, "e4m3fnuz": 0x80}


# ----------------------------------------------------------------------------------------------- CPU numerics

def _bf16_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int16).view(torch.bfloat16)


def _hard_rows(K: int, fmt: str, dtype=torch.bfloat16) -> torch.Tensor:
    """Rows whose blocks hit every rounding case: each block of 32 holds fmt_max (so its scale is 2^0 or
    close) and values on, just off and between the FP8 rounding points: ties between every pair of
    neighbouring codes (normal and subnormal), signed zeros, values below half the smallest subnormal,
    values that round up into the next binade and saturate; plus rows scaled by powers of two over the
    whole bf16 range (tiny blocks take the 1e-4 amax floor), an all-zero row and a row of bf16 subnormals."""
    fmt_max = tq.FMT_MAX[fmt]
    table = torch.arange(0, 0x7F if fmt == "e4m3fn" else 0x80, dtype=torch.uint8).view(tq.FP8_DTYPE[fmt]).float()
    table = table[table <= fmt_max]
    mids = (table[1:] + table[:-1]) / 2           # exact ties (representable in fp32, and in bf16 mostly)
    pool = torch.cat([table, mids, mids * (1 + 2**-7), mids * (1 - 2**-7), -table, -mids, torch.tensor([-0.0, 0.0]),
                      table[1:2] / 4, -table[1:2] / 4, table[1:2] / 2 * (1 + 2**-7)])
    need = -(-K // 32) * 32
    rows = []
    for scale_pow in (0, -3, 7, -40, 60, -120, 100):
        vals = pool[torch.randperm(pool.numel())][: need].repeat(need // pool.numel() + 1)[:need].clone()
        vals = vals.view(-1, 32)
        vals[:, 0] = fmt_max                      # pins the block scale to 2^0 before the row's power of two
        rows.append(vals.flatten()[:K] * 2.0**scale_pow)
    rows.append(torch.zeros(K))
    rows.append(_bf16_from_bits(torch.randint(1, 128, (K,)) * torch.where(torch.rand(K) < 0.5, 1, -1)).float())
    return torch.stack(rows).to(dtype)


def _random_rows(n: int, K: int, dtype=torch.bfloat16) -> torch.Tensor:
    x = torch.randn(n, K) * torch.exp2(torch.randint(-20, 20, (n, K // 32)).float()).repeat_interleave(32, 1)[:, :K]
    return x.to(dtype)


def _poison_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """NaN and +-inf in some blocks (the first, one in the middle, the last of a row)."""
    x = x.clone()
    K = x.shape[1]
    x[0, 1] = float("nan")
    x[1, K // 2] = float("inf")
    x[2, K - 1] = float("-inf")
    if x.shape[0] > 3:
        x[3, :] = float("nan")
    return x


def _assert_bitwise(q, s, rq, rs, where=""):
    assert q.dtype == rq.dtype and q.shape == rq.shape and s.shape == rs.shape, where
    bad = (q.view(torch.uint8) != rq.view(torch.uint8)).nonzero()
    assert bad.numel() == 0, f"{where}: {bad.shape[0]} bytes differ, first at {bad[:4].tolist()}"
    assert torch.equal(s.isnan(), rs.isnan()), f"{where}: NaN scales differ"
    ok = ~rs.isnan()
    assert torch.equal(s[ok], rs[ok]), f"{where}: scales differ"


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("K", [1408, 384], ids=["K1408-tail-chunk", "K384"])
def test_quantize_fp8_is_bitwise_the_reference_and_triton(fmt, block, K):
    """Every byte and scale equals quantize_fp8_blockwise and triton_quant.quantize_fp8 (interpreter): ties,
    subnormals, signed zeros, saturation, tiny and huge blocks, NaN / inf blocks; K 1408 is a full chunk of
    1024 and a partial one of 384 (its blocks past K are neither read nor stored), K 384 one chunk."""
    from dsv4_kernels.kernels.moe import triton_quant
    x = torch.cat([_hard_rows(K, fmt), _random_rows(12, K)])
    x = _poison_blocks(x, block)
    q, s = tq.quantize_fp8(x, block, fmt)
    _assert_bitwise(q, s, *quantize_fp8_blockwise(x, block, fmt), "reference")
    _assert_bitwise(q, s, *triton_quant.quantize_fp8(x, block, fmt), "triton_quant")
    # the NaN rule: a block with a NaN or inf is the NaN byte everywhere, scale NaN; the others unaffected
    qb = q.view(torch.uint8).view(x.shape[0], K // block, block)
    poisoned = ~torch.isfinite(x.float()).view(x.shape[0], K // block, block).all(-1)
    assert poisoned.sum() >= 4 and s[poisoned].isnan().all() and not s[~poisoned].isnan().any()
    assert (qb[poisoned] == NAN_BYTE[fmt]).all()


@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_fp8_fp32_input_and_every_fp8_value(fmt):
    """fp32 input (the other dtype the kernel takes): every finite FP8 value of the encoding times powers of
    two, and fp32 values between bf16 ones (ties that bf16 cannot hold)."""
    K = 256
    fmt_max = tq.FMT_MAX[fmt]
    codes = torch.arange(256, dtype=torch.uint8).view(tq.FP8_DTYPE[fmt]).float()
    codes = codes[codes.isfinite() & (codes.abs() <= fmt_max)]
    vals = torch.cat([codes, codes[: K - codes.numel() % K]])[: (codes.numel() // K + 1) * K].view(-1, K)
    x = torch.cat([vals, vals * 2.0**-5, vals * 3.0, vals * 2.0**-70,
                   torch.randn(4, K) * 2.0**torch.randint(-60, 60, (4, 1)).float()]).float()
    x[:, ::32] = fmt_max * 2.0**torch.randint(-10, 10, (x.shape[0], K // 32)).float()
    for block in (32, 128):
        q, s = tq.quantize_fp8(x, block, fmt)
        _assert_bitwise(q, s, *quantize_fp8_blockwise(x, block, fmt), f"fp32 block {block}")


@pytest.mark.parametrize("fmt, block", [("e4m3fn", 128), ("e4m3fnuz", 32)])
def test_quantize_fp8_gather(fmt, block):
    """Output row r quantises x[rows[r]]: repeated rows, rows in any order; rows[r] = -1 or >= T gives zero
    bytes and scale 0; more and fewer output rows than x's; x rows full of NaN are not read through a
    padding row; zero output rows; zero x rows with only padding."""
    K = 1408
    x = _poison_blocks(torch.cat([_random_rows(9, K), _hard_rows(K, fmt)]), block)
    T = x.shape[0]
    rows = torch.tensor([5, -1, 0, T, T - 1, 5, -7, 3, 2**31 - 1, 1, 0, -2**31], dtype=torch.int32)
    q, s = tq.quantize_fp8(x, block, fmt, rows)
    rq, rs = quantize_fp8_blockwise(x, block, fmt)
    live = (rows >= 0) & (rows < T)
    src = rows.long()[live]
    _assert_bitwise(q[live], s[live], rq[src], rs[src], "gathered rows")
    assert (q.view(torch.uint8)[~live] == 0).all() and (s[~live] == 0).all() and not s[~live].signbit().any()
    q, s = tq.quantize_fp8(x, block, fmt, rows[:0])
    assert q.shape == (0, K) and s.shape == (0, K // block) and q.dtype == tq.FP8_DTYPE[fmt]
    q, s = tq.quantize_fp8(x[:0], block, fmt, torch.tensor([-1, 0, 3], dtype=torch.int32))
    assert (q.view(torch.uint8) == 0).all() and (s == 0).all()


def test_quantize_fp8_zero_rows():
    q, s = tq.quantize_fp8(torch.zeros(0, 256, dtype=torch.bfloat16), 32, "e4m3fn")
    assert q.shape == (0, 256) and s.shape == (0, 8) and q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32


def _swiglu_reference(gu, m, w, G, block, fmt, limit):
    inter = gu.shape[1] // 2
    g, u = gu.float()[:, :inter], gu.float()[:, inter:]
    if limit > 0:
        u = u.clamp(-limit, limit)
        g = g.clamp(max=limit)
    h = torch.nn.functional.silu(g) * u * w.float()[:, None]
    rq, rs = quantize_fp8_blockwise(h.to(torch.bfloat16), block, fmt)
    live = (m >= 0) & (m < G)
    return rq.view(torch.uint8), rs, live


@pytest.mark.parametrize("fmt, block, limit", [
    ("e4m3fn", 32, 10.0), ("e4m3fnuz", 128, 10.0), ("e4m3fn", 128, 0.0), ("e4m3fnuz", 32, 0.0), ("e4m3fn", 32, 2.5),
    ("e4m3fnuz", 128, -1.0)], ids=["fn-32-limit10", "fnuz-128-limit10", "fn-128-no-clamp", "fnuz-32-no-clamp",
                                   "fn-32-limit2.5", "fnuz-128-limit-1"])
def test_swiglu_quant_is_bitwise_the_reference_and_triton(fmt, block, limit):
    """h = silu(clamp(g, max=limit)) * clamp(u, -limit, limit) * w, rounded to bf16, block-quantised: bit
    for bit the reference formula (torch's silu) fed to quantize_fp8_blockwise, and triton_quant's kernel
    (interpreter), on every live row; padding rows (m = -1, m >= G) are left unwritten. I 1408 has a
    partial last chunk. NaN and inf in g or u go through the clamps (a NaN is not clamped away) and make
    their block NaN; limit <= 0 disables both clamps (values beyond 10 survive)."""
    from dsv4_kernels.kernels.moe import triton_quant
    inter, M, G = 1408, 24, 5
    gu = (torch.randn(M, 2 * inter) * torch.exp2(torch.randint(-6, 5, (M, 1)).float())).to(torch.bfloat16)
    gu[0, :8] = torch.tensor([30.0, -30.0, 1e4, -1e4, 0.0, -0.0, 88.0, -88.0])       # beyond the clamps
    gu[0, inter:inter + 8] = torch.tensor([30.0, -30.0, 1e4, -1e4, 5.0, -5.0, 200.0, -200.0])
    gu[1, 3] = float("nan")                       # a NaN gate: its block is NaN, clamp or not
    gu[2, inter + 40] = float("nan")              # a NaN up
    gu[3, 100] = float("inf")                     # inf gate: silu(inf) = inf (clamped to the limit if on)
    gu[4, inter + 200] = float("-inf")            # -inf up: -inf, or -limit
    m = torch.tensor([0, 1, 2, 3, 4, -1, 0, 5, 1, 2, 3, 4, 99, 0, 1, 2, 3, 4, -1, 0, 1, 2, 3, 4], dtype=torch.int32)
    w = torch.rand(M) + 0.25
    w[7] = float("nan")                           # a padding row's weight: never read into a live row
    q, s = tq.swiglu_quant(gu, m, w, G, block, fmt, limit)
    rq, rs, live = _swiglu_reference(gu, m, w, G, block, fmt, limit)
    assert q.dtype == torch.uint8 and q.shape == (M, inter) and s.shape == (M, inter // block)
    _assert_bitwise(q[live], s[live], rq[live], rs[live], "reference")
    tq_q, tq_s = triton_quant.swiglu_quant(gu, m, w, G, block, fmt, limit)
    _assert_bitwise(q[live], s[live], tq_q[live], tq_s[live], "triton_quant")
    # padding rows keep the poisoned memory of torch.empty (never written)
    assert s[~live].isnan().all(), "padding rows were written"
    assert s[1, 0].isnan() and s[2, 40 // block].isnan()
    clamp_on = limit > 0
    assert bool(s[3, 100 // block].isnan()) != clamp_on, "inf gate: NaN block iff not clamped (inf * u ...)"


def test_swiglu_quant_zero_rows_and_all_padding():
    gu = torch.zeros(0, 256, dtype=torch.bfloat16)
    q, s = tq.swiglu_quant(gu, torch.zeros(0, dtype=torch.int32), torch.zeros(0), 4, 32, "e4m3fn", 10.0)
    assert q.shape == (0, 128) and s.shape == (0, 4)
    gu = torch.full((3, 256), float("nan"), dtype=torch.bfloat16)
    q, s = tq.swiglu_quant(gu, torch.tensor([-1, 4, 7], dtype=torch.int32), torch.ones(3), 4, 32, "e4m3fn", 10.0)
    assert s.isnan().all() and (q == 0xA5).all(), "padding rows were written"   # 0xA5: torch.empty's poison


@pytest.mark.parametrize("call, needle", [
    (lambda: tq.quantize_fp8(torch.zeros(4, 96), 64, "e4m3fn"), "block: expected 32 or 128, got 64"),
    (lambda: tq.quantize_fp8(torch.zeros(4, 96), 32, "e5m2"), "fmt: expected 'e4m3fn' or 'e4m3fnuz', got 'e5m2'"),
    (lambda: tq.quantize_fp8(torch.zeros(4, 100), 32, "e4m3fn"), "x: expected K (x.shape[1]) a positive multiple of block 32, got 100"),
    (lambda: tq.quantize_fp8(torch.zeros(4, 96, dtype=torch.float16), 32, "e4m3fn"), "x: expected a contiguous 2-D bf16 or fp32"),
    (lambda: tq.quantize_fp8(torch.zeros(96, 4).t(), 32, "e4m3fn"), "non-contiguous"),
    (lambda: tq.quantize_fp8(torch.zeros(4, 96), 32, "e4m3fn", torch.zeros(3, dtype=torch.int64)), "rows: expected a contiguous 1-D int32"),
    (lambda: tq.swiglu_quant(torch.zeros(4, 96, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.int32), torch.zeros(4), 2, 32, "e4m3fn", 10.0),
     "gu: expected 2I (gu.shape[1]) a positive multiple of 2 * block 64, got 96"),
    (lambda: tq.swiglu_quant(torch.zeros(4, 128, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.int32), torch.zeros(4), 2, 32, "e4m3fn", 10.0),
     "m_indices: expected a contiguous [4] torch.int32 tensor, got (3,) torch.int32"),
    (lambda: tq.swiglu_quant(torch.zeros(4, 128, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.float64), 2, 32, "e4m3fn", 10.0),
     "row_w: expected a contiguous [4] torch.float32 tensor"),
    (lambda: tq.swiglu_quant(torch.zeros(4, 128), torch.zeros(4, dtype=torch.int32), torch.zeros(4), 2, 32, "e4m3fn", 10.0),
     "gu: expected a contiguous 2-D bf16 tensor, got 2-D torch.float32"),
], ids=["block", "fmt", "K", "dtype", "layout", "rows", "I", "m_indices", "row_w", "gu-dtype"])
def test_bad_arguments_raise_before_any_launch(call, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        call()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(block=64), "block must be 32 or 128, got 64"),
    (dict(fmt="e5m2"), "fmt must be 'e4m3fn' or 'e4m3fnuz'"),
    (dict(K=100), "K must be a positive multiple of block 32, got 100"),
    (dict(in_dtype="float16"), "in_dtype must be bfloat16 or float32"),
    (dict(cpu=True), "the C-target build runs one thread, got threads=128"),
])
def test_kernel_builders_check_their_arguments(kwargs, needle):
    args = dict(K=4096, block=32, fmt="e4m3fn")
    args.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(needle)):
        tq.make_quant_kernel(**args)
    if "in_dtype" not in kwargs:
        args["I"] = args.pop("K")
        with pytest.raises(ValueError, match=re.escape(needle.replace("K must", "I must"))):
            tq.make_swiglu_quant_kernel(clamp=True, **args)


# ----------------------------------------------------------------------------------------------------- codegen

_LABELS = {"quantize_fp8": tq.CODEGEN_QUANT, "swiglu_quant": tq.CODEGEN_SWIGLU}


def _artifact(codegen_artifacts, op: str, target: str) -> Artifact:
    """The artifact of one kernel in the TileLang fp4_grouped_moe's codegen job (picked by its label)."""
    label = _LABELS[op][target][0]
    arts = [a for a in codegen_artifacts("fp4_grouped_moe", "tilelang", target) if a.label == label]
    assert len(arts) == 1, f"{label} not in the fp4_grouped_moe/tilelang codegen job for {target}"
    return arts[0]


def _common(target: str, a: Artifact, fnuz: bool) -> None:
    """What both kernels share: one kernel, the block scale rule, the encoding, the NaN rule."""
    t = a.text
    label = a.label
    hip = target.startswith("gfx")
    assert t.count("__global__ void __launch_bounds__(") == 1, f"{label}: expected one kernel"
    assert not a.failed_claims(), f"{label}: {a.failed_claims()}"
    if not hip:
        assert a.binary_kind == "cubin" and a.resources["local"] == 0 and a.resources["stack"] == 0, a.resources
    # the per-block amax: a max over the magnitude bits, across the threads of a block (block / 8 of them)
    block = int(re.search(r"-b(\d+)", label).group(1))
    assert "& 2147483647);" in t, f"{label}: magnitudes as bits"
    assert re.search(rf"tl::AllReduce<tl::MaxOp, {block // 8}, 1, 0\b", t), f"{label}: cross-thread amax"
    # scale = 2^ceil(log2(max(amax, 1e-4) / fmt_max)): the exponent of max(amax bits, fp32(1e-4) bits) minus
    # fmt_max's, plus 1 where the mantissa exceeds fmt_max's (0x600000 for 1.75, 0x700000 for 1.875)
    man, off = (7340032, 7) if fnuz else (6291456, 8)
    assert re.search(rf"if \(\({man} < \(max\(amax\[0\], 953267991\) & 8388607\)\)\)", t), f"{label}: scale rounding"
    assert re.search(rf"\(\(max\(amax\[0\], 953267991\) >> 23\) \+ condval\w*\) - {off}\);", t), f"{label}: scale bias"
    # NaN / inf block (amax bits >= 0x7F800000): the NaN byte everywhere and the NaN scale
    nan_byte = 128 if fnuz else 127
    assert re.search(rf"if \(\(2139095040 <= amax\[0\]\)\) \{{\s*condval\w* = {nan_byte};", t), f"{label}: NaN byte"
    assert re.search(r"if \(\(2139095040 <= amax\[0\]\)\) \{\s*(int _reinterpret_tmp\w* = 2143289344;|condval\w* = "
                     r"__builtin_bit_cast\(float, 2143289344\))", t), f"{label}: NaN scale"
    # the encoding: normal codes keep 3 mantissa bits RNE on the fp32 bits, exponent bias 7 / 8; subnormals
    # below 2^-6 / 2^-7 shifted by 141 - e / 140 - e, RNE on the bits shifted out
    bias = 8 if fnuz else 7
    assert f"+ 524287) >> 23) - {127 - bias}) << 3)" in t, f"{label}: FP8 exponent bias"
    assert f">> 23) < {128 - bias}))" in t, f"{label}: subnormal threshold"
    assert re.search(rf"\(1 << \({147 - bias} - max\(\(\(mag\[\w+\] & 2147483647\) >> 23\), {118 - bias}\)\)\)", t), \
        f"{label}: subnormal rounding increment"
    assert f">> ({148 - bias} - max(" in t, f"{label}: subnormal shift"
    # the sign: the IEEE bit; e4m3fnuz only on a nonzero code (no -0)
    sign = r"\(\(mag\[\w+\] < 0\) && \(0 < \(\(int\)qb\[\w+\]\)\)\)" if fnuz else r"\(mag\[\w+\] < 0\)"
    assert re.search(r"if \(" + sign + r"\) \{\s*condval\w* = 128;", t), f"{label}: sign rule"
    assert ("(0 < ((int)qb[" in t) == fnuz, f"{label}: the no -0 rule belongs to e4m3fnuz only"
    # stores: 8 bytes per thread; no byte-vector constant (HIP's make_uint2 of 8 bytes does not compile)
    assert re.search(r"\*\(uint2\*\)\(Q \+", t), f"{label}: 8-byte stores of the bytes"
    assert not re.search(r"make_uint2\((\w+, ){2,}", t) and not re.search(r"make_uint4\((\w+, ){4,}", t), \
        f"{label}: a byte-vector constant (invalid HIP)"


@pytest.mark.codegen
@pytest.mark.parametrize("target", TARGETS)
def test_codegen_quantize_fp8(target, codegen_artifacts):
    a = _artifact(codegen_artifacts, "quantize_fp8", target)
    label, K, block, gather = tq.CODEGEN_QUANT[target]
    assert a.label == label
    fnuz = target == "gfx942"
    _common(target, a, fnuz)
    t = a.text
    assert re.search(r"\bint R\b", t), f"{label}: the row count is not symbolic"
    assert " / " not in t[t.index("__global__ void __launch_bounds__("):], f"{label}: a division in the x quantisation"
    assert re.search(r"\*\(uint4\*\)\(X_local_cast \+ 0\) = \*\(uint4\*\)\(X \+", t), f"{label}: 16-byte loads of x"
    if gather:
        # the gather guard: x is read through rows[r] only when 0 <= rows[r] < T; a padding row's scale is 0
        assert re.search(r"\bint T\b", t), f"{label}: x's row count is not symbolic"
        assert "int src = ROWS[((int64_t)((int)blockIdx.x))];" in t, f"{label}: the gathered row"
        load = re.search(r"\(X \+ \(+\(int64_t\)src\) \*", t).start()
        assert t.count("(X + ") == 1, f"{label}: x read in more than one place"
        assert t.rindex("if ((0 <= src) && (src < T)) {", 0, load) > t.index("int src = "), f"{label}: gather guard"
        store = re.search(r"\bS\[\(", t).start()
        scale = t.rindex("if (((0 <= src) && (src < T))) {", 0, store)
        assert re.search(r"\} else \{\s*condval\w* = (0x0p\+0f|0\.000000e\+00f)", t[scale:store]), \
            f"{label}: a padding row's scale is not 0"
    else:
        assert "ROWS[" not in t and re.search(r"\(X \+ \(+\(int64_t\)\(\(int\)blockIdx\.x\)\) \*", t), \
            f"{label}: plain row index"


@pytest.mark.codegen
@pytest.mark.parametrize("target", TARGETS)
def test_codegen_swiglu_quant(target, codegen_artifacts):
    a = _artifact(codegen_artifacts, "swiglu_quant", target)
    label, inter, block, clamp = tq.CODEGEN_SWIGLU[target]
    assert a.label == label
    _common(target, a, target == "gfx942")
    t = a.text
    assert re.search(r"\bint M\b", t) and re.search(r"\bint G\b", t), f"{label}: M and G are not symbolic"
    # the live-row guard: the expert id read once, the row computed only for 0 <= m < G
    assert "int ge = MI[((int64_t)((int)blockIdx.x))];" in t and "if ((0 <= ge) && (ge < G)) {" in t, \
        f"{label}: live-row guard"
    body = t.split("if ((0 <= ge) && (ge < G)) {", 1)[1]
    assert "} else {\n" not in body.rstrip()[-40:], f"{label}: padding rows must be left unwritten"
    # gate and up: the first I and the last I columns
    assert re.search(rf"\(GU \+ [^;]*\+ \(int64_t\){inter}\)\)", t), f"{label}: the up half at column I"
    # the clamps as selects (NaN kept): g = min(g, limit), u = clamp(u, -limit, limit); compiled out without
    clamps = [r"if \(\(limit < xs\[\w+\]\)\) \{\s*condval\w* = limit;",
              r"if \(\(limit < us\[\w+\]\)\) \{\s*condval\w* = limit;",
              r"if \(\(us\[\w+\] < \(limit \* -(0x1p\+0f|1\.000000e\+00f)[^)]*\)\)\) \{"]
    for c in clamps:
        assert bool(re.search(c, t)) == clamp, f"{label}: clamp {c!r} {'missing' if clamp else 'present'}"
    assert ("limit" in body) == clamp, f"{label}: limit used without the clamp"
    assert "fminf" not in t and "fmaxf" not in t, f"{label}: fminf / fmaxf drop NaN"
    # silu(g) * u * w in fp32 with the accurate expf, then bf16 RNE by integer ops
    assert re.search(r"\bexpf\(", t) and "__expf" not in t, f"{label}: the accurate expf (T.exp is __expf on HIP)"
    assert "-65536) | 4194304)" in t and "+ 32767) & -65536)" in t and ">> 16) & 1)" in t, f"{label}: bf16 RNE"
    assert "W[((int64_t)((int)blockIdx.x))]" in t, f"{label}: the routing weight"


def test_codegen_specs_cover_both_models_blocks_and_encodings():
    """The four specs of each kernel: the x quantisation at both hidden sizes, h at both intermediate sizes,
    both blocks each, the gather and the plain form, the clamp on and off; gfx942 is e4m3fnuz, and the
    default pair (sm_90a, gfx942) already holds the gather, both encodings and the clamp on and off."""
    from dsv4_kernels.ops import moe as ops
    dims = sorted(d for d, _, _ in ops.MODELS.values())
    inters = sorted(i for _, i, _ in ops.MODELS.values())
    assert set(tq.CODEGEN_QUANT) == set(tq.CODEGEN_SWIGLU) == set(TARGETS)
    assert sorted({k for _, k, _, _ in tq.CODEGEN_QUANT.values()}) == dims
    assert sorted({i for _, i, _, _ in tq.CODEGEN_SWIGLU.values()}) == inters
    for table in (tq.CODEGEN_QUANT, tq.CODEGEN_SWIGLU):
        assert {b for _, _, b, _ in table.values()} == {32, 128}
        assert {f for _, _, _, f in table.values()} == {True, False}
    assert tq.CODEGEN_SWIGLU["sm_90a"][3] != tq.CODEGEN_SWIGLU["gfx942"][3]
    assert tq.CODEGEN_QUANT["sm_90a"][3] and tq.CODEGEN_QUANT["gfx942"][3]
    assert all(label.endswith("-fnuz") == (t == "gfx942") for table in (tq.CODEGEN_QUANT, tq.CODEGEN_SWIGLU)
               for t, (label, *_) in table.items())
