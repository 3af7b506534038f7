"""What one benchmark case is, and the family modules that yield them."""
from __future__ import annotations

import importlib
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dsv4_kernels.shapes import Grid

__all__ = ["Case", "FAMILIES", "FAMILY_ALIASES", "family_cases", "all_cases", "public_op", "generator", "seed_of"]

# One module per op family, named as the family's tests are (tests/<family>/).
FAMILIES = ("sparse_mqa", "compressor", "routing", "mhc", "moe", "formats")
FAMILY_ALIASES = {"fp4_moe": "moe"}
COMPUTE_FORMATS = ("bf16", "fp8", "fp4", "none")


@dataclass(frozen=True, eq=False)
class Case:
    """One benchmark case of one op.

    label: unique within the op, e.g. "flash-decode-csa-ctx2048-B4".
    model: "flash", "pro", or "v4" when both models share the shape. phase: "decode" or "prefill".
    tokens: decode batch size or prefill token count (the x axis of the latency chart).
    variant: the series the case belongs to within (model, phase), e.g. "csa-ctx2048".
    shape: every size the byte and FLOP models read (recorded in the results).
    bytes / flops: the analytical traffic and arithmetic of one call (pure functions of `shape`).
    compute: the tensor-core format whose peak bounds the arithmetic ("bf16", "fp8", "fp4"), or "none"
        for ops that run on vector units (placed against the memory roofline only).
    make_inputs(device) -> (args, kwargs) of the public op; deterministic for a device.
    call: the function to benchmark, called as call(*args, impl=name, **kwargs); None means the public
        op `dsv4_kernels.<op>`.
    """

    op: str
    family: str
    label: str
    model: str
    phase: str
    tokens: int
    variant: str
    shape: dict[str, Any]
    bytes: int
    flops: int
    compute: str
    make_inputs: Callable[[torch.device], tuple[tuple, dict]]
    call: Callable | None = field(default=None)

    def __post_init__(self):
        if self.compute not in COMPUTE_FORMATS:
            raise ValueError(f"{self.op}/{self.label}: compute {self.compute!r} is not one of {COMPUTE_FORMATS}")


def public_op(op: str) -> Callable | None:
    """The public op `dsv4_kernels.<op>`, or None while it has not landed."""
    import dsv4_kernels
    return getattr(dsv4_kernels, op, None)


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on `device`, so that inputs are drawn where they live (no host round trip)."""
    return torch.Generator(device=device).manual_seed(seed)


def seed_of(op: str, label: str) -> int:
    """A seed fixed by the case's name (Python's str hash changes between processes)."""
    return zlib.crc32(f"{op}/{label}".encode())


def _module(family: str):
    family = FAMILY_ALIASES.get(family, family)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    return importlib.import_module(f"dsv4_kernels.bench.{family}")


def family_cases(family: str, grid: Grid) -> list[Case]:
    return _module(family).cases(grid)


def all_cases(grid: Grid, families: tuple[str, ...] = FAMILIES) -> list[Case]:
    out: list[Case] = []
    for family in families:
        out += family_cases(family, grid)
    return out
