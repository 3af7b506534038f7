"""The test harness itself: poisoned torch.empty, per-test seeds, device_assert, the all-skipped rule, the
bf16 rounding statistics of assert_bf16_close and the guard bands."""
import pytest
import torch
import triton
import triton.language as tl

from pathlib import Path

from dsv4_kernels import testing


def test_empty_is_poisoned():
    assert torch.empty(4).isnan().all()
    assert torch.empty_like(torch.zeros(3, dtype=torch.bfloat16)).isnan().all()
    assert (torch.empty(2, dtype=torch.int32) == -1515870811).all()
    assert (torch.empty(2, dtype=torch.uint8) == 0xA5).all()


def test_seed_comes_from_the_test_id(_seed):
    assert torch.initial_seed() == _seed


@pytest.mark.parametrize("variant", ["a", "b"])
def test_seeds_differ_between_tests(variant, _seed, request):
    request.config.cache_seeds = getattr(request.config, "cache_seeds", {})
    request.config.cache_seeds[variant] = _seed
    if len(request.config.cache_seeds) == 2:
        assert request.config.cache_seeds["a"] != request.config.cache_seeds["b"]


@triton.jit
def _positive_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=1.0)
    tl.device_assert(x > 0, "x must be positive")


def test_device_assert_fires_in_the_interpreter():
    _positive_kernel[(1,)](torch.ones(8), 8, BLOCK=8)
    with pytest.raises(BaseException, match="x must be positive"):
        _positive_kernel[(1,)](torch.tensor([1.0, -1.0]), 2, BLOCK=8)


def test_a_run_where_everything_skips_fails(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_only_skips="""
import pytest
def test_a():
    pytest.skip("nothing to do here")
""")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*all 1 tests were skipped*"])


def test_a_run_with_a_pass_and_a_skip_passes(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_mixed="""
import pytest
def test_a():
    pytest.skip("not here")
def test_b():
    assert True
""")
    assert pytester.runpytest_subprocess("-p", "no:cacheprovider").ret == 0


# assert_bf16_close's rounding statistics. Measured on the mHC kernel and op tests (Triton interpreter and
# reference, 2026-12): bit-exact fraction >= 0.9995 and |mean error| <= 0.0005 ulps on every output of 64
# or more counted elements. A truncating fp32->bf16 store gives about 0.5 and -0.5: the defaults (0.9 and
# 0.1 ulps) sit between with margin on both sides.

