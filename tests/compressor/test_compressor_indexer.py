"""indexer_cache_quantize (SPEC 2: d = 128 entries, Hadamard rotation with scale 128^-0.5, then MXFP4) through
every implementation, beyond the op tests of test_compressor_ops.py:

- the kernels against the reference byte for byte (n = 0, 1, 7, 64, 129 and V4-shaped normed rows), the
  reference's fp32 rotation order being the definition (reference/compressor.py: walsh_hadamard_fp32);
- rows built to hit the rules: an all-zero row (the 1e-4 amax floor), -0 (code 8), tiny negatives
  (code 8), large and small magnitudes, blocks of different magnitude, rotated values exactly on an e2m1
  midpoint (ties to the even code), block amaxes one fp32 ulp either side of 6 * 2^k (the scale step);
- NaN, +-inf and fp32 overflow inside the rotation: every block of the row gets scale byte 255 and codes
  0, never a finite block;
- validation before any launch, the dispatcher's guard, the registration;
- the reference's fp32 order against the exactly rounded rotation (the fp64 oracle) on realistic rows;
- TileLang codegen claims (from the session's `codegen_results`: sm_90a and gfx942, all four with --all-targets). TileLang GPU kernels
  do not run on the CPU: their numerics are the device test of test_compressor_device.py.
"""
import math

import pytest
import torch

from dsv4_kernels import dispatch
from dsv4_kernels.backends import find_target
from dsv4_kernels.kernels import compressor as shared
from dsv4_kernels.ops import compressor as ops
from dsv4_kernels.oracles import compressor as oracle
from dsv4_kernels.reference import compressor as ref
from dsv4_kernels.reference.formats import FP4_VALUES, dequantize_mxfp4, quantize_mxfp4
from dsv4_kernels.reference.transforms import hadamard, rope_tables

OP = "indexer_cache_quantize"
C = ref.INDEXER_SCALE                  # fp32(128^-0.5)
TARGETS = ("sm_90a", "sm_100a", "gfx942", "gfx950")
pytestmark = pytest.mark.guard_bands  # outputs between canary bands: a store past the last row fails here


def _codes(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def _rotated(x: torch.Tensor) -> torch.Tensor:
    return ref.walsh_hadamard_fp32(x) * C


def _normed(n: int, gen: torch.Generator) -> torch.Tensor:
    """Rows as the indexer compressor writes them: RMSNorm'd (weight about 1) and RoPE'd, bf16."""
    cos, sin = rope_tables(torch.arange(4096))
    return ref.compressor_norm_rope(0.3 * torch.randn(n, 128, generator=gen), 1.0 + 0.2 * torch.randn(128, generator=gen),
                                    cos, sin, torch.randint(0, 4096, (n,), generator=gen))


def _bf16(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64).to(torch.bfloat16)


def _row_hitting(target: float, big: float) -> torch.Tensor:
    """A bf16 row whose rotation (the reference's fp32 order) is exactly `target` at index 0 (and every
    index = 0 mod 8), and about `big` at index 1: x0 - x1 = big / c carries the large value, x0 + x1 + x2 +
    x3 + x4 = S the exact fp32 sum with fp32(S * c) == target (found among S's fp32 neighbours; none
    exists for some mantissas, e.g. 1.5 * 2^k: fp32(S * c) skips them)."""
    s0 = torch.tensor(target / float(C), dtype=torch.float32)
    sums = (s0.view(torch.int32) + torch.arange(-4, 5, dtype=torch.int32)).view(torch.float32)
    hits = sums[(sums * C) == target]
    assert len(hits), f"no fp32 sum rotates to exactly {target}"
    s = float(hits[0])
    x = torch.zeros(128, dtype=torch.bfloat16)
    x[0] = _bf16((big / float(C) + s) / 2)
    x[1] = _bf16(s - float(x[0]))
    rest = s - float(x[0]) - float(x[1])
    for i in (2, 3, 4):                                   # greedy bf16 pieces of the remainder: 24 bits
        x[i] = _bf16(rest)
        rest -= float(x[i])
    got = _rotated(x[None])[0]
    assert float(got[0]) == target and rest == 0.0, (target, float(got[0]), rest)
    return x


# (target rotated value at index 0, the block's large value at index 1, expected code at index 0, scale byte)
TIES = [(0.25, 4.5, 0, 127), (1.25, 4.5, 2, 127), (1.75, 4.5, 4, 127), (2.5, 4.5, 4, 127), (3.5, 4.5, 6, 127),
        (5.0, 2.0, 6, 127), (-1.25, 4.5, 10, 127), (-3.5, -4.5, 14, 127), (2.5 * 2**-6, 4.5 * 2**-6, 4, 121),
        (1.75 * 2**9, 4.5 * 2**9, 4, 136)]
# block amax one fp32 ulp below / above 6 * 2^k: scale 2^k and code 7, or scale 2^(k+1) and code 5 (3.0)
# (fp32 ulp of 6: 2^-21; 6 * 2^k itself is never a rotated value, mantissa 1.5 being skipped)
BOUNDARY = [(6.0 - 2**-21, 2.0, 7, 127), (6.0 + 2**-21, 2.0, 5, 128), (-(6.0 + 2**-21) * 2**-3, 2.0 * 2**-3, 13, 125)]


# Other stage orders a kernel could run by mistake: the same math, other fp32 roundings.
# (reversed, h = 64 first, the last two swapped; these rows do not tell every permutation apart, e.g. not
# stages 1 and 2 swapped, whose pairs stay exact on them)
ALT_ORDERS = ((64, 32, 16, 8, 4, 2, 1), (64, 1, 2, 4, 8, 16, 32), (1, 2, 4, 8, 16, 64, 32))
PERTURBED = [5, 6, 7, 64, 97]


def _rotated_in_order(x: torch.Tensor, stages) -> torch.Tensor:
    v = x.float()
    for h in stages:
        pairs = v.reshape(-1, 128 // (2 * h), 2, h)
        v = torch.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), dim=2).reshape(-1, 128)
    return v * C


