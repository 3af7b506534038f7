"""Every registered Triton and TileLang implementation compiles for every target of its backends, with
the run-time specialisation, and its artifacts keep the claims of codegen.DEFAULT_EXPECTS and the specs."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from dsv4_kernels import codegen, dispatch, ladder
from dsv4_kernels.backends import find_target
from dsv4_kernels.codegen import (Artifact, amdgcn_resources, check_claims, reduced_precision_mma, scaled_mma,
                                  targets_for, widest_global_load)


@pytest.mark.codegen
def test_compiles(codegen_job, codegen_results):
    result = codegen_results[codegen_job]
    assert result["ok"], result.get("error")
    if result.get("crash_retry"):
        warnings.warn(f"{'/'.join(codegen_job)} compiled on a second try; the first {result['crash_retry']}")
    arts = [Artifact.from_json(a) for a in result["artifacts"]]
    assert arts and all(a.text for a in arts)
    for a in arts:
        assert not a.failed_claims(), f"{a.label}: {a.failed_claims()} ({a.resources})"
        if a.binary_kind == "cubin":
            assert a.resources["reg"] > 0 and "no_local" in a.claims, f"{a.label}: {a.resources}"
        if a.kind in ("ptx", "amdgcn"):  # Triton: a binary, and the no-spill and precision claims were checked
            assert a.level == "binary" and {"no_local", "reduced_precision_mma"} <= set(a.claims), (a.label, a.claims)
        if a.kind == "amdgcn":
            assert a.resources["vgpr"] > 0, f"{a.label}: {a.resources}"
    if codegen_job[0].startswith("mhc_") and codegen_job[1] == "triton":
        # kernels/mhc/README.md: wide loads and no spills; the projection's dot precision is declared
        # either way (ieee today: reduced_precision_mma False, derived from the source)
        for a in arts:
            assert a.claims["no_local"]["expected"] and a.claims["vector_loads"]["expected"], (a.label, a.claims)
            assert "reduced_precision_mma" in a.claims, (a.label, a.claims)

def test_every_kernel_implementation_has_targets():
    for op in dispatch.ops():
        for impl in dispatch.implementations(op):
            if impl.language != "reference":
                assert targets_for(impl), f"{op}/{impl.name} compiles for no target"
                assert impl.codegen, f"{op}/{impl.name} registers no codegen specs"


def test_amdgcn_resource_parser_on_a_hand_listing():
    asm = "; NumVgprs: 37\n; NumSgprs: 20\n; ScratchSize: 16\n; Occupancy: 8\n; LDSByteSize: 4096 bytes/workgroup\n"
    assert amdgcn_resources(asm) == {"vgpr": 37, "sgpr": 20, "scratch": 16, "lds": 4096, "occupancy": 8}


_FAKE_WORKER = r"""
import json, os, signal, sys
from pathlib import Path
for r in json.loads(sys.stdin.read()):
    mark = Path(sys.argv[1] + "-" + r["op"])  # one mark per request: workers run side by side
    if r["op"] == "crash-always" or (r["op"] == "crash-once" and not mark.exists()):
        mark.touch()
        print("dying on", r["op"], file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)
    print("dsv4k-codegen-result " + json.dumps({**r, "ok": True, "artifacts": []}), flush=True)
"""


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_compile_many_survives_a_compiler_crash(monkeypatch, tmp_path, workers):
    """A subprocess that dies keeps the results so far; the request it died on is retried once in a
    fresh one (marked), one that kills it twice fails with the crash output, and the rest still run;
    with several compiler subprocesses side by side the results still come back in request order."""
    monkeypatch.setattr(codegen, "_WORKER", [sys.executable, "-c", _FAKE_WORKER, str(tmp_path / "crashed")])
    ops = ["a", "crash-once", "b", "crash-always", "c"]
    results = codegen.compile_many([{"op": op, "impl": "x", "target": "t"} for op in ops], workers=workers)
    assert [r["op"] for r in results] == ops
    assert [r["ok"] for r in results] == [True, True, True, False, True]
    assert "crash_retry" not in results[0] and "exit -11" in results[1]["crash_retry"]
    assert "exit -11" in results[3]["error"] and "dying on crash-always" in results[3]["error"]


def test_codegen_workers_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(codegen.WORKERS_ENV, "3")
    assert codegen._default_workers() == 3
    monkeypatch.setenv(codegen.WORKERS_ENV, "0")
    with pytest.raises(ValueError, match="DSV4K_CODEGEN_WORKERS: expected an int >= 1, got '0'"):
        codegen._default_workers()


def test_compile_many_reports_a_worker_that_cannot_start(monkeypatch):
    monkeypatch.setattr(codegen, "_WORKER", [sys.executable, "-c", "raise SystemExit('no compiler here')"])
    with pytest.raises(RuntimeError, match="no compiler here"):
        codegen.compile_many([{"op": "a", "impl": "x", "target": "t"}])


PTX = """
    ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.L1::evict_last.v2.b16 { %rs1, %rs2 }, [ %rd2 + 0 ];
    ld.global.b32 %r9, [ %rd3 + 0 ];
