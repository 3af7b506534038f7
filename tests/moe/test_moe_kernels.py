"""The FP4 MoE Triton kernels (kernels/moe/) against the reference, beyond the shared op tests of
test_moe_ops.py: the FP8 activation quantisation bit for bit in both encodings, the permutation and
combine, the grouped GEMM over many small tiles (blocks that mix experts, padding rows, tails in M, N and
K), and the whole MoE at the V4 hidden sizes and true expert counts with a small I (the interpreter's
cost grows with dim * I per expert; the full V4 shapes are device tests, tests/moe/test_moe_device.py),
with its edge cases: experts with no token, all tokens on one expert, a token with no local expert under
expert_map, swiglu_limit <= 0, zero tokens, both encodings and activation blocks, and a hypothesis case.
Tolerance: calc_diff < 0.01 against the reference with the same activation block and encoding (SPEC 5)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import dsv4_kernels as dk
from dsv4_kernels.kernels.moe import triton as tk
from dsv4_kernels.kernels.moe.triton_quant import quantize_fp8
from dsv4_kernels.kernels.moe.triton_route import combine, permute
from dsv4_kernels.ops import moe as ops
from dsv4_kernels.reference import moe as reference
from dsv4_kernels.reference.formats import quantize_fp8_blockwise

pytestmark = pytest.mark.guard_bands  # outputs and workspaces between canary bands: a stray store fails


@pytest.mark.parametrize("fmt", ["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("block", [32, 128])
def test_fp8_quant_kernel_is_bitwise_the_reference(fmt, block):
    """Bytes and scales equal quantize_fp8_blockwise: wide magnitudes, subnormal codes, signed zeros and
    tiny values (e4m3fnuz has no -0), an all-zero block, NaN and inf blocks (NaN scale, NaN bytes), an
    odd row count and a K with a block tail in the last program."""
    gen = torch.Generator().manual_seed(block)
    K = 7 * block
    x = torch.randn(5, K, generator=gen) * torch.exp(3 * torch.randn(5, 1, generator=gen))
    x[0, :block] = 0.0
    x[0, block:2 * block] = -0.0
    x[1, 3] = float("nan")
    x[2, block + 1] = float("-inf")
    x[3, :8] = torch.tensor([1e-30, -1e-30, 1e-6, -1e-6, 448.0, -240.0, 3e4, -2.5e-3])
    x = x.to(torch.bfloat16)
    q, s = quantize_fp8(x, block, fmt)
    rq, rs = quantize_fp8_blockwise(x, block, fmt)
    assert q.dtype == rq.dtype
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(s.isnan(), rs.isnan()) and torch.equal(s.nan_to_num(0), rs.nan_to_num(0))


def _slots(ids: torch.Tensor, E: int, expert_map=None) -> list[tuple[int, int, int]]:
    """(local expert, token, slot) of every valid slot, in the kernel's order: by expert, then slot."""
    out = []
    T, k = ids.shape
    for s in range(T * k):
        e = int(ids.view(-1)[s])
        if expert_map is not None:
            e = int(expert_map[e]) if 0 <= e < expert_map.shape[0] else -1
        if 0 <= e < E:
            out.append((e, s // k, s))
    return sorted(out)


@pytest.mark.parametrize("case", ["random", "one-expert", "none-valid", "expert-map", "chunks"])
def test_permute_counts_offsets_order_and_inverse(case):
    gen = torch.Generator().manual_seed(len(case))
    E, k, emap = 9, 6, None
    T = 150 if case == "chunks" else 7        # 900 slots: many 64-slot chunks
    ids = torch.randint(-2, E + 2, (T, k), generator=gen, dtype=torch.int32)
    if case == "one-expert":
        ids = torch.full((T, k), 4, dtype=torch.int32)
    if case == "none-valid":
        ids = torch.tensor([[-1, E, -7, 2 ** 31 - 1, -(2 ** 31), E + 5]] * T, dtype=torch.int32)
    if case == "expert-map":
        emap = torch.tensor([-1, 8, 0, -1, 3, 3, 12, -5, 1, 2, 7, -1], dtype=torch.int32)  # E_global 12
        ids = torch.randint(-2, 14, (T, k), generator=gen, dtype=torch.int32)
    w = torch.rand(T, k, generator=gen)
    r = permute(ids, w, E, emap)
    want = _slots(ids, E, emap)
    n = len(want)
    counts = torch.bincount(torch.tensor([e for e, _, _ in want], dtype=torch.long), minlength=E)
    assert torch.equal(r["counts"].long(), counts)
    assert torch.equal(r["offsets"].long(), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    assert r["experts"][:n].tolist() == [e for e, _, _ in want] and (r["experts"][n:] == -1).all()
    assert r["tokens"][:n].tolist() == [t for _, t, _ in want] and (r["tokens"][n:] == -1).all()
    assert torch.equal(r["weights"][:n], w.view(-1)[[s for _, _, s in want]]) and (r["weights"][n:] == 0).all()
    inv = torch.full((T * k,), -1, dtype=torch.int32)
    for row, (_, _, s) in enumerate(want):
        inv[s] = row
    assert torch.equal(r["inv"].view(-1), inv)


def test_combine_sums_each_tokens_rows_in_fp32():
    ys = (torch.randn(10, 1100) * 100).to(torch.bfloat16)
    ys[3, 5] = float("nan")                                   # row 3 is nobody's: must not show
    inv = torch.tensor([[0, -1, 4], [9, 9, -1], [-1, -1, -1], [1, 2, 5]], dtype=torch.int32)
    y = combine(ys, inv)
    f = ys.float()
    want = torch.stack([f[0] + f[4], f[9] + f[9], torch.zeros(1100), f[1] + f[2] + f[5]]).to(torch.bfloat16)
    assert torch.equal(y, want)


SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}


@pytest.mark.parametrize("fmt, block", [("e4m3fn", 32), ("e4m3fnuz", 128)])
def test_grouped_gemm_many_tiles(fmt, block):
    """M 37 (three row blocks, the last of 5 rows), N 80 (two column blocks, a 16-column tail), K 384
    (three K steps): blocks that mix experts (runs of 1, 2 and 13 rows), padding rows (-1, G) inside and
    between runs, a group without rows, and wide activation magnitudes."""
    gen = torch.Generator().manual_seed(block)
    K, N, G = 384, 80, 5
    runs = [(3, 1), (-1, 2), (0, 2), (4, 13), (G, 1), (1, 5), (-1, 1), (0, 0), (3, 12)]  # (group, rows)
    m = torch.tensor([g for g, n in runs for _ in range(n)], dtype=torch.int32)
    M = m.shape[0]
    x = torch.randn(M, K, generator=gen) * torch.exp(torch.randn(M, 1, generator=gen))
    a, a_scale = quantize_fp8_blockwise(x.to(torch.bfloat16), block, fmt)
    b, b_scale = ops.random_weights(G, N, K, "cpu")
    c = tk.grouped_gemm(a.view(torch.uint8), a_scale, b, b_scale, m, block, fmt == "e4m3fnuz", tiles=SMALL_TILES)
    want = reference.mxfp4_grouped_gemm(a, a_scale, b, b_scale, m, block)
    ops.compare_gemm(c, want)
    assert torch.equal(c == 0, want == 0) and ((m < 0) | (m >= G)).sum() == 4
    assert (c[(m < 0) | (m >= G)] == 0).all()
    # the gathering form (the MoE's gate/up GEMM): output row r reads activation row gather[r]
    gather = torch.randint(0, M, (M,), generator=gen, dtype=torch.int32)
    gather[7] = -1
    cg = tk.grouped_gemm(a.view(torch.uint8), a_scale, b, b_scale, m, block, fmt == "e4m3fnuz", gather=gather,
                         tiles=SMALL_TILES)
    ref_rows = reference.mxfp4_grouped_gemm(a[gather.clamp(min=0).long()], a_scale[gather.clamp(min=0).long()], b,
                                            b_scale, torch.where(gather < 0, -1, m), block)
    ops.compare_gemm(cg, ref_rows)
    assert (cg[7] == 0).all()
    # x quantised in the prologue (the MoE's decode gate/up GEMM): the same bytes and scales, so bit for bit
    xb = x.to(torch.bfloat16)
    xb[5, 40] = float("nan")
    a, a_scale = quantize_fp8_blockwise(xb, block, fmt)
    for rows in (None, gather):
        want = tk.grouped_gemm(a.view(torch.uint8), a_scale, b, b_scale, m, block, fmt == "e4m3fnuz", gather=rows,
                               tiles=SMALL_TILES)
        got = tk.grouped_gemm(xb, xb, b, b_scale, m, block, fmt == "e4m3fnuz", gather=rows, tiles=SMALL_TILES,
                              quant_a=True)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("block", [32, 128])
def test_grouped_gemm_scaled_path(block):
    """The MXFP4 scaled-dot path (gfx950, sm_100a prefill tiles) through the interpreter's dot_scaled: the
    runs, padding and N tail of test_grouped_gemm_many_tiles, weight scale bytes 0 (2^-127) and 255 (NaN),
    and a row block whose activation scales are not all powers of two (one is 1.75 x 2^e, one is 0): an e8m0
    byte cannot hold them, so that block's passes take the bf16 path and the values are still the
    reference's; the other blocks run scaled. With own_scales (the MoE's quantiser made the scales) a NaN
    block (NaN bytes, NaN scale) still gives NaN rows."""
    gen = torch.Generator().manual_seed(block + 1)
    K, N, G = 256, 80, 5
    runs = [(3, 1), (-1, 2), (0, 2), (4, 13), (G, 1), (1, 5), (-1, 1), (3, 12)]
    m = torch.tensor([g for g, n in runs for _ in range(n)], dtype=torch.int32)
    M = m.shape[0]
    x = torch.randn(M, K, generator=gen) * torch.exp(torch.randn(M, 1, generator=gen))
    a, a_scale = quantize_fp8_blockwise(x.to(torch.bfloat16), block, "e4m3fn")
    b, b_scale = ops.random_weights(G, N, K, "cpu")
    b_scale[4, 3, 1] = 0
    b_scale[1, 70, 0] = 255
    pow2 = a_scale.clone()
    a_scale[20, 1] *= 1.75         # row block 1 (rows 16..31): bf16 path
    a_scale[17, 0] = 0.0           # another pass (group 4); read as e8m0 byte 0, 2^-127: too small to show
    tiles = {**SMALL_TILES, "SCALED": True}
    c = tk.grouped_gemm(a.view(torch.uint8), a_scale, b, b_scale, m, block, False, tiles=tiles)
    want = reference.mxfp4_grouped_gemm(a, a_scale, b, b_scale, m, block)
    ops.compare_gemm(c, want)
    rows = slice(19, 24)           # group 1, the rows of the unusual scales: every value, not calc_diff
    finite = want[rows].isfinite()
    torch.testing.assert_close(c[rows][finite].float(), want[rows][finite].float(), rtol=2 ** -7,
                               atol=1e-3 * want[rows][finite].float().abs().amax().item())
    assert c[m == 1][:, 70].isnan().all() and torch.equal(c.isnan(), want.isnan())
    assert (c[(m < 0) | (m >= G)] == 0).all()
    a_nan = a.clone()
    a_nan[30, :block] = float("nan")
    s_nan = pow2.clone()
    s_nan[30, 0] = float("nan")
    cn = tk.grouped_gemm(a_nan.view(torch.uint8), s_nan, b, b_scale, m, block, False, tiles=tiles, own_scales=True)
    wn = reference.mxfp4_grouped_gemm(a_nan, s_nan, b, b_scale, m, block)
    assert cn[30].isnan().all() and torch.equal(cn.isnan(), wn.isnan())
    ops.compare_gemm(cn, wn)
    # x quantised in the prologue, on the scaled path: bit for bit the pre-quantised scaled GEMM
    xb = x.to(torch.bfloat16)
    xb[30, 3] = float("nan")
    a, a_scale = quantize_fp8_blockwise(xb, block, "e4m3fn")
    want = tk.grouped_gemm(a.view(torch.uint8), a_scale, b, b_scale, m, block, False, tiles=tiles, own_scales=True)
    got = tk.grouped_gemm(xb, xb, b, b_scale, m, block, False, tiles=tiles, quant_a=True)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)) and got[30].isnan().all()


