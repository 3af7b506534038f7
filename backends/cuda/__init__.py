"""NVIDIA CUDA: Hopper (sm_90a) and Blackwell (sm_100a)."""
from dsv4_kernels.backends import Backend, Peak, Target

TARGETS = (
    # Triton picks the "a" feature set (wgmma, tcgen05) itself for 90 and 100; TileLang needs it spelled out.
    Target("sm_90a", "cuda", triton=("cuda", 90, 32), tilelang={"kind": "cuda", "arch": "sm_90a"}),
    Target("sm_100a", "cuda", triton=("cuda", 100, 32), tilelang={"kind": "cuda", "arch": "sm_100a"}),
)

PEAKS = (
    # NVIDIA H100 Tensor Core GPU datasheet, SXM5 column; sparsity figures halved to dense. No FP4 MMA on Hopper.
    # FP32 (non-tensor) 67 TF.
    Peak("H100", "sm_90", bf16_tflops=989.4, fp8_tflops=1978.9, fp4_tflops=None, hbm_tbps=3.35,
         source="NVIDIA H100 datasheet (SXM5), dense", fp32_tflops=67.0),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM column: same SM as H100 (FP32 67 TF), HBM3e 4.8 TB/s.
    Peak("H200", "sm_90", bf16_tflops=989.4, fp8_tflops=1978.9, fp4_tflops=None, hbm_tbps=4.8,
         source="NVIDIA H200 datasheet (SXM), dense", fp32_tflops=67.0),
    # NVIDIA HGX B200 datasheet: 8-GPU totals with sparsity (BF16 36 PF, FP8 72 PF, FP4 144 PF) / 8 / 2; HBM3e 8 TB/s;
    # per-GPU FP32 75 TF.
    Peak("B200", "sm_100", bf16_tflops=2250.0, fp8_tflops=4500.0, fp4_tflops=9000.0, hbm_tbps=8.0,
         source="NVIDIA HGX B200 datasheet, per GPU, dense", fp32_tflops=75.0),
    # NVIDIA GB300 NVL72 / Blackwell Ultra product page: per-GPU dense NVFP4 15 PF; FP8 and BF16 as B200-class
    # tensor cores at GB300 clocks; HBM3e 8 TB/s.
    Peak("GB300", "sm_103", bf16_tflops=2500.0, fp8_tflops=5000.0, fp4_tflops=15000.0, hbm_tbps=8.0,
         source="NVIDIA Blackwell Ultra (GB300) product page, per GPU, dense"),
)

BACKEND = Backend("cuda", TARGETS, PEAKS, package=__name__)
