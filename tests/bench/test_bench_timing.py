"""The timing statistics, the flush size and iteration count, the CPU timer; the roofline arithmetic."""
import time

import pytest
import torch

from dsv4_kernels import platform
from dsv4_kernels.backends import get_backend
from dsv4_kernels.bench import timing
from dsv4_kernels.bench.roofline import compute_peak, find_peak, match_peak, roofline

MiB = 1 << 20


def test_percentiles_by_hand():
    s = [5.0, 1.0, 4.0, 2.0, 3.0]            # sorted 1..5: rank (n - 1) q / 100
    assert timing.percentile(s, 50) == 3.0
    assert timing.percentile(s, 10) == pytest.approx(1.4)      # rank 0.4: 1 + 0.4 * (2 - 1)
    assert timing.percentile(s, 90) == pytest.approx(4.6)      # rank 3.6
    assert timing.percentile([2.0, 1.0, 4.0, 3.0], 50) == 2.5
    assert timing.percentile([7.0], 90) == 7.0
    stats = timing.summarize(s)
    assert (stats.median, stats.mean, stats.min, stats.max, stats.n) == (3.0, 3.0, 1.0, 5.0, 5)
    with pytest.raises(ValueError, match="percentile of no samples"):
        timing.percentile([], 50)
    with pytest.raises(ValueError, match="q: expected 0 <= q <= 100, got 101"):
        timing.percentile([1.0], 101)


def test_flush_covers_twice_the_cache_and_at_least_the_floor():
    assert timing.flush_bytes(50 * MiB, "cuda") == 256 * MiB        # H100: 2 x 50 MiB < the 256 MiB floor
    assert timing.flush_bytes(200 * MiB, "cuda") == 400 * MiB
    assert timing.flush_bytes(4 * MiB, "rocm") == 512 * MiB         # behind L2: MI300's 256 MiB Infinity Cache
    assert timing.flush_bytes(None, "ascend") == 256 * MiB
    assert timing.flush_bytes(32 * MiB, "cpu") == 64 * MiB
    with pytest.raises(ValueError, match="backend: expected one of cuda, rocm, ascend, cpu, got 'tpu'"):
        timing.flush_bytes(1, "tpu")


def test_iteration_count():
    s = timing.Settings(warmup_us=0, target_us=1000, min_iters=10, max_iters=100, max_time_us=5000)
    assert timing.choose_iterations(1, s) == 100           # 1000 wanted, capped
    assert timing.choose_iterations(50, s) == 20           # fills the 1000 us target
    assert timing.choose_iterations(200, s) == 10          # the minimum, 2000 us in all
    assert timing.choose_iterations(1000, s) == 5          # 10 would take 10000 us > 5000: 5 fit
    assert timing.choose_iterations(4000, s) == timing.MIN_SAMPLES   # never fewer than 3 samples
    assert timing.choose_iterations(0, s) == 100


def test_cpu_timer_measures_wall_clock():
    def sleep_2ms():
        time.sleep(0.002)
    device = torch.device("cpu")
    _, first_us = timing.first_call(sleep_2ms, device)
    settings = timing.Settings(warmup_us=0, target_us=10_000, min_iters=3, max_iters=6, max_time_us=1e6)
    t = timing.measure(sleep_2ms, device, settings, first_us)
    assert t.timer == "cpu-wall" and timing.timer_name(torch.device("cuda")) == "cuda-events"
    assert 3 <= t.stats.n <= 6 and t.warmup_us is None and t.warmup_calls == 0
    assert 2000 <= t.stats.p10 <= t.stats.median <= t.stats.p90
    assert first_us >= 2000 and t.flush_bytes >= 64 * MiB


def test_cpu_measurement_stops_at_max_time_when_calls_are_slower_than_estimated():
    settings = timing.Settings(warmup_us=0, target_us=1e6, min_iters=3, max_iters=50, max_time_us=8_000)
    t = timing.measure(lambda: time.sleep(0.002), torch.device("cpu"), settings, first_us=1.0)
    assert timing.MIN_SAMPLES <= t.stats.n <= 5          # 50 were planned from a 1 us estimate


def test_peak_matching_by_device_name():
    cuda, rocm = get_backend("cuda").peaks, get_backend("rocm").peaks
    assert match_peak("NVIDIA H100 80GB HBM3", cuda).chip == "H100"
    assert match_peak("NVIDIA H200", cuda).chip == "H200"
    assert match_peak("NVIDIA GB300", cuda).chip == "GB300"
    assert match_peak("AMD Instinct MI300X", rocm).chip == "MI300X"
    assert match_peak("Tesla V100-SXM2-16GB", cuda) is None
    assert find_peak(platform.CPU) is None
    assert find_peak(platform.DeviceInfo("cuda", "sm_90", "NVIDIA H100 80GB HBM3")).hbm_tbps == 3.35
    assert compute_peak(match_peak("H100", cuda), "fp4") is None       # no FP4 tensor cores on Hopper
    assert compute_peak(match_peak("H100", cuda), "none") is None


def test_roofline_by_hand():
    h100 = match_peak("NVIDIA H100", get_backend("cuda").peaks)
    # 3.35 MB at 3.35 TB/s is 1 us of traffic; taking 1000 us is 0.1% of the memory roofline.
    r = roofline(3_350_000, 0, 1000.0, h100, "none")
    assert r.gbps == pytest.approx(3.35) and r.bound == "memory" and r.pct_peak == pytest.approx(0.1)
    # 989.4 MFLOP at 989.4 TFLOP/s (bf16) is 1 us of math; in 2 us: 50% of the compute roofline.
    r = roofline(1000, 989_400_000, 2.0, h100, "bf16")
    assert r.bound == "compute" and r.pct_peak == pytest.approx(50.0) and r.tflops == pytest.approx(494.7)
    assert (r.peak_tbps, r.peak_tflops) == (3.35, 989.4)
    cpu = roofline(1000, 1000, 1.0, None, "bf16")
    assert cpu.gbps == pytest.approx(1.0) and cpu.pct_peak is None and cpu.bound is None
