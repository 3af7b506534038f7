"""The TileLang grouped GEMM (kernels/moe/tilelang.py: mxfp4_grouped_gemm) beyond the impl-parametrised op
and device tests (test_moe_ops.py, test_moe_device.py, which run it against the reference on a device).

- codegen (from the session's `codegen_results`: sm_90a and gfx942 by default, all four GPU targets with
  --all-targets; one spec per target, the four together the four V4 GEMM shapes): one kernel, symbolic row and group counts, the K loop's trip count K / BLOCK_K,
  the decodes as built (e2m1 nibble k % 8 of the word in its own 4 bits, the ue8m0 byte (k / 32) % 4 of
  the scale word as the fp32 exponent field, i.e. 2^(byte - 127), byte 255 NaN and byte 0 2^-127; e4m3fn bias 7 with S.1111.111
  NaN and subnormal step 2^-9 on three targets, e4m3fnuz bias 8 with 0x80 NaN and step 2^-10 on gfx942),
  the group row mask on the activation tile and on the store, padding rows stored as 0, bf16 MMA with
  fp32 accumulation (wgmma on sm_90a, mma.sync on sm_100a, MFMA on ROCm), the scale indices advancing
  with the K step, the pass rule, no local memory in a cubin, TMA copies on CUDA with the weight scales
  read by the consumer warps (not the producer);
- CPU numerics of the kernel's decode helpers (every FP8 byte in both encodings, every ue8m0 byte and
  e2m1 code, the byte and nibble order of packed words), lowered for TileLang's C target;
- host logic in pure Python: the registration, the defaults kept equal in ops/moe.py, the guards and
  their reasons, the kernel builder's argument checks.
The GEMM's numbers need a device: TileLang GPU kernels do not run on the CPU (test_moe_device.py).
"""
import re

import pytest
import torch

pytest.importorskip("tilelang", reason="tilelang is not installed (pip install 'dsv4-kernels[cuda]')")

from dsv4_kernels import dispatch, platform  # noqa: E402
from dsv4_kernels.backends import find_target  # noqa: E402
from dsv4_kernels.kernels.moe import tilelang as tl  # noqa: E402
from dsv4_kernels.ops import moe as ops  # noqa: E402

OP = "mxfp4_grouped_gemm"
I32, F32 = "int32", "float32"
TARGETS = ("sm_90a", "sm_100a", "gfx942", "gfx950")
MMA = {"sm_90a": "tl::wgmma_ss<tl::DataType::kBFloat16, tl::DataType::kBFloat16, tl::DataType::kFloat32",
       "sm_100a": "tl::mma_sync<tl::DataType::kBFloat16, tl::DataType::kBFloat16, tl::DataType::kFloat32",
       "gfx942": "__builtin_amdgcn_mfma_f32_", "gfx950": "__builtin_amdgcn_mfma_f32_"}


