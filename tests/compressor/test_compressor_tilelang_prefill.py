"""The TileLang compressor prefill kernel (kernels/compressor/tilelang_prefill.py), both public forms.

- codegen (from the session's `codegen_results`: sm_90a and gfx942, all four GPU targets with --all-targets): the batched CSA form (ratio 4,
  d = 512, bf16 inputs, FP8 cache store) and the single-sequence form (ratio 128, d = 128, fp32): one
  kernel, symbolic token / chunk / slot / row counts, the binary search over `steps` probes, int64 state
  addressing, 16-byte state accesses (8-byte bf16 input loads), libm expf, the barriers and every state
  store behind them, no local memory in any cubin; two other forms lowered to CUDA source;
- host logic in pure Python: the guards and their reasons, the kernel's config checks, the registration;
- on a CUDA/ROCm device (`--backend=cuda|rocm`): a 64K-token single prefill and a ragged batch of 64 chunks
  at random starts in permuted slots (empty chunks, invalid chunks, padding rows), fp32 and the fused form
  with the FP8 cache bytes, against the reference (entries, flags, states and cache bit for bit where the
  arithmetic is exact). TileLang GPU kernels do not run on the CPU, so these skip there with the reason.
"""
import re

import pytest
import torch

pytest.importorskip("tilelang", reason="tilelang is not installed (pip install 'dsv4-kernels[cuda]')")

from dsv4_kernels import dispatch, ladder  # noqa: E402
from dsv4_kernels.backends import find_target  # noqa: E402
from dsv4_kernels.kernels.compressor import tilelang_prefill as tp  # noqa: E402
from dsv4_kernels.ops import compressor as ops  # noqa: E402
from dsv4_kernels.reference import compressor as ref  # noqa: E402
from dsv4_kernels.reference.formats import store_kv_cache_fp8  # noqa: E402
from dsv4_kernels.reference.transforms import rope_tables  # noqa: E402

OPS = ("compressor_prefill_batched", "compressor_prefill")
TARGETS = ("sm_90a", "sm_100a", "gfx942", "gfx950")
LABELS = {"compressor_prefill_batched": ["r4-d512-bf16-in-fp8-cache"], "compressor_prefill": ["r128-d128-fp32"]}
BLOCK = 64
MAX_POS = 1 << 17


@pytest.mark.codegen
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("op", OPS)
def test_codegen(op, target, codegen_artifacts):
    backend = find_target(target).backend
    arts = codegen_artifacts(op, "tilelang", target)
    assert [a.label for a in arts] == LABELS[op]
    for a in arts:
        text = a.text
        assert text.count("__global__ void __launch_bounds__(256") == 1, f"{a.label}: expected one kernel"
        # one compile serves every batch: the counts are kernel arguments, nothing is read back
        for name in ("int n", "int cu_len", "int slots", "int rows", "int steps") + (
                ("int pages", "int rope_rows") if "cache" in a.label else ()):
            assert name in text, f"{a.label}: {name!r} is not a kernel argument"
        assert re.search(r"for \(int \w+ = 0; \w+ < steps; \+\+\w+\)", text), f"{a.label}: no binary search"
        assert "(slot * (int64_t)" in text, f"{a.label}: state slots not addressed in int64"
        for state in ("KVS", "SCS"):   # pooled state rows, the rows 0:4 copy, the tail rows
            assert f"*(float4*)({state} + " in text, f"{a.label}: {state} is not accessed in 16-byte vectors"
        if "bf16-in" in a.label:
            assert "*(uint2*)(KV + " in text and "*(uint2*)(SC + " in text, f"{a.label}: bf16 loads not 8-byte"
        else:
            assert "*(float4*)(KV + " in text and "*(float4*)(SC + " in text, f"{a.label}: fp32 loads not 16-byte"
        assert "expf(" in text and "__expf(" not in text, f"{a.label}: expected libm expf, not the fast one"
        # the partial softmaxes before the combine, (fused) the RMSNorm partial sums before their total, and
        # the barrier after each pooled entry that orders every pooling read before the state update
        syncs = [m.start() for m in re.finditer(r"__syncthreads\(\)", text)]
        assert len(syncs) == 2 + ("cache" in a.label), f"{a.label}: barriers"
        stores = [m.start() for m in re.finditer(r"^\s*\*\(float4\*\)\((?:KVS|SCS) \+ .*\) =", text, re.M)]
        assert stores and min(stores) > max(syncs), f"{a.label}: a state store is not behind the last barrier"
        if "cache" in a.label:
            assert "CSLOT" in text and "*(uint2*)(KC + " in text and "rintf(" in text, f"{a.label}: FP8 store"
        if backend == "cuda":
            assert a.binary_kind == "cubin", f"{a.label}: no cubin ({a.resources})"
            res = a.resources
            assert res["reg"] > 0 and res["local"] == 0 and res["stack"] == 0, f"{a.label}: {res} (spills?)"
        else:
            assert a.kind == "hip-source"


