"""The torch.library registration of the public ops, without its cost on the eager path.

Every public op is a `torch.library` custom op (`torch.ops.dsv4.<name>`, with a fake and its mutation
annotations), which is what torch.compile, export and FakeTensor tracing need. Going through the custom
op's dispatcher costs 15-25 us of host time per call, though, next to decode kernels of 5-20 us. So
`custom_op` below registers the op as usual and returns a callable that runs the function directly when
nothing traces (eager calls, CUDA-graph capture) and the registered op when something does
(torch.compile, or any TorchDispatchMode such as FakeTensorMode or make_fx). Both paths run the same
function body, so their results are the same.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["custom_op", "tracing"]


def tracing() -> bool:
    """True under torch.compile or an active TorchDispatchMode (FakeTensorMode, make_fx, functionalization)."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


class EagerFastOp:
    """A registered custom op (`.op`, the torch.library CustomOpDef) that skips the torch dispatcher when
    nothing traces. `register_fake` is the custom op's."""

    def __init__(self, fn: Callable, op) -> None:
        self._fn = fn
        self.op = op
        self.register_fake = op.register_fake
        self.__name__ = getattr(fn, "__name__", "op")
        self.__doc__ = fn.__doc__

    def __call__(self, *args):
        if tracing():
            return self.op(*args)
        return self._fn(*args)


def custom_op(name: str, mutates_args: Iterable[str] | str = ()) -> Callable[[Callable], EagerFastOp]:
    """torch.library.custom_op(name, mutates_args=...), returning an EagerFastOp."""
    def register(fn: Callable) -> EagerFastOp:
        return EagerFastOp(fn, torch.library.custom_op(name, mutates_args=mutates_args)(fn))
    return register