def _order_sensitive_rows(gen: torch.Generator) -> list[tuple[torch.Tensor, float, int]]:
    """For each order of ALT_ORDERS a row whose rotated value 0 is exactly an e2m1 midpoint in the reference's
    order and one fp32 ulp off it (so another code) in that order: a midpoint row (_row_hitting) plus
    perturbations about one ulp of the sum on indices PERTURBED, whose roundings depend on the order (an
    index past 64 too: on rows within [0, 64) the stage h = 64 adds zeros, exactly, wherever it runs).
    Returns (row, midpoint, expected code, the code in the other order)."""
    out = []
    for stages, (target, code, down) in zip(ALT_ORDERS, ((1.25, 2, True), (0.25, 0, True), (3.5, 6, False))):
        base = _row_hitting(target, 4.5)
        ulp = 2.0 ** (math.frexp(target / float(C))[1] - 24)
        rows = base.repeat(512, 1)
        rows[:, PERTURBED] = (torch.randn(512, len(PERTURBED), generator=gen, dtype=torch.float64) * ulp).to(torch.bfloat16)
        on_tie = _rotated(rows)[:, 0] == target
        other = _rotated_in_order(rows, stages)[:, 0]
        moved = other > target if down else other < target        # off the tie, to the side it does not round to
        pick = (on_tie & moved).nonzero()
        assert len(pick), f"no row tells order {stages} from the reference's"
        out.append((rows[int(pick[0])], target, code, code + 1 if down else code - 1))
    return out


