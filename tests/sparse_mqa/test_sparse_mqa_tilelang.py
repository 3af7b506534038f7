"""The TileLang sparse MQA kernels (kernels/sparse_mqa/tilelang.py) beyond what the impl-parametrised op
and device tests cover.

- codegen (from the session's `codegen_results`: sm_90a and gfx942, all four GPU targets with --all-targets): the split bf16 attend kernel + the
  merge (sparse_mqa) and the split two-cache FP8 attend kernel (sparse_mqa_fp8); source checks for what
  a wrong kernel would get wrong: the index bound mask (0 <= idx < rows), the topk_length clamp, the -inf
  logits of masked entries, the FP8 decode constants (e4m3 exponent bias, subnormal step, ue8m0 scale
  bits), the sink in the finish, libm expf / logf, the tensor-core instruction, shared memory within the
  target's limit, int64 cache offsets; no local memory in any cubin (test_codegen.py's generic claim);
- host logic in pure Python: the tile fit per target, the split plan, the cache word view (no copy), the
  guards and their reasons, the registered defaults;
- a CPU model of the tile plan (block-wise online softmax, P = hi + lo in bf16, split + merge with the
  sink) against the reference at SPEC 6 tolerances: the plan's numerics, not the kernel's.
TileLang GPU kernels do not run on the CPU: their numbers are checked by test_sparse_mqa_device.py.
"""
import re

import pytest
import torch

pytest.importorskip("tilelang", reason="tilelang is not installed (pip install 'dsv4-kernels[cuda]')")

from dsv4_kernels import dispatch, ladder  # noqa: E402
from dsv4_kernels.kernels.sparse_mqa import tilelang as tl  # noqa: E402
from dsv4_kernels.ops import sparse_mqa as ops  # noqa: E402
from dsv4_kernels.reference.formats import quantize_kv_cache_fp8  # noqa: E402

TARGETS = ("sm_90a", "sm_100a", "gfx942", "gfx950")
LABELS = {"sparse_mqa": ["decode-bf16-split", "merge"], "sparse_mqa_fp8": ["decode-fp8-two-cache-split"]}


def _shared_bytes(text: str) -> int:
    """The dynamic shared memory a lowered kernel carves out: the largest `buf_dyn_shmem + offset` plus
    the buffer there (bounded by the next 1 KB)."""
    offsets = [int(m) for m in re.findall(r"buf_dyn_shmem \+ (\d+)\)", text)]
    return max(offsets, default=0) + 1024


@pytest.mark.codegen
@pytest.mark.parametrize("op", ["sparse_mqa", "sparse_mqa_fp8"])
@pytest.mark.parametrize("target", TARGETS)
def test_codegen(op, target, codegen_artifacts):
    arts = codegen_artifacts(op, "tilelang", target)
    fp8 = op == "sparse_mqa_fp8"
    arch = target
    h_tile, block_n, threads = tl.tiles(tl.DEFAULTS, fp8, arch)
    labels = [a.label for a in arts]
    assert labels[0] == f"{LABELS[op][0]}-h{h_tile}-n{block_n}-t{threads}" and labels[1:] == LABELS[op][1:], labels
    attend = arts[0].text
    cuda = target.startswith("sm")
    assert attend.count(f"__global__ void __launch_bounds__({threads}") == 1, "expected one attend kernel"
    # one compile serves every shape: heads, tokens, list lengths, rows, strides, splits are arguments
    for name in ("int heads", "int n", "int bps", "float scale"):
        assert name in attend, f"{name!r} is not a kernel argument"
    # step 1: an index is used only within the row's clamped topk_length and inside [0, rows)
    assert re.search(r"min\(max\(LEN\[[^\]]+\], 0\), K", attend), "topk_length is not clamped to [0, K]"
    assert "(0 <= raw) && (raw < rows" in attend, "the index bound mask 0 <= idx < rows is missing"
    assert re.search(r"if \(\(0 <= \(\(int\*\)idx_s\)\[[^\]]+\]\)\) \{\s*condval_\d+ = \(acc_s\[i_\d+\] \* scale\)",
                     attend), "masked entries do not get -inf logits (or the scale is missing)"
    assert "expf(" in attend and "__expf(" not in attend, "expected libm expf, not the fast one"
    # the tensor cores: wgmma on sm_90a, tcgen05 / mma on sm_100a, MFMA on AMD
    if target == "sm_90a":  # S = Q K^T, then P V with lo and hi: one body for both lists
        assert attend.count("tl::wgmma_ss<") == 3, "expected the three gemms of one step"
    elif cuda:
        assert "tcgen05" in attend or "mma" in attend
    else:
        assert "mfma" in attend.lower()
    assert _shared_bytes(attend) <= tl.SHARED_LIMIT[arch], f"shared memory {_shared_bytes(attend)} over the limit"
    assert abs(_shared_bytes(attend) - tl.shared_bytes(fp8, h_tile, block_n)) <= 8192, (
        _shared_bytes(attend), tl.shared_bytes(fp8, h_tile, block_n))
    if fp8:
        assert "int64_t stride" in attend and "int rows" in attend, "page stride / row count not run-time"
        assert "1006632960" in attend, "e4m3 normal decode: (mag << 20) + (120 << 23) missing"
        assert "0x1p-9f" in attend or "1.953125e-03f" in attend, "e4m3 subnormal step 2^-9 missing"
        assert "<< (uint)23" in attend and "4194304" in attend, "ue8m0 scale bits (b << 23, 2^-127) missing"
        assert "IDX2" in attend and "LEN2" in attend, "the second list is not read"
    else:
        assert "(KV + " in attend or "KV[" in attend, "the pool rows are not gathered"
    if op == "sparse_mqa":
        merge = arts[1].text
        assert "SINK[" in merge, "the merge does not read the sink"
        assert re.search(r"expf\(\(SINK\[[^\]]+\] - ", merge) or re.search(r"expf\(\(sink", merge) or (
            "SINK[" in merge and merge.count("expf(") >= 5), "the sink term e^(sink - M) is not in the merge"
        assert "logf(" in merge, "lse = m + logf(l) missing"
        assert "for (int s = 0; s < splits; ++s)" in merge, "the merge does not fold every split"
    for a in arts:
        if a.binary_kind == "cubin":
            assert a.resources["local"] == 0 and a.resources["stack"] == 0, (a.label, a.resources)


