"""The shape grid and every family's byte and FLOP models against counts worked out by hand.

Each expected number is written as the sum of its terms (with what each term is), computed by hand
from the model's definition in the family module's docstring, not by calling the model's helpers.
"""
import pytest
import torch

from dsv4_kernels.bench import compressor, formats, mhc, moe, routing, sparse_mqa
from dsv4_kernels.bench.case import FAMILIES, all_cases, family_cases
from dsv4_kernels.shapes import (CPU, FULL, V4_FLASH, V4_PRO, decode_index_shape, get_grid, get_model,
                                 prefill_index_width, prefill_valid_entries)


def test_model_configs_match_spec_0():
    assert (V4_FLASH.hidden, V4_FLASH.heads, V4_FLASH.experts, V4_FLASH.index_topk) == (4096, 64, 256, 512)
    assert (V4_PRO.hidden, V4_PRO.heads, V4_PRO.experts, V4_PRO.index_topk) == (7168, 128, 384, 1024)
    assert (V4_FLASH.moe_intermediate, V4_PRO.moe_intermediate) == (2048, 3072)
    assert (V4_FLASH.routed_scaling_factor, V4_PRO.routed_scaling_factor) == (1.5, 2.5)
    assert [V4_PRO.compress_ratio(i) for i in (0, 1, 2, 3, 60, 61)] == [128, 128, 4, 128, 4, 0]
    assert [V4_FLASH.compress_ratio(i) for i in (0, 1, 2, 3, 43)] == [0, 0, 4, 128, 0]
    assert get_model("V4-Pro") is V4_PRO and get_grid("cpu") is CPU
    with pytest.raises(ValueError, match="layer: expected 0 <= layer <= 43"):
        V4_FLASH.compress_ratio(44)
    with pytest.raises(ValueError, match="unknown grid 'gpu'; expected one of full, cpu"):
        get_grid("gpu")


def test_index_lengths_by_hand():
    # V4-Pro CSA after 2048 tokens: 128 window slots + 1024 indexer slots; 2048 // 4 = 512 entries visible.
    pro = decode_index_shape(V4_PRO, "csa", 2048)
    assert (pro.width, pro.valid) == (128 + 1024, 128 + 512)
    flash = decode_index_shape(V4_FLASH, "csa", 2048)
    assert (flash.width, flash.valid) == (128 + 512, 128 + 512)
    hca = decode_index_shape(V4_PRO, "hca", 131072)          # 131072 / 128 = 1024 entries
    assert (hca.width, hca.valid) == (128 + 1024, 128 + 1024)
    short = decode_index_shape(V4_FLASH, "hca", 100)          # no complete block, 100 window rows
    assert (short.width, short.valid) == (128, 100)
    swa = decode_index_shape(V4_FLASH, "swa", 5000)
    assert (swa.width, swa.valid) == (128, 128)


def test_prefill_valid_entries_by_hand():
    # 5 tokens, CSA: window rows 1 + 2 + 3 + 4 + 5; compressed (i + 1) // 4 = 0, 0, 0, 1, 1.
    assert prefill_valid_entries(V4_FLASH, "csa", 5) == 15 + 2
    # 130 tokens, HCA: window 1 + ... + 128 = 8256, then 128 twice; one complete block for i + 1 >= 128.
    assert prefill_valid_entries(V4_PRO, "hca", 130) == 8256 + 256 + 3
    assert prefill_index_width(V4_PRO, "hca", 130) == 128 + 1
    assert prefill_index_width(V4_PRO, "csa", 130) == 128 + 1024
    assert prefill_valid_entries(V4_PRO, "csa", 0) == 0


def test_sparse_mqa_models_by_hand():
    # V4-Flash CSA decode, 2 sequences of 2048 tokens: T = 2, H = 64, K = 640, 1280 valid entries.
    q = out = 2 * 64 * 512 * 2
    lse, indices, sink = 2 * 64 * 4, 2 * 640 * 4, 64 * 4
    assert sparse_mqa.sparse_mqa_bytes(2, 64, 640, 1280) == q + out + lse + indices + sink + 1280 * 1024
    assert sparse_mqa.sparse_mqa_bytes(2, 64, 640, 1280, row_bytes=584) == 262144 + 5888 + 1280 * 584
    assert sparse_mqa.sparse_mqa_flops(64, 1280) == 4 * 64 * 512 * 1280
    case = next(c for c in family_cases("sparse_mqa", FULL) if c.label == "flash-decode-csa-ctx2048-B2")
    assert (case.bytes, case.flops) == (1578752, 167772160)
    # V4-Pro at 2048 tokens: K = 1152 columns, but only 640 valid per row count.
    pro = next(c for c in family_cases("sparse_mqa", FULL) if c.label == "pro-decode-csa-ctx2048-B1"
               and c.op == "sparse_mqa_fp8")
    assert pro.shape["K"] == 1152 and pro.flops == 4 * 128 * 512 * 640
    assert pro.bytes == 2 * 128 * 512 * 2 + 128 * 4 + 1152 * 4 + 128 * 4 + 640 * 584


