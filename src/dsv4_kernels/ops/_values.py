"""Checks that read tensor values: checked mode (SPEC 6, `DSV4K_CHECK=1`) and the default-path masks.

The default path never reads values on the host (decode must stay CUDA-graph capturable): an id, slot,
position or index outside its range is *invalid* and masked on the device, never wrapped (Python's
negative indexing must not reach an engine's buffer). Every op declares its value rules once, as a tuple
of `Rule`s; `check()` enforces them in checked mode and `valid()` gives the same predicate to the
reference and the kernels for masking:

    if enabled():                      # off by default: the hot path builds no rule
        check(InRange("slot_ids", slot_ids, 0, slots, what="state slots"), Distinct("slot_ids", slot_ids))

In checked mode every rule is one device-side reduction, all are fetched with a single host sync, and
the first failing rule raises ValueError naming the argument, the expected range, the first bad position
and its value. Checked mode refuses to run inside CUDA-graph capture (it has to sync).
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass

import torch

__all__ = ["enabled", "Rule", "InRange", "Distinct", "NonDecreasing", "AllFinite", "check", "in_range"]

ENV = "DSV4K_CHECK"


# os.environ.get encodes the key on every call (~0.7 us); the mapping under it (a dict of encoded keys and
# values, kept in step with every os.environ assignment) answers in ~50 ns. dispatch.py reads its
# variables the same way.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV) if _ENV_DATA is not None else ENV
_ON = ("1", "true", "yes", "on")


def enabled() -> bool:
    """True when DSV4K_CHECK is 1, true, yes or on (read at every call)."""
    if _ENV_DATA is not None:
        raw = _ENV_DATA.get(_ENV_KEY)
        return raw is not None and os.environ.decodevalue(raw).strip().lower() in _ON
    return os.environ.get(ENV, "").strip().lower() in _ON


def in_range(x: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """The default path's validity mask: low <= x < high, elementwise (bool, same shape)."""
    return (x >= low) & (x < high)


@dataclass(frozen=True)
class Rule(abc.ABC):
    """One value rule on one argument. `bad(x)` gives a bool mask of the offending elements;
    `expected` says what was expected, for the error message."""

    name: str
    tensor: torch.Tensor | None

    @abc.abstractmethod
    def bad(self, x: torch.Tensor) -> torch.Tensor: ...

    @property
    @abc.abstractmethod
    def expected(self) -> str: ...


@dataclass(frozen=True)
class InRange(Rule):
    """Integer values in [low, high), or one of `allow` (sentinels such as -1 for an unused slot)."""

    low: int = 0
    high: int = 0
    what: str = ""
    allow: tuple[int, ...] = ()

    def bad(self, x):
        ok = in_range(x, self.low, self.high)
        for sentinel in self.allow:
            ok |= x == sentinel
        return ~ok

    @property
    def expected(self) -> str:
        extra = "".join(f" or {a}" for a in self.allow)
        what = f" ({self.what})" if self.what else ""
        return f"values in [{self.low}, {self.high}){what}{extra}"


@dataclass(frozen=True)
class Distinct(Rule):
    """No value appears twice (values in `ignore`, e.g. -1 padding, may repeat)."""

    ignore: tuple[int, ...] = ()

    def bad(self, x):
        flat = x.flatten()
        values, order = torch.sort(flat, stable=True)
        repeat = torch.zeros_like(flat, dtype=torch.bool)
        repeat[order[1:]] = values[1:] == values[:-1]
        for v in self.ignore:
            repeat &= flat != v
        return repeat.view(x.shape)

    @property
    def expected(self) -> str:
        return "distinct values" + (f" (only {', '.join(map(str, self.ignore))} may repeat)" if self.ignore else "")


@dataclass(frozen=True)
class NonDecreasing(Rule):
    """A 1-D tensor whose values never decrease (cumulative lengths); the bad position is the first
    element smaller than the one before it."""

    def bad(self, x):
        bad = torch.zeros_like(x, dtype=torch.bool)
        bad[1:] = x[1:] < x[:-1]
        return bad

    @property
    def expected(self) -> str:
        return "non-decreasing values (cumulative lengths)"


@dataclass(frozen=True)
class AllFinite(Rule):
    """No NaN or infinity."""

    def bad(self, x):
        return ~torch.isfinite(x)

    @property
    def expected(self) -> str:
        return "finite values"


def _position(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def check(*rules: Rule) -> None:
    """Enforce `rules` in checked mode (one reduction per rule, one host sync); a no-op otherwise.

    Rules whose tensor is None or empty are skipped. Raises ValueError naming the argument, the
    expected values, the first bad position and its value; RuntimeError inside CUDA-graph capture.
    """
    if not enabled():
        return
    live = [r for r in rules if r.tensor is not None and r.tensor.numel()]
    if not live:
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{ENV}=1 reads values back to the host and cannot run inside CUDA-graph capture; "
                           f"unset it for the captured step")
    masks = [r.bad(r.tensor) for r in live]
    flags = torch.stack([m.any().to(masks[0].device) for m in masks]).tolist()  # the one host sync
    for rule, mask, flag in zip(live, masks, flags):
        if flag:
            pos = _position(mask)
            value = rule.tensor[pos].item()
            raise ValueError(f"{rule.name}: expected {rule.expected}, got {value} at position {pos} "
                             f"({ENV}=1 checked mode)")