def check_source(target: str, label: str, text: str) -> None:
    """The claims the module docstring makes about one target's kernel source (see the module docstring)."""
    _, N, K, act_block = tl.CODEGEN_SHAPES[target]
    cfg = tl.DEFAULTS[OP]
    backend = find_target(target).backend
    hip = backend == "rocm"
    assert text.count("__global__ void __launch_bounds__(") == 1, f"{label}: expected one kernel"
    assert re.search(r"\bint G\b", text) and re.search(r"\bint M\b", text), f"{label}: M and G are not symbolic"
    # The K loop: K / BLOCK_K steps (ROCm's copy pipeline peels the last step after a loop one shorter).
    trips = {int(t) for t in re.findall(r"for \(int kt\w* = 0; kt\w* < (\d+); \+\+kt\w*\)", text)}
    steps = K // cfg["BLOCK_K"]
    peeled = trips == {steps - 1} and "cp_async_wait<0>()" in text
    assert trips == {steps} or peeled, f"{label}: K loop trips {trips}, expected {steps} steps"
    # the scales advance with the K step: BLOCK_K / 128 weight scale words, BLOCK_K / act_block activation scales
    def advances(name: str, per_step: int) -> bool:
        term = r"\+ \(\(int64_t\)kt\w*\)\)" if per_step == 1 else \
            r"\(\(int64_t\)kt\w*\) \* \(int64_t\)" + str(per_step) + r"\)"
        return re.search(name + r"\[[^;]*" + term, text) is not None
    assert advances("BS", cfg["BLOCK_K"] // 128), f"{label}: the weight scale index does not advance with the K step"
    assert advances("AS", cfg["BLOCK_K"] // act_block), f"{label}: the activation scale index does not advance with K"
    # one pass per run of a group: a row opens a pass when its id differs from the previous row's
    assert "if ((0 <= ge) && ((s == 0) || (((int*)ids)[(s - 1)] != ge)))" in text, f"{label}: the pass rule"
    # the rows' groups: a row past M or an id outside [0, G) is padding (-1), never wrapped
    head = text[:text.index("for (int s = 0; s < ")]
    assert "< M)" in head and "< G)" in head and "0 <= " in head, f"{label}: the row ids are not range checked"
    # e2m1: code k % 8 of the word is bits [4 (k % 8), 4 (k % 8) + 4), k even in the low nibble of its byte
    assert re.search(r"\(\w+\[(vec\w*)\] >> \(\1 \* 4\)\) & 15\)", text), f"{label}: e2m1 nibble order"
    assert "<< 22) + 1056964608)" in text, f"{label}: e2m1 normal codes (bits << 22 plus 126 << 23)"
    assert "& 1) * 1056964608)" in text, f"{label}: the e2m1 subnormal code 1 is 0.5"
    assert re.search(r"& 15\) & 8\)\)\) \{\s*\w+ = -2147483648;", text), f"{label}: the e2m1 sign bit"
    # ue8m0: byte (k / 32) % 4 of the step's scale word is the fp32 exponent field (2^(byte - 127)); 255 is
    # NaN, 0 is 2^-127
    assert re.search(r"BS_local\w*\[vec\w*\] >> \([^;]*\) \* 8\)\) & 255\) << 23\b", text), \
        f"{label}: the ue8m0 scale is not its byte shifted into the exponent field"
    assert re.search(r"& 255\) == 255\)", text), f"{label}: scale byte 255 must decode to NaN"
    assert ("5.877472e-39f" if hip else "0x1p-127f") in text, f"{label}: scale byte 0 must be 2^-127"
    assert "2143289344" in text, f"{label}: no NaN constant (0x7FC00000)"
    # FP8 activations in the target's encoding
    fnuz = target == "gfx942"
    bias_bits, other = (998244352, 1006632960) if fnuz else (1006632960, 998244352)   # (127 - bias) << 23
    assert re.search(rf"& 127\) << 20\) \+ {bias_bits}\b", text) and not re.search(rf"\+ {other}\b", text), \
        f"{label}: e4m3 exponent bias"
    sub = ("9.765625e-04f" if hip else "0x1p-10f") if fnuz else ("1.953125e-03f" if hip else "0x1p-9f")
    assert f") & 127)) * {sub}" in text, f"{label}: e4m3 subnormal step"
    if fnuz:
        assert re.search(r"& 255\) == 128\)", text) and "& 127) == 127)" not in text, f"{label}: e4m3fnuz NaN 0x80"
    else:
        assert "& 127) == 127)" in text and not re.search(r"& 255\) == 128\)", text), f"{label}: e4m3fn NaN"
    assert re.search(r"\(128 <= \(\(\w+\[vec\w*\] >> \(vec\w* \* 8\)\) & 255\)\)\) \{\s*\w+ = -2147483648;", text), \
        f"{label}: e4m3 sign bit"
    # the group row mask: the activation tile takes only rows of the pass's group (in the last K loop,
    # before the MMA), and only those rows are stored (after it)
    loop = text.rindex("for (int kt")
    mma = text.find(MMA[target], loop)
    assert mma > 0, f"{label}: no bf16 MMA with fp32 accumulators in the K loop"
    assert "] == ge)" in text[loop:mma], f"{label}: the activation tile is not masked to the pass's group"
    assert "== ge)" in text[mma:], f"{label}: the store is not masked to the pass's group"
    assert re.search(r"\] < 0\)\) \{\s*bfloat16_t broadcast_var = bfloat16_t\(0", text), f"{label}: padding rows"


@pytest.mark.codegen
@pytest.mark.parametrize("target", TARGETS)
def test_codegen(target, codegen_artifacts):
    arts = codegen_artifacts(OP, "tilelang", target)
    assert [a.label for a in arts] == [tl.CODEGEN_SHAPES[target][0]]
    for a in arts:
        check_source(target, a.label, a.text)
        if find_target(target).backend == "cuda":
            assert a.binary_kind == "cubin", f"{a.label}: no cubin ({a.resources})"
            res = a.resources
            assert res["reg"] > 0 and res["local"] == 0 and res["stack"] == 0, f"{a.label}: {res} (spills?)"
            # TMA copies from a producer warpgroup; the weight scales are read by the consumers after the
            # weights' barrier (a shared scale buffer filled on the producer side raced with its readers)
            assert "tl::tma_load(" in a.text, f"{a.label}: expected TMA copies of the raw tiles"
            assert a.text.index("BS[") > a.text.index("mbarrier[1].wait("), f"{a.label}: scales read by the producer"
        else:
            assert a.kind == "hip-source"
            assert "make_uint4(broadcast_var_2, broadcast_var_2, broadcast_var_2, broadcast_var_2, " \
                   "broadcast_var_2" not in a.text, f"{a.label}: byte-vector zero fill (invalid HIP)"


def test_codegen_shapes_cover_every_v4_gemm_once():
    shapes = sorted((N, K) for _, N, K, _ in tl.CODEGEN_SHAPES.values())
    want = sorted((n, k) for dim, inter, _ in ops.MODELS.values() for n, k in ((2 * inter, dim), (dim, inter)))
    assert shapes == want and set(tl.CODEGEN_SHAPES) == set(TARGETS)
    assert {b for *_, b in tl.CODEGEN_SHAPES.values()} == set(ops.ACT_BLOCK_SIZES)


def test_registration_matches_this_module():
    impl = dispatch.get(OP, "tilelang")
    assert impl.entry == f"dsv4_kernels.kernels.moe.tilelang:{OP}"
    assert impl.codegen == f"dsv4_kernels.kernels.moe.tilelang:codegen_{OP}"
    assert impl.defaults == tl.DEFAULTS[OP] == ops.TILELANG_DEFAULTS[OP], "defaults differ between the files"
    assert set(impl.backends) == {"cuda", "rocm"} and impl.priority == 10
    moe = dispatch.get("fp4_grouped_moe", "tilelang")
    assert moe.entry == "dsv4_kernels.kernels.moe.tilelang:fp4_grouped_moe" and moe.priority == 10
    assert moe.codegen == "dsv4_kernels.kernels.moe.tilelang:codegen_fp4_grouped_moe" and moe.defaults == {}


def _gemm(M=5, N=4096, K=4096, G=3, block=128, dtype=torch.float8_e4m3fn):
    a = torch.zeros(M, K, dtype=dtype)
    return (a, torch.ones(M, K // block), torch.zeros(G, N, K // 2, dtype=torch.uint8),
            torch.full((G, N, K // 32), 127, dtype=torch.uint8), torch.zeros(M, dtype=torch.int32), block)


@pytest.fixture
def on_arch(monkeypatch):
    """Make the guard see a device of the given arch (the tensors stay on the CPU)."""
    def use(arch: str):
        info = platform.DeviceInfo(backend="rocm" if arch.startswith("gfx") else "cuda", arch=arch, name=arch)
        monkeypatch.setattr(tl.platform, "device_info", lambda *_: info)
    return use


@pytest.mark.parametrize("arch", ["sm_90", "sm_100", "gfx942", "gfx950"])
@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 2048), (6144, 7168), (7168, 3072)], ids=str)
def test_supports_accepts_the_v4_gemms_on_the_chips_it_serves(on_arch, arch, shape):
    on_arch(arch)
    N, K = shape
    for block, dtype in ((32, torch.float8_e4m3fn), (128, torch.float8_e4m3fnuz)):
        assert tl.supports_mxfp4_grouped_gemm(*_gemm(N=N, K=K, block=block, dtype=dtype)) is None
    assert tl.supports_mxfp4_grouped_gemm(*_gemm(M=0, N=N, K=K)) is None


def _misaligned(args):
    a, *rest = args
    flat = torch.zeros(a.numel() + 1, dtype=torch.uint8)[1:].view(a.shape).view(a.dtype)
    return (flat, *rest)


@pytest.mark.parametrize("args, arch, needle", [
    (_gemm(N=4000), "sm_90", "N a multiple of BLOCK_N 64"),
    (_gemm(K=4160, block=32), "sm_90", "K of BLOCK_K 128"),
    (_gemm(K=96, block=32), "gfx942", "K of BLOCK_K 128"),
    (_misaligned(_gemm()), "sm_90", "a: the TileLang kernel reads it in 16-byte vectors (TMA on CUDA)"),
    (_gemm(), "sm_80", "built and checked for sm_90a, sm_100a, gfx942, gfx950, got a device of arch sm_80"),
    (_gemm(), "gfx90a", "got a device of arch gfx90a"),
    (_gemm(), "cpu", "got a device of arch cpu"),
    (_gemm(dtype=torch.float8_e5m2), "sm_90", "a must be float8_e4m3fn or float8_e4m3fnuz"),
], ids=["N-tail", "K-tail", "K96", "misaligned-a", "sm_80", "gfx90a", "cpu", "e5m2"])
def test_supports_refuses_with_a_reason(on_arch, args, arch, needle):
    on_arch(arch)
    reason = tl.supports_mxfp4_grouped_gemm(*args)
    assert reason and needle in reason, reason


def test_supports_refuses_a_misaligned_b_or_b_scale(on_arch):
    on_arch("sm_100")
    a, s, b, bs, m, block = _gemm()
    b = torch.zeros(b.numel() + 8, dtype=torch.uint8)[8:].view(b.shape)
    reason = tl.supports_mxfp4_grouped_gemm(a, s, b, bs, m, block)
    assert reason and reason.startswith("b: the TileLang kernel reads it in 16-byte vectors"), reason
    a, s, b, bs, m, block = _gemm()
    bs = torch.zeros(bs.numel() + 2, dtype=torch.uint8)[2:].view(bs.shape)
    reason = tl.supports_mxfp4_grouped_gemm(a, s, b, bs, m, block)
    assert reason and reason.startswith("b_scale: the TileLang kernel reads it in 4-byte words"), reason


def test_registered_guard_is_this_modules():
    """The dispatcher asks this guard (a CPU tensor is refused by arch; the dispatcher never offers the
    CPU to TileLang anyway)."""
    impl = dispatch.get(OP, "tilelang")
    assert "got a device of arch cpu" in impl.supports(*_gemm())


@pytest.mark.parametrize("kwargs, needle", [
    (dict(act_block=64), "act_block must be 32 or 128"),
    (dict(block_k=96), "BLOCK_K must be a multiple of 128 (4 scale bytes per word)"),
    (dict(N=4000), "N must be a multiple of BLOCK_N 64"),
    (dict(K=4096 + 32, act_block=32), "K of BLOCK_K 128"),
])
def test_kernel_builder_checks_its_arguments(kwargs, needle):
    args = dict(N=4096, K=4096, act_block=128, fnuz=False, block_m=64, block_n=64, block_k=128, threads=128,
                num_stages=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(needle)):
        tl.make_gemm_kernel(**args)


def test_decode_helpers_on_the_cpu_are_exact_for_every_code():
    """The kernel's own decode helpers (_e4m3 both encodings, _ue8m0, _e2m1, _byte, _nibble), lowered for
    TileLang's C target and run here: every FP8 byte, scale byte and e2m1 code against torch's decoding,
    bit for bit (NaN positions equal), and the nibble / byte order of packed words against unpacking the
    bytes. The NaN constant is the one thing swapped (the C target cannot take the address of a literal; the
    GPU sources' NaN is checked in test_codegen)."""
    import math
    import tilelang
    import tilelang.language as T

    def nan():
        return T.float32(float("nan"))

    real_nan = tl._nan
    tl._nan = nan   # the prim_func is traced when it is defined
    try:
        @T.prim_func
        def decode(X: T.Tensor((256,), I32), W: T.Tensor((64,), I32), FN: T.Tensor((256,), F32),
                   FNUZ: T.Tensor((256,), F32), SC: T.Tensor((256,), F32), E2: T.Tensor((16,), F32),
                   NIB: T.Tensor((512,), I32), BYT: T.Tensor((256,), I32)):
            with T.Kernel(1, threads=1):
                for i in T.serial(256):
                    FN[i] = tl._e4m3(X[i], False)
                    FNUZ[i] = tl._e4m3(X[i], True)
                    SC[i] = tl._ue8m0(X[i])
                    BYT[i] = tl._byte(W[i // 4], i % 4)
                for i in T.serial(16):
                    E2[i] = tl._e2m1(X[i])
                for i in T.serial(512):
                    NIB[i] = tl._nibble(W[i // 8], i % 8)

        kernel = tilelang.compile(decode, target="c")
    finally:
        tl._nan = real_nan
    codes = torch.arange(256, dtype=torch.int32)
    packed = torch.randint(0, 256, (256,), dtype=torch.uint8)
    outs = [torch.zeros(256), torch.zeros(256), torch.zeros(256), torch.zeros(16), torch.zeros(512, dtype=torch.int32),
            torch.zeros(256, dtype=torch.int32)]
    kernel(codes, packed.view(torch.int32), *outs)
    fn, fnuz, scale, e2m1, nibbles, bytes_ = outs
    u8 = codes.to(torch.uint8)
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    want = {
        "e4m3fn": (fn, u8.view(torch.float8_e4m3fn).float()),
        "e4m3fnuz": (fnuz, u8.view(torch.float8_e4m3fnuz).float()),
        "ue8m0": (scale, torch.tensor([math.ldexp(1.0, b - 127) if b < 255 else math.nan for b in range(256)])),
        "e2m1": (e2m1, torch.tensor(table + [-v for v in table])),
    }
    for name, (got, expected) in want.items():
        assert torch.equal(got.isnan(), expected.isnan()), f"{name}: NaN codes differ"
        ok = ~expected.isnan()
        assert torch.equal(got[ok].view(torch.int32), expected[ok].view(torch.int32)), f"{name}: values differ"
    assert torch.equal(bytes_, packed.to(torch.int32)), "byte order of a word"
    low_first = torch.stack([packed & 15, packed >> 4], dim=1).flatten().to(torch.int32)
    assert torch.equal(nibbles, low_first), "nibble order: k even is the low nibble of byte k / 2"


def _moe(T=3, dim=256, inter=128, E=4, k=2, block=32):
    gen = torch.Generator().manual_seed(T * 7 + dim)
    x = torch.randn(T, dim, generator=gen).to(torch.bfloat16)
    ids = torch.randint(0, E, (T, k), generator=gen, dtype=torch.int32)
    w = torch.softmax(torch.randn(T, k, generator=gen), dim=-1)
    (w13, w13_s), (w2, w2_s) = ops.random_weights(E, 2 * inter, dim, "cpu"), ops.random_weights(E, dim, inter, "cpu")
    return x, ids, w, w13, w13_s, w2, w2_s


@pytest.mark.parametrize("arch", ["sm_90", "sm_100", "gfx942", "gfx950"])
def test_moe_supports_accepts_v4_sizes_and_refuses_the_rest(on_arch, arch):
    on_arch(arch)
    for model in ("flash", "pro"):
        dim, inter, E = ops.MODELS[model]
        x = torch.zeros(2, dim, dtype=torch.bfloat16)
        def w(*shape):   # full V4 weight shapes without their bytes: the guard reads metadata only
            return torch.empty(shape, dtype=torch.uint8, device="meta")
        args = (x, torch.zeros(2, 6, dtype=torch.int32), torch.zeros(2, 6), w(E, 2 * inter, dim // 2),
                w(E, 2 * inter, dim // 32), w(E, dim, inter // 2), w(E, dim, inter // 32))
        assert tl.supports_fp4_grouped_moe(*args, 128) is None
    reason = tl.supports_fp4_grouped_moe(*_moe(dim=160, inter=96), 32)
    assert reason and "dim and I multiples of BLOCK_K 128" in reason and "dim = 160, I = 96" in reason, reason
    on_arch("sm_80")
    assert "got a device of arch sm_80" in tl.supports_fp4_grouped_moe(*_moe(), 32)


def test_moe_composition_on_the_cpu(monkeypatch):
    """The TileLang fp4_grouped_moe's wiring on the CPU: its x quantisation (straight into expert-sorted
    order) and SwiGLU + requantisation run as TileLang C-target builds of their own source; the grouped
    GEMM (no CPU build) is the Triton interpreter's, and permute / combine triton_route's (the TileLang ones'
    contract is their bits, tests/moe/test_moe_tilelang_route.py). Against the reference, with a token whose
    slot is dropped (-1), an expert with no token and the clamp active."""
    from dsv4_kernels.kernels.moe import tilelang_route, triton, triton_route
    monkeypatch.setattr(tl, "mxfp4_grouped_gemm", triton.mxfp4_grouped_gemm)
    monkeypatch.setattr(tilelang_route, "permute", triton_route.permute)
    monkeypatch.setattr(tilelang_route, "combine", triton_route.combine)
    x, ids, w, w13, w13_s, w2, w2_s = args = _moe(T=5, E=4, k=3)
    ids[1, 2] = -1
    ids[ids == 3] = 2
    x[4] *= 40
    y = tl.fp4_grouped_moe(*args, act_block_size=32)
    want = dispatch.get("fp4_grouped_moe", "reference")
    ops.compare_moe(y, dispatch._resolve(want.entry)(*args, act_block_size=32))
    assert tl.fp4_grouped_moe(x[:0], ids[:0], w[:0], w13, w13_s, w2, w2_s).shape == (0, 256)
