"""Compile registered Triton and TileLang implementations for a named target without the device.

What each target produces (see ../shared/TOOLCHAIN.md):
- Triton, CUDA sm_90a / sm_100a: PTX and a cubin (triton's bundled ptxas); registers, stack and shared
  memory from triton's bundled cuobjdump.
- Triton, ROCm gfx942 / gfx950: AMDGCN and a hsaco; VGPR/SGPR/scratch/LDS from the AMDGCN listing.
- TileLang GPU dialect, CUDA: CUDA C++ source, then a cubin built with the machine's nvcc when there is one.
- TileLang GPU dialect, ROCm: HIP source (building a hsaco needs hipcc, absent here).
- TileLang Ascend dialect: Ascend C source (building needs CANN's bisheng, absent here).

Triton kernels defined under the interpreter (TRITON_INTERPRET=1) cannot be compiled ahead of time, and
TVM's HIP code generator writes warnings straight to stderr, so `compile_many` runs the compilers in one
clean subprocess (TRITON_INTERPRET removed) and shows its stderr only when the subprocess fails.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from dsv4_kernels import dispatch


@dataclass
class TritonKernel:
    """A @triton.jit function with the argument types and constexprs of one specialisation."""

    fn: Callable
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""


@dataclass
class TileLangKernel:
    """A TileLang prim_func, in the dialect of the target it is compiled for."""

    func: Any
    label: str = ""


@dataclass
class Artifact:
    op: str
    impl: str
    target: str
    label: str
    kind: str                      # "ptx", "amdgcn", "cuda-source", "hip-source", "ascend-c"
    text: str
    binary_kind: str | None = None  # "cubin", "hsaco" or None
    binary: bytes | None = None
    resources: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["binary"] = base64.b64encode(self.binary).decode() if self.binary else None
        return d

    @staticmethod
    def from_json(d: dict) -> "Artifact":
        d = dict(d)
        d["binary"] = base64.b64decode(d["binary"]) if d.get("binary") else None
        return Artifact(**d)


def targets_for(impl: dispatch.Implementation) -> list:
    """The compile targets of an implementation: those of its backends that its language reaches."""
    from dsv4_kernels.backends import all_targets
    if impl.language == "triton":
        return [t for t in all_targets() if t.backend in impl.backends and t.triton]
    if impl.language == "tilelang":
        return [t for t in all_targets() if t.backend in impl.backends and t.tilelang]
    return []


def _cuobjdump() -> str | None:
    import triton
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def cubin_resources(cubin: bytes) -> dict:
    """Registers, stack, shared and local memory per kernel function of a cubin (cuobjdump)."""
    tool = _cuobjdump()
    if tool is None:
        return {"note": "cuobjdump not found: no resource report"}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    res = {}
    for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out):
        res[key.lower()] = max(res.get(key.lower(), 0), int(value))
    return res


def amdgcn_resources(asm: str) -> dict:
    """VGPRs, SGPRs, scratch (spill) bytes, LDS bytes and occupancy from an AMDGCN listing's comments."""
    fields = {"vgpr": r";\s*NumVgprs:\s*(\d+)", "sgpr": r";\s*NumSgprs:\s*(\d+)",
              "scratch": r";\s*ScratchSize:\s*(\d+)", "lds": r";\s*LDSByteSize:\s*(\d+)",
              "occupancy": r";\s*Occupancy:\s*(\d+)"}
    res = {}
    for key, pattern in fields.items():
        values = [int(v) for v in re.findall(pattern, asm)]
        if values:
            res[key] = max(values)
    return res


