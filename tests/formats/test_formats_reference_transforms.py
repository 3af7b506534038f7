"""Interleaved RoPE and the Sylvester Hadamard transform (SPEC 2 and 6)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv4_kernels.reference.transforms import apply_rope_interleaved, hadamard, hadamard_rotate, rope_tables
from dsv4_kernels.testing import assert_close


def test_rope_hand_90_degrees():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    cos = torch.tensor([0.0, 1.0])  # pair 0 by +90 degrees, pair 1 by 0
    sin = torch.tensor([1.0, 0.0])
    # (1 + 2j) * j = -2 + 1j: interleaved pairs, not NeoX halves (which would mix x[0] with x[2]).
    assert apply_rope_interleaved(x, cos, sin).tolist() == [-2.0, 1.0, 3.0, 4.0]
    assert apply_rope_interleaved(x, cos, sin, inverse=True).tolist() == [2.0, -1.0, 3.0, 4.0]


def test_rope_tables_hand_values():
    cos, sin = rope_tables(torch.tensor([0, 1, 7]), rope_dim=4, theta=100.0)
    assert cos.dtype == torch.float32 and cos.shape == (3, 2)
    # Frequencies 100^(-0/4) = 1 and 100^(-2/4) = 0.1.
    want = [[p * f for f in (1.0, 0.1)] for p in (0, 1, 7)]
    assert_close(cos, torch.tensor([[math.cos(a) for a in r] for r in want]), atol=1e-7, rtol=0, what="cos")
    assert_close(sin, torch.tensor([[math.sin(a) for a in r] for r in want]), atol=1e-7, rtol=0, what="sin")
    c, s = rope_tables(torch.zeros(0, dtype=torch.int64))
    assert c.shape == (0, 32) and s.shape == (0, 32)


@settings(deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(0, 5), h=st.sampled_from([1, 8, 64, 128]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_rope_matches_complex_product_and_inverts(seed, t, h, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, 64, generator=g).to(dtype)
    pos = torch.randint(0, 1 << 20, (t,), generator=g)
    cos, sin = rope_tables(pos)
    out = apply_rope_interleaved(x, cos[:, None], sin[:, None])
    assert out.dtype == torch.float32 and out.shape == x.shape
    z = torch.view_as_complex(x.double().reshape(t, h, 32, 2).contiguous())
    rot = torch.polar(torch.ones_like(cos.double()), torch.atan2(sin.double(), cos.double()))[:, None]
    want = torch.view_as_real(z * rot).reshape(t, h, 64)
    # |x| ~ 1; fp32 products and one sum: a few fp32 ulps of the magnitude.
    assert_close(out, want, atol=1e-6, rtol=1e-6, what="rope")
    back = apply_rope_interleaved(out, cos[:, None], sin[:, None], inverse=True)
    assert_close(back, x.float(), atol=2e-6, rtol=2e-6, what="inverse(forward(x))")


def test_hadamard_hand_cases():
    assert hadamard(1).tolist() == [[1.0]]
    assert hadamard(2).tolist() == [[1.0, 1.0], [1.0, -1.0]]
    assert hadamard(4).tolist() == [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]
    assert hadamard_rotate(torch.tensor([1.0, 2.0])).tolist() == pytest.approx([3 / math.sqrt(2), -1 / math.sqrt(2)])
    assert hadamard_rotate(torch.tensor([1.0, 0.0, 0.0, 0.0])).tolist() == [0.5, 0.5, 0.5, 0.5]
    assert hadamard_rotate(torch.tensor([0.0, 1.0, 0.0, 0.0]), scale=1.0).tolist() == [1, -1, 1, -1]


@pytest.mark.parametrize("n", [8, 32, 128, 512])
def test_hadamard_sylvester_order_and_orthogonality(n):
    h = hadamard(n)
    assert h.dtype == torch.float32 and h.shape == (n, n)
    want = torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(n)] for i in range(n)])
    assert torch.equal(h, want)
    assert torch.equal(h, h.T)
    assert torch.equal(h @ h.T, n * torch.eye(n))


@settings(deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(0, 7), n=st.sampled_from([64, 128]))
def test_hadamard_rotate_is_orthonormal(seed, t, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 3, n, generator=g).to(torch.bfloat16)
    y = hadamard_rotate(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    want = torch.einsum("...k,jk->...j", x.double(), hadamard(n).double()) / math.sqrt(n)
    # fp64 accumulation, one rounding to fp32: within an fp32 ulp of values of order 1.
    assert_close(y, want, atol=1e-6, rtol=1e-6, what="rotate")
    assert_close(y.double().norm(dim=-1), x.double().norm(dim=-1), atol=1e-5, rtol=1e-6, what="norm")
    assert_close(hadamard_rotate(y), x.float(), atol=1e-5, rtol=1e-5, what="rotate twice")
