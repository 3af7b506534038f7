"""Lazy device detection: which backend a tensor (or this machine) runs on, its arch and FP8 encoding.

Nothing here runs at import time. Every probe is cached, and Ascend is looked for only through
torch_npu, and only when that package is installed: a broken or absent torch_npu never breaks
`import torch` or `import dsv4_kernels`.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger("dsv4_kernels")

BACKENDS = ("cpu", "cuda", "rocm", "ascend")
DEVICE_BACKENDS = ("cuda", "rocm", "ascend")

# FP8 byte encoding per ROCm arch; gfx942 (MI300X/MI325X) hardware uses the "fnuz" variant.
_ROCM_FP8 = {"gfx942": "e4m3fnuz", "gfx950": "e4m3fn"}


@dataclass(frozen=True)
class DeviceInfo:
    """What the dispatcher needs to know about one device.

    backend: "cpu", "cuda", "rocm" or "ascend". arch: "sm_90" / "gfx942" / "ascend910c" style, or
    "cpu". name: the device's marketing name where the runtime reports it. fp8_encoding: the OCP
    e4m3 variant the device's FP8 instructions use ("e4m3fn" or "e4m3fnuz").
    """

    backend: str
    arch: str
    name: str
    fp8_encoding: str = "e4m3fn"
    index: int | None = None

    @property
    def fp8_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fnuz if self.fp8_encoding == "e4m3fnuz" else torch.float8_e4m3fn


CPU = DeviceInfo(backend="cpu", arch="cpu", name="cpu")


def fp8_encoding_for_arch(arch: str) -> str:
    """e4m3fnuz for gfx942, e4m3fn for every other arch (CUDA, gfx950, Ascend, CPU)."""
    return _ROCM_FP8.get(arch.split(":")[0], "e4m3fn")


def is_rocm_build() -> bool:
    """True when this torch is a ROCm (HIP) build: its "cuda" device type is then an AMD GPU."""
    return getattr(torch.version, "hip", None) is not None


@functools.lru_cache(maxsize=None)
def _gpu_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    if is_rocm_build():
        arch = str(getattr(props, "gcnArchName", "")).split(":")[0] or "gfx-unknown"
        return DeviceInfo("rocm", arch, props.name, fp8_encoding_for_arch(arch), index)
    return DeviceInfo("cuda", f"sm_{props.major}{props.minor}", props.name, "e4m3fn", index)


@functools.lru_cache(maxsize=None)
def torch_npu_available() -> bool:
    """True when torch_npu imports and reports an NPU. Never raises; never imports it if absent."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    try:
        import torch_npu  # noqa: F401
        return bool(torch.npu.is_available())  # type: ignore[attr-defined]
    except Exception as exc:  # a CANN-less install raises on import: report, never propagate
        log.info("torch_npu is installed but unusable: %s", exc)
        return False


@functools.lru_cache(maxsize=None)
def _npu_info(index: int) -> DeviceInfo:
    name = str(torch.npu.get_device_name(index))  # type: ignore[attr-defined]
    arch = "ascend" + name.lower().replace("ascend", "").strip().replace(" ", "")
    return DeviceInfo("ascend", arch, name, "e4m3fn", index)


def device_info(device: torch.device | str | torch.Tensor | None = None) -> DeviceInfo:
    """DeviceInfo of a tensor, a device, or (None) the machine's first accelerator, else the CPU."""
    if device is None:
        return machine_device()
    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device)
    if device.type == "cpu":
        return CPU
    if device.type == "cuda":
        return _gpu_info(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "npu":
        return _npu_info(device.index or 0)
    raise ValueError(f"unsupported device type {device.type!r}; expected one of cpu, cuda (CUDA or ROCm), npu")


def backend_of(x: torch.Tensor | torch.device | str) -> str:
    """The backend name ("cpu", "cuda", "rocm", "ascend") a tensor or device runs on."""
    return device_info(x).backend


def tilelang_target(x: torch.Tensor | torch.device | str) -> str:
    """The tilelang.compile target kind of the GPU a tensor or device is on: "hip" on ROCm, else "cuda"."""
    return "hip" if backend_of(x) == "rocm" else "cuda"


@functools.lru_cache(maxsize=None)
def machine_device() -> DeviceInfo:
    """The first accelerator of this machine (CUDA or ROCm GPU, then Ascend NPU), else the CPU."""
    if torch.cuda.is_available():
        return _gpu_info(0)
    if torch_npu_available():
        return _npu_info(0)
    return CPU


def device_present(backend: str) -> str | None:
    """None when this machine has a device of `backend`; otherwise the reason it has none."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "cpu":
        return None
    found = machine_device().backend
    if found == backend:
        return None
    if backend in ("cuda", "rocm"):
        build = "ROCm" if is_rocm_build() else "CUDA" if torch.version.cuda else "CPU-only"
        if not torch.cuda.is_available():
            label = {"cuda": "CUDA", "rocm": "ROCm"}[backend]
            return f"no {label} device on this machine (torch {torch.__version__} is a {build} build; " \
                   f"torch.cuda.is_available() is False)"
        return f"this machine's GPU is {found}, not {backend}"
    if importlib.util.find_spec("torch_npu") is None:
        return "no Ascend NPU: torch_npu is not installed"
    return "no Ascend NPU: torch_npu does not report a usable device"