def _compile_triton(spec: TritonKernel, target) -> tuple[str, str, str, bytes, dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if not isinstance(spec.fn, triton.runtime.JITFunction):
        raise RuntimeError("Triton kernels were imported under TRITON_INTERPRET=1; compile in a clean process")
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(src, target=GPUTarget(*target.triton),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    meta = {"num_warps": compiled.metadata.num_warps, "shared_bytes": compiled.metadata.shared}
    if target.backend == "cuda":
        return "ptx", compiled.asm["ptx"], "cubin", compiled.asm["cubin"], {**meta, **cubin_resources(compiled.asm["cubin"])}
    asm = compiled.asm["amdgcn"]
    return "amdgcn", asm, "hsaco", compiled.asm["hsaco"], {**meta, **amdgcn_resources(asm)}


def _compile_tilelang(spec: TileLangKernel, target) -> tuple[str, str, str | None, bytes | None, dict]:
    import tilelang
    from tvm.target import Target
    with Target(target.tilelang):
        source = str(tilelang.lower(spec.func, target=target.tilelang, enable_device_compile=False).kernel_source)
    if target.tilelang_dialect == "ascend":
        return "ascend-c", source, None, None, {"note": "source only: building needs CANN's bisheng"}
    if target.backend == "rocm":
        return "hip-source", source, None, None, {"note": "source only: building a hsaco needs hipcc"}
    if shutil.which("nvcc") is None:
        return "cuda-source", source, None, None, {"note": "source only: nvcc not found"}
    from tilelang.contrib import nvcc
    cubin = nvcc.compile_cuda(source, target_format="cubin", arch=target.tilelang["arch"],
                              options=nvcc.default_compile_options())
    return "cuda-source", source, "cubin", cubin, cubin_resources(cubin)


def compile_impl(op: str, impl_name: str, target_name: str) -> list[Artifact]:
    """Compile every kernel spec of one implementation for one target, in this process."""
    from dsv4_kernels.backends import find_target
    import dsv4_kernels  # noqa: F401  (registers the ops)
    impl = dispatch.get(op, impl_name)
    target = find_target(target_name)
    if target not in targets_for(impl):
        names = ", ".join(t.name for t in targets_for(impl)) or "none"
        others = [i.name for i in dispatch.implementations(op) if target in targets_for(i)]
        hint = f"; implementations that do: {', '.join(others)}" if others else ""
        raise ValueError(f"{op}/{impl_name} does not compile for {target_name}; its targets: {names}{hint}")
    artifacts = []
    for spec in impl.codegen_specs(target):
        t0 = time.perf_counter()
        if isinstance(spec, TritonKernel):
            kind, text, bkind, binary, res = _compile_triton(spec, target)
        else:
            kind, text, bkind, binary, res = _compile_tilelang(spec, target)
        artifacts.append(Artifact(op, impl_name, target_name, spec.label, kind, text, bkind, binary, res,
                                  round(time.perf_counter() - t0, 3)))
    if not artifacts:
        raise RuntimeError(f"{op}/{impl_name} registered no kernel specs for {target_name}")
    return artifacts


def _compile_request(req: dict) -> dict:
    try:
        arts = compile_impl(req["op"], req["impl"], req["target"])
        return {**req, "ok": True, "artifacts": [a.to_json() for a in arts]}
    except Exception as exc:  # reported per request: one failing target must not hide the others
        return {**req, "ok": False, "error": f"{type(exc).__name__}: {exc}"}


_RESULT_MARK = "dsv4k-codegen-result "
_WORKER = [sys.executable, "-c", "import sys; from dsv4_kernels.codegen import main; sys.exit(main())"]


def _crash_summary(proc: subprocess.CompletedProcess) -> str:
    return f"codegen subprocess died (exit {proc.returncode}):\n{proc.stderr[-4000:]}"


def compile_many(requests: list[dict], timeout: float = 1800) -> list[dict]:
    """Compile [{"op", "impl", "target"}, ...] in clean subprocesses; each result adds "ok" and
    "artifacts" or "error", in the order of the requests.

    The subprocess reports one result per line as it goes. When it dies (TVM's C++ code generator has
    been seen to segfault now and then on a build that succeeds when repeated), the results so far are
    kept, the request it died on is compiled once more in a fresh subprocess, and the rest follow. A
    request that kills the compiler twice fails with the crash's output; one that succeeded on the
    second try carries the first crash in "crash_retry", and the codegen tests warn about it.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results: list[dict] = []
    remaining = list(requests)
    retried: dict[int, str] = {}
    while remaining:
        proc = subprocess.run(_WORKER, input=json.dumps(remaining),
                              capture_output=True, text=True, env=env, timeout=timeout)
        got = [json.loads(line[len(_RESULT_MARK):]) for line in proc.stdout.splitlines()
               if line.startswith(_RESULT_MARK)]
        for r in got:
            first_crash = retried.pop(len(results), None)
            results.append({**r, "crash_retry": first_crash} if first_crash else r)
        remaining = remaining[len(got):]
        if not remaining:
            break  # every result arrived (a crash on the way out loses nothing)
        if proc.returncode > 0 and not got:
            raise RuntimeError(_crash_summary(proc))  # it failed before compiling anything: no retry
        index = len(results)
        if index in retried:  # the same request killed it twice: report it and go on with the rest
            results.append({**remaining[0], "ok": False, "error": _crash_summary(proc)})
            del retried[index]
            remaining = remaining[1:]
        else:
            retried[index] = _crash_summary(proc)
    return results


def main() -> int:
    """Subprocess entry of compile_many: JSON requests on stdin, one marked JSON result line per request
    on stdout, written as each finishes."""
    requests = json.loads(sys.stdin.read())
    for r in requests:
        print(f"compiling {r['op']}/{r['impl']} for {r['target']}", file=sys.stderr, flush=True)
        print(_RESULT_MARK + json.dumps(_compile_request(r)), flush=True)
    return 0
