"""The torch.library registration of the public ops, without its cost on the eager path.

Every public op is a `torch.library` custom op (`torch.ops.dsv4.<name>`, with a fake and its mutation
annotations), which is what torch.compile, export and FakeTensor tracing need. Going through the custom
op's dispatcher costs 15-25 us of host time per call, though, next to decode kernels of 5-20 us. So
`custom_op` below registers the op as usual and returns a callable that runs the function directly when
nothing traces (eager calls, CUDA-graph capture) and the registered op when something does
(torch.compile, or any TorchDispatchMode such as FakeTensorMode or make_fx). Both paths run the same
function body, so their results are the same.

The public function in front of it checks its arguments, which costs more than the rest of the call for
ops with many arguments. `known` and `run` skip that too for a call whose call class (every argument's
shape, strides, dtype, device, alignment or scalar value; see dispatch.checked) passed the checks
before, and go straight to the implementation chosen for it:

    args = (x, w)
    known = _my_op.known(args, impl)
    if known is None:                 # first call of this class, checked mode, or tracing
        validate(*args)
    return _my_op.run(known, args, impl, x, float(w))   # the custom op's arguments, without impl
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from dsv4_kernels import dispatch
from dsv4_kernels.ops import _checks, _values

__all__ = ["custom_op", "tracing"]


def tracing() -> bool:
    """True under torch.compile or an active TorchDispatchMode (FakeTensorMode, make_fx, functionalization)."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


class EagerFastOp:
    """A registered custom op (`.op`, the torch.library CustomOpDef) that skips the torch dispatcher when
    nothing traces. `register_fake` is the custom op's."""

    def __init__(self, fn: Callable, op, name: str) -> None:
        self._fn = fn
        self.op = op
        self.dispatch_op = name.partition("::")[2]   # "dsv4::mhc_pre" -> the dispatcher's "mhc_pre"
        self.register_fake = op.register_fake
        self.__name__ = getattr(fn, "__name__", "op")
        self.__doc__ = fn.__doc__

    def __call__(self, *args):
        if tracing():
            return self.op(*args)
        return self._fn(*args)

    def known(self, args: tuple, impl) -> dispatch.Implementation | None:
        """The implementation chosen for an earlier call of this class whose public arguments `args` (and
        impl=) passed the op's checks, when this call may skip them: nothing traces and checked mode
        (DSV4K_CHECK) is off. None: check the arguments, then `run`."""
        if _values.enabled() or tracing():
            return None
        return dispatch.checked(self.dispatch_op, args, impl)

    def run(self, known: dispatch.Implementation | None, args: tuple, impl, *op_args):
        """Call `known` on the custom op's arguments `op_args` (without impl), or, when None (the public
        arguments `args` were just checked), the op itself, remembering the class for the next call."""
        if known is not None:
            return known(*op_args)
        out = self(*op_args, _checks.impl_name(impl))
        if not tracing():
            dispatch.remember_checked(self.dispatch_op, args, impl, op_args)
        return out


def custom_op(name: str, mutates_args: Iterable[str] | str = ()) -> Callable[[Callable], EagerFastOp]:
    """torch.library.custom_op(name, mutates_args=...), returning an EagerFastOp."""
    def register(fn: Callable) -> EagerFastOp:
        return EagerFastOp(fn, torch.library.custom_op(name, mutates_args=mutates_args)(fn), name)
    return register
