"""Backend descriptors: targets, peak tables, tuned-config folders."""
import pytest

from dsv4_kernels.backends import BACKEND_NAMES, all_targets, find_target, get_backend


def test_targets_named_in_the_architecture():
    assert [t.name for t in all_targets()] == ["sm_90a", "sm_100a", "gfx942", "gfx950", "ascend950"]
    assert find_target("sm_90a").triton == ("cuda", 90, 32)
    assert find_target("gfx942").triton == ("hip", "gfx942", 64)  # wave64
    assert find_target("gfx950").tilelang == {"kind": "hip", "mcpu": "gfx950"}
    assert find_target("sm_100a").tilelang == {"kind": "cuda", "arch": "sm_100a"}
    asc = find_target("ascend950")
    assert asc.triton is None and asc.tilelang_dialect == "ascend"
    with pytest.raises(ValueError, match="unknown target 'sm_80'; expected one of sm_90a"):
        find_target("sm_80")


def test_peak_tables_cover_the_chips_users_run():
    chips = {p.chip for name in BACKEND_NAMES for p in get_backend(name).peaks}
    assert chips == {"H100", "H200", "B200", "GB300", "MI300X", "MI355X", "Ascend 910C", "Ascend 950"}
    for name in BACKEND_NAMES:
        for p in get_backend(name).peaks:
            assert p.source and p.hbm_tbps > 0
            rates = [r for r in (p.bf16_tflops, p.fp8_tflops, p.fp4_tflops) if r is not None]
            assert rates and all(r > 0 for r in rates)
    assert get_backend("cuda").peak("H100").fp4_tflops is None  # Hopper has no FP4 tensor cores
    assert get_backend("rocm").peak("gfx950").chip == "MI355X"
    assert get_backend("cuda").peak("sm_80") is None


def test_tuned_folders_exist_and_missing_tables_are_empty():
    for name in BACKEND_NAMES:
        b = get_backend(name)
        assert b.tuned_dir.is_dir()
        assert b.tuned("no_such_arch") == {}
    with pytest.raises(ValueError, match="unknown backend 'metal'"):
        get_backend("metal")
