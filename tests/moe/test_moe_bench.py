"""The FP4 MoE benchmark entry (bench/moe.py) runs the Triton implementation: every CPU-grid case is one
the kernels support, and the runner measures the Triton MoE (through the interpreter here) and finds it
matching the reference. The timed case keeps the bench's routing and weights but a small dim (256) and
top-2: the interpreter's cost grows with the weights it decodes."""
from __future__ import annotations

import dataclasses

import torch

from dsv4_kernels import dispatch
from dsv4_kernels.bench import moe, runner, timing
from dsv4_kernels.bench.case import family_cases
from dsv4_kernels.platform import CPU
from dsv4_kernels.shapes import CPU as CPU_GRID, MODELS

FAST = timing.Settings(warmup_us=0, target_us=1000, min_iters=3, max_iters=3, max_time_us=1e5)


def test_every_cpu_grid_case_is_supported_by_the_triton_kernels():
    cases = family_cases("fp4_moe", CPU_GRID)
    assert {c.op for c in cases} == {"fp4_grouped_moe", "mxfp4_grouped_gemm"}
    for case in cases:
        args, kwargs = case.make_inputs(torch.device("cpu"))
        assert dispatch.get(case.op, "triton").supports(*args, **kwargs) is None, case.label


def test_runner_measures_the_triton_moe_and_checks_it():
    case = next(c for c in family_cases("fp4_moe", CPU_GRID) if c.op == "fp4_grouped_moe" and c.phase == "decode")
    small = dataclasses.replace(MODELS[0], hidden=256, experts_per_token=2)
    case = dataclasses.replace(case, make_inputs=moe._moe_inputs(small, case.tokens, 128, 7))
    rows = runner.run_case(case, runner.Options(torch.device("cpu"), impls=("reference", "triton"), interpreter=True,
                                                peers=False, call_timing=False, settings=FAST),
                           {"chip": CPU.name, "device_name": "test"})
    tri = next(r for r in rows if r["impl"] == "triton")
    assert tri["status"] == "measured" and tri["correct"] is True, tri
