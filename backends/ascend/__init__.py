"""Huawei Ascend: the 950 (dav-3510) through TileLang's Ascend dialect; 910C is detected and in the peak table.

TileLang GPU-dialect kernels do not compile for Ascend: Ascend kernels are written in the Ascend dialect
and live in `kernels/` beside this file. Triton for Ascend (triton-ascend) replaces the `triton` package
and needs CANN, so it has no target in this environment.
"""
from dsv4_kernels.backends import Backend, Peak, Target

TARGETS = (
    Target("ascend950", "ascend", triton=None, tilelang={"kind": "ascend"}, tilelang_dialect="ascend"),
)

PEAKS = (
    # Huawei publishes no full 910C datasheet; public reporting gives about 800 TF FP16/BF16 dense and 3.2 TB/s
    # HBM for the dual-die 910C. No FP8 or FP4 tensor-core path (None).
    Peak("Ascend 910C", "ascend910c", bf16_tflops=800.0, fp8_tflops=None, fp4_tflops=None, hbm_tbps=3.2,
         source="public reporting on Ascend 910C (no vendor datasheet); approximate"),
    # Huawei Connect 2025 Ascend roadmap: 950 at 1 PF FP8 and 2 PF FP4; HBM 4 TB/s for the 950DT (HiZQ 2.0).
    # No BF16 figure was published (None).
    Peak("Ascend 950", "ascend950", bf16_tflops=None, fp8_tflops=1000.0, fp4_tflops=2000.0, hbm_tbps=4.0,
         source="Huawei Connect 2025 Ascend roadmap (950DT); approximate"),
)

BACKEND = Backend("ascend", TARGETS, PEAKS, package=__name__)
