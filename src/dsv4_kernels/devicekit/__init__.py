"""`dsv4k device-check`: one prepared command that does all the device work of a short GPU lease.

It runs on a bare GPU image (scripts/device-kit.sh installs the project and the carried wheels first)
and writes everything it learns to one folder, at most 8 files:

    summary.md     one screen: per op and implementation the device numerics, the sanitizer, median us,
                   CUDA-graph replay us, host overhead, % of the measured roofline, x reference, x compile
    bench.jsonl    the benchmark records (bench/README.md lists the keys)
    junit.xml      pytest --backend=<device> -m device
    sanitizer.log  compute-sanitizer memcheck and racecheck output
    roofline.png   the benchmark against the measured ceilings
    kit.json       versions, GPU, clocks, ceilings, every step's status and time, numerics and sanitizer
                   results per op and implementation
    run.log        everything every step printed

Steps, in order, each with its share of `--budget-s` and a clean stop at its deadline (budget.py):
machine, numerics, pytest, sanitizer, tilelang, bench, report. `--dry-run` runs every step on this CPU
(Triton interpreter, a few small ops, the sanitizer and TileLang steps skipped with the reason) so that
CI keeps the kit working between GPU runs.
"""
from dsv4_kernels.devicekit.kit import OUTPUT_FILES, main

__all__ = ["OUTPUT_FILES", "main"]
