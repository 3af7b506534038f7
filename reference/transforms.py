"""Rotations shared by the attention and compressor references: interleaved RoPE (SPEC 6) and the
Sylvester-order Hadamard transform used before the indexer's FP4 cache (SPEC 2)."""
from __future__ import annotations

import torch

__all__ = ["rope_tables", "apply_rope_interleaved", "hadamard", "hadamard_rotate"]


def rope_tables(positions: torch.Tensor, rope_dim: int = 64, theta: float = 10000.0):
    """cos/sin tables of plain RoPE (no frequency scaling), for tests and demos.

    Args:
        positions: [P] int64 token positions (P may be 0).
        rope_dim: rotated dims (even); pair i rotates with frequency theta^(-2i / rope_dim).
        theta: RoPE base.
    Returns:
        cos, sin: [P, rope_dim / 2] fp32 of the angle position * frequency (computed in fp64, rounded once).
    """
    i = torch.arange(rope_dim // 2, dtype=torch.float64, device=positions.device)
    freq = theta ** (-2.0 * i / rope_dim)
    angle = positions.to(torch.float64).unsqueeze(-1) * freq
    return angle.cos().float(), angle.sin().float()


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as the complex number x[2i] + j x[2i+1] (GPT-J style).

    Args:
        x: [..., 2m] float tensor (any float dtype).
        cos, sin: [..., m] fp32 (or any float), broadcastable against x[..., 0::2] (e.g. [T, 1, m] for
            x [T, H, 2m]).
        inverse: rotate by -angle instead (undoes the forward rotation up to rounding).
    Returns:
        [..., 2m] fp32 (the broadcast shape): out[2i] = x[2i] cos - x[2i+1] sin,
        out[2i+1] = x[2i] sin + x[2i+1] cos, fp32 math; callers round to their dtype.
    """
    xf = x.float()
    c, s = cos.float(), sin.float()
    if inverse:
        s = -s
    even, odd = xf[..., 0::2], xf[..., 1::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2)


def hadamard(n: int) -> torch.Tensor:
    """Unnormalised Hadamard matrix in Sylvester (natural) order: H[i, j] = (-1)^popcount(i & j).

    Args:
        n: a power of two >= 1.
    Returns:
        [n, n] fp32 of +-1, symmetric, H @ H = n * I.
    """
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), dim=1), torch.cat((h, -h), dim=1)), dim=0)
    return h


def hadamard_rotate(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Hadamard transform of the last dimension: x @ H^T * scale (H is symmetric, so x @ H * scale).

    Args:
        x: [..., n] float tensor, n a power of two; leading dims may be empty.
        scale: multiplier; default n^-0.5 (orthonormal rotation).
    Returns:
        [..., n] fp32, accumulated in fp64 and rounded once.
    """
    n = x.shape[-1]
    if scale is None:
        scale = n ** -0.5
    h = hadamard(n).to(device=x.device, dtype=torch.float64)
    return (x.double() @ h.T * scale).float()
