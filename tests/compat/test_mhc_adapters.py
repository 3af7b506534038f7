"""compat mHC adapters (SGLang and vLLM) against the engines' documented semantics, written out here in
fp64: mhc_pre returns (post [..., 4, 1], comb [..., 4, 4], layer_input) with the RMS eps first and the two
hc eps after; mhc_post reads the [..., 4, 1] post; vLLM's fused post-pre returns (residual, post, comb,
layer_input); hc_head / fused_hc_head take (rms eps, hc eps), the other order than dsv4_kernels.mhc_head.
The eps values in these tests are far apart and large enough to move the results, so a swapped pair fails.
"""
from __future__ import annotations

import math

import pytest
import torch

import dsv4_kernels as dk
from dsv4_kernels.compat import sglang, vllm

FLASH_DIM, PRO_DIM = 4096, 7168
RMS_EPS, HC_EPS = 0.5, 1e-3  # both matter: x is small (rms 0.3), so rms_eps changes the mixes by ~2x


def _site(dim, rows=24):
    fn = torch.randn(rows, 4 * dim) / math.sqrt(4 * dim)
    scale = torch.tensor([0.5, 0.5, 2.0]) if rows == 24 else torch.tensor([0.8])
    return fn, scale, 0.5 * torch.randn(rows)


def _state(shape):
    return (0.3 * torch.randn(*shape)).bfloat16()


def _mixes(x, fn, rms_eps):
    xf = x.flatten(-2).double()
    return (xf @ fn.double().T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + rms_eps)


def _split(mixes, scale, base, iters, eps):
    s, b = scale.double(), base.double()
    pre = torch.sigmoid(mixes[..., :4] * s[0] + b[:4]) + eps
    post = 2 * torch.sigmoid(mixes[..., 4:8] * s[1] + b[4:8])
    comb = (mixes[..., 8:] * s[2] + b[8:]).unflatten(-1, (4, 4)).softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


def _pre_expected(x, fn, scale, base, rms_eps, eps, iters=20):
    pre, post, comb = _split(_mixes(x, fn, rms_eps), scale, base, iters, eps)
    y = (pre.unsqueeze(-1) * x.double()).sum(-2)
    return post.unsqueeze(-1), comb, y


def _post_expected(f, res, post, comb):
    return post.double() * f.double().unsqueeze(-2) + torch.einsum("...ij,...id->...jd", comb.double(), res.double())


def _close_bf16(actual, expected):
    assert actual.dtype == torch.bfloat16 and actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected, rtol=2 ** -7, atol=2 ** -16 * max(1.0, float(expected.abs().amax()) if expected.numel() else 1.0))


def _close_f32(actual, expected):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=2e-5)


ENGINES = {"sglang": sglang.mhc_pre, "vllm": vllm.mhc_pre}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("lead,dim", [((3,), PRO_DIM), ((0,), FLASH_DIM), ((2, 1), FLASH_DIM)],
                         ids=["pro-T3", "flash-T0", "flash-B2xS1"])
def test_mhc_pre(engine, lead, dim):
    x, (fn, scale, base) = _state((*lead, 4, dim)), _site(dim)
    post, comb, y = ENGINES[engine](x, fn, scale, base, RMS_EPS, HC_EPS, HC_EPS, 2.0, 20, impl="reference")
    assert post.shape == (*lead, 4, 1) and comb.shape == (*lead, 4, 4) and y.shape == (*lead, dim)
    e_post, e_comb, e_y = _pre_expected(x, fn, scale, base, RMS_EPS, HC_EPS)
    _close_f32(post, e_post)
    _close_f32(comb, e_comb)
    _close_bf16(y, e_y)


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
@pytest.mark.parametrize("T,dim", [(3, PRO_DIM), (0, FLASH_DIM)], ids=["pro-T3", "flash-T0"])
def test_mhc_post_reads_the_4x1_post(engine, T, dim):
    f, res = _state((T, dim)), _state((T, 4, dim))
    post = 2 * torch.rand(T, 4, 1)
    comb = torch.rand(T, 4, 4)
    comb = comb / comb.sum(1, keepdim=True)
    fn = sglang.mhc_post if engine == "sglang" else vllm.mhc_post
    out = fn(f, res, post, comb, impl="reference")
    _close_bf16(out, _post_expected(f, res, post, comb))
    torch.testing.assert_close(fn(f, res, post.squeeze(-1), comb, impl="reference"), out, rtol=0, atol=0)


