"""Triton source of sigmoid_gate: one flat pass, BLOCK elements per program."""
import torch
import triton
import triton.language as tl

from dsv4_kernels import dispatch, platform
from dsv4_kernels.kernels._triton_util import FP_FUSION


@triton.jit
def sigmoid_gate_kernel(x_ptr, g_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (x * tl.sigmoid(g)).to(out_ptr.dtype.element_ty), mask=mask)  # x * sigmoid(gate)


def sigmoid_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    cfg = dispatch.config(dispatch.get("sigmoid_gate", "triton"), platform.device_info(x))
    grid = (triton.cdiv(n, cfg["BLOCK"]),)
    sigmoid_gate_kernel[grid](x, gate, out, n, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
                              enable_fp_fusion=FP_FUSION)
    return out


def codegen(target) -> list:
    from dsv4_kernels.codegen import TritonKernel
    cfg = dispatch.get("sigmoid_gate", "triton").defaults
    return [TritonKernel(sigmoid_gate_kernel, {"x_ptr": f"*{t}", "g_ptr": f"*{t}", "out_ptr": f"*{t}", "n": "i64"},
                         {"BLOCK": cfg["BLOCK"]}, num_warps=cfg["num_warps"], label=t,
                         expects={"vector_loads": None})  # the mask on n vectorises only where n % 16 == 0
            for t in ("bf16", "fp32")]
