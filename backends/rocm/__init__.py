"""AMD ROCm: CDNA3 gfx942 (MI300X/MI325X, FP8 e4m3fnuz) and CDNA4 gfx950 (MI350X/MI355X, FP8 e4m3fn), wave64."""
from dsv4_kernels.backends import Backend, Peak, Target

TARGETS = (
    Target("gfx942", "rocm", triton=("hip", "gfx942", 64), tilelang={"kind": "hip", "mcpu": "gfx942"}),
    Target("gfx950", "rocm", triton=("hip", "gfx950", 64), tilelang={"kind": "hip", "mcpu": "gfx950"}),
)

PEAKS = (
    # AMD Instinct MI300X datasheet: dense BF16 1307.4 TF, FP8 2614.9 TF, HBM3 5.3 TB/s; no FP4 MMA on CDNA3;
    # peak FP32 vector 163.4 TF.
    Peak("MI300X", "gfx942", bf16_tflops=1307.4, fp8_tflops=2614.9, fp4_tflops=None, hbm_tbps=5.3,
         source="AMD Instinct MI300X datasheet, dense", fp32_tflops=163.4),
    # AMD Instinct MI355X datasheet: dense BF16 2.5 PF, FP8 5.0 PF, MXFP4 10 PF, HBM3E 8 TB/s; peak FP32 vector
    # 157.3 TF.
    Peak("MI355X", "gfx950", bf16_tflops=2516.6, fp8_tflops=5033.2, fp4_tflops=10066.3, hbm_tbps=8.0,
         source="AMD Instinct MI355X datasheet, dense", fp32_tflops=157.3),
)

BACKEND = Backend("rocm", TARGETS, PEAKS, package=__name__)
