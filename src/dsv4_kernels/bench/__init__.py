"""The benchmark harness behind `dsv4k bench` (bench/README.md tells how to run it and read it).

One module per op family yields the cases (`case.py`: shapes from dsv4_kernels.shapes, inputs, the
analytical byte and FLOP counts); `runner.py` checks and times every implementation that can run,
the compiled reference and the peers (`peers.py`) with `timing.py`; `roofline.py` places a time
against the chip's peak; `records.py` writes and compares JSON lines; `plots.py` draws the charts
(matplotlib is optional and imported only there). Importing this package imports none of them.
"""