@pytest.mark.parametrize("label", ["pro-decode-csa-ctx2048-B4", "flash-decode-hca-ctx2048-B1",
                                   "pro-prefill-csa-T16", "flash-prefill-hca-T16"])
def test_sparse_mqa_inputs_hold_exactly_the_counted_valid_entries(label):
    case = next(c for c in family_cases("sparse_mqa", CPU) if c.label == label)
    (q, kv, indices, sink), _ = case.make_inputs(torch.device("cpu"))
    valid = (indices >= 0) & (indices < kv.shape[0])
    assert indices.shape == (case.shape["T"], case.shape["K"])
    assert int(valid.sum()) == case.shape["valid"]
    rows = [set(r[m].tolist()) for r, m in zip(indices, valid)]
    assert all(len(s) == int(m.sum()) for s, m in zip(rows, valid))    # no duplicate within a row
    assert q.shape == (case.shape["T"], case.shape["H"], 512) and sink.shape == (case.shape["H"],)


def test_compressor_models_by_hand():
    # Prefill S = 8, ratio 4, d = 128: coff 2, W = 256, n = 2 entries, 8 pooled rows per entry.
    assert compressor.prefill_bytes(8, 4, 128) == (2 * 8 * 256 * 4 + 4 * 256 * 4) + 2 * 2 * 4 * 256 * 4 + 2 * 128 * 4
    assert compressor.prefill_flops(8, 4, 128) == 8 * 256 + 2 * 128 * (5 * 8 + 1)
    # Fused with the FP8 cache, d = 512: W = 1024, bf16 entries, norm weight, 2 rope rows, 2 cache rows.
    fused_bytes = (65536 + 16384) + 65536 + 2 * 512 * 2 + 512 * 4 + 2 * 32 * 8 + 2 * (584 + 8)
    assert compressor.prefill_bytes(8, 4, 512, True, True) == fused_bytes == 153248
    assert compressor.prefill_flops(8, 4, 512, True, True) == 8192 + 2 * 512 * 41 + 2 * (4 * 512 + 194) + 2 * 448
    # Batched prefill N = 8 tokens in B = 2 chunks, ratio 4, d = 128, fp32: per token one output row.
    inputs = 2 * 8 * 256 * 4 + 4 * 256 * 4 + 3 * 4 + 2 * 2 * 8
    assert compressor.batched_bytes(8, 2, 4, 128) == inputs + 2 * 2 * (2 * 4 * 2 * 256 * 4) + 8 * 128 * 4 + 8
    # Decode B = 3, ratio 128, d = 512, one row emits: its whole 128-row slot (kv and score) is read.
    inputs = 2 * 3 * 512 * 4 + 3 * 512 * 4 + 3 * 8
    state = 2 * 3 * 512 * 4 + 2 * 128 * 512 * 4
    assert compressor.decode_bytes(3, 128, 512, 1) == inputs + state + 3 * 512 * 4 + 3 == 561179
    assert compressor.decode_flops(3, 128, 512, 1) == 3 * 512 + 512 * (5 * 128 + 1)
    # Decode B = 2, ratio 4, d = 128, both emit: slot reads 2 x [8, 256] x 2 and the 4-row shift.
    assert compressor.decode_bytes(2, 4, 128, 2) == (4096 + 2048 + 16) + (4096 + 32768 + 16384) + (1024 + 2)
    assert compressor.decode_flops(2, 4, 128, 0) == 2 * 256
    # Indexer cache form: 128 bf16 values read, 64 packed code bytes and 4 scale bytes written per row.
    assert compressor.indexer_bytes(3) == 3 * (256 + 68)
    assert compressor.indexer_flops(3) == 3 * 128 * 8
    assert compressor.norm_rope_bytes(3, 512) == 6144 + 2048 + 3 * 256 + 3 * 8 + 3 * 512 * 2
    assert compressor.norm_rope_flops(3, 512) == 3 * (4 * 512 + 194)
    assert compressor.indexer_bytes(5) == 5 * 256 + 5 * 64 + 5 * 4
    assert compressor.indexer_flops(5) == 5 * 128 * (7 + 1)