def test_scaled_path_serves_gfx950_and_sm100_prefill_tiles():
    from dsv4_kernels.kernels.moe import scaled_path
    assert scaled_path("gfx950", False, 16) and not scaled_path("gfx950", True, 64)
    assert scaled_path("sm_100", False, 128) and not scaled_path("sm_100", False, 64)
    assert not scaled_path("sm_90", False, 128) and not scaled_path("gfx942", False, 128)


def _moe_args(T, dim, inter, E, k=6, block=128, scale=1.0, gen=None, experts=None):
    gen = gen or torch.Generator().manual_seed(T * 1000 + dim + E)
    x = (scale * torch.randn(T, dim, generator=gen)).to(torch.bfloat16)
    pool = torch.tensor(experts) if experts is not None else torch.arange(E)
    ids = pool[torch.randint(0, len(pool), (T, k), generator=gen)].to(torch.int32)
    weights = torch.softmax(torch.randn(T, k, generator=gen), dim=-1) * 2.5
    used = torch.unique(ids.long())
    w13 = torch.zeros(E, 2 * inter, dim // 2, dtype=torch.uint8)
    w13_s = torch.full((E, 2 * inter, dim // 32), 255, dtype=torch.uint8)   # unused experts: NaN scales
    w2 = torch.zeros(E, dim, inter // 2, dtype=torch.uint8)
    w2_s = torch.full((E, dim, inter // 32), 255, dtype=torch.uint8)
    for e in used.tolist():
        (w13[e], w13_s[e]), (w2[e], w2_s[e]) = ((w[0] for w in ops.random_weights(1, 2 * inter, dim, "cpu")),
                                                (w[0] for w in ops.random_weights(1, dim, inter, "cpu")))
    return x, ids, weights, w13, w13_s, w2, w2_s


def _run(args, **kwargs):
    y = dk.fp4_grouped_moe(*args, impl="triton", **kwargs)
    want = dk.fp4_grouped_moe(*args, impl="reference", **kwargs)
    ops.compare_moe(y, want)
    return y, want


@pytest.mark.parametrize("model, block, fmt", [("flash", 32, "e4m3fn"), ("pro", 128, "e4m3fnuz")])
def test_moe_at_v4_hidden_sizes_and_expert_counts(model, block, fmt):
    """dim 4096 / 7168 and E 256 / 384 with I 128 (reduced from 2048 / 3072 on the CPU), one token whose
    six slots name two experts (0 and the last), so the other experts receive no token (their weights hold
    NaN scales and are never read)."""
    dim, _, E = ops.MODELS[model]
    args = _moe_args(1, dim, 128, E, block=block, experts=[0, E - 1])
    y, _ = _run(args, act_block_size=block, act_fmt=fmt)
    assert y.isfinite().all()


def test_moe_all_tokens_on_one_expert_and_odd_sizes():
    """Nine tokens x k 3 all on expert 1 (27 rows: two GEMM row blocks of one expert, the second a tail
    of 11), dim 160, I 96, and x large enough that the clamp is active (swiglu_limit <= 0 runs in the op
    tests and the hypothesis case)."""
    args = _moe_args(9, 160, 96, 3, k=3, block=32, scale=40.0, experts=[1])
    y, _ = _run(args, act_block_size=32)
    assert y.isfinite().all()


def test_moe_expert_map_token_without_local_expert_and_zero_tokens():
    """Expert parallelism, 8 global experts with 3 here: token 2 names only remote experts and unknown ids
    (its output is 0), token 0 mixes local and remote; T = 0 gives an empty result."""
    x, _, weights, w13, w13_s, w2, w2_s = _moe_args(4, 256, 128, 3, k=4, block=32)
    emap = torch.tensor([-1, 2, -1, -1, 0, -1, 1, -1], dtype=torch.int32)
    ids = torch.tensor([[1, 0, 4, 9], [6, 6, 1, 4], [0, 3, -1, 8], [4, -1, 2, 7]], dtype=torch.int32)
    y, want = _run((x, ids, weights, w13, w13_s, w2, w2_s), act_block_size=32, expert_map=emap)
    assert (y[2] == 0).all() and (y[[0, 1, 3]] != 0).any(dim=1).all()
    empty = dk.fp4_grouped_moe(x[:0], ids[:0], weights[:0], w13, w13_s, w2, w2_s, expert_map=emap, impl="triton")
    assert empty.shape == (0, 256) and empty.dtype == torch.bfloat16


@pytest.mark.parametrize("scaled", [False, True])
def test_moe_quant_in_gemm_or_its_own_launch_and_the_scaled_path(scaled, monkeypatch):
    """The decode form (x quantised in the gate/up GEMM's prologue) and the prefill form (its own launch)
    give the same bits; with the scaled-dot path forced on (gfx950's and sm_100a prefill's) as well, and
    both match the reference. A NaN in x makes its token's row NaN."""
    if scaled:
        tiles = tk._tiles
        monkeypatch.setattr(tk, "_tiles", lambda *a: {**tiles(*a), "BLOCK_K": 128, "SCALED": True})
    x, ids, w, w13, w13_s, w2, w2_s = args = _moe_args(5, 256, 128, 4, k=3, block=32)
    x[3, 17] = float("nan")
    want = dk.fp4_grouped_moe(*args, act_block_size=32, impl="reference")
    fused = tk.fp4_grouped_moe(*args, act_block_size=32, quant_in_gemm=True)
    apart = tk.fp4_grouped_moe(*args, act_block_size=32, quant_in_gemm=False)
    assert torch.equal(fused.view(torch.int16), apart.view(torch.int16))
    assert fused[3].isnan().all() and not fused[[0, 1, 2, 4]].isnan().any()
    ops.compare_moe(fused, want)


@settings(max_examples=3)
@given(T=st.integers(1, 4), k=st.integers(1, 8), E=st.integers(1, 4), block=st.sampled_from([32, 128]),
       fmt=st.sampled_from(["e4m3fn", "e4m3fnuz"]), limit=st.sampled_from([10.0, 0.0, 3.0]),
       seed=st.integers(0, 2 ** 16))
def test_moe_hypothesis(T, k, E, block, fmt, limit, seed):
    gen = torch.Generator().manual_seed(seed)
    dim, inter = 2 * block, block
    args = list(_moe_args(T, dim, inter, E, k=k, block=block, scale=8.0, gen=gen))
    drop = torch.rand(T, k, generator=gen) < 0.2
    args[1] = torch.where(drop, torch.full_like(args[1], -1), args[1])
    _run(tuple(args), act_block_size=block, act_fmt=fmt, swiglu_limit=limit)


def test_supports_refuses_what_the_kernels_were_not_built_for():
    from dsv4_kernels.kernels.moe import supports_fp4_grouped_moe, supports_mxfp4_grouped_gemm
    x, ids, w, w13, w13_s, w2, w2_s = _moe_args(2, 64, 32, 2, k=2, block=32)
    assert supports_fp4_grouped_moe(x, ids, w, w13, w13_s, w2, w2_s, 32) is None
    ids17 = torch.zeros(2, 17, dtype=torch.int32)
    assert "top-k up to 16" in supports_fp4_grouped_moe(x, ids17, w, w13, w13_s, w2, w2_s, 32)
    a, a_s = quantize_fp8_blockwise(x, 32)
    assert supports_mxfp4_grouped_gemm(a, a_s, w13, w13_s, ids[:, 0].contiguous(), 32) is None
    assert "float8" in supports_mxfp4_grouped_gemm(a.view(torch.uint8), a_s, w13, w13_s, ids[:, 0], 32)
