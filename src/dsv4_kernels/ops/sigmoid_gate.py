"""sigmoid_gate(x, gate) = x * sigmoid(gate): the demo op that carries the machinery end to end
(validation, dispatch, torch.library op, Triton and TileLang kernels, codegen, the check ladder)."""
from __future__ import annotations

import torch

from dsv4_kernels import dispatch, toolchains
from dsv4_kernels.dispatch import Implementation
from dsv4_kernels.ladder import OpCheck, register_check
from dsv4_kernels.ops import _checks, _library
from dsv4_kernels.testing import assert_close

OP = "sigmoid_gate"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT32_LIMIT = 2**31 - 1


def validate(x, gate) -> None:
    _checks.tensor("x", x, DTYPES)
    _checks.tensor("gate", gate, x.dtype)
    _checks.shape("gate", gate, tuple(x.shape))
    _checks.same_device(x=x, gate=gate)


def _tilelang_supports(x, gate) -> str | None:
    if x.numel() > INT32_LIMIT:
        return f"the kernel indexes with int32: {x.numel()} elements exceed {INT32_LIMIT}"
    return None


dispatch.register(Implementation(
    OP, "reference", "reference", ("cpu", "cuda", "rocm", "ascend"),
    entry="dsv4_kernels.reference.sigmoid_gate:sigmoid_gate", priority=0))
dispatch.register(Implementation(
    OP, "triton", "triton", ("cpu", "cuda", "rocm"),
    entry="dsv4_kernels.kernels.sigmoid_gate.triton:sigmoid_gate", priority=20,
    available=toolchains.triton_available,
    codegen="dsv4_kernels.kernels.sigmoid_gate.triton:codegen",
    defaults={"BLOCK": 1024, "num_warps": 4}))
dispatch.register(Implementation(
    OP, "tilelang", "tilelang", ("cuda", "rocm"),
    entry="dsv4_kernels.kernels.sigmoid_gate.tilelang:sigmoid_gate", priority=10,
    available=toolchains.tilelang_available, supports=_tilelang_supports,
    codegen="dsv4_kernels.kernels.sigmoid_gate.tilelang:codegen",
    defaults={"BLOCK": 1024, "threads": 256}))
dispatch.register(Implementation(
    OP, "tilelang_ascend", "tilelang", ("ascend",),
    entry="dsv4_kernels.backends.ascend.kernels.sigmoid_gate:sigmoid_gate", priority=10,
    available=toolchains.tilelang_ascend_available,
    codegen="dsv4_kernels.backends.ascend.kernels.sigmoid_gate:codegen",
    defaults={"tile": 4096, "blocks": 32, "threads": 1024}))


@_library.custom_op("dsv4::sigmoid_gate", mutates_args=())
def _sigmoid_gate_op(x: torch.Tensor, gate: torch.Tensor, impl: str) -> torch.Tensor:
    return dispatch.call(OP, x, gate, impl=impl or None)


@_sigmoid_gate_op.register_fake
def _(x, gate, impl):
    return torch.empty_like(x)


def sigmoid_gate(x: torch.Tensor, gate: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """x * sigmoid(gate), elementwise, in fp32 with one rounding to x.dtype.

    x: any shape (zero elements allowed), bf16, fp16 or fp32, contiguous.
    gate: the same shape, dtype and device as x, contiguous.
    impl: run this implementation ("reference", "triton", "tilelang", "tilelang_ascend") or raise.
    Returns: a new tensor, x's shape and dtype. NaN propagates; sigmoid(-inf) = 0.
    Raises ValueError for a wrong dtype, shape, device or layout, before any launch.
    """
    known = _sigmoid_gate_op.known((x, gate), impl)
    if known is None:
        validate(x, gate)
    return _sigmoid_gate_op.run(known, (x, gate), impl, x, gate)


def _cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    cases = []
    for label, shape in (("flash-3x4096", (3, 4096)), ("pro-3x7168", (3, 7168)), ("odd-63x100", (63, 100)),
                         ("zero-tokens", (0, 4096))):
        x = torch.randn(shape, dtype=torch.bfloat16, device=device)
        g = torch.randn(shape, dtype=torch.bfloat16, device=device) * 4
        cases.append((label, (x, g), {}))
    return cases


def _compare(out: torch.Tensor, expected: torch.Tensor) -> None:
    # One bf16 rounding of the same fp32 value: within one bf16 ulp (2^-8 relative). The Triton
    # interpreter truncates fp32->bf16 instead of rounding, which also stays within one ulp.
    assert_close(out.float(), expected.float(), atol=1e-6, rtol=2**-7, what=OP)


def _oracle(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (x.double() / (1 + torch.exp(-gate.double()))).to(x.dtype)


register_check(OpCheck(OP, _cases, _compare, oracle=_oracle))
