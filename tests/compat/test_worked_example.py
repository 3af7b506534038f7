"""The README's worked decode step runs as written (the code block after <!-- worked-example -->), and what
it computes holds: the decode step's compressed entries are the ones a prefill of one more token emits and
stores, the FP8-cache attention equals the bf16 op on the dequantised cache, and the routed MoE is finite."""
from __future__ import annotations

import pathlib
import re

import torch

import dsv4_kernels as dk

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text()
    found = re.search(r"<!-- worked-example -->\s*```python\n(.*?)```", text, re.S)
    assert found, "README.md: no ```python block after <!-- worked-example -->"
    return found.group(1)


def test_readme_decode_step_runs():
    scope: dict = {}
    exec(compile(_example(), str(README) + ":worked-example", "exec"), scope)
    y, out, lse = scope["y"], scope["out"], scope["lse"]
    assert y.isfinite().all() and out.isfinite().all()
    B, H = scope["B"], scope["H"]
    assert out.shape == (B, H, 512) and lse.shape == (B, H) and lse.isfinite().all()


def test_decode_entries_match_a_longer_prefill():
    """The example's compressor pattern (prefill S, decode token S) against prefill(S + 1) directly."""
    torch.manual_seed(1)
    R, D, S = 128, 512, 127
    cos, sin = torch.randn(256, 32), torch.randn(256, 32)
    ape, norm_w = 0.1 * torch.randn(R, D), torch.ones(D)
    kv, score = torch.randn(S + 1, D), torch.randn(S + 1, D)
    fused = dict(norm_weight=norm_w, rope_cos=cos, rope_sin=sin)
    _, kvs, scs = dk.compressor_prefill(kv[:S], score[:S], ape, R, **fused, impl="reference")
    entries, emitted = dk.compressor_decode(kvs[None].clone(), scs[None].clone(), kv[S:], score[S:], ape,
                                            torch.tensor([S]), R, **fused, impl="reference")
    full, _, _ = dk.compressor_prefill(kv, score, ape, R, **fused, impl="reference")
    assert emitted.tolist() == [True]
    torch.testing.assert_close(entries.float(), full.float(), rtol=2 ** -7, atol=1e-6)
