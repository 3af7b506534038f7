"""Which kernel toolchains this environment has, probed lazily and cached.

The `*_available(backend)` functions are the `available` hooks of registered implementations: each
returns None when that language can run kernels on `backend` here, else the reason it cannot.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os


def interpreter_active() -> bool:
    """True when Triton kernels are (re)defined in interpreter mode: TRITON_INTERPRET=1 before they are imported."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.lru_cache(maxsize=None)
def version(dist: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def triton_available(backend: str) -> str | None:
    if not importable("triton"):
        return "triton is not installed (pip install 'dsv4-kernels[cuda]' or '[rocm]')"
    if backend == "cpu" and not interpreter_active():
        return "Triton runs on the CPU only through its interpreter (set TRITON_INTERPRET=1 before import)"
    if backend == "ascend":
        return "Triton for Ascend needs triton-ascend and CANN, not supported in this build"
    return None


def tilelang_available(backend: str) -> str | None:
    """GPU-dialect TileLang kernels: CUDA and ROCm devices only (the CPU gets codegen only)."""
    if not importable("tilelang"):
        return "tilelang is not installed (pip install 'dsv4-kernels[cuda]' or '[rocm]')"
    if backend == "cpu":
        return "TileLang GPU kernels do not run on the CPU (verified here by codegen only)"
    if backend == "ascend":
        return "GPU-dialect TileLang kernels do not compile for Ascend; the Ascend-dialect variant serves it"
    return None


def tilelang_ascend_available(backend: str) -> str | None:
    """Ascend-dialect TileLang kernels: an Ascend NPU with CANN's bisheng compiler."""
    if not importable("tilelang"):
        return "tilelang is not installed (pip install 'dsv4-kernels[ascend]')"
    if backend != "ascend":
        return f"Ascend-dialect kernels run only on Ascend NPUs, not {backend}"
    if not os.environ.get("ASCEND_HOME_PATH"):
        return "CANN is not set up (ASCEND_HOME_PATH is unset): bisheng cannot build Ascend kernels"
    return None
