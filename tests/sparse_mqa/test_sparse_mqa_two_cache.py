"""sparse_mqa_fp8's two-cache form (SPEC 1.3) and padded pages (SPEC 1.2): one softmax over both lists,
as one concatenated pool would give; FlashMLA-padded pages and strided or float8 views read in place."""
from __future__ import annotations

import pytest
import torch

from dsv4_kernels import dispatch
from dsv4_kernels.ops import sparse_mqa as ops
from dsv4_kernels.reference.formats import quantize_kv_cache_fp8
from dsv4_kernels.reference.sparse_mqa import sparse_mqa_fp8 as reference_fp8

D = 512
INF = float("inf")
BS = 16


def _list(gen, T, K, N):
    return torch.randint(-3, N + 3, (T, K), generator=gen, dtype=torch.int32)


def two_cache_inputs(T=3, H=16, N1=40, N2=70, K1=20, K2=37, seed=14):
    """q, kv ~ N(0, 1) (logits of order 1); both lists hold -1, negatives, out-of-range entries and
    duplicates; both have a topk_length (row 2: none of list 1, row 1: none of list 2)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, D, generator=gen).to(torch.bfloat16)
    c1 = quantize_kv_cache_fp8(torch.randn(N1, D, generator=gen).to(torch.bfloat16), BS)
    c2 = quantize_kv_cache_fp8(torch.randn(N2, D, generator=gen).to(torch.bfloat16), BS)
    i1, i2 = _list(gen, T, K1, c1.shape[0] * BS), _list(gen, T, K2, c2.shape[0] * BS)
    i1[0, 1] = i1[0, 0]
    i2[0, 3] = i2[0, 2]
    l1 = torch.tensor([K1, 7, 0][:T], dtype=torch.int32)
    l2 = torch.tensor([K2 + 5, 0, 30][:T], dtype=torch.int32)
    sink = torch.randn(H, generator=gen)
    sink[0] = -INF
    return q, c1, i1, sink, l1, c2, i2, l2


def concatenated(c1, i1, l1, c2, i2, l2):
    """The same computation as one pool: cache 2's pages after cache 1's, list 2 renumbered past cache 1's
    slots; entries that are invalid or past their list's length become -1 (so none turns valid)."""
    def used(idx, length, slots, offset):
        keep = (idx >= 0) & (idx < slots) & (torch.arange(idx.shape[1])[None, :] < length[:, None])
        return torch.where(keep, idx + offset, -1)
    s1, s2 = c1.shape[0] * BS, c2.shape[0] * BS
    indices = torch.cat((used(i1, l1, s1, 0), used(i2, l2, s2, s1)), dim=1).to(torch.int32).contiguous()
    return torch.cat((c1, c2)), indices


def _dev(device, *xs):
    return ops._to(device, *xs)


def check(impl, out, lse, expected):
    if impl == "reference":
        assert torch.equal(out.cpu(), expected[0]) and torch.equal(lse.cpu(), expected[1])
    else:
        ops.compare(out.cpu(), expected[0])
        ops.compare(lse.cpu(), expected[1])


@pytest.mark.op("sparse_mqa_fp8")
def test_two_caches_equal_one_concatenated_pool(impl, device):
    q, c1, i1, sink, l1, c2, i2, l2 = two_cache_inputs()
    pool, indices = concatenated(c1, i1, l1, c2, i2, l2)
    expected = reference_fp8(q, pool, indices, sink, None, None, BS)
    q_, c1_, i1_, sink_, l1_, c2_, i2_, l2_ = _dev(device, q, c1, i1, sink, l1, c2, i2, l2)
    out, lse = ops.sparse_mqa_fp8(q_, c1_, i1_, sink_, None, l1_, BS, c2_, i2_, l2_, impl=impl)
    check(impl, out, lse, expected)
    # one softmax over both lists: the joint lse is the log-sum-exp of the two lists' own lse
    lse1 = ops.sparse_mqa_fp8(q_, c1_, i1_, sink_, None, l1_, BS, impl=impl)[1].cpu()
    lse2 = ops.sparse_mqa_fp8(q_, c2_, i2_, sink_, None, l2_, BS, impl=impl)[1].cpu()
    finite = torch.where(lse1.isinf(), -INF, lse1), torch.where(lse2.isinf(), -INF, lse2)
    assert torch.allclose(lse.cpu(), torch.logaddexp(*finite), atol=2e-5, rtol=1e-5)   # row 2: list 2 only


@pytest.mark.op("sparse_mqa_fp8")
def test_two_cache_empty_rows_and_empty_lists(impl, device):
    q, c1, i1, sink, l1, c2, i2, l2 = two_cache_inputs()
    sink[:] = 4.0                                                 # a sink does not make an empty row non-zero
    l1 = torch.tensor([0, 0, 5], dtype=torch.int32)
    i2[0] = -1
    i2[1] = torch.arange(i2.shape[1]) + c2.shape[0] * BS         # all past the second cache
    args = _dev(device, q, c1, i1, sink, None, l1, BS, c2, i2, l2)
    out, lse = ops.sparse_mqa_fp8(*args, impl=impl)
    out, lse = out.cpu(), lse.cpu()
    for t in (0, 1):
        assert torch.all(out[t] == 0) and torch.all(lse[t] == INF), t
    assert torch.isfinite(lse[2]).all()
    pool, indices = concatenated(c1, i1, l1, c2, i2, l2)
    check(impl, out, lse, reference_fp8(q, pool, indices, sink, None, None, BS))
    no_extra = i2[:, :0].contiguous()                             # K2 = 0: the first list alone
    out0, lse0 = ops.sparse_mqa_fp8(*_dev(device, q, c1, i1, sink, None, l1, BS, c2, no_extra), impl=impl)
    check(impl, out0, lse0, reference_fp8(q, c1, i1, sink, None, l1, BS))


