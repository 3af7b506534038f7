"""Declarative argument specs: one per op, from which both its validation and its refusal tests come.

An op lists its arguments in signature order; `validate(*args)` checks them in that order and raises
ValueError naming the argument, the expected and the actual value (ops/_checks.py wording), and
`refusals(valid_args)` derives, from one valid call, a bad variant of every argument for every property
the spec states (type, dtype, rank, each size that is fixed or already bound, contiguity, device, range).
A check dropped from the spec is then a missing refusal, which the generated test reports.

Shapes are tuples of ints, symbols ("T", "dim") bound by their first occurrence, or multiples of a
symbol ("4*dim"). Until a symbol is bound its size is shown as "*".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dsv4_kernels.ops import _checks

__all__ = ["Tensor", "Int", "PosFloat", "ArgSpec", "Refusal"]

_DTYPE_PROBES = (torch.bfloat16, torch.float32, torch.float16, torch.int32)


@dataclass(frozen=True)
class Tensor:
    name: str
    dtypes: tuple[torch.dtype, ...]
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class Int:
    name: str
    minimum: int | None = None
    choices: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PosFloat:
    """A positive finite real number."""
    name: str


@dataclass(frozen=True)
class Refusal:
    """A bad variant of one argument: the value to pass and the argument the error must name."""
    name: str
    what: str
    value: object


def _dim(entry, symbols: dict[str, int]) -> int | None:
    """The expected size of one shape entry, None while its symbol is unbound."""
    if isinstance(entry, int):
        return entry
    factor, _, sym = entry.rpartition("*")
    value = symbols.get(sym)
    return None if value is None else (int(factor) if factor else 1) * value


@dataclass(frozen=True)
class ArgSpec:
    op: str
    args: tuple
    device_of: str = ""  # the tensor the others' devices are compared with, and checked first: its shape
    #                      binds the symbols (mhc_post's x defines T and dim; f must match it)
    minimum: dict[str, int] = field(default_factory=dict)   # lower bounds of symbols, e.g. {"dim": 1}

    def _ordered(self, pairs: list) -> list:
        return sorted(pairs, key=lambda p: p[0].name != self.device_of) if self.device_of else pairs

    def _tensor(self, spec: Tensor, x, symbols: dict[str, int]) -> None:
        _checks.tensor(spec.name, x, spec.dtypes, ndim=len(spec.shape))
        _checks.shape(spec.name, x, tuple(_dim(e, symbols) for e in spec.shape))
        for entry, size in zip(spec.shape, x.shape):
            if isinstance(entry, str) and "*" not in entry and entry not in symbols:
                low = self.minimum.get(entry)
                if low is not None and size < low:
                    raise ValueError(f"{spec.name}: expected shape ({', '.join(map(str, spec.shape))}) with "
                                     f"{entry} >= {low}, got {tuple(x.shape)}")
                symbols[entry] = size

    def __post_init__(self) -> None:
        # The accept-only plan of _fast: per argument in checking order, its position and what to check,
        # shape entries pre-parsed into (size, None) or (factor, symbol).
        plan = []
        for spec, index in self._ordered([(spec, i) for i, spec in enumerate(self.args)]):
            if isinstance(spec, Tensor):
                dims = []
                for e in spec.shape:
                    if isinstance(e, int):
                        dims.append((e, None))
                    else:
                        factor, _, sym = e.rpartition("*")
                        dims.append((int(factor) if factor else 1, sym) if factor else (0, sym))
                plan.append((index, spec, frozenset(spec.dtypes), tuple(dims)))
            else:
                plan.append((index, spec, None, None))
        object.__setattr__(self, "_plan", tuple(plan))

    def _fast(self, values) -> dict[str, int] | None:
        """The symbols when every check passes, else None (then the full checks run and raise): the same
        conditions as the checks below, as plain attribute tests, so a valid call costs a few microseconds."""
        if torch.compiler.is_compiling():
            return None   # symbolic sizes and floats: the full checks know how to treat them
        symbols: dict[str, int] = {}
        device = None
        for index, spec, dtypes, dims in self._plan:
            v = values[index]
            if dtypes is not None:
                if (not isinstance(v, torch.Tensor) or v.dtype not in dtypes or v.dim() != len(dims)
                        or not v.is_contiguous()):
                    return None
                for (factor, sym), size in zip(dims, v.shape):
                    if sym is None:
                        if size != factor:
                            return None
                    elif factor == 0:                    # a plain symbol: bound here, or checked
                        bound = symbols.get(sym)
                        if bound is None:
                            low = self.minimum.get(sym)
                            if low is not None and size < low:
                                return None
                            symbols[sym] = size
                        elif size != bound:
                            return None
                    elif sym in symbols and size != factor * symbols[sym]:
                        return None
                if device is None:
                    device = v.device
                elif v.device != device:
                    return None
            elif isinstance(spec, Int):
                if type(v) is not int or (spec.minimum is not None and v < spec.minimum) or (
                        spec.choices is not None and v not in spec.choices):
                    return None
            elif type(v) is not float or not 0.0 < v < math.inf:
                return None
        return symbols

    def validate(self, *values) -> dict[str, int]:
        """Check `values` (in signature order); returns the bound symbols, e.g. {"T": 3, "dim": 4096}."""
        symbols = self._fast(values)
        if symbols is not None:
            return symbols
        symbols = {}
        tensors: dict[str, torch.Tensor] = {}
        for spec, value in self._ordered(list(zip(self.args, values))):
            if isinstance(spec, Tensor):
                self._tensor(spec, value, symbols)
                tensors[spec.name] = value
            elif isinstance(spec, Int):
                _checks.integer(spec.name, value, minimum=spec.minimum)
                if spec.choices is not None:
                    _checks.one_of(spec.name, value, spec.choices)
            else:
                _checks.positive_float(spec.name, value)
        first = self.device_of or next(iter(tensors))
        _checks.same_device(**{first: tensors[first]}, **{n: t for n, t in tensors.items() if n != first})
        return symbols

    def refusals(self, valid: dict) -> list[Refusal]:
        """Bad variants of every argument of the valid call `valid` (name -> value)."""
        out: list[Refusal] = []
        bound: set[str] = set()
        first = self.device_of or next(s.name for s in self.args if isinstance(s, Tensor))
        for spec, v in self._ordered([(spec, valid[spec.name]) for spec in self.args]):
            add = lambda what, value, n=spec.name: out.append(Refusal(n, what, value))  # noqa: E731
            if isinstance(spec, Tensor):
                add("not a tensor", v.tolist())
                add("wrong dtype", v.to(next(d for d in _DTYPE_PROBES if d not in spec.dtypes)))
                add("extra dimension", v[None])
                for i, entry in enumerate(spec.shape):
                    fixed = isinstance(entry, int) or "*" in entry or entry in bound
                    if fixed:
                        add(f"size {i} + 1", torch.cat([v, v.narrow(i, 0, 1)], dim=i) if v.shape[i] else
                            v.new_zeros(v.shape[:i] + (1,) + v.shape[i + 1:]))
                    elif entry in self.minimum and self.minimum[entry] > 0:
                        add(f"size {i} below {self.minimum[entry]}", v.narrow(i, 0, 0).contiguous())
                bound.update(e for e in spec.shape if isinstance(e, str) and "*" not in e)
                if v.dim() and v.shape[-1] > 1:
                    add("non-contiguous", torch.stack([v, v], dim=-1)[..., 0])
                if spec.name != first:
                    add("other device", v.to("meta"))
            elif isinstance(spec, Int):
                add("float", float(v))
                add("bool", True)
                if spec.minimum is not None:
                    add("below minimum", spec.minimum - 1)
                if spec.choices is not None:
                    add("not a choice", max(spec.choices) + 1)
            else:
                for what, bad in (("zero", 0.0), ("negative", -1.0), ("nan", math.nan), ("inf", math.inf),
                                  ("str", "1e-6"), ("bool", True)):
                    add(what, bad)
        return out
