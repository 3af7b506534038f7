"""Argument checks run by every public op before dispatch. Each raises ValueError naming the argument,
the expected value and the actual one."""
from __future__ import annotations

import math
import numbers
from typing import Iterable

import torch


def tensor(name: str, x, dtypes: Iterable[torch.dtype] | torch.dtype | None = None,
           ndim: int | None = None, contiguous: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None:
        allowed = (dtypes,) if isinstance(dtypes, torch.dtype) else tuple(dtypes)
        if x.dtype not in allowed:
            raise ValueError(f"{name}: expected dtype {' or '.join(str(d) for d in allowed)}, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got {x.dim()} (shape {tuple(x.shape)})")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {x.stride()} for shape {tuple(x.shape)}")
    return x


def format_shape(dims: tuple) -> str:
    """(3, None, 512) -> "(3, *, 512)"; a one-element shape keeps its comma: "(3,)"."""
    parts = ["*" if d is None else str(d) for d in dims]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def shape(name: str, x: torch.Tensor, expected: tuple) -> None:
    """expected: a tuple of ints or None (any size) per dimension."""
    actual = x.shape
    ok = len(actual) == len(expected)
    if ok:
        for a, e in zip(actual, expected):   # a loop, not any(<generator>): this runs on every call
            if e is not None and a != e:
                ok = False
                break
    if not ok:
        raise ValueError(f"{name}: expected shape {format_shape(expected)}, got {tuple(actual)}")


def same_device(**tensors: torch.Tensor) -> None:
    devices = {n: t.device for n, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for n, d in devices.items():
        if d != first:
            raise ValueError(f"{n}: expected device {first} (the device of {first_name}), got {d}")


def one_of(name: str, value, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {', '.join(map(str, allowed))}, got {value!r}")


def integer(name: str, value, minimum: int | None = None) -> int:
    """A Python int (bool refused), optionally >= minimum."""
    if type(value) is int and (minimum is None or value >= minimum):   # the common case, without the ABC check
        return int(value)   # int(): under torch.compile a symbolic int (which dynamo calls int) is specialised
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def _finite_real(name: str, value, expected: str, low: float | None = None, strict: bool = False) -> None:
    """A finite real number (bool refused), > low (strict) or >= low when low is given."""
    if type(value) is float and not torch.compiler.is_compiling() and -math.inf < value < math.inf and (
            low is None or (value > low if strict else value >= low)):
        return   # the common eager case (a float in range), without the ABC check
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected {expected}, got {type(value).__name__} {value!r}")
    if torch.compiler.is_compiling():
        # torch.compile(dynamic=True) may trace the float symbolically, which math.isfinite cannot read:
        # the range becomes a check of the compiled graph (NaN fails it too).
        message = f"{name}: expected {expected} (checked in the compiled graph)"
        if low is not None:
            torch._check_value(value > low if strict else value >= low, lambda: message)
        torch._check_value(value < math.inf, lambda: message)
        torch._check_value(value > -math.inf, lambda: message)
        return
    if not math.isfinite(value) or (low is not None and (value <= low if strict else value < low)):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def positive_float(name: str, value, optional: bool = False) -> None:
    """A positive finite real number (bool refused); None too when optional."""
    if value is None and optional:
        return
    expected = "None or a positive finite float" if optional else "a positive finite float"
    _finite_real(name, value, expected, low=0.0, strict=True)


def finite_float(name: str, value, minimum: float | None = None, note: str = "") -> None:
    """A finite real number (bool refused), >= minimum when given; note is appended to "expected"."""
    expected = f"a finite float{'' if minimum is None else f' >= {minimum:g}'}{note}"
    _finite_real(name, value, expected, low=minimum)


def impl_name(impl) -> str:
    """The `impl=` keyword of every public op: None (automatic selection) or an implementation name.
    Returns the string the torch.library op takes ("" for None); which names exist is the dispatcher's
    check (dispatch.get names the registered ones)."""
    if impl is None:
        return ""
    if not isinstance(impl, str) or not impl:
        raise ValueError(f"impl: expected None or an implementation name (a non-empty str, e.g. \"triton\"), "
                         f"got {type(impl).__name__} {impl!r}")
    return impl


def boolean(name: str, value) -> bool:
    """A Python bool: flags are switches, so 0, 1 or "yes" are refused."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value