def _special_rows(gen: torch.Generator) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Rows that hit the rules, and (row, expected code at index 0, expected scale byte of block 0)."""
    normed = _normed(4, gen)
    rows, expect = [], []
    rows.append(torch.zeros(128, dtype=torch.bfloat16))                     # amax floor 1e-4: byte 112
    expect.append((0, 0, 112))
    rows.append(torch.full((128,), -0.0, dtype=torch.bfloat16))             # index 0 stays -0: code 8
    expect.append((1, 8, 112))
    rows.append(normed[0] * 2**12)                                          # large
    rows.append(normed[1] * 2**-16)                                         # below the floor: tiny codes
    # rotated blocks of magnitude 2^6, 1, 2^-4 and 2^-8: x = the rotation of the wanted rotated row
    y = torch.randn(4, 32, generator=gen) * torch.tensor([2.0**6, 1.0, 2.0**-4, 2.0**-8])[:, None]
    rows.append(_rotated(y.reshape(1, 128)).to(torch.bfloat16)[0])
    tiny = torch.full((4, 32), -0.01)                                       # small negatives next to a large value
    tiny[:, 0] = 4.0
    rows.append(_rotated(tiny.reshape(1, 128)).to(torch.bfloat16)[0])
    for target, big, code, byte in TIES + BOUNDARY:
        expect.append((len(rows), code, byte))
        rows.append(_row_hitting(target, big))
    for row, _, code, _ in _order_sensitive_rows(gen):
        expect.append((len(rows), code, 127))
        rows.append(row)
    return torch.stack(rows), expect


def _nonfinite_rows(gen: torch.Generator) -> torch.Tensor:
    """Rows whose rotation is non-finite: a NaN, +inf, -inf, inf and -inf (NaN), two finite values whose fp32
    sum overflows (3e38 + 3e38), all NaN (everywhere non-finite); and 3e38 - (-3e38), non-finite in every
    block but only at the indices with bit 4 set (a block's flag must come from all 32 of its values)."""
    rows = _normed(5, gen).repeat(2, 1)[:6]
    rows[0, 17] = float("nan")
    rows[1, 100] = float("inf")
    rows[2, 0] = float("-inf")
    rows[3, 5], rows[3, 77] = float("inf"), float("-inf")
    rows[4, 0], rows[4, 1] = 3e38, 3e38
    rows[5, :] = float("nan")
    partial = torch.zeros(1, 128, dtype=torch.bfloat16)     # overflow at the indices with bit 4 set only: the
    partial[0, 0], partial[0, 16] = 3e38, -3e38               # first half of each block stays finite
    return torch.cat((rows, partial))


def _check(impl, device, x):
    packed, scale = ops.indexer_cache_quantize(x.to(device), impl=impl)
    assert packed.shape == (x.shape[0], 64) and scale.shape == (x.shape[0], 4)
    assert packed.dtype == scale.dtype == torch.uint8 and packed.device == x.to(device).device
    want_packed, want_scale = ref.indexer_cache_quantize(x)
    assert torch.equal(scale.cpu(), want_scale), f"scale bytes differ at {(scale.cpu() != want_scale).nonzero()[:4].tolist()}"
    assert torch.equal(packed.cpu(), want_packed), f"packed bytes differ at {(packed.cpu() != want_packed).nonzero()[:4].tolist()}"
    return packed.cpu(), scale.cpu()


@pytest.mark.op(OP)
@pytest.mark.parametrize("n", (0, 1, 7, 64, 129))
def test_matches_reference_bytes(impl, device, n):
    """Normed V4 rows (n = 129: the last block of rows is a one-row tail) with the special rows mixed in."""
    gen = torch.Generator().manual_seed(n)
    x = _normed(n, gen)
    if n >= 7:
        special, _ = _special_rows(gen)
        pick = torch.randperm(n, generator=gen)[:min(n, special.shape[0])]
        x[pick] = special[:len(pick)]
    _check(impl, device, x)


@pytest.mark.op(OP)
def test_special_rows(impl, device):
    """Each rule on its own row: the floor, -0, magnitudes, exact midpoints, the 6 * 2^k scale step."""
    x, expect = _special_rows(torch.Generator().manual_seed(1))
    packed, scale = _check(impl, device, x)
    codes = _codes(packed)
    for row, code, byte in expect:
        assert int(codes[row, 0]) == code and int(scale[row, 0]) == byte, (row, int(codes[row, 0]), int(scale[row, 0]))
    assert bool((scale[0] == 112).all()) and bool((codes[0] == 0).all())       # 2^ceil(log2(1e-4 / 6)) = 2^-15
    assert bool((codes[1, 1:] == 0).all())                                    # the other outputs are +0
    assert bool((scale[3] == 112).all())                                      # amax < 1e-4: the floor
    assert len(set(scale[4].tolist())) == 4                                   # four block magnitudes
    assert int((codes[5] == 8).sum()) > 100 and bool((codes[5].reshape(4, 32)[:, 0] == 6).all())  # -0.01 -> -0
    deq = dequantize_mxfp4(packed, scale)
    assert bool(deq.isfinite().all())


@pytest.mark.op(OP)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
def test_nonfinite_rows_give_the_nan_form(impl, device):
    """NaN in, NaN out: each non-finite row (a NaN, +-inf, inf - inf, an fp32 overflow of the rotation) gets
    scale byte 255 in every block and codes 0, so it dequantises to NaN; the finite rows around it do not."""
    gen = torch.Generator().manual_seed(2)
    bad = _nonfinite_rows(gen)
    x = torch.cat((_normed(3, gen), bad, _normed(2, gen)))
    packed, scale = _check(impl, device, x)
    assert bool((scale[3:10] == 255).all()) and bool((packed[3:10] == 0).all())
    assert bool((scale[:3] != 255).all()) and bool((scale[10:] != 255).all())
    assert bool(dequantize_mxfp4(packed, scale)[3:10].isnan().all())


def test_order_sensitive_rows_tell_the_stage_order():
    """The byte tests hold rows on which another stage order gives another code (so a kernel that runs the
    stages in another order fails them, not only one that computes another transform)."""
    for (row, target, code, moved), stages in zip(_order_sensitive_rows(torch.Generator().manual_seed(6)), ALT_ORDERS):
        want = _codes(ref.indexer_cache_quantize(row[None])[0])[0, 0]
        other = _codes(quantize_mxfp4(_rotated_in_order(row[None], stages), 32)[0])[0, 0]
        assert int(want) == code and int(other) == moved, (stages, int(want), int(other))


def test_reference_order_against_the_exact_rotation():
    """The fp32 order is the definition; the exactly rounded rotation (the fp64 oracle) moves no byte on
    4096 normed rows: a byte moves only for a value within a few fp32 ulps of an e2m1 midpoint or a block
    amax at 6 * 2^k, which realistic rows do not hit. The rotation itself is within 8 fp32 ulps of the
    row's 1-norm times c of the exact one."""
    x = _normed(4096, torch.Generator().manual_seed(3))
    got = ref.indexer_cache_quantize(x)
    want = oracle.indexer_cache_quantize(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    exact = x.double() @ hadamard(128).double() * 128 ** -0.5
    bound = 8 * 2.0**-24 * x.double().abs().sum(dim=-1, keepdim=True) * 128 ** -0.5
    assert bool(((_rotated(x).double() - exact).abs() <= bound).all())


def test_rotation_order_is_the_sylvester_transform():
    """Small integers rotate exactly: walsh_hadamard_fp32 is x @ H (Sylvester order) and H is its own
    inverse up to 128; the scale constant is fp32(128^-0.5)."""
    x = torch.randint(-8, 9, (5, 128)).to(torch.bfloat16)
    assert torch.equal(ref.walsh_hadamard_fp32(x), (x.double() @ hadamard(128).double()).float())
    assert torch.equal(ref.walsh_hadamard_fp32(ref.walsh_hadamard_fp32(x)), 128 * x.float())
    assert C.dtype == torch.float32 and int(C.view(torch.int32)) == 0x3DB504F3


def test_dequantised_rows_are_near_the_rotation():
    """The bytes mean what they should: every dequantised value is within half an e2m1 step of the rotated
    value (0.25 * scale below 2, 0.5 below 4, 1 up to 6) and rotating back recovers the row."""
    x = _normed(64, torch.Generator().manual_seed(4))
    packed, scale = ref.indexer_cache_quantize(x)
    deq = dequantize_mxfp4(packed, scale).double()
    rot = _rotated(x).double()
    step = torch.exp2(scale.double() - 127).repeat_interleave(32, dim=-1)
    half = torch.where(rot.abs() < 2 * step, 0.25, torch.where(rot.abs() < 4 * step, 0.5, 1.0)) * step
    assert bool(((deq - rot).abs() <= half).all())
    back = deq @ hadamard(128).double() * 128 ** -0.5
    assert float(((back - x.double()).norm(dim=-1) / x.double().norm(dim=-1)).max()) < 0.2
    assert set(FP4_VALUES.abs().tolist()) >= set((deq / step).abs().unique().tolist())


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the kernel was launched")


@pytest.mark.op(OP)
def test_bad_input_is_refused_before_any_launch(impl, device, monkeypatch):
    """The op validates before dispatch: the Triton kernel is never reached (a launch would raise here)."""
    from dsv4_kernels.kernels.compressor import triton_indexer
    monkeypatch.setattr(triton_indexer, "indexer_kernel", _NoLaunch())
    for bad, message in ((torch.zeros(3, 128, device=device), "x: expected dtype torch.bfloat16, got torch.float32"),
                         (torch.zeros(3, 64, dtype=torch.bfloat16, device=device), "x: expected shape (*, 128), got (3, 64)"),
                         (torch.zeros(3, 128, dtype=torch.bfloat16, device=device)[None], "x: expected 2 dimensions"),
                         (torch.zeros(128, 3, dtype=torch.bfloat16, device=device).t(), "x: expected a contiguous"),
                         (torch.zeros(3, 256, dtype=torch.bfloat16, device=device)[:, ::2], "x: expected a contiguous"),
                         ([[0.0] * 128], "x: expected a torch.Tensor")):
        with pytest.raises(ValueError) as err:
            ops.indexer_cache_quantize(bad, impl=impl)
        assert message in str(err.value)
    if impl == "triton" and device.type == "cpu":
        with pytest.raises(AssertionError, match="launched"):     # the patch is live: a valid call launches
            ops.indexer_cache_quantize(torch.zeros(3, 128, dtype=torch.bfloat16), impl=impl)


def test_guard_and_registration():
    impl = dispatch.get(OP, "triton")
    assert impl.entry == "dsv4_kernels.kernels.compressor.triton:indexer_cache_quantize"
    assert impl.codegen == "dsv4_kernels.kernels.compressor.triton:codegen_indexer_cache_quantize"
    assert set(impl.backends) == {"cpu", "cuda", "rocm"} and impl.priority == 20
    assert impl.defaults["BLOCK_ROWS"] >= 1 and impl.defaults["num_warps"] >= 1
    assert dispatch.get(OP, "tilelang").defaults == ops.TILELANG_INDEXER_DEFAULTS
    x = torch.zeros(4, 128, dtype=torch.bfloat16)
    assert shared.supports_indexer_cache_quantize(x) is None
    assert "contiguous [n, 128] bf16" in shared.supports_indexer_cache_quantize(x.float())
    assert "not contiguous" in shared.supports_indexer_cache_quantize(torch.zeros(4, 256, dtype=torch.bfloat16)[:, ::2])


def test_default_choice_is_the_triton_kernel_on_cpu():
    """impl=None picks the highest-priority implementation that serves the tensor: Triton (interpreter)."""
    x = _normed(9, torch.Generator().manual_seed(5))
    assert dispatch.select(OP, (x,)).chosen.name == "triton"
    got = ops.indexer_cache_quantize(x)
    want = ref.indexer_cache_quantize(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.codegen
@pytest.mark.parametrize("target", TARGETS)
def test_tilelang_codegen(target, codegen_artifacts):
    """One kernel per target: symbolic n, 8-byte bf16 loads, 2-byte packed stores, 32-lane xor shuffles
    (5 butterfly stages and 3 amax steps, each on 4 values or one), no division, no fast math; the cubin
    without local memory."""
    pytest.importorskip("tilelang", reason="tilelang is not installed (pip install 'dsv4-kernels[cuda]')")
    backend = find_target(target).backend
    (art,) = codegen_artifacts(OP, "tilelang", target)
    text = art.text
    assert art.label == "d128-threads256" and text.count("__global__ void __launch_bounds__(256") == 1
    assert "int n)" in text, "n is not a kernel argument"
    assert "*(uint2*)(xb" in text and "*(uchar2*)(PK + " in text, "expected 8-byte loads and 2-byte stores"
    shuffle = "__shfl_xor_sync(" if backend == "cuda" else "__shfl_xor("
    assert text.count(shuffle) == 3 and ", 32)" in text, "expected the butterfly and the amax/flag shuffles"
    assert "1035273459" in text, "the rotation scale is not fp32(128^-0.5) from its bits"
    assert " / " not in text and "__fdividef" not in text and "__expf" not in text
    if backend == "cuda":
        assert art.binary_kind == "cubin", art.resources
        res = art.resources
        assert res["reg"] > 0 and res["local"] == 0 and res["stack"] == 0, res
    else:
        assert art.kind == "hip-source"


def test_tilelang_defaults_and_config_checks():
    tli = pytest.importorskip("dsv4_kernels.kernels.compressor.tilelang_indexer",
                              reason="tilelang is not installed (pip install 'dsv4-kernels[cuda]')")
    assert tli.DEFAULTS[OP] == ops.TILELANG_INDEXER_DEFAULTS
    impl = dispatch.get(OP, "tilelang")
    assert impl.entry == "dsv4_kernels.kernels.compressor.tilelang:indexer_cache_quantize"
    assert set(impl.backends) == {"cuda", "rocm"} and impl.priority == 10
    for threads in (0, 48, 2048):
        with pytest.raises(ValueError, match="multiple of 32 in \\[32, 1024\\]"):
            tli.make_indexer_kernel(threads)
    x = torch.zeros(4, 128, dtype=torch.bfloat16)
    assert tli.supports_indexer_cache_quantize(x) is None
    assert "8-byte aligned" in tli.supports_indexer_cache_quantize(torch.zeros(4 * 128 + 1, dtype=torch.bfloat16)[1:].view(4, 128))