def test_registration_matches_this_module():
    for op in ("sparse_mqa", "sparse_mqa_fp8"):
        impl = dispatch.get(op, "tilelang")
        assert impl.defaults == tl.DEFAULTS == ops.TILELANG_DEFAULTS
        assert impl.backends == ("cuda", "rocm")
        assert impl.entry.endswith(f"tilelang:{op}")


@pytest.mark.parametrize("fp8", (False, True))
@pytest.mark.parametrize("arch", ("sm_90a", "sm_100a", "gfx950", "gfx942"))
def test_tiles_fit_the_shared_memory(fp8, arch):
    h_tile, block_n, threads = tl.tiles(tl.DEFAULTS, fp8, arch)
    assert tl.shared_bytes(fp8, h_tile, block_n) <= tl.SHARED_LIMIT[arch]
    assert h_tile % 16 == 0 and block_n % 16 == 0
    if arch.startswith("sm"):   # the plan of the module docstring: 64 heads per block, two warpgroups
        assert (h_tile, block_n, threads) == (64, 32 if fp8 and arch == "sm_100a" else 64, 256)
    else:                # every 64-lane wave holds at least one 16 x 16 MFMA tile of S
        assert threads % 64 == 0 and threads // 64 <= (h_tile // 16) * (block_n // 16)


@pytest.mark.parametrize("T, H, blocks", [(64, 128, 18), (1, 128, 18), (1, 64, 10), (512, 64, 3), (3, 8, 1),
                                          (2, 120, 37)])
