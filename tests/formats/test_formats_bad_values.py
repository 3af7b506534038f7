"""Bad values in the number formats (issue 11, SPEC "Number formats", "Non-finite input"): a block with a
NaN or an infinity quantises to a NaN scale and dequantises to all-NaN, the other blocks are untouched,
checked mode does not refuse it; a KV store never writes outside the slots it was given."""
from __future__ import annotations

import pytest
import torch

from dsv4_kernels.ops import _values
from dsv4_kernels.ops.formats import (dequantize_kv_cache_fp8, dequantize_mxfp4, quantize_fp8_blockwise,
                                      quantize_kv_cache_fp8, quantize_mxfp4)
from dsv4_kernels.reference import formats as reference

NAN, INF = float("nan"), float("inf")
NAN_BYTE = {"e4m3fn": 0x7F, "e4m3fnuz": 0x80}


def _poisoned(rows: int, k: int, block: int, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, clean, bad): x is `clean` with a NaN, a +inf and a -inf in block 1 of row 1 and a lone -inf in
    the last block of the last row; bad [rows, k / block] marks those blocks. Clean holds zeros there."""
    clean = torch.randn(rows, k).to(dtype)
    clean[1, block:2 * block] = 0
    clean[-1, -block:] = 0
    x = clean.clone()
    x[1, block + 3], x[1, block + 4], x[1, 2 * block - 1] = NAN, INF, -INF
    x[-1, -1] = -INF
    bad = torch.zeros(rows, k // block, dtype=torch.bool)
    bad[1, 1] = bad[-1, -1] = True
    return x, clean, bad


@pytest.fixture(params=[False, True], ids=["default", "checked"])
def mode(request, monkeypatch):
    """Both modes: non-finite input is never an error, checked mode (DSV4K_CHECK=1) included."""
    if request.param:
        monkeypatch.setenv(_values.ENV, "1")
    else:
        monkeypatch.delenv(_values.ENV, raising=False)
    return request.param


@pytest.mark.op("quantize_fp8_blockwise")
@pytest.mark.parametrize("fmt", ["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("block, dtype", [(32, torch.bfloat16), (128, torch.float32)])
def test_fp8_nonfinite_block_is_nan_and_others_unchanged(impl, device, mode, fmt, block, dtype):
    x, clean, bad = _poisoned(3, 4 * block, block, dtype)
    q, scale = quantize_fp8_blockwise(x.to(device), block, fmt, impl=impl)
    q_clean, scale_clean = quantize_fp8_blockwise(clean.to(device), block, fmt, impl=impl)
    q, scale, q_clean, scale_clean = q.cpu(), scale.cpu(), q_clean.cpu(), scale_clean.cpu()
    assert scale.isnan().equal(bad)
    assert torch.equal(scale[~bad], scale_clean[~bad])
    codes, clean_codes = q.view(torch.uint8).view(3, 4, block), q_clean.view(torch.uint8).view(3, 4, block)
    assert (codes[bad] == NAN_BYTE[fmt]).all()
    assert torch.equal(codes[~bad], clean_codes[~bad])
    back = reference.dequantize_fp8_blockwise(q, scale).view(3, 4, block)
    assert back[bad].isnan().all() and not back[~bad].isnan().any()


@pytest.mark.op("quantize_mxfp4")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mxfp4_nonfinite_block_is_nan_and_others_unchanged(impl, device, mode, dtype):
    x, clean, bad = _poisoned(3, 128, 32, dtype)
    packed, scale = quantize_mxfp4(x.to(device), impl=impl)
    packed_clean, scale_clean = quantize_mxfp4(clean.to(device), impl=impl)
    assert torch.equal(scale.cpu()[bad], torch.full((2,), 255, dtype=torch.uint8))
    assert torch.equal(scale.cpu()[~bad], scale_clean.cpu()[~bad])
    blocks, clean_blocks = packed.cpu().view(3, 4, 16), packed_clean.cpu().view(3, 4, 16)
    assert (blocks[bad] == 0).all()                                         # code 0, never a value of x
    assert torch.equal(blocks[~bad], clean_blocks[~bad])
    back = dequantize_mxfp4(packed, scale, impl=impl).cpu().view(3, 4, 32)
    assert back[bad].isnan().all()
    assert torch.equal(back[~bad], dequantize_mxfp4(packed_clean, scale_clean, impl=impl).cpu().view(3, 4, 32)[~bad])


@pytest.mark.op("dequantize_mxfp4")
def test_dequantize_mxfp4_scale_byte_255_is_nan_for_any_codes(impl, device):
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(4, 64)   # every byte once
    scale = torch.full((4, 4), 127, dtype=torch.uint8)
    scale[1, 2] = scale[3, 0] = 255
    back = dequantize_mxfp4(packed.to(device), scale.to(device), impl=impl).cpu().view(4, 4, 32)
    bad = scale == 255
    assert back[bad].isnan().all() and not back[~bad].isnan().any()


@pytest.mark.op("quantize_kv_cache_fp8")
def test_kv_cache_nonfinite_tile_is_nan_and_rope_carries_it(impl, device, mode):
    clean = torch.randn(5, 512).to(torch.bfloat16)
    clean[1, 64:128] = 0
    kv = clean.clone()
    kv[1, 70], kv[1, 71], kv[1, 127] = NAN, INF, -INF               # nope tile 1 of token 1
    kv[3, 448], kv[3, 449], kv[3, 511] = NAN, INF, -INF             # rope of token 3: stored as it is
    pages = quantize_kv_cache_fp8(kv.to(device), 4, impl=impl)
    pages_clean = quantize_kv_cache_fp8(clean.to(device), 4, impl=impl)
    back = dequantize_kv_cache_fp8(pages, 5, 4, impl=impl).cpu()
    back_clean = dequantize_kv_cache_fp8(pages_clean, 5, 4, impl=impl).cpu()
    tile = torch.zeros(5, 512, dtype=torch.bool)
    tile[1, 64:128] = True
    rope_bad = torch.zeros(5, 512, dtype=torch.bool)
    rope_bad[3, [448, 449, 511]] = True
    assert back[tile].isnan().all()
    assert torch.equal(back[~tile & ~rope_bad], back_clean[~tile & ~rope_bad])
    assert back[3, 448].isnan() and back[3, 449] == INF and back[3, 511] == -INF
    # Bytes: token 1 sits in page 0, row 1; its tile 1 is e4m3fn NaN bytes and scale byte 255.
    page = pages.cpu()[0]
    assert (page[576 + 64:576 + 128] == 0x7F).all() and page[4 * 576 + 8 + 1] == 255


@pytest.mark.op("dequantize_kv_cache_fp8")
def test_dequantize_kv_cache_scale_byte_255_is_nan_for_its_tile(impl, device):
    clean = reference.quantize_kv_cache_fp8(torch.randn(6, 512).to(torch.bfloat16), 4)
    pages = clean.clone()
    pages[0, 4 * 576 + 2 * 8 + 3] = 255                             # token 2 (page 0, row 2), tile 3
    back = dequantize_kv_cache_fp8(pages.to(device), 6, 4, impl=impl).cpu()
    want = dequantize_kv_cache_fp8(clean.to(device), 6, 4, impl=impl).cpu()
    tile = torch.zeros(6, 512, dtype=torch.bool)
    tile[2, 192:256] = True
    assert back[tile].isnan().all() and torch.equal(back[~tile], want[~tile])


def test_kv_store_writes_only_in_range_slots_of_the_view():
    """Slots outside [0, P * bs) -- -1, other negatives that Python indexing would wrap, one past the end,
    far past it -- write nothing: every byte of a larger canary buffer around the cache view is unchanged
    except the bytes of the in-range slots, which hold exactly what storing only them gives."""
    bs, n_pages = 4, 3
    capacity = bs * n_pages
    kv = torch.randn(9, 512).to(torch.bfloat16)
    slots = torch.tensor([5, -1, -2, -capacity, -capacity - 1, capacity, capacity + 3, 1 << 40, 0])
    canary = torch.randint(0, 256, (n_pages + 2, bs * 584), dtype=torch.uint8)
    want = canary.clone()
    reference.store_kv_cache_fp8(want[1:-1], slots[[0, 8]], kv[[0, 8]], bs)
    before = canary.clone()
    reference.store_kv_cache_fp8(canary[1:-1], slots, kv, bs)
    assert torch.equal(canary, want)
    assert not torch.equal(canary, before)                                  # the two valid rows did land
    assert torch.equal(reference.gather_kv_cache_fp8(canary[1:-1], slots[[0, 8]], bs),
                       reference.dequantize_kv_cache_fp8(reference.quantize_kv_cache_fp8(kv[[0, 8]], bs), 2, bs))


def test_kv_gather_never_wraps_negative_or_past_the_end_slots():
    bs = 4
    pages = reference.quantize_kv_cache_fp8(torch.randn(12, 512).to(torch.bfloat16) + 3, bs)  # no zero rows
    out = reference.gather_kv_cache_fp8(pages, torch.tensor([-1, -2, -12, -13, 12, 1 << 40, 11]), bs)
    assert (out[:6] == 0).all() and (out[6] != 0).any()