OTHER_FORMS = [  # (ratio, d, in_dtype, cu_dtype, fused, cache, compact, has_starts, has_slots, threads, chunk)
    ("batched-r128-d512-bf16-fp8-cache", (128, 512, "bfloat16", "int32", True, True, False, True, True, 256, 8)),
    ("batched-r4-d128-fp32-noslots-128threads", (4, 128, "float32", "int64", False, False, False, False, False,
                                                 128, 4)),
]


@pytest.mark.codegen
@pytest.mark.parametrize("params", [f[1] for f in OTHER_FORMS], ids=[f[0] for f in OTHER_FORMS])
def test_other_forms_lower(params):
    """Forms and configs outside the codegen specs lower to CUDA source (no nvcc: cheap)."""
    import tilelang
    from tvm.target import Target
    cuda = find_target("sm_90a").tilelang
    with Target(cuda):
        source = str(tilelang.lower(tp.make_prefill_kernel(*params), target=cuda, enable_device_compile=False)
                     .kernel_source)
    assert source.count("__global__ void") == 2 and "expf(" in source and "*(float4*)(KVS + " in source


def test_registration_matches_this_module():
    for op in OPS:
        impl = dispatch.get(op, "tilelang")
        assert impl.entry == f"dsv4_kernels.kernels.compressor.tilelang:{op}"
        assert impl.codegen == f"dsv4_kernels.kernels.compressor.tilelang:codegen_{op}"
        assert impl.defaults == tp.DEFAULTS[op], "registered defaults differ from tilelang_prefill.DEFAULTS"
        assert set(impl.backends) == {"cuda", "rocm"} and impl.priority < dispatch.get(op, "triton").priority


def test_kernel_configs_are_checked():
    ok = (4, 512, "float32", "int64", False, False, False, True, True, 256, 8)
    for index, value, needle in ((0, 16, "ratio 4 or 128 and d 128 or 512"), (2, "float16", "fp32/bf16 inputs"),
                                 (3, "int16", "int32/int64 cu_seqlens"), (5, True, "needs the fused form"),
                                 (6, True, "compact \\(single-sequence\\) form has no starts"),
                                 (9, 64, "multiple of 32 in \\[32, 1024\\] and of d / 4 = 128")):
        params = list(ok)
        params[index] = value
        with pytest.raises(ValueError, match=needle):
            tp.make_prefill_kernel(*params)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        tp.make_prefill_kernel(*ok, 0)