@pytest.mark.op("sparse_mqa_fp8")
@pytest.mark.parametrize("form", ["wide-pages", "slice-view", "fp8-view", "fp8-slice-view"])
def test_padded_pages_are_read_in_place(impl, device, form):
    """FlashMLA's 37440-byte pages (block 64) as [P, 37440], as the [P, 37376] view of them, and as
    float8_e4m3fn views: the same bits as the packed cache; the padding (0xA5 bytes) is never read."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 24, D, generator=gen).to(torch.bfloat16)
    cache = quantize_kv_cache_fp8(torch.randn(150, D, generator=gen).to(torch.bfloat16), 64)
    indices = torch.randint(-2, 3 * 64 + 2, (2, 45), generator=gen, dtype=torch.int32)
    sink = torch.randn(24, generator=gen)
    padded = ops.padded_pages(cache.to(device), slice_view="slice" in form, fp8_view="fp8" in form)
    assert padded.stride(0) == ops.FLASHMLA_PAGE_BYTES
    rest = _dev(device, indices, sink)
    out, lse = ops.sparse_mqa_fp8(q.to(device), padded, rest[0], rest[1], impl=impl)
    want = ops.sparse_mqa_fp8(q.to(device), cache.to(device), rest[0], rest[1], impl=impl)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    if impl == "reference":
        return
    check("triton", out, lse, reference_fp8(q, cache, indices, sink))


def base():
    q, c1, i1, sink, l1, c2, i2, l2 = two_cache_inputs()
    return {"q": q, "kv_cache": c1, "indices": i1, "attn_sink": sink, "topk_length": l1, "block_size": BS,
            "extra_kv_cache": c2, "extra_indices": i2, "extra_topk_length": l2}


EXTRA_RULES = [
    ("extra_indices", lambda a: None, "extra_indices: expected an int32 tensor [T, K2] of indices into extra_kv_cache "
                                      "when extra_kv_cache is given (SPEC 1.3), got None"),
    ("extra_kv_cache", lambda a: None, "extra_indices: expected None when extra_kv_cache is None"),
    ("extra_indices", lambda a: a["extra_indices"].long(), "extra_indices: expected dtype torch.int32, got torch.int64"),
    ("extra_indices", lambda a: a["extra_indices"][:2].contiguous(), "extra_indices: expected shape (3, *), got (2, 37)"),
    ("extra_indices", lambda a: a["extra_indices"][:, ::2], "extra_indices: expected a contiguous tensor"),
    ("extra_topk_length", lambda a: a["extra_topk_length"][:2].contiguous(),
     "extra_topk_length: expected shape (3,), got (2,)"),
    ("extra_topk_length", lambda a: a["extra_topk_length"].long(),
     "extra_topk_length: expected dtype torch.int32, got torch.int64"),
    ("extra_kv_cache", lambda a: a["extra_kv_cache"][:, :100],
     "extra_kv_cache: expected shape (*, >= 9344) (pages of at least block_size 16 * 584 bytes), got (5, 100)"),
    ("extra_kv_cache", lambda a: a["extra_kv_cache"].view(torch.int8),
     "extra_kv_cache: expected dtype torch.uint8 or torch.float8_e4m3fn, got torch.int8"),
    ("extra_kv_cache", lambda a: a["extra_kv_cache"].to("meta"),
     "extra_kv_cache: expected device cpu (the device of q), got meta"),
    ("extra_indices", lambda a: a["extra_indices"].to("meta"),
     "extra_indices: expected device cpu (the device of q), got meta"),
]


@pytest.mark.parametrize("name, bad, message", EXTRA_RULES, ids=[m[:60] for _, _, m in EXTRA_RULES])
def test_bad_extra_arguments_are_refused_before_launch(name, bad, message):
    args = base()
    args[name] = bad(args)
    if name == "extra_kv_cache" and args[name] is None:
        args["extra_topk_length"] = None          # extra_indices alone
    with dispatch.recording() as calls, pytest.raises(ValueError) as err:
        ops.sparse_mqa_fp8(**args)
    assert message in str(err.value) and not calls


def test_extra_topk_length_without_extra_cache_is_refused():
    args = {**base(), "extra_kv_cache": None, "extra_indices": None}
    with pytest.raises(ValueError, match="extra_topk_length: expected None when extra_kv_cache is None"):
        ops.sparse_mqa_fp8(**args)


@pytest.mark.parametrize("change, message", [
    (lambda a: {"extra_indices": torch.where(torch.arange(37) == 4, 80, a["extra_indices"].clamp(-1, 79))},
     "extra_indices: expected values in [0, 80) (slots of extra_kv_cache, 5 pages * block_size 16) or -1, "
     "got 80 at position (0, 4)"),
    (lambda a: {"extra_topk_length": torch.tensor([37, 38, 0], dtype=torch.int32)},
     "extra_topk_length: expected values in [0, 38) (entries used of the K = 37 of extra_indices), got 38 at "
     "position (1,)"),
], ids=["index", "length"])
def test_checked_mode_covers_the_second_list(monkeypatch, change, message):
    args = base()
    args["indices"] = args["indices"].clamp(-1, 47)
    args["extra_indices"] = args["extra_indices"].clamp(-1, 79)
    args["extra_topk_length"] = args["extra_topk_length"].clamp(0, 37)
    monkeypatch.setenv("DSV4K_CHECK", "1")
    ops.sparse_mqa_fp8(**args)
    with dispatch.recording() as calls, pytest.raises(ValueError) as err:
        ops.sparse_mqa_fp8(**{**args, **change(args)})
    assert message in str(err.value) and not calls
