"""The machine step: versions, the device, its clocks, and the two ceilings measured on it.

Ceilings (METHOD: measure them, the datasheet is a lead): the device-to-device copy bandwidth, counting
bytes read plus bytes written, and the bf16 matrix rate of torch.matmul on random data (never zeros).
The benchmark step places its results against these instead of the datasheet's.
"""
from __future__ import annotations

import platform as _pyplatform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from dsv4_kernels import platform, toolchains
from dsv4_kernels.bench import records
from dsv4_kernels.bench.roofline import find_peak

__all__ = ["versions", "device_facts", "clocks", "measure_copy_tbps", "measure_bf16_tflops", "run"]

SMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
              "power.draw", "temperature.gpu")


def _package_dir() -> str:
    import dsv4_kernels
    return str(Path(dsv4_kernels.__file__).parent)


def versions(info: platform.DeviceInfo) -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "torch_hip": getattr(torch.version, "hip", None), "triton": toolchains.version("triton"),
            "tilelang": toolchains.version("tilelang"), "apache-tvm-ffi": toolchains.version("apache-tvm-ffi"),
            "dsv4_kernels": toolchains.version("dsv4-kernels"), "dsv4_kernels_from": _package_dir(),
            "commit": records.git_commit(),
            "driver": records._driver(info), "host": f"{_pyplatform.node()} {_pyplatform.machine()}"}


def device_facts(device: torch.device, info: platform.DeviceInfo) -> dict:
    facts = {"backend": info.backend, "arch": info.arch, "name": info.name, "fp8_encoding": info.fp8_encoding}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        facts.update(multiprocessors=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                     l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    return facts


def clocks() -> dict:
    """nvidia-smi's view of the GPU (clocks in MHz), or why there is none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"status": "nvidia-smi not found"}
    try:
        out = subprocess.run([smi, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"status": f"nvidia-smi failed: {exc}"}
    if out.returncode != 0 or not out.stdout.strip():
        return {"status": f"nvidia-smi failed (exit {out.returncode}): {out.stderr.strip()[:200]}"}
    values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    return {"status": "read", **dict(zip(SMI_FIELDS, values))}


def _events_ms(fn, device: torch.device, iters: int, warmup: int = 3) -> float:
    """Mean milliseconds of fn over iters calls after warm-up (device events; perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cpu":
        import time
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) * 1e3 / iters
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / iters


def measure_copy_tbps(device: torch.device, nbytes: int, iters: int = 10) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _events_ms(lambda: dst.copy_(src), device, iters)
    return 2 * nbytes / (ms * 1e-3) / 1e12


def measure_bf16_tflops(device: torch.device, n: int, iters: int = 10) -> float:
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    ms = _events_ms(lambda: torch.matmul(a, b), device, iters)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def run(device: torch.device, dry_run: bool) -> dict:
    info = platform.device_info(device)
    before = clocks()
    copy_bytes, n = (64 << 20, 512) if dry_run or device.type == "cpu" else (2 << 30, 8192)
    measured = {"copy_tbps": measure_copy_tbps(device, copy_bytes), "bf16_tflops": measure_bf16_tflops(device, n),
                "copy_bytes": copy_bytes, "matmul_n": n}
    peak = find_peak(info)
    datasheet = ({"chip": peak.chip, "hbm_tbps": peak.hbm_tbps, "bf16_tflops": peak.bf16_tflops,
                  "fp8_tflops": peak.fp8_tflops, "fp4_tflops": peak.fp4_tflops, "source": peak.source}
                 if peak else None)
    return {"versions": versions(info), "device": device_facts(device, info), "clocks_before": before,
            "clocks_after": clocks(), "measured": measured, "datasheet": datasheet}