def _bf16_trunc(v: torch.Tensor) -> torch.Tensor:
    """Round toward zero: drop the low 16 bits of the fp32 pattern (the Triton interpreter's own cast)."""
    return (v.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _near(v: torch.Tensor) -> torch.Tensor:
    """v nudged by a few fp32 ulps: what another correct fp32 evaluation order gives."""
    return v * (1 + 2.0 ** -22 * torch.randn_like(v))


def test_bf16_close_accepts_round_to_nearest_from_a_nearby_fp32_value():
    v = torch.randn(64, 129)
    stats = testing.bf16_error_stats(_near(v).bfloat16(), v.bfloat16())
    assert stats["exact"] > 0.99 and abs(stats["mean_ulps"]) < 0.01, stats
    testing.assert_bf16_close(_near(v).bfloat16(), v.bfloat16())


def test_bf16_close_refuses_truncation_that_stays_inside_two_ulps():
    v = torch.randn(8, 256)
    testing.assert_bf16_close(_bf16_trunc(v), v.bfloat16(), min_exact=0, max_bias=float("inf"))  # the bound alone
    stats = testing.bf16_error_stats(_bf16_trunc(v), v.bfloat16())
    assert 0.4 < stats["exact"] < 0.6 and -0.6 < stats["toward_zero_ulps"] < -0.4, stats
    with pytest.raises(AssertionError, match=r"y: only 0\.[45]\d* of the elements are bit-identical.*truncating"):
        testing.assert_bf16_close(_bf16_trunc(v), v.bfloat16(), what="y")
    with pytest.raises(AssertionError, match="mean error toward zero -0.[45]"):
        testing.assert_bf16_close(_bf16_trunc(v), v.bfloat16(), min_exact=0.3)


def test_bf16_close_refuses_a_bias_of_rare_two_ulp_errors():
    # 8 % of the elements two ulps up: 0.92 bit-exact passes min_exact, a mean of +0.16 ulps does not
    e = (1 + torch.rand(1000)).bfloat16()  # all of one sign and scale: every element counted
    a = e.float().clone()
    a[:80] += 2 * testing.bf16_ulp(e[:80])
    with pytest.raises(AssertionError, match=r"mean signed error \+0\.1[56]\d bf16 ulps exceeds 0.1"):
        testing.assert_bf16_close(a.bfloat16(), e)
    testing.assert_bf16_close(a.bfloat16(), e, max_bias=0.2)


def test_bf16_statistics_skip_small_tensors_and_cancelled_elements():
    v = torch.randn(40)
    testing.assert_bf16_close(_bf16_trunc(v), v.bfloat16())  # 40 < min_count: the 2-ulp bound only
    with pytest.raises(AssertionError, match="bit-identical"):
        testing.assert_bf16_close(_bf16_trunc(v), v.bfloat16(), min_count=16)
    # elements below floor * max|e| / ulps (cancellation territory) are not counted
    e = torch.cat([torch.tensor([1000.0]), torch.full((100,), 1e-3)]).bfloat16()
    assert testing.bf16_error_stats(e, e)["count"] == 1


# Guard bands: buffers with canary bytes before and after.

def test_guard_bands_hand_out_poisoned_views_and_pass_when_untouched():
    with testing.guard_bands() as bands:
        a = torch.empty(3, 5)
        b = torch.empty_like(torch.zeros(7, dtype=torch.int32))
        a.fill_(1.0)
        b.zero_()
        assert torch.empty((2, 2), dtype=torch.bfloat16).isnan().all()
    assert [tuple(x.view.shape) for x in bands.buffers] == [(3, 5), (7,), (2, 2)]
    assert a.untyped_storage().nbytes() > a.numel() * 4
    assert a.data_ptr() % 256 == bands.buffers[0].flat.data_ptr() % 256  # alignment kept
    assert torch.empty(3).untyped_storage().nbytes() == 12  # restored on exit


def test_guard_bands_name_the_buffer_and_the_first_overwritten_offset():
    with pytest.raises(AssertionError, match=r"after the torch.empty buffer of shape \(3, 5\) torch.float32 was "
                                             r"overwritten: first changed element at offset 16 \(valid offsets 0\.\.14\)"):
        with testing.guard_bands():
            a = torch.empty(3, 5)
            a.as_strided((17,), (1,))[16] = 0.0  # the second element after the end
    with pytest.raises(AssertionError, match=r"before the torch.empty_like buffer of shape \(4,\) torch.bfloat16.*"
                                             r"offset -2 \(valid offsets 0\.\.3\)"):
        with testing.guard_bands():
            b = torch.empty_like(torch.zeros(4, dtype=torch.bfloat16))
            b.as_strided((1,), (1,), b.storage_offset() - 2).fill_(1.0)


def test_guard_bands_do_not_check_when_the_block_raises_and_skip_strided_layouts():
    with pytest.raises(KeyError):
        with testing.guard_bands():
            a = torch.empty(4)
            a.as_strided((5,), (1,))[4] = 0.0
            raise KeyError("the test's own failure comes first")
    assert torch.empty(3).untyped_storage().nbytes() == 12
    with testing.guard_bands() as bands:
        t = torch.empty_like(torch.zeros(4, 6).t())  # layout preserved: returned as torch made it
        assert t.stride() == (1, 6) and t.isnan().all()
    assert not bands.buffers


@triton.jit
def _store_rows_kernel(out_ptr, T, D: tl.constexpr, OFF_BY_ONE: tl.constexpr):
    t = tl.arange(0, 8)
    d = tl.arange(0, D)
    mask_t = (t <= T) if OFF_BY_ONE else (t < T)
    tl.store(out_ptr + t[:, None] * D + d[None, :], 1.0, mask=mask_t[:, None])


def test_guard_bands_catch_a_kernel_store_one_row_past_the_end():
    with testing.guard_bands():
        out = torch.empty(3, 16)
        _store_rows_kernel[(1,)](out, 3, D=16, OFF_BY_ONE=False)
    assert (out == 1).all()
    with pytest.raises(AssertionError, match=r"shape \(3, 16\).*first changed element at offset 48 \(valid"):
        with testing.guard_bands():
            _store_rows_kernel[(1,)](torch.empty(3, 16), 3, D=16, OFF_BY_ONE=True)


@pytest.mark.guard_bands
def test_the_guard_bands_marker_guards_the_test_body():
    assert torch.empty(4).untyped_storage().nbytes() > 16
