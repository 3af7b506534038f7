"""Vendor backends: what is specific to one vendor, importable as `dsv4_kernels.backends.<name>`.

Each backend package defines `BACKEND`, a `Backend` naming its codegen targets, the peak table of the
chips users run (for rooflines) and the folder of tuned configs (one JSON per arch). Nothing here
touches a device at import time.
"""
from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Backend", "Target", "Peak", "get_backend", "all_backends", "all_targets", "find_target", "BACKEND_NAMES"]

BACKEND_NAMES = ("cuda", "rocm", "ascend")


@dataclass(frozen=True)
class Target:
    """One compile target of a backend.

    name: the user-facing name (`dsv4k codegen --target NAME`). triton: (backend, arch, warp_size) for
    triton's GPUTarget, or None when Triton has no such target here. tilelang: the TileLang target
    dict, or None. tilelang_dialect: "gpu" (tilelang.language) or "ascend" (tilelang.ascend.language):
    kernels of one dialect do not compile for the other.
    """

    name: str
    backend: str
    triton: tuple | None
    tilelang: dict | None
    tilelang_dialect: str = "gpu"


@dataclass(frozen=True)
class Peak:
    """Dense (no sparsity) datasheet peaks of one chip. None: the format has no tensor-core path, or
    the vendor publishes no number. `source` says where each number comes from. fp32_tflops: plain
    fp32 FMA on the vector units / CUDA cores (not tensor cores, not TF32), the ceiling of kernels that
    multiply in fp32 (the mHC decode projection); None where not checked against a datasheet."""

    chip: str
    arch: str
    bf16_tflops: float | None
    fp8_tflops: float | None
    fp4_tflops: float | None
    hbm_tbps: float
    source: str
    fp32_tflops: float | None = None


@dataclass(frozen=True)
class Backend:
    name: str
    targets: tuple[Target, ...]
    peaks: tuple[Peak, ...]
    package: str = field(default="")

    @property
    def tuned_dir(self) -> Path:
        return Path(importlib.import_module(self.package).__file__).parent / "tuned"

    def device_present(self) -> str | None:
        """None when this machine has this backend's device, else the reason it has none."""
        from dsv4_kernels.platform import device_present
        return device_present(self.name)

    def target(self, name: str) -> Target:
        for t in self.targets:
            if t.name == name:
                return t
        raise ValueError(f"backend {self.name} has no target {name!r}; expected one of "
                         f"{', '.join(t.name for t in self.targets)}")

    def peak(self, arch_or_chip: str) -> Peak | None:
        key = arch_or_chip.lower()
        for p in self.peaks:
            if key in (p.arch.lower(), p.chip.lower()):
                return p
        return None

    def tuned(self, arch: str) -> dict:
        """The tuned table for `arch` (empty when none is recorded): {"dispatch": {op: impl},
        "configs": {"op/impl": {param: value}}}."""
        return _load_tuned(str(self.tuned_dir / f"{arch}.json"))


@functools.lru_cache(maxsize=None)
def _load_tuned(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        return {}
    data = json.loads(p.read_text())
    unknown = set(data) - {"dispatch", "configs", "comment"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected dispatch, configs, comment")
    return data


def get_backend(name: str) -> Backend:
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")
    return importlib.import_module(f"dsv4_kernels.backends.{name}").BACKEND


def all_backends() -> tuple[Backend, ...]:
    return tuple(get_backend(n) for n in BACKEND_NAMES)


def all_targets() -> tuple[Target, ...]:
    return tuple(t for b in all_backends() for t in b.targets)


def find_target(name: str) -> Target:
    for t in all_targets():
        if t.name == name:
            return t
    raise ValueError(f"unknown target {name!r}; expected one of {', '.join(t.name for t in all_targets())}")