def _batched(ratio=4, d=512, tokens=12, batch=3, slots=5, dtype=torch.float32, fused=False, cache=False):
    coff = 2 if ratio == 4 else 1
    kv_state = torch.zeros(slots, coff * ratio, coff * d)
    args = [torch.zeros(tokens, coff * d, dtype=dtype), torch.zeros(tokens, coff * d, dtype=dtype),
            torch.zeros(ratio, coff * d), ratio, torch.tensor([0, 4, 8, tokens][:batch + 1], dtype=torch.int32),
            kv_state, kv_state.clone(), torch.arange(batch), torch.arange(batch)]
    if fused:
        args += [torch.ones(d), torch.zeros(64, 32), torch.zeros(64, 32)]
        if cache:
            args += [torch.zeros(2, BLOCK * 584, dtype=torch.uint8), BLOCK, torch.arange(tokens)]
    return args


def _single(ratio=4, d=512, tokens=12, dtype=torch.float32, fused=False, cache=False):
    args = _batched(ratio, d, tokens, 1, 1, dtype, fused, cache)
    return args[:4] + args[9:]


SUPPORTED = [(r, d, dt, f) for r in (4, 128) for d in (512, 128) for dt in (torch.float32, torch.bfloat16)
             for f in ("fp32", "fused", "fp8-cache") if not (f == "fp8-cache" and d == 128)]


@pytest.mark.parametrize("ratio, d, dtype, form", SUPPORTED)
def test_supports_accepts_what_the_kernel_was_built_for(ratio, d, dtype, form):
    kw = dict(dtype=dtype, fused=form != "fp32", cache=form == "fp8-cache")
    assert tp.supports_compressor_prefill_batched(*_batched(ratio, d, **kw)) is None
    assert tp.supports_compressor_prefill(*_single(ratio, d, **kw)) is None


def _shifted(t, elements):
    return torch.zeros(t.numel() + elements, dtype=t.dtype)[elements:].view(t.shape)


def _with(index, value, single=False, **kw):
    args = _single(**kw) if single else _batched(**kw)
    args[index] = value(args[index]) if callable(value) else value
    return args


REFUSALS = [
    ("ratio 16", _with(3, 16), "built for ratio 4 or 128"),
    ("d 256", _with(0, torch.zeros(12, 256), ratio=128), "built for d = 512 or 128"),
    ("fp16 kv", _with(0, lambda t: t.half()), "kv and score must share the dtype fp32 or bf16"),
    ("int64 cu as float", _with(4, lambda t: t.float()), "cu_seqlens: built for int32 or int64"),
    ("int32 starts", _with(7, lambda t: t.int()), "start_positions must be a contiguous int64 tensor"),
    ("int32 slots", _with(8, lambda t: t.int()), "slot_ids must be a contiguous int64 tensor"),
    ("int32 cache slots", _with(14, lambda t: t.int(), fused=True, cache=True),
     "cache_slots must be a contiguous int64 tensor"),
    ("single int32 cache slots", _with(9, lambda t: t.int(), single=True, fused=True, cache=True),
     "cache_slots must be a contiguous int64 tensor"),
    ("fp64 state", _with(5, lambda t: t.double()), "kv_state must be a contiguous fp32 tensor"),
    ("misaligned fp32 kv", _with(0, lambda t: _shifted(t, 1)), "kv: the TileLang kernel uses 16-byte accesses"),
    ("misaligned bf16 score", _with(1, lambda t: _shifted(t, 2), dtype=torch.bfloat16),
     "score: the TileLang kernel uses 8-byte accesses"),
    ("misaligned state", _with(6, lambda t: _shifted(t, 3)), "score_state: the TileLang kernel uses 16-byte"),
    ("single misaligned ape", _with(2, lambda t: _shifted(t, 1), single=True), "ape: the TileLang kernel uses"),
    ("misaligned cache", _with(12, lambda t: _shifted(t, 4), fused=True, cache=True),
     "kv_cache: the TileLang kernel uses 8-byte accesses"),
    ("2^31 state slots", _batched()[:5] + [torch.empty(2**31, 8, 1024, device="meta")] * 2 + _batched()[7:],
     "int32 state slot count"),
    ("2^31 rope rows", _batched(fused=True)[:10] + [torch.empty(2**31, 32, device="meta")] * 2,
     "int32 rope table row count"),
    ("single 2^31 rope rows", _single(fused=True)[:5] + [torch.empty(2**31, 32, device="meta")] * 2,
     "int32 rope table row count"),
]


