"""Device detection: lazy, cached, never breaking imports; ROCm FP8 encoding per arch."""
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from dsv4_kernels import platform


def test_cpu_tensor():
    info = platform.device_info(torch.zeros(1))
    assert info == platform.CPU and info.fp8_dtype == torch.float8_e4m3fn
    assert platform.backend_of(torch.zeros(1)) == "cpu"


@pytest.mark.parametrize("arch, encoding, dtype", [
    ("gfx942", "e4m3fnuz", torch.float8_e4m3fnuz),
    ("gfx942:sramecc+:xnack-", "e4m3fnuz", torch.float8_e4m3fnuz),
    ("gfx950", "e4m3fn", torch.float8_e4m3fn),
    ("sm_90", "e4m3fn", torch.float8_e4m3fn),
    ("ascend950", "e4m3fn", torch.float8_e4m3fn),
])
def test_fp8_encoding(arch, encoding, dtype):
    assert platform.fp8_encoding_for_arch(arch) == encoding
    assert platform.DeviceInfo("x", arch, "x", encoding).fp8_dtype == dtype


def _fake_gpu(monkeypatch, hip, props):
    platform._gpu_info.cache_clear()
    monkeypatch.setattr(torch.version, "hip", hip, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_rocm_gpu_is_detected_with_its_fp8_encoding(monkeypatch):
    _fake_gpu(monkeypatch, "6.4", SimpleNamespace(name="AMD Instinct MI300X", gcnArchName="gfx942:sramecc+:xnack-"))
    try:
        info = platform.device_info("cuda:0")
        assert (info.backend, info.arch, info.fp8_encoding) == ("rocm", "gfx942", "e4m3fnuz")
        assert platform.tilelang_target("cuda:0") == "hip"
    finally:
        platform._gpu_info.cache_clear()


def test_cuda_gpu_is_detected(monkeypatch):
    _fake_gpu(monkeypatch, None, SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0))
    try:
        info = platform.device_info(torch.device("cuda"))
        assert (info.backend, info.arch, info.fp8_encoding) == ("cuda", "sm_90", "e4m3fn")
        assert platform.tilelang_target(torch.device("cuda")) == "cuda"
    finally:
        platform._gpu_info.cache_clear()


def test_unknown_device_type():
    with pytest.raises(ValueError, match="unsupported device type 'meta'"):
        platform.device_info("meta")


def test_absent_devices_say_why():
    assert platform.device_present("cpu") is None
    if not torch.cuda.is_available():
        assert "no CUDA device on this machine" in platform.device_present("cuda")
        assert "no ROCm device on this machine" in platform.device_present("rocm")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        platform.device_present("tpu")


def test_broken_torch_npu_is_reported_not_raised(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torch_npu" else real(name, *a))
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # "import torch_npu" now raises ImportError
    platform.torch_npu_available.cache_clear()
    try:
        assert platform.torch_npu_available() is False
    finally:
        platform.torch_npu_available.cache_clear()


def test_import_touches_no_toolchain_and_no_device():
    code = ("import sys, dsv4_kernels; "
            "print(sorted(m for m in ('triton', 'tilelang', 'torch_npu') if m in sys.modules)); "
            "print(dsv4_kernels.platform.machine_device.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "0"