def test_routing_models_by_hand():
    assert routing.score_topk_bytes(3, 256, 6) == 3 * 256 * 4 + 256 * 4 + 3 * 6 * (4 + 4)
    assert routing.score_topk_flops(3, 256, 6) == 3 * (4 * 256 + 3 * 6)
    # ids (int64), the table rows and the gathered logits (k int32 / fp32 each), weights and ids out.
    assert routing.hash_topk_bytes(3, 6) == 3 * 8 + 3 * 6 * 4 + 3 * 6 * 4 + 3 * 6 * 8
    assert routing.hash_topk_flops(3, 6) == 3 * 6 * (3 + 3)


def test_mhc_models_by_hand():
    # 8 gates x 6, 16 comb logits x 2, row softmax 16 x 4, + eps 16, 39 normalisations x 32.
    assert mhc.sinkhorn_flops() == 48 + 32 + 64 + 16 + 39 * 32 == 1408
    assert mhc.sinkhorn_bytes(2) == 2 * 24 * 4 + 12 + 96 + 2 * 24 * 4
    x, y, gates = 2 * 4 * 4096 * 2, 2 * 4096 * 2, 2 * (4 + 16) * 4
    site = 24 * 4 * 4096 * 4 + 3 * 4 + 24 * 4
    assert mhc.pre_bytes(2, 4096) == x + site + y + gates == 1655052
    per_token = 2 * 24 * 16384 + 2 * 16384 + 24 + 2 + 2 * 16384 + 1408
    assert mhc.pre_flops(2, 4096) == 2 * per_token
    assert mhc.post_bytes(2, 4096) == y + 2 * x + gates
    assert mhc.post_flops(2, 4096) == 2 * 4 * 4096 * 2 * 5          # 5 multiply-adds per output value
    head_site = 4 * 16384 * 4 + 4 + 16
    assert mhc.head_bytes(2, 4096) == x + head_site + y
    assert mhc.head_flops(2, 4096) == 2 * (2 * 4 * 16384 + 2 * 16384 + 4 + 2 + 2 * 16384 + 24)
    assert mhc.post_pre_bytes(2, 4096) == (y + 2 * x + gates) + site + y + gates
    assert mhc.post_pre_flops(2, 4096) == 2 * 4 * 4096 * 10 + 2 * per_token


def test_mhc_kernel_bytes_by_hand():
    # mhc_pre, V4-Flash decode T = 1 (default decode config: 128 splits of one 32-column tile, one token
    # block, 8 out dim blocks of 512): x read twice, hc_fn once, workspace 128 x (24 + 1) fp32 written,
    # then read: 5 floats per split in each of 8 dim blocks plus 20 in block 0.
    x, hc_fn, gates = 4 * 4096 * 2, 24 * 16384 * 4, (4 + 16) * 4
    ws_write, ws_read = 128 * 25 * 4, 128 * 4 * (5 * 8 + 20)
    site = 3 * 4 + 24 * 4
    assert mhc.kernel_bytes("mhc_pre", 1, 4096) == 2 * x + hc_fn + ws_write + ws_read + 4096 * 2 + gates + site
    assert mhc.kernel_bytes("mhc_pre", 1, 4096) > mhc.pre_bytes(1, 4096)
    # Prefill T = 4096, V4-Pro (bf16x3 phase, 16-token blocks, 256 of them: 1 split): hc_fn once per
    # token block dominates, x twice.
    hc_pro = 24 * 4 * 7168 * 4
    T = 4096
    expected = (256 * hc_pro + T * 25 * 4 + 2 * T * 4 * 7168 * 2 + T * 4 * (5 * 14 + 20) + T * 7168 * 2
                + T * 20 * 4 + site)
    assert mhc.kernel_bytes("mhc_pre", T, 7168) == expected
    # mhc_post: F, X read, X' written, gates per dim block (V4-Flash: 4 blocks of 1024).
    assert mhc.kernel_bytes("mhc_post", 2, 4096) == 2 * 4096 * 2 + 2 * 2 * x + 4 * 2 * gates
    assert mhc.kernel_bytes("mhc_head", 0, 4096) == 0
    cases = [c for c in mhc.cases(FULL) if c.op == "mhc_post_pre"]
    assert cases and all(c.shape["kernel_bytes"] >= c.bytes for c in cases)


def test_fp32_vector_peaks_of_the_chips_mhc_decode_runs_on():
    # The mHC decode projection multiplies in fp32 on the FMA units: its compute ceiling is the plain
    # fp32 datasheet peak, not a tensor-core one.
    from dsv4_kernels.backends import get_backend
    cuda, rocm = get_backend("cuda"), get_backend("rocm")
    assert cuda.peak("H100").fp32_tflops == cuda.peak("H200").fp32_tflops == 67.0
    assert cuda.peak("B200").fp32_tflops == 75.0
    assert rocm.peak("MI300X").fp32_tflops == 163.4 and rocm.peak("MI355X").fp32_tflops == 157.3
    assert all(p.fp32_tflops is None or p.fp32_tflops < p.bf16_tflops for p in cuda.peaks + rocm.peaks)


