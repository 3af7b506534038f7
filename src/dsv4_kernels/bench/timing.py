"""Timing of one callable: first call (JIT compile included) and warm-up apart from the measured
iterations, a cold L2 before every measured iteration, median and p10 / p90 spread.

GPU path (CUDA and ROCm "cuda" devices, Ascend "npu"): device events around each call, a buffer larger
than the last-level cache written between iterations. CPU path: time.perf_counter around each call,
the same flush sized from the CPU's last-level cache. Every result says which timer produced it.
Decode path (call_and_graph): back-to-back public-op calls against replays of a CUDA graph of the same
call, warm, and their difference as the host overhead per call.
The pure parts (statistics, flush size, iteration count) are separate functions, unit-tested.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

__all__ = ["Stats", "Settings", "Timing", "percentile", "summarize", "flush_bytes", "choose_iterations",
           "timer_name", "first_call", "measure", "GPU_SETTINGS", "CPU_SETTINGS", "MIN_SAMPLES", "CallTiming",
           "call_iterations", "call_and_graph"]

MiB = 1 << 20
# Smallest flush per backend: 256 MiB on CUDA (Triton's do_bench uses the same), 512 MiB on ROCm, whose
# MI300 parts put a 256 MiB Infinity Cache behind the L2 that torch reports; 64 MiB on CPUs.
FLUSH_FLOOR = {"cuda": 256 * MiB, "rocm": 512 * MiB, "ascend": 256 * MiB, "cpu": 64 * MiB}


@dataclass(frozen=True)
class Stats:
    """Microseconds over n samples."""

    median: float
    p10: float
    p90: float
    mean: float
    min: float
    max: float
    n: int


MIN_SAMPLES = 3


@dataclass(frozen=True)
class Settings:
    """warmup_us: warm-up calls (after the first call) run until this much time is spent (0: none).
    target_us: the measured iterations aim at this much time, within [min_iters, max_iters], but a slow
    call (a reference at prefill sizes) gets fewer iterations, never below MIN_SAMPLES, so that the
    measurement stays under max_time_us where it can."""

    warmup_us: float
    target_us: float
    min_iters: int
    max_iters: int
    max_time_us: float


GPU_SETTINGS = Settings(warmup_us=25_000, target_us=200_000, min_iters=10, max_iters=1000, max_time_us=5e6)
CPU_SETTINGS = Settings(warmup_us=0, target_us=150_000, min_iters=3, max_iters=30, max_time_us=1e6)


@dataclass(frozen=True)
class Timing:
    timer: str            # "cuda-events", "npu-events" or "cpu-wall"
    stats: Stats
    warmup_us: float | None   # median of the warm-up calls after the first call (None: no warm-up)
    warmup_calls: int
    flush_bytes: int


def percentile(samples: list[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"q: expected 0 <= q <= 100, got {q}")
    s = sorted(samples)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(samples: list[float]) -> Stats:
    return Stats(median=percentile(samples, 50), p10=percentile(samples, 10), p90=percentile(samples, 90),
                 mean=sum(samples) / len(samples), min=min(samples), max=max(samples), n=len(samples))


def flush_bytes(cache_bytes: int | None, backend: str) -> int:
    """Bytes to write between iterations so that nothing of the last call stays cached: twice the
    last-level cache, at least the backend's floor (FLUSH_FLOOR)."""
    if backend not in FLUSH_FLOOR:
        raise ValueError(f"backend: expected one of {', '.join(FLUSH_FLOOR)}, got {backend!r}")
    return max(2 * (cache_bytes or 0), FLUSH_FLOOR[backend])


def choose_iterations(estimate_us: float, settings: Settings) -> int:
    """Measured iterations: enough to fill target_us at the estimated time per call, clamped to
    [min_iters, max_iters]; if that exceeds max_time_us, as many as fit in it, at least MIN_SAMPLES."""
    if estimate_us <= 0:
        return settings.max_iters
    n = max(settings.min_iters, min(settings.max_iters, math.ceil(settings.target_us / estimate_us)))
    if n * estimate_us > settings.max_time_us:
        n = max(MIN_SAMPLES, math.floor(settings.max_time_us / estimate_us))
    return n


def timer_name(device: torch.device) -> str:
    return {"cuda": "cuda-events", "npu": "npu-events"}.get(device.type, "cpu-wall")