@pytest.mark.parametrize("name, args, needle", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_supports_refuses_with_a_reason(name, args, needle):
    guard = tp.supports_compressor_prefill if name.startswith("single") else tp.supports_compressor_prefill_batched
    reason = guard(*args)
    assert reason and needle in reason, reason


def test_registered_tilelang_refuses_misaligned_inputs():
    """The dispatcher must ask the TileLang guard: an unaligned vector access faults the device."""
    impl = dispatch.get("compressor_prefill_batched", "tilelang")
    assert "16-byte" in impl.supports(*_with(0, lambda t: _shifted(t, 1)), None, None, None, None, 64, None)


# Device numerics at V4 shapes.

def _on_device(device):
    if device.type == "cpu":
        pytest.skip("TileLang GPU kernels run only on CUDA/ROCm devices (on the CPU they are codegen-verified)")


def _bits(t):
    return t.view(torch.int32)


def _check_cache(got, want):
    """Cache bytes equal the reference's (a NaN among the raw bf16 rope values only has to be a NaN)."""
    pages = got.shape[0]
    data = lambda c: c[:, :BLOCK * 576].view(pages, BLOCK, 576)
    assert torch.equal(data(got)[..., :448], data(want)[..., :448]), "e4m3 bytes differ from the reference"
    assert torch.equal(got[:, BLOCK * 576:], want[:, BLOCK * 576:]), "scale bytes differ from the reference"
    g, w = (data(c)[..., 448:].contiguous().view(torch.bfloat16) for c in (got, want))
    assert ((g.view(torch.int16) == w.view(torch.int16)) | (g.isnan() & w.isnan())).all(), "rope bytes differ"


def _check_fused(got, want, cache, cache_before, cache_slots, rows):
    """bf16 entries (the rows that hold one) within two bf16 ulps of the reference, relative or at the
    entries' RMS scale 1 (atol 2^-7): the pooling order differs from the reference's, so a normed value can
    differ by one ulp before the RoPE rotation, whose cancellation then leaves a small rotated value off by
    that ulp (seen in the CPU shim run: 2 of 1.9M values, all in the rope dims, and pooled channels
    cancelled to ~1e-6); the cache bytes equal the reference store of the kernel's own entries, bit for bit."""
    got, want = got.cpu(), want.cpu()
    torch.testing.assert_close(got[rows].float(), want[rows].float(), rtol=2**-7, atol=2**-7)
    expected = cache_before.clone()
    store_kv_cache_fp8(expected, cache_slots[rows], got[rows], block_size=BLOCK)
    _check_cache(cache.cpu(), expected)


FORMS = [(4, 512, "fp8-cache"), (128, 512, "fp8-cache"), (4, 128, "fp32"), (128, 128, "fp32")]


def _fused_args(d, rows, gen, cache):
    cos, sin = rope_tables(torch.arange(MAX_POS))
    args = [1.0 + 0.2 * torch.randn(d, generator=gen), cos, sin]
    if cache:
        pages = -(-rows // BLOCK) + 2
        slots = torch.randperm(pages * BLOCK, generator=gen)[:rows]
        slots[::97] = -1                                   # skipped stores
        args += [torch.randint(0, 256, (pages, BLOCK * 584), dtype=torch.uint8, generator=gen), BLOCK, slots]
    return args


@pytest.mark.parametrize("ratio, d, form", FORMS)
def test_device_single_prefill_64k_tokens(device, ratio, d, form):
    _on_device(device)
    gen = torch.Generator().manual_seed(ratio + d)
    coff = 2 if ratio == 4 else 1
    seq = 65536
    dtype = torch.bfloat16 if form != "fp32" else torch.float32
    kv = torch.randn(seq, coff * d, generator=gen).to(dtype)
    score = (2.0 * torch.randn(seq, coff * d, generator=gen)).to(dtype)
    ape = 0.5 * torch.randn(ratio, coff * d, generator=gen)
    extra = _fused_args(d, seq // ratio, gen, form == "fp8-cache") if form != "fp32" else []
    dev = [a.clone().to(device) if isinstance(a, torch.Tensor) else a for a in [kv, score, ape, ratio] + extra]
    cache_before = extra[3].clone() if extra else None
    got = ops.compressor_prefill(*dev, impl="tilelang")
    want = ref.compressor_prefill(kv.float(), score.float(), ape, ratio, *extra)
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(_bits(g.cpu()), _bits(w)), "state differs from the reference"
    if form == "fp8-cache":
        _check_fused(got[0], want[0], dev[7], cache_before, extra[5], torch.ones(seq // ratio, dtype=torch.bool))
    else:
        ladder.get_check("compressor_prefill_batched").compare(got[0].cpu(), want[0])


@pytest.mark.parametrize("ratio, d, form", FORMS)
def test_device_ragged_batch_of_64_chunks(device, ratio, d, form):
    """64 chunks continuing sequences from random starts (prefixes from the reference) in permuted slots of a
    larger pool: empty chunks, chunks inside one block, one with a slot of -1 and one with a negative start
    (they touch nothing), padding rows past cu_seqlens[-1] (zero, not emitted)."""
    _on_device(device)
    gen = torch.Generator().manual_seed(7 * ratio + d)
    coff = 2 if ratio == 4 else 1
    width, batch, pool = coff * d, 64, 80
    dtype = torch.bfloat16 if form != "fp32" else torch.float32
    starts = torch.randint(0, 4000, (batch,), generator=gen)
    lengths = torch.randint(0, 600, (batch,), generator=gen)
    lengths[:4] = torch.tensor([0, 1, ratio - 1, 3 * ratio])
    starts[:3] = 0
    slot_ids = torch.randperm(pool, generator=gen)[:batch]
    kv_state, score_state = ref.compressor_init_state(ratio, d, pool)
    ape = 0.5 * torch.randn(ratio, width, generator=gen)
    for b in range(batch):   # each slot holds its sequence's state after `start` tokens
        s = int(starts[b])
        if s:
            pre = torch.randn(s, width, generator=gen).to(dtype).float()
            _, kvs, scs = ref.compressor_prefill(pre, 2.0 * pre.flip(0), ape, ratio)
            kv_state[slot_ids[b]], score_state[slot_ids[b]] = kvs, scs
    slot_ids[5], starts[6] = -1, -3
    total = int(lengths.sum()) + 5                         # 5 padding rows
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    kv = torch.randn(total, width, generator=gen).to(dtype)
    score = (2.0 * torch.randn(total, width, generator=gen)).to(dtype)
    extra = _fused_args(d, total, gen, form == "fp8-cache") if form != "fp32" else []
    args = [kv, score, ape, ratio, cu, kv_state, score_state, starts, slot_ids] + extra
    dev = [a.clone().to(device) if isinstance(a, torch.Tensor) else a for a in args]
    got = ops.compressor_prefill_batched(*dev, impl="tilelang")
    host = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    host[0], host[1] = kv.float(), score.float()
    want = ref.compressor_prefill_batched(*host)
    assert torch.equal(got[1].cpu(), want[1]) and want[1].sum() > 100
    assert not got[0].cpu()[~want[1]].any(), "rows that complete no entry must stay zero"
    for g, w in ((dev[5], host[5]), (dev[6], host[6])):
        assert torch.equal(_bits(g.cpu()), _bits(w)), "state differs from the reference"
    if form == "fp8-cache":
        _check_fused(got[0], want[0], dev[12], args[12], args[14], want[1])
    else:
        ladder.get_check("compressor_prefill_batched").compare(got[0].cpu(), want[0])