def test_split_plan_covers_every_block_once(T, H, blocks):
    groups, splits, per = tl.plan(T, H, blocks, 64, tl.DEFAULTS, 132)
    assert groups == -(-H // 64)
    assert 1 <= splits <= tl.DEFAULTS["MAX_SPLITS"] and (splits - 1) * per < blocks <= splits * per
    if T >= 512:
        assert splits == 1   # prefill: no workspace, no merge


def test_cache_words_view_is_a_view():
    cache = ops.padded_pages(quantize_kv_cache_fp8(torch.randn(130, 512).to(torch.bfloat16), 64), slice_view=True)
    words = tl._words(cache, 64)
    assert words.dtype == torch.int32 and words.data_ptr() == cache.data_ptr()
    assert words.numel() * 4 == (cache.shape[0] - 1) * cache.stride(0) + 64 * 584
    assert tl._words(cache.view(torch.float8_e4m3fn), 64).data_ptr() == cache.data_ptr()
    assert tl._words(cache[:0], 64).numel() == 2


def _inputs(H=64, T=3, K=200, N=300):
    gen = torch.Generator().manual_seed(H + K)
    q = torch.randn(T, H, 512, generator=gen).to(torch.bfloat16)
    kv = torch.randn(N, 512, generator=gen).to(torch.bfloat16)
    idx = torch.randint(-2, N + 3, (T, K), generator=gen, dtype=torch.int32)
    return q, kv, idx, torch.randn(H, generator=gen)


def test_supports_accepts_v4_shapes():
    for H in (8, 64, 120, 128):
        q, kv, idx, sink = _inputs(H)
        assert tl.supports_sparse_mqa(q, kv, idx, sink) is None
        cache = ops.padded_pages(quantize_kv_cache_fp8(kv, 64))
        assert tl.supports_sparse_mqa_fp8(q, cache, idx, sink, None, None, 64, cache, idx, None) is None


def test_supports_refuses_with_a_reason():
    q, kv, idx, sink = _inputs()
    buf = torch.empty(q.numel() + 8, dtype=torch.bfloat16)
    q_odd = buf[1:1 + q.numel()].view(q.shape)                       # 2 bytes off a 16-byte boundary
    assert "16-byte" in tl.supports_sparse_mqa(q_odd, kv, idx, sink)
    kv_buf = torch.empty(kv.numel() + 8, dtype=torch.bfloat16)
    assert "16-byte" in tl.supports_sparse_mqa(q, kv_buf[4:4 + kv.numel()].view(kv.shape), idx, sink)
    assert "H a multiple of 8" in tl.supports_sparse_mqa(q[:, :12].contiguous(), kv, idx, sink)
    assert "contiguous" in tl.supports_sparse_mqa(q, kv, idx.t().contiguous().t(), sink)
    cache = quantize_kv_cache_fp8(kv, 64)
    wide = torch.zeros(cache.shape[0], cache.shape[1] + 4, dtype=torch.uint8)[:, :cache.shape[1]]  # stride % 8
    assert "multiples of 8" in tl.supports_sparse_mqa_fp8(q, wide, idx, sink)


def _model(q, rows_list, sink, scale, h_tile, block_n, splits):
    """CPU model of the tile plan on the bf16 rows each list gathers (invalid entries: None): block-wise
    fp32 online softmax, P = hi + lo in bf16, fp32 accumulator, per-split partials merged with the sink."""
    T_, H, D = q.shape
    out = torch.zeros(T_, H, D)
    lse = torch.zeros(T_, H)
    for t in range(T_):
        blocks = []
        for rows in rows_list[t]:
            blocks += [rows[i:i + block_n] for i in range(0, max(1, len(rows)), block_n)]
        per = -(-len(blocks) // splits)
        parts = []
        for s in range(0, len(blocks), per):
            m = torch.full((H,), float("-inf"))
            l = torch.zeros(H)
            acc = torch.zeros(H, D)
            for blk in blocks[s:s + per]:
                ok = torch.tensor([r is not None for r in blk] + [False] * (block_n - len(blk)))
                kvb = torch.stack([r if r is not None else torch.zeros(D, dtype=torch.bfloat16) for r in blk]
                                  + [torch.zeros(D, dtype=torch.bfloat16)] * (block_n - len(blk))).float()
                sc = torch.where(ok[None, :], (q[t].float() @ kvb.T) * scale, float("-inf"))
                mn = torch.maximum(m, sc.max(dim=1).values)
                ms = torch.where(mn == float("-inf"), 0.0, mn)
                alpha, p = torch.exp(m - ms), torch.exp(sc - ms[:, None])
                l = l * alpha + p.sum(dim=1)
                hi = p.to(torch.bfloat16).float()
                lo = (p - hi).to(torch.bfloat16).float()
                acc = acc * alpha[:, None] + lo @ kvb + hi @ kvb
                m = mn
            parts.append((m, l, acc))
        m = torch.full((H,), float("-inf"))
        l = torch.zeros(H)
        acc = torch.zeros(H, D)
        for ms_, ls, a in parts:   # the merge
            mn = torch.maximum(m, ms_)
            base = torch.where(mn == float("-inf"), 0.0, mn)
            w0, w1 = torch.exp(m - base), torch.exp(ms_ - base)
            l, acc, m = l * w0 + ls * w1, acc * w0[:, None] + a * w1[:, None], mn
        msafe = torch.where(m == float("-inf"), 0.0, m)
        big = torch.maximum(msafe, sink)
        factor = torch.where(l == 0, 0.0, torch.exp(msafe - big) / (l * torch.exp(msafe - big) + torch.exp(sink - big)))
        out[t] = acc * factor[:, None]
        lse[t] = torch.where(l == 0, float("inf"), msafe + torch.log(torch.where(l == 0, 1.0, l)))
    return out.to(torch.bfloat16), lse


@pytest.mark.parametrize("splits", (1, 3))
def test_tile_plan_model_matches_the_reference(splits):
    """The plan's numerics (64-head tiles, 64-entry blocks, hi/lo P, the split merge with the sink) at SPEC 6
    tolerances, on V4-Flash-like lists with every kind of invalid entry and an empty row."""
    q, kv, idx, sink = _inputs(H=64, T=3, K=200, N=300)
    idx[1] = -1
    lengths = torch.tensor([200, 150, 37], dtype=torch.int32)
    scale = 512 ** -0.5
    rows = [[[kv[int(i)] if 0 <= int(i) < kv.shape[0] else None for i in idx[t, :int(lengths[t])]]]
            for t in range(3)]
    got = _model(q, rows, sink, scale, 64, 64, splits)
    expected = ops.sparse_mqa(q, kv, idx, sink, None, lengths, impl="reference")
    check = ladder.get_check("sparse_mqa")
    for g, e in zip(got, expected):
        check.compare(g, e)
