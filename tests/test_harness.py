"""The test harness itself: poisoned torch.empty, per-test seeds, device_assert, the all-skipped rule."""
import pytest
import torch
import triton
import triton.language as tl

from pathlib import Path


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