"""


def test_claim_parsers_on_hand_listings():
    assert widest_global_load("ptx", PTX) == 16
    assert widest_global_load("ptx", "ld.global.b32 %r9, [ %rd3 + 0 ];") == 4
    assert widest_global_load("ptx", "cp.async.cg.shared.global [ %r8 + 0 ], [ %rd12 + 0 ], 0x10, %r38;") == 16
    assert widest_global_load("amdgcn", "global_load_dwordx2 v[0:1], v[2:3], off") == 8
    assert widest_global_load("amdgcn", "buffer_load_dwordx4 v[0:3], v4, s[0:3], 0 offen") == 16
    assert reduced_precision_mma("ptx", "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {...}") == [
        "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32"]
    assert reduced_precision_mma("ptx", "cvt.rna.tf32.f32 %r1, %f1;\nfma.rn.f32 %f2, %f3, %f4, %f5;") == [
        "cvt.rna.tf32.f32"]
    asm = "v_mfma_f32_16x16x4_f32 a[0:3], v1, v2, a[0:3]\nv_mfma_f32_16x16x8_xf32 a[0:3]\nv_mfma_f32_32x32x8_bf16"
    assert reduced_precision_mma("amdgcn", asm) == ["v_mfma_f32_16x16x8_xf32", "v_mfma_f32_32x32x8_bf16"]
    claims = check_claims("ptx", PTX + "\n.local .align 4 .b8 __local_depot0[16];", {"reg": 40, "local": 16},
                          {"no_local": True, "vector_loads": True, "reduced_precision_mma": False})
    assert {k: c["ok"] for k, c in claims.items()} == {"no_local": False, "vector_loads": True,
                                                      "reduced_precision_mma": True}
    assert check_claims("hip-source", "__global__ void k() {}", {"note": "source only"}, {"no_local": True}) == {}
    # ptxas puts register spills in the stack frame: LOCAL 0 with STACK 88 is a spill
    spilled = check_claims("ptx", PTX, {"reg": 255, "stack": 88, "local": 0}, {"no_local": True})
    assert not spilled["no_local"]["ok"] and "stack frame 88 B" in spilled["no_local"]["evidence"]
    pair = check_claims("ptx", PTX, {"reg": 128, "stack": 8, "local": 0}, {"no_local": True})["no_local"]
    assert pair["ok"] and "stack frame 8 B" in pair["evidence"]
    assert scaled_mma("ptx", "tcgen05.mma.cta_group::1.kind::mxf8f6f4.block_scale.block32 [%r1], ...;\n"
                             "tcgen05.mma.cta_group::1.kind::f16 [%r2];") == [
        "tcgen05.mma.cta_group::1.kind::mxf8f6f4.block_scale.block32"]
    assert scaled_mma("amdgcn", "v_mfma_scale_f32_16x16x128_f8f6f4 a[0:3]\nv_mfma_f32_16x16x32_bf16") == [
        "v_mfma_scale_f32_16x16x128_f8f6f4"]
    assert not check_claims("amdgcn", "v_mfma_f32_16x16x32_bf16", {}, {"scaled_mma": True})["scaled_mma"]["ok"]


_DOT_KERNEL = """
import triton
import triton.language as tl


