"""What the demo op's generated code must contain on each target."""
import pytest

CHECKS = {
    ("triton", "sm_90a"): ".target sm_90a",
    ("triton", "sm_100a"): ".target sm_100a",
    ("triton", "gfx942"): "gfx942",
    ("triton", "gfx950"): "gfx950",
    ("tilelang", "sm_90a"): "__global__",
    ("tilelang", "gfx942"): "__global__",
    ("tilelang_ascend", "ascend950"): "__simt_vf__",  # the SIMT vector function of the Ascend dialect
}


@pytest.mark.codegen
@pytest.mark.parametrize("impl_name, target", CHECKS, ids=[f"{i}-{t}" for i, t in CHECKS])
def test_generated_code(impl_name, target, codegen_results):
    result = codegen_results.get(("sigmoid_gate", impl_name, target))
    if result is None:
        pytest.skip(f"{target} is not compiled in this run (another --backend, or the default run without --all-targets)")
    assert result["ok"], result.get("error")
    for art in result["artifacts"]:
        assert CHECKS[(impl_name, target)] in art["text"], f"{art['label']}: marker missing"
    if impl_name == "tilelang" and target == "sm_90a":
        assert all(a["binary_kind"] == "cubin" for a in result["artifacts"]), "nvcc built no cubin"