@pytest.mark.parametrize("T,dim", [(2, PRO_DIM), (0, FLASH_DIM)], ids=["pro-T2", "flash-T0"])
def test_vllm_fused_post_pre_return_order(T, dim):
    f, res = _state((T, dim)), _state((T, 4, dim))
    post, comb = 2 * torch.rand(T, 4, 1), torch.rand(T, 4, 4)
    fn, scale, base = _site(dim)
    out = vllm.mhc_fused_post_pre(f, res, post, comb, fn, scale, base, RMS_EPS, HC_EPS, HC_EPS, 2.0, 20,
                                  impl="reference")
    residual_cur, post_cur, comb_cur, layer_input = out
    separate = vllm.mhc_post(f, res, post, comb, impl="reference")
    torch.testing.assert_close(residual_cur, separate, rtol=0, atol=0)
    e_post, e_comb, e_y = _pre_expected(separate, fn, scale, base, RMS_EPS, HC_EPS)
    _close_f32(post_cur, e_post)
    _close_f32(comb_cur, e_comb)
    _close_bf16(layer_input, e_y)


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
@pytest.mark.parametrize("T,dim", [(3, PRO_DIM), (0, FLASH_DIM)], ids=["pro-T3", "flash-T0"])
def test_hc_head_eps_order(engine, T, dim):
    x, (fn, scale, base) = _state((T, 4, dim)), _site(dim, rows=4)
    call = sglang.fused_hc_head if engine == "sglang" else vllm.hc_head
    y = call(x, fn, scale, base, RMS_EPS, HC_EPS, impl="reference")
    mixes = _mixes(x, fn, RMS_EPS)
    pre = torch.sigmoid(mixes * scale.double()[0] + base.double()) + HC_EPS
    _close_bf16(y, (pre.unsqueeze(-1) * x.double()).sum(-2))
    if T:  # the trap is visible: passing the pair in dsv4_kernels.mhc_head's order gives another result
        swapped = dk.mhc_head(x, fn, scale, base, RMS_EPS, HC_EPS, impl="reference")
        assert (swapped.float() - y.float()).abs().max() > 1e-2


@pytest.mark.parametrize("lead", [(2, 3), (0, 1)], ids=["b2-s3", "b0-s1"])
def test_sglang_hc_split_sinkhorn(lead):
    mixes, (_, scale, base) = torch.randn(*lead, 24), _site(4)
    pre, post, comb = sglang.hc_split_sinkhorn(mixes, scale, base, 4, 20, HC_EPS, impl="reference")
    e_pre, e_post, e_comb = _split(mixes.double(), scale, base, 20, HC_EPS)
    assert pre.shape == post.shape == (*lead, 4) and comb.shape == (*lead, 4, 4)
    for actual, expected in ((pre, e_pre), (post, e_post), (comb, e_comb)):
        _close_f32(actual, expected)


def test_outputs_are_views_of_the_op_outputs(monkeypatch):
    seen = {}
    real = dk.mhc_pre

    def spy(*args, **kwargs):
        seen["args"], seen["out"] = args, real(*args, **kwargs)
        return seen["out"]

    monkeypatch.setattr(dk, "mhc_pre", spy)
    x, (fn, scale, base) = _state((2, 1, 4, 512)), _site(512)
    post, comb, y = vllm.mhc_pre(x, fn, scale, base, RMS_EPS, HC_EPS, HC_EPS, 2.0, 20, impl="reference")
    op_y, op_post, op_comb = seen["out"]
    assert seen["args"][0].data_ptr() == x.data_ptr() and seen["args"][1] is fn
    assert (y.data_ptr(), post.data_ptr(), comb.data_ptr()) == (op_y.data_ptr(), op_post.data_ptr(),
                                                                 op_comb.data_ptr())