@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, PRECISION: tl.constexpr):
    i = tl.arange(0, 32)
    a = tl.load(a_ptr + i[:, None] * 32 + i[None, :])
    b = tl.load(b_ptr + i[:, None] * 32 + i[None, :])
    tl.store(c_ptr + i[:, None] * 32 + i[None, :], tl.dot(a, b, input_precision=PRECISION))
"""


def test_claims_catch_a_tf32_dot_in_a_kernel_that_promises_ieee(tmp_path):
    """A real compile (sm_90a, clean subprocess): an fp32 tl.dot with tf32 fails reduced_precision_mma=False,
    the same dot with ieee passes it, and both load with 16-byte vectors thanks to the pointer hints."""
    (tmp_path / "dotk.py").write_text(_DOT_KERNEL)
    script = textwrap.dedent("""
        import json, sys
        from dsv4_kernels import codegen
        from dsv4_kernels.backends import find_target
        import dotk
        sig = {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32"}
        out = {}
        for p in ("tf32", "ieee"):
            spec = codegen.TritonKernel(dotk.dot_kernel, sig, {"PRECISION": p},
                                        expects={"reduced_precision_mma": False})
            kind, text, _, _, res = codegen._compile_triton(spec, find_target("sm_90a"))
            out[p] = codegen.check_claims(kind, text, res, codegen.expected_claims(spec))
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    tf32 = out["tf32"]["reduced_precision_mma"]
    assert not tf32["ok"] and tf32["evidence"].startswith("found "), tf32
    assert out["ieee"]["reduced_precision_mma"]["ok"]
    assert out["tf32"]["vector_loads"]["ok"] and out["ieee"]["vector_loads"]["ok"]


def _result(kind, binary_kind, claims=None, note=None, ok=True):
    art = Artifact("op", "impl", "t", "k", kind, "text", binary_kind, b"x" if binary_kind else None,
                   {"note": note} if note else {}, 0.1, claims or {})
    return {"ok": ok, "artifacts": [art.to_json()], "error": "boom"}


def test_ladder_labels_binary_and_source_levels_and_fails_a_broken_claim():
    impl = dispatch.Implementation("op", "impl", "tilelang", ("rocm",), "x:y")
    target = find_target("gfx942")
    recs = ladder.codegen_level_records("op", impl, target, _result("hip-source", None, note="needs hipcc"))
    assert [(r.level, r.status, r.reason) for r in recs] == [
        ("codegen-source", "pass", "k: hip-source [needs hipcc]"), ("codegen-binary", "skip", "needs hipcc")]
    ok = {"no_local": {"expected": True, "ok": True, "evidence": "no local memory or scratch"}}
    recs = ladder.codegen_level_records("op", impl, target, _result("amdgcn", "hsaco", ok))
    assert recs[0].reason == "k: amdgcn+hsaco claims held: no_local=True"
    recs = ladder.codegen_level_records("op", impl, target, _result("amdgcn", "hsaco"))
    assert [(r.level, r.status) for r in recs] == [("codegen-binary", "pass")]
    broken = {"vector_loads": {"expected": True, "ok": False, "evidence": "widest global load 4 B per thread"}}
    recs = ladder.codegen_level_records("op", impl, target, _result("amdgcn", "hsaco", broken))
    assert [(r.level, r.status) for r in recs] == [("codegen-binary", "fail")]
    assert "vector_loads: expected True, widest global load 4 B" in recs[0].reason
    recs = ladder.codegen_level_records("op", impl, target, {"ok": False, "error": "CompilationError: x"})
    assert [(r.level, r.status, r.reason) for r in recs] == [("codegen-source", "fail", "CompilationError: x")]


_JIT_SPEC = """
import json
import torch
import dsv4_kernels
from dsv4_kernels import dispatch
from dsv4_kernels.codegen import targets_for
from dsv4_kernels.kernels._triton_util import compile_options, pointer_attrs
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "u8": torch.uint8,
          "i8": torch.int8, "i32": torch.int32, "i64": torch.int64, "fp8e4nv": torch.float8_e4m3fn}
VALUES = {"i32": 5, "i64": 2**31 + 5, "fp32": 0.5}  # the general case: not 1, not a multiple of 16
mismatches, checked = [], 0
for op in dispatch.ops():
    for impl in dispatch.implementations(op):
        if impl.language != "triton":
            continue
        for target in targets_for(impl):
            backend = make_backend(GPUTarget(*target.triton))
            for spec in impl.codegen_specs(target):
                fn = spec.fn
                args = {name: torch.empty(64, dtype=DTYPES[ty[1:]]) if ty.startswith("*") else VALUES[ty]
                        for name, ty in spec.signature.items()}
                binder = create_function_from_signature(fn.signature, fn.params, backend)
                bound, specialization, _ = binder(**args, **spec.constexprs)
                launch = compile_options(spec.num_warps, spec.num_stages)
                _, sig, constexprs, attrs = fn._pack_args(backend, launch, bound, specialization, None)
                got = ({k: v for k, v in sig.items() if v != "constexpr"}, {k: v for k, v in attrs.items() if v},
                       {fn.arg_names[k[0]]: v for k, v in constexprs.items()})
                want = (spec.signature, pointer_attrs(fn, spec.signature, GPUTarget(*target.triton)), spec.constexprs)
                checked += 1
                if got != want:
                    mismatches.append(f"{op}/{impl.name}/{target.name}/{spec.label}: JIT {got!r} codegen {want!r}")
print(json.dumps({"checked": checked, "mismatches": mismatches}))
"""


def test_codegen_compiles_the_specialisation_the_jit_launches():
    """For 16-byte aligned tensors below 2 GiB and general scalars (not 1, not a multiple of 16), the JIT's
    own binder (triton.runtime.jit) derives the signature, pointer hints (on ROCm with the buffer-load
    pointer range) and constants that codegen compiles: every Triton spec, every target."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _JIT_SPEC], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["checked"] >= 20 and not out["mismatches"], out["mismatches"]


def test_a_compile_error_names_its_cause():
    """Triton's CompilationError says where; its __cause__ says why (here: a non-constexpr global)."""
    try:
        try:
            raise NameError("Cannot access global variable SUM_EPS from within @jit'ed function")
        except NameError as inner:
            raise RuntimeError("at 27:4: _finish(w, ids, ...)") from inner
    except RuntimeError as outer:
        text = codegen._describe(outer)
    assert text == ("RuntimeError: at 27:4: _finish(w, ids, ...)\n"
                    "caused by NameError: Cannot access global variable SUM_EPS from within @jit'ed function")


ASCEND_C = """
extern "C" __global__ __mix__(1, 2) void k(__gm__ float* P) {
  __cbuf__ uint8_t *buf_dyn_l1 = (__cbuf__ uint8_t *)0;
  if ASC_IS_AIC {
    ascend_gemm_l1<64, 256, 32, 256, true, bfloat16_t>(acc, ((__cbuf__ bfloat16_t*)buf_dyn_l1 + 24576), b, 0, 0, 0);
  }
  if ASC_IS_AIV {
    ((__ubuf__ float*)buf_dyn_shmem)[(((int32_t)threadIdx.x) + 8448)] = 0;
  }
}
"""


def test_ascend_claim_parsers_on_a_hand_listing():
    assert codegen.ascend_cube_calls(ASCEND_C) == ["ascend_gemm_l1<64, 256, 32, 256, true, bfloat16_t>"]
    assert codegen.ascend_cube_calls(ASCEND_C.replace("__mix__(1, 2)", "__vector__")) == []
    assert codegen.ascend_buffer_extents(ASCEND_C) == {"ub": 8448 * 4, "l1": 24576 * 2, "l0a": 2 * 64 * 256 * 2,
                                                       "l0b": 2 * 32 * 256 * 2}
    held = check_claims("ascend-c", ASCEND_C, {}, {"cube_mma": True, "ub_budget": True})
    assert held["cube_mma"]["ok"] and held["ub_budget"]["ok"], held
    over = ASCEND_C.replace("+ 8448)]", "+ 52000)]")  # 208000 B of UB > 192 KB
    assert not check_claims("ascend-c", over, {}, {"ub_budget": True})["ub_budget"]["ok"]
    assert not check_claims("ascend-c", ASCEND_C, {}, {"cube_mma": False})["cube_mma"]["ok"]
    assert check_claims("ptx", "", {}, {"cube_mma": True}) == {}
