"""The chip's peak (from the backend peak tables) and what a measured time achieves against it.

Roofline of one call with B bytes and F FLOPs on a chip of bandwidth BW and peak P for the case's
compute format: attainable time = max(B / BW, F / P). The bound that applies is the larger term
("memory" or "compute"); % of peak = attainable time / measured time. A case whose arithmetic runs on
vector units (compute "none"), or a chip without a peak for that format, is placed against the memory
roofline only. The CPU has no peak table: its % of peak and bound are not applicable (None).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from dsv4_kernels.backends import Peak, get_backend
from dsv4_kernels.platform import DeviceInfo

__all__ = ["match_peak", "find_peak", "compute_peak", "Roofline", "roofline"]


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def match_peak(device_name: str, peaks: tuple[Peak, ...]) -> Peak | None:
    """The peak-table entry whose chip name appears in the device name (case, spaces and punctuation
    ignored; the longest such name wins, so "GB300" beats "B300"), or None."""
    name = _squash(device_name)
    hits = [p for p in peaks if _squash(p.chip) and _squash(p.chip) in name]
    return max(hits, key=lambda p: len(_squash(p.chip))) if hits else None


def find_peak(device: DeviceInfo) -> Peak | None:
    """The peak entry of `device` by its name in its backend's table; None on the CPU or an unlisted chip."""
    if device.backend == "cpu":
        return None
    return match_peak(device.name, get_backend(device.backend).peaks)


def compute_peak(peak: Peak | None, compute: str) -> float | None:
    """TFLOP/s of the case's compute format on this chip, or None (vector-unit math, or no entry)."""
    if peak is None or compute == "none":
        return None
    return getattr(peak, f"{compute}_tflops")


@dataclass(frozen=True)
class Roofline:
    gbps: float | None
    tflops: float | None
    pct_peak: float | None
    bound: str | None
    peak_tbps: float | None
    peak_tflops: float | None


def roofline(nbytes: int, flops: int, us: float | None, peak: Peak | None, compute: str) -> Roofline:
    """Achieved GB/s and TFLOP/s of a call of `us` microseconds, and its % of the bound that applies."""
    if us is None or us <= 0:
        return Roofline(None, None, None, None, peak.hbm_tbps if peak else None, compute_peak(peak, compute))
    gbps = nbytes / us / 1e3
    tflops = flops / us / 1e6
    if peak is None:
        return Roofline(gbps, tflops, None, None, None, None)
    tf_peak = compute_peak(peak, compute)
    memory_us = nbytes / (peak.hbm_tbps * 1e6)
    compute_us = flops / (tf_peak * 1e6) if tf_peak else 0.0
    bound = "compute" if compute_us > memory_us else "memory"
    return Roofline(gbps, tflops, 100.0 * max(memory_us, compute_us) / us, bound, peak.hbm_tbps, tf_peak)
