"""The kit's steps and how the time budget is shared among them.

Each step owns a share of the budget. When a step starts it gets its share of the time that is left,
in proportion to the shares of the steps still to run, so time a step did not use goes to the later
ones and a step that overran shortens them instead of the whole run.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Step", "STEPS", "STEP_NAMES", "step_budget", "GRACE_S"]

GRACE_S = 10.0     # after its deadline a step gets SIGINT, then this long to write its results, then SIGKILL


@dataclass(frozen=True)
class Step:
    name: str
    share: float
    what: str


STEPS = (
    Step("machine", 0.05, "versions, GPU, clocks, measured copy bandwidth and bf16 matrix rate"),
    Step("numerics", 0.13, "every op's sample cases, references and Triton kernels, on the device against "
                           "the CPU reference"),
    Step("pytest", 0.27, "pytest --backend=<device> -m device: the device tests of every family"),
    Step("sanitizer", 0.14, "compute-sanitizer memcheck and racecheck on one small launch of every Triton kernel"),
    Step("tilelang", 0.10, "the TileLang runtime path: JIT on the device, numerics against the reference"),
    Step("bench", 0.28, "decode and one prefill per op: every implementation, the reference, "
                        "torch.compile(reference), CUDA-graph replay"),
    Step("report", 0.03, "summary.md and roofline.png"),
)
STEP_NAMES = tuple(s.name for s in STEPS)


def step_budget(remaining_s: float, step: Step, later: list[Step]) -> float:
    """Seconds for `step` out of `remaining_s`, given the steps that still run after it."""
    total = step.share + sum(s.share for s in later)
    return max(0.0, remaining_s * step.share / total) if total > 0 else 0.0