def _cpu_cache_bytes() -> int | None:
    """Size of the CPU's largest cache level from sysfs (Linux), else None."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        mult = {"K": 1 << 10, "M": MiB, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * mult)
    return max(sizes) if sizes else None


def _backend(device: torch.device) -> str:
    if device.type == "cuda":
        return "rocm" if getattr(torch.version, "hip", None) else "cuda"
    return "ascend" if device.type == "npu" else "cpu"


def _device_cache_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or None
    if device.type == "cpu":
        return _cpu_cache_bytes()
    return None


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def first_call(fn: Callable, device: torch.device):
    """(result, microseconds) of one call timed on the host to completion: JIT compilation included."""
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, (time.perf_counter() - start) * 1e6


def _host_timed(fn: Callable, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e6


def measure(fn: Callable, device: torch.device, settings: Settings | None = None,
            first_us: float | None = None) -> Timing:
    """Warm up, then time fn() over the chosen number of iterations with a cold cache before each.

    The iteration count comes from the warm-up median, or from first_us (the first call's time) when
    the settings ask for no warm-up (the CPU: its first call already ran the op once)."""
    if settings is None:
        settings = CPU_SETTINGS if device.type == "cpu" else GPU_SETTINGS
    nbytes = flush_bytes(_device_cache_bytes(device), _backend(device))
    flush = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
    warm: list[float] = []
    while sum(warm) < settings.warmup_us:
        warm.append(_host_timed(fn, device))
    estimate = percentile(warm, 50) if warm else (first_us or 0.0)
    iters = choose_iterations(estimate, settings)
    samples: list[float] = []
    if device.type == "cpu":
        for _ in range(iters):
            flush.fill_(len(samples))
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e6)
            if len(samples) >= MIN_SAMPLES and sum(samples) > settings.max_time_us:
                break       # slower than the estimate said (a loaded machine): stop at max_time_us
    else:
        module = getattr(torch, device.type)
        with module.device(device):
            starts = [module.Event(enable_timing=True) for _ in range(iters)]
            ends = [module.Event(enable_timing=True) for _ in range(iters)]
            for i in range(iters):
                flush.fill_(i)
                starts[i].record()
                fn()
                ends[i].record()
            _sync(device)
        samples = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    del flush
    return Timing(timer_name(device), summarize(samples), percentile(warm, 50) if warm else None, len(warm), nbytes)


@dataclass(frozen=True)
class CallTiming:
    """What an engine pays per call on the decode path, both timed back to back with a warm cache.

    call_us: one public-op call (validation, dispatch and launch included), the mean over `iters` calls
        issued back to back (device events around the loop on a GPU: a host slower than the kernels
        stretches the loop, so host overhead is included). graph_us: one replay of a CUDA graph that
        captured the same call, or None with graph_status saying why (no CUDA device, capture failed).
    host_overhead_us = call_us - graph_us: the host time per call that a CUDA graph removes.
    """

    timer: str
    call_us: float
    graph_us: float | None
    graph_status: str
    iters: int

    @property
    def host_overhead_us(self) -> float | None:
        return None if self.graph_us is None else self.call_us - self.graph_us


def _loop_us(fn: Callable, device: torch.device, iters: int) -> float:
    """Mean microseconds per call of `iters` back-to-back calls of fn."""
    if device.type == "cpu":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) * 1e6 / iters
    module = getattr(torch, device.type)
    with module.device(device):
        begin, end = module.Event(enable_timing=True), module.Event(enable_timing=True)
        begin.record()
        for _ in range(iters):
            fn()
        end.record()
        _sync(device)
    return begin.elapsed_time(end) * 1e3 / iters


def _graph_us(fn: Callable, device: torch.device, iters: int) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, f"skipped: CUDA graphs need a CUDA or ROCm device, not {device.type}"
    try:
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):      # warm-up off the capture stream, as torch's docs ask
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graph.replay()
            torch.cuda.synchronize(device)
            return _loop_us(graph.replay, device, iters), "measured"
    except Exception as exc:  # a call that cannot be captured is a finding, recorded with the reason
        try:
            torch.cuda.synchronize(device)
        except RuntimeError:
            pass  # the failed capture's own error is the one to report
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"capture failed: {type(exc).__name__}: {first}"


def call_iterations(estimate_us: float, budget_us: float = 50_000, lo: int = 5, hi: int = 200) -> int:
    """Back-to-back calls for call_and_graph: about budget_us of work, within [lo, hi]."""
    if estimate_us <= 0:
        return hi
    return max(lo, min(hi, math.ceil(budget_us / estimate_us)))


def call_and_graph(fn: Callable, device: torch.device, estimate_us: float) -> CallTiming:
    """The decode-path timing of one call (see CallTiming); fn has run before (compiled, warm)."""
    iters = call_iterations(estimate_us, budget_us=50_000 if device.type != "cpu" else 20_000,
                            lo=5 if device.type != "cpu" else 2)
    call_us = _loop_us(fn, device, iters)
    graph_us, status = _graph_us(fn, device, iters)
    return CallTiming(timer_name(device), call_us, graph_us, status, iters)
