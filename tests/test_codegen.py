"""Every registered Triton and TileLang implementation compiles for every target of its backends."""
import pytest

from dsv4_kernels.codegen import Artifact, amdgcn_resources, targets_for
from dsv4_kernels import dispatch


@pytest.mark.codegen
def test_compiles(codegen_job, codegen_results):
    result = codegen_results[codegen_job]
    assert result["ok"], result.get("error")
    arts = [Artifact.from_json(a) for a in result["artifacts"]]
    assert arts and all(a.text for a in arts)
    for a in arts:
        if a.binary_kind == "cubin":
            assert a.resources["reg"] > 0 and a.resources["local"] == 0, f"{a.label}: {a.resources} (spills?)"
        if a.kind == "amdgcn":
            assert a.resources["vgpr"] > 0 and a.resources["scratch"] == 0, f"{a.label}: {a.resources} (spills?)"


def test_every_kernel_implementation_has_targets():
    for op in dispatch.ops():
        for impl in dispatch.implementations(op):
            if impl.language != "reference":
                assert targets_for(impl), f"{op}/{impl.name} compiles for no target"
                assert impl.codegen, f"{op}/{impl.name} registers no codegen specs"


def test_amdgcn_resource_parser_on_a_hand_listing():
    asm = "; NumVgprs: 37\n; NumSgprs: 20\n; ScratchSize: 16\n; Occupancy: 8\n; LDSByteSize: 4096 bytes/workgroup\n"
    assert amdgcn_resources(asm) == {"vgpr": 37, "sgpr": 20, "scratch": 16, "lds": 4096, "occupancy": 8}
