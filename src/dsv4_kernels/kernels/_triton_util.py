"""What every Triton kernel of the project shares: the pinned FP-fusion option, the run-time pointer
specialisation that codegen reproduces, and the integer fp32 -> bf16 rounding.

FP fusion (a * b + c contracted to one FMA). Triton's default has moved: on through 3.9 (3.9 warns that
3.10 turns it off). Every launch passes `enable_fp_fusion=FP_FUSION` and codegen compiles with the same
value (`compile_options`), so the kernels a test or benchmark ran, the artifacts codegen inspected and the
numerics the tolerances were measured with are the same programs on any Triton from 3.6 on. FMA
contraction is kept on: one rounding instead of two (never less accurate per operation), the speed the
kernels were tuned with. The Triton interpreter ignores the option (numpy does not fuse).

Pointer specialisation. At launch the JIT marks every pointer argument whose address is a multiple of 16
bytes with `tt.divisibility = 16` (torch's allocator gives 256-byte aligned storage; a view with a storage
offset may lose it and gets another, slower, specialisation). Integer arguments are specialised too
(value 1 becomes a constant, multiples of 16 get the same hint); codegen compiles the general integer case,
which is what a token count T gets at run time for most T. `pointer_attrs` gives codegen the pointer
hints, so that vector widths, register counts and the absence of spills are those of the launched kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

FP_FUSION = True

__all__ = ["FP_FUSION", "compile_options", "pointer_attrs", "bf16_rne"]


def compile_options(num_warps: int, num_stages: int) -> dict:
    """The options of triton.compile for one kernel spec: as the launch passes them."""
    return {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": FP_FUSION}


def _pointer_hints(target) -> list:
    """The attributes the JIT gives a 16-byte aligned tensor smaller than 2 GiB on `target` (a GPUTarget),
    asked from Triton's own backend: tt.divisibility 16 everywhere; on ROCm also tt.pointer_range 32
    (buffer loads and stores), which the HIP backend adds for tensors within 2 GiB."""
    import torch
    from triton.compiler import make_backend
    backend = make_backend(target)
    probe = torch.empty(16, dtype=torch.float32)  # CPU storage: aligned, far below 2 GiB
    try:
        desc = backend.get_tensor_specialization(probe, align=True)
        return backend.parse_attr(desc)
    except AttributeError:  # a Triton without these hooks: the divisibility hint it has always given
        return [["tt.divisibility", 16]]


def pointer_attrs(fn, signature: dict[str, str], target=None) -> dict[tuple[int], list]:
    """ASTSource attrs for a @triton.jit fn: {(index of a pointer argument in fn.arg_names,): hints}, the
    hints the JIT gives every 16-byte aligned tensor below 2 GiB at launch on `target` (a GPUTarget; None:
    the divisibility hint alone). A tensor of 2 GiB or more on ROCm, or an unaligned view, is launched
    with another specialisation that codegen does not compile."""
    hints = _pointer_hints(target) if target is not None else [["tt.divisibility", 16]]
    return {(fn.arg_names.index(name),): [list(h) for h in hints]
            for name, ty in signature.items() if ty.startswith("*")}


@triton.jit
def bf16_rne(v):
    # fp32 -> bf16, round to nearest even by integer ops: the interpreter's cast truncates, the GPUs'
    # cvt rounds; this gives the same bits everywhere. NaN keeps a quiet NaN, overflow rounds to inf.
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = tl.where(v != v, (bits >> 16) | 0x40, rounded)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)