def test_default_dispatch():
    x, (fn, scale, base) = _state((2, 4, 256)), _site(256)
    post, comb, y = sglang.mhc_pre(x, fn, scale, base, RMS_EPS, HC_EPS, HC_EPS, 2.0, 20)
    e_post, e_comb, e_y = _pre_expected(x, fn, scale, base, RMS_EPS, HC_EPS)
    _close_f32(post, e_post)
    _close_bf16(y, e_y)


def _pre_args(**over):
    x, (fn, scale, base) = _state((2, 4, 256)), _site(256)
    args = dict(residual=x, fn=fn, hc_scale=scale, hc_base=base, rms_eps=1e-6, hc_pre_eps=1e-6, hc_sinkhorn_eps=1e-6,
                hc_post_mult_value=2.0, sinkhorn_repeat=20)
    args.update(over)
    return args


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
@pytest.mark.parametrize("over,match", [
    (dict(hc_pre_eps=1e-5), "hc_pre_eps: expected the value of hc_sinkhorn_eps"),
    (dict(hc_post_mult_value=1.0), "hc_post_mult_value: expected 2.0"),
    (dict(norm_weight=torch.ones(256)), "norm_weight: expected None"),
    (dict(n_splits=0), "n_splits: expected an int >= 1"),
    (dict(rms_eps=0.0), "rms_eps: expected a positive finite float"),
    (dict(residual=_state((2, 256, 4)).transpose(1, 2)), "residual: expected a contiguous tensor"),
])
def test_pre_refusals_name_the_argument(engine, over, match):
    with pytest.raises(ValueError, match=match):
        ENGINES[engine](**_pre_args(**over))


def test_post_refuses_a_bad_post_shape():
    f, res = _state((2, 256)), _state((2, 4, 256))
    with pytest.raises(ValueError, match=r"post_layer_mix: expected shape \(\.\.\., 4, 1\)"):
        vllm.mhc_post(f, res, torch.rand(2, 4, 2), torch.rand(2, 4, 4))


def test_op_errors_carry_the_engines_argument_names():
    f, res = _state((2, 256)), _state((2, 4, 256))
    with pytest.raises(ValueError, match=r"^x: expected dtype torch.bfloat16.*dsv4_kernels.mhc_post calls it f"):
        sglang.mhc_post(f.float(), res, torch.rand(2, 4, 1), torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match=r"^fn: expected shape .*dsv4_kernels.mhc_pre calls it hc_fn"):
        vllm.mhc_pre(**_pre_args(fn=torch.randn(24, 512)))
    with pytest.raises(ValueError, match=r"^sinkhorn_repeat: expected an int >= 1"):
        sglang.mhc_pre(**_pre_args(sinkhorn_repeat=0))



def _traced(fn, *args, **kwargs):
    """fn under torch.compile(dynamic=True, fullgraph=True) with symbolic floats, as
    tests/test_public_surface.py traces the ops: no graph break, no host read of a symbolic value."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(specialize_float=False):
        return torch.compile(lambda *a: fn(*a, **kwargs), dynamic=True, backend="eager", fullgraph=True)(*args)


def test_adapters_trace_under_dynamic_torch_compile():
    """The engines compile their models (vLLM by default, SGLang in graph capture): the adapters' own checks
    and views must trace too, and give the eager results."""
    x, (fn, scale, base) = _state((3, 4, 256)), _site(256)
    args = (x, fn, scale, base, RMS_EPS, HC_EPS, HC_EPS, 2.0, 20)
    for g, w in zip(_traced(sglang.mhc_pre, *args, impl="reference"), sglang.mhc_pre(*args, impl="reference")):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    f, post, comb = _state((3, 256)), 2 * torch.rand(3, 4, 1), torch.rand(3, 4, 4)
    args = (f, x, post, comb, fn, scale, base, RMS_EPS, HC_EPS, HC_EPS, 2.0, 20)
    for g, w in zip(_traced(vllm.mhc_fused_post_pre, *args, impl="reference"),
                    vllm.mhc_fused_post_pre(*args, impl="reference")):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
