"""dsv4-kernels: the DeepSeek-V4 operators for CUDA, ROCm and Ascend, one kernel source per operator.

Every public op validates its arguments (ValueError naming the expected and the actual value), then the
dispatcher picks an implementation; `explain(op, *args)` says which one and why. Importing this package
touches no device and imports neither triton nor tilelang.
"""
from dsv4_kernels import dispatch, platform
from dsv4_kernels.dispatch import FallbackError, ImplementationUnavailable, explain
from dsv4_kernels.ops.sigmoid_gate import sigmoid_gate

__version__ = "0.1.0"

__all__ = [
    "sigmoid_gate",
    "explain",
    "dispatch",
    "platform",
    "FallbackError",
    "ImplementationUnavailable",
]