def test_moe_models_by_hand():
    # FP4 at half a byte per value plus a scale byte per 32 values: 64 values -> 32 + 2 bytes.
    assert moe.fp4_weight_bytes(1, 1, 64) == 34
    # One V4-Flash token: 6 rows, a gate-up GEMM with N = 512 (I = 256), K = 4096, 6 experts touched.
    a = 6 * 4096 + 6 * (4096 // 128) * 4
    weights = 6 * 512 * (4096 // 2 + 4096 // 32)
    assert moe.grouped_gemm_bytes(6, 512, 4096, 256) == a + 6 * 4 + weights + 6 * 512 * 2 == 6716184
    assert moe.grouped_gemm_flops(6, 512, 4096) == 2 * 6 * 512 * 4096
    assert moe.touched_experts(600, 256) == 256 and moe.touched_experts(6, 256) == 6
    w13 = 6 * 4096 * (2048 + 128)          # 6 experts x 2I rows x (dim / 2 + dim / 32)
    w2 = 6 * 4096 * (1024 + 64)            # 6 experts x dim rows x (I / 2 + I / 32)
    assert moe.moe_bytes(1, 4096, 2048, 256, 6) == 8192 + 6 * 8 + w13 + w2 + 8192 == 80232496
    assert moe.moe_flops(1, 4096, 2048, 6) == 2 * 6 * 4096 * 4096 + 2 * 6 * 4096 * 2048


def test_formats_models_by_hand():
    assert formats.fp8_quant_bytes(2, 256) == 2 * 256 * 2 + 2 * 256 + 2 * 2 * 4
    assert formats.mxfp4_quant_bytes(2, 256) == 1024 + 256 + 16
    assert formats.mxfp4_dequant_bytes(2, 256) == 256 + 16 + 2 * 256 * 4
    assert formats.kv_quant_bytes(65) == 65 * 1024 + 2 * 64 * 584    # two whole pages written
    assert formats.kv_dequant_bytes(3) == 3 * 584 + 3 * 1024


@pytest.mark.parametrize("grid", [CPU, FULL], ids=["cpu", "full"])
def test_every_family_yields_well_formed_cases(grid):
    cases = all_cases(grid)
    assert {c.family for c in cases} == set(FAMILIES)
    for family in FAMILIES:
        models = {c.model for c in cases if c.family == family}
        assert models >= {"v4"} or models >= {"flash", "pro"}, (family, models)
    seen = set()
    for c in cases:
        assert (c.op, c.label) not in seen
        seen.add((c.op, c.label))
        assert c.bytes > 0 and c.flops > 0 and c.tokens >= 1 and c.phase in ("decode", "prefill")
    ops = {c.op for c in cases}
    assert {"sparse_mqa", "sparse_mqa_fp8", "compressor_prefill", "compressor_decode", "score_topk", "hash_topk",
            "mhc_pre", "mhc_post", "mxfp4_grouped_gemm", "fp4_grouped_moe", "quantize_mxfp4"} <= ops


def test_full_grid_spans_decode_and_long_prefill():
    cases = all_cases(FULL, ("mhc", "sparse_mqa"))
    mhc_tokens = {c.tokens for c in cases if c.op == "mhc_pre"}
    assert {1, 256, 65536} <= mhc_tokens
    assert {16384} <= {c.tokens for c in cases if c.op == "sparse_mqa" and c.phase == "prefill"}
    assert {c.shape["K"] for c in cases if c.op == "sparse_mqa" and c.phase == "decode"} == {144, 640, 1152}


def test_sparse_mqa_two_cache_decode_holds_the_same_entries():
    """V4-Pro CSA decode over two FP8 caches (SPEC 1.3): the window and compressed lists renumbered into
    their own caches hold the counted valid entries, every one inside its cache."""
    case = next(c for c in family_cases("sparse_mqa", CPU) if c.label == "pro-decode-csa-ctx2048-two-cache-B4")
    assert case.op == "sparse_mqa_fp8" and case.shape["K"] == 1152
    (q, ring, window, sink), kwargs = case.make_inputs(torch.device("cpu"))
    comp, extra = kwargs["extra_indices"], kwargs["extra_kv_cache"]
    n1, n2 = ring.shape[0] * 64, extra.shape[0] * 64
    assert window.shape == (4, 128) and comp.shape == (4, 1024)
    assert bool(((window >= -1) & (window < n1)).all()) and bool(((comp >= -1) & (comp < n2)).all())
    assert int((window >= 0).sum() + (comp >= 0).sum()) == case.shape["valid"]
