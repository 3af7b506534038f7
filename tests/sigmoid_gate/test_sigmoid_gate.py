"""sigmoid_gate (the demo op) through every implementation, as every op is tested."""
import pytest
import torch
from hypothesis import given, strategies as st

import dsv4_kernels
from dsv4_kernels import dispatch
from dsv4_kernels.reference.sigmoid_gate import sigmoid_gate as reference
from dsv4_kernels.testing import assert_close

# One bf16/fp16 rounding of the same fp32 value: within one ulp (2^-7 relative bounds it for both).
# The Triton interpreter truncates fp32->bf16 instead of rounding: still within one ulp.
RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-6}

SHAPES = {
    "flash-decode": (3, 4096),        # V4-Flash hidden
    "pro-decode": (3, 7168),          # V4-Pro hidden
    "flash-heads": (2, 64, 512),      # 64 heads x head_dim
    "pro-heads": (1, 128, 512),       # 128 heads
    "odd": (63, 100),
    "one": (1,),
    "zero-tokens": (0, 7168),
}


def _check(impl, device, shape, dtype):
    x = torch.randn(shape, dtype=dtype, device=device)
    g = torch.randn(shape, dtype=dtype, device=device) * 4
    out = dsv4_kernels.sigmoid_gate(x, g, impl=impl)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert_close(out.float().cpu(), reference(x.cpu(), g.cpu()).float(), atol=1e-6, rtol=RTOL[dtype])


@pytest.mark.op("sigmoid_gate")
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(impl, device, shape):
    _check(impl, device, shape, torch.bfloat16)


@pytest.mark.op("sigmoid_gate")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_other_dtypes(impl, device, dtype):
    _check(impl, device, (5, 300), dtype)


@pytest.mark.op("sigmoid_gate")
def test_special_values(impl, device):
    x = torch.tensor([1.0, 2.0, -3.0, float("nan"), 1.0, float("inf")], device=device)
    g = torch.tensor([float("-inf"), float("inf"), 0.0, 1.0, float("nan"), 2.0], device=device)
    out = dsv4_kernels.sigmoid_gate(x, g, impl=impl).cpu()
    expected = torch.tensor([0.0, 2.0, -1.5, float("nan"), float("nan"), float("inf")])
    assert_close(out, expected, atol=0, rtol=1e-6)


@pytest.mark.op("sigmoid_gate")
@given(n=st.integers(0, 5000), seed=st.integers(0, 2**31 - 1))
def test_any_length(impl, device, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen).to(torch.bfloat16).to(device)
    g = (torch.randn(n, generator=gen) * 8).to(torch.bfloat16).to(device)
    out = dsv4_kernels.sigmoid_gate(x, g, impl=impl)
    assert_close(out.float().cpu(), reference(x.cpu(), g.cpu()).float(), atol=1e-6, rtol=2**-7)


def test_reference_against_fp64_formula():
    x = torch.randn(1000, dtype=torch.float64)
    g = torch.randn(1000, dtype=torch.float64) * 6
    expected = x / (1 + torch.exp(-g))
    assert_close(reference(x.float(), g.float()).double(), expected, atol=1e-7, rtol=1e-6)
    assert reference(torch.tensor([2.0]), torch.tensor([0.0])).item() == 1.0  # sigmoid(0) = 1/2


@pytest.mark.parametrize("bad, message", [
    (lambda x, g: (x.to(torch.int32), g), "x: expected dtype torch.bfloat16 or torch.float16 or torch.float32, got torch.int32"),
    (lambda x, g: (x, g.float()), "gate: expected dtype torch.bfloat16, got torch.float32"),
    (lambda x, g: (x, g[:, :-1].contiguous()), "gate: expected shape (4, 4096), got (4, 4095)"),
    (lambda x, g: (x.t(), g.t().contiguous()), "x: expected a contiguous tensor"),
    (lambda x, g: (x.tolist(), g), "x: expected a torch.Tensor, got list"),
])
def test_bad_input_is_refused_before_launch(bad, message):
    x = torch.randn(4, 4096, dtype=torch.bfloat16)
    g = torch.randn(4, 4096, dtype=torch.bfloat16)
    with pytest.raises(ValueError) as err:
        dsv4_kernels.sigmoid_gate(*bad(x, g))
    assert message in str(err.value)


def test_torch_library_op_is_complete():
    """Schema, fake implementation and autograd registration pass torch's own op checker."""
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    g = torch.randn(4, 96, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.dsv4.sigmoid_gate.default, (x, g, "reference"),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_without_graph_breaks():
    torch._dynamo.reset()

    def block(x, g):
        return dsv4_kernels.sigmoid_gate(x, g, impl="reference") * 2

    compiled = torch.compile(block, fullgraph=True, backend="eager")
    x = torch.randn(3, 4096, dtype=torch.bfloat16)
    g = torch.randn(3, 4096, dtype=torch.bfloat16)
    assert torch.equal(compiled(x, g), block(x, g))
    explain = torch._dynamo.explain(block)(x, g)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def test_explain_names_the_choice_and_every_reason(monkeypatch):
    monkeypatch.delenv("DSV4K_IMPL", raising=False)
    x = torch.randn(2, 8)
    decision = dsv4_kernels.explain("sigmoid_gate", x, x)
    names = [c.impl.name for c in decision.candidates]
    assert set(names) == {i.name for i in dispatch.implementations("sigmoid_gate")}
    assert decision.chosen.name == "triton"  # interpreter on in the CPU test run: triton serves the CPU
    text = str(decision)
    assert "tilelang" in text and "does not serve cpu" in text and "tilelang_ascend" in text


def test_env_choice_and_argument(monkeypatch):
    x = torch.randn(2, 8)
    monkeypatch.setenv("DSV4K_IMPL", "sigmoid_gate=reference")
    assert dispatch.select("sigmoid_gate", (x, x)).chosen.name == "reference"
    assert dispatch.select("sigmoid_gate", (x, x), impl="triton").chosen.name == "triton"  # argument wins
    monkeypatch.setenv("DSV4K_IMPL", "sigmoid_gate=tilelang")
    with pytest.raises(dispatch.ImplementationUnavailable, match="requested by DSV4K_IMPL but cannot run on cpu"):
        dsv4_kernels.sigmoid_gate(x, x)
    monkeypatch.setenv("DSV4K_IMPL", "sigmoid_gate=cutlass")
    with pytest.raises(ValueError, match="has no implementation 'cutlass'; expected one of triton, tilelang"):
        dsv4_kernels.sigmoid_gate(x, x)
