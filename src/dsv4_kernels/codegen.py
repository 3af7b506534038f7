"""Compile registered Triton and TileLang implementations for a named target without the device.

Two levels of result, labelled in every Artifact (`level`) and ladder record: "binary" (a cubin or a
hsaco, what the driver loads) and "source" (HIP, Ascend C or CUDA source that still needs a compiler
absent here). What each target produces (see docs/toolchain.md):
- Triton, CUDA sm_90a / sm_100a: PTX and a cubin (triton's bundled ptxas); registers, stack and shared
  memory from triton's bundled cuobjdump.
- Triton, ROCm gfx942 / gfx950: AMDGCN and a hsaco; VGPR/SGPR/scratch/LDS from the AMDGCN listing.
- TileLang GPU dialect, CUDA: CUDA C++ source, then a cubin built with the machine's nvcc when there is one.
- TileLang GPU dialect, ROCm: HIP source (building a hsaco needs hipcc, absent here).
- TileLang Ascend dialect: Ascend C source (building needs CANN's bisheng, absent here).

Triton kernels are compiled as the JIT specialises them at launch: pointer arguments 16-byte aligned
(kernels/_triton_util.py: `pointer_attrs`) and the pinned FP-fusion option (`compile_options`). Each
artifact then has its claims checked (`check_claims`): what a kernel's docs promise about the machine
code, from DEFAULT_EXPECTS, the kernel's own dot precision and the spec's `expects`.

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


# Claims every kernel's artifacts are checked against unless its spec says otherwise (True: must hold,
# False: the opposite must hold, None: not checked):
#   no_local: no local memory (CUDA: no .local in the PTX, cuobjdump LOCAL 0 and a STACK frame of at most
#       SPILL_ALLOWANCE bytes -- ptxas puts register spills in the stack frame, and at the 128-register
#       occupancy point it sometimes spills one 8-byte pair, which the evidence still names; ROCm:
#       ScratchSize 0) -- a spill or a stack array is a performance bug the CPU cannot see;
#   vector_loads: some global load moves >= 8 bytes per thread (ld.global.v2/v4, cp.async 8/16 bytes,
#       global/buffer_load_dwordx2..4) -- a kernel that reads with scalar loads wastes most of its bandwidth;
#   reduced_precision_mma: tensor-core instructions that round their inputs (CUDA mma/wgmma/tcgen05,
#       tf32 conversions; ROCm MFMA on xf32, bf16, fp16, fp8 operands; CDNA's fp32-operand MFMA that
#       Triton emits for input_precision="ieee" keeps fp32 products and is not counted). Triton kernels
#       derive it from their source when the spec does not set it: False when every tl.dot in the
#       kernel's body says input_precision="ieee" (or there is no tl.dot), else not checked;
#   scaled_mma: the block-scaled MXFP4 MMA (CUDA tcgen05.mma ... block_scale, ROCm v_mfma_scale_*), for the
#       paths of chips that have it (never in DEFAULT_EXPECTS).
DEFAULT_EXPECTS = {"no_local": True, "vector_loads": True}
SPILL_ALLOWANCE = 8   # bytes of CUDA stack frame no_local tolerates (see above)


@dataclass
class TritonKernel:
    """A @triton.jit function with the argument types and constexprs of one specialisation.

    expects: claims on the compiled code that override DEFAULT_EXPECTS and the derived
    reduced_precision_mma, e.g. {"reduced_precision_mma": True} for a kernel meant to run on tensor
    cores, {"vector_loads": None} for one whose loads cannot vectorise without integer specialisation.
    """

    fn: Callable
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    expects: dict[str, bool | None] = field(default_factory=dict)


@dataclass
class TileLangKernel:
    """A TileLang prim_func, in the dialect of the target it is compiled for. Its binaries (a cubin)
    are checked for no_local; `expects` as in TritonKernel, on binaries only."""

    func: Any
    label: str = ""
    expects: dict[str, bool | None] = field(default_factory=lambda: {"no_local": True})
    # source_check(text) -> problems: what the kernel's own design promises about its source (Ascend C
    # has no binary here to read resources from); recorded as the claim "source_plan", which must hold.
    source_check: Callable[[str], list[str]] | None = None


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
    claims: dict = field(default_factory=dict)  # name -> {"expected", "ok", "evidence"} (check_claims)

    @property
    def level(self) -> str:
        """"binary" when the driver-loadable cubin or hsaco was built, else "source"."""
        return "binary" if self.binary_kind else "source"

    def to_json(self) -> dict:
        d = asdict(self)
        d["binary"] = base64.b64encode(self.binary).decode() if self.binary else None
        return d

    @staticmethod
    def from_json(d: dict) -> "Artifact":
        d = dict(d)
        d["binary"] = base64.b64decode(d["binary"]) if d.get("binary") else None
        return Artifact(**d)

    def failed_claims(self) -> list[str]:
        return [f"{name}: expected {c['expected']}, {c['evidence']}" for name, c in self.claims.items()
                if not c["ok"]]


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


def widest_global_load(kind: str, text: str) -> int:
    """Bytes per thread of the widest global load in a PTX or AMDGCN listing (0: none found)."""
    widths = [0]
    if kind == "ptx":
        for n, bits in re.findall(r"\bld\.global(?:\.\w+)*?\.v(\d)\.[bfus](\d+)", text):
            widths.append(int(n) * int(bits) // 8)
        for bits in re.findall(r"\bld\.global(?:\.\w+)*?\.[bfus](\d+)\b", text):
            widths.append(int(bits) // 8)
        copies = re.findall(r"\bcp\.async\.\w+\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-f]+|\d+)", text)
        widths += [int(n, 0) for n in copies]
    elif kind == "amdgcn":
        for op, n in re.findall(r"\b(global|buffer)_load(?:_lds)?_dwordx(\d)", text):
            widths.append(4 * int(n))
        widths += [int(b) // 8 for b in re.findall(r"\b(?:global|buffer)_load_b(\d+)", text)]
    return max(widths)


def reduced_precision_mma(kind: str, text: str) -> list[str]:
    """The tensor-core instructions in a listing that round their inputs below fp32 (see DEFAULT_EXPECTS)."""
    if kind == "ptx":
        found = re.findall(r"\b(mma\.sync[\w.]*|wgmma\.mma_async[\w.]*|tcgen05\.mma[\w.]*|"
                           r"cvt\.\w+\.tf32\.f32)", text)
    elif kind == "amdgcn":
        found = [m.group(0) for m in re.finditer(r"\bv_(?:mfma|smfmac|wmma)\w*", text)
                 if not re.search(r"x\d+_?f(32|64)$", m.group(0))]
    else:
        return []
    return sorted(set(found))


def scaled_mma(kind: str, text: str) -> list[str]:
    """The block-scaled (microscaling) MMA instructions in a listing (see DEFAULT_EXPECTS)."""
    if kind == "ptx":
        return sorted(set(re.findall(r"\btcgen05\.mma[\w.:]*\.block_scale[\w.:]*", text)))
    if kind == "amdgcn":
        return sorted(set(re.findall(r"\bv_mfma_scale_\w+", text)))
    return []


# Ascend on-chip capacities the ub_budget claim holds a kernel's source to: 192 KB of Unified Buffer per
# Vector core (the budget the kernels are planned for), Cube L1 512 KB, L0A / L0B 64 KB (Ascend 910B figures;
# the dav-3510 compiler's own UB limit is 220160 B).
ASCEND_CAPACITY = {"ub": 192 * 1024, "l1": 512 * 1024, "l0a": 64 * 1024, "l0b": 64 * 1024}
_ASCEND_BYTES = {"float": 4, "half": 2, "bfloat16_t": 2, "half_t": 2, "int32_t": 4, "uint8_t": 1, "int8_t": 1,
                 "uint16_t": 2, "uint32_t": 4}


def ascend_cube_calls(text: str) -> list[str]:
    """The Cube GEMM template calls (`ascend_gemm_l1<M, K, N, K_SUB, ...>`, whose body issues asc_mmad)
    inside the AIC branch of a mixed Cube + Vector kernel of TileLang's Ascend C source."""
    aic = text.split("if ASC_IS_AIC", 1)
    if len(aic) < 2 or "__mix__" not in text:
        return []
    body = aic[1].split("if ASC_IS_AIV", 1)[0]
    return re.findall(r"ascend_gemm_l1<[^>]*>", body)


def ascend_buffer_extents(text: str) -> dict[str, int]:
    """Lower bounds of the on-chip bytes an Ascend C listing uses, per scope: UB and L1, the largest
    constant element offset into the dynamic buffer times the element size (the start of the last buffer
    placed there); L0A / L0B, the double-buffered stages of each Cube GEMM call (M x K_SUB and N x K_SUB)."""
    out: dict[str, int] = {}
    for scope, qual, base in (("ub", "__ubuf__", "buf_dyn_shmem"), ("l1", "__cbuf__", "buf_dyn_l1")):
        used = 0
        pattern = rf"\(\({qual} (\w+)\*\){base}\)\[([^\]]*)\]|\({qual} (\w+)\*\){base} \+ \(?([^)]*)\)"
        for m in re.finditer(pattern, text):
            dtype, index = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            literals = [int(v) for v in re.findall(r"(?<![\w.])(\d+)(?![\w.])", index)]
            if literals:
                used = max(used, max(literals) * _ASCEND_BYTES.get(dtype, 4))
        if used or base in text:
            out[scope] = used
    for m in re.finditer(r"ascend_gemm_l1<(\d+), (\d+), (\d+), (\d+), \w+, (\w+)>", text):
        mm, _, nn, ksub = (int(v) for v in m.groups()[:4])
        size = _ASCEND_BYTES.get(m.group(5), 2)
        out["l0a"] = max(out.get("l0a", 0), 2 * mm * ksub * size)
        out["l0b"] = max(out.get("l0b", 0), 2 * nn * ksub * size)
    return out


def _local_memory(kind: str, text: str, resources: dict) -> str | None:
    if kind == "ptx" and re.search(r"^\s*\.local\b", text, re.M):
        return "the PTX declares .local memory"
    if resources.get("local", 0):
        return f"local {resources['local']} B (stack {resources.get('stack', 0)} B)"
    if resources.get("stack", 0) > SPILL_ALLOWANCE:
        return f"stack frame {resources['stack']} B (register spills)"
    if resources.get("scratch", 0):
        return f"scratch {resources['scratch']} B"
    return None


def _dot_precisions(fn) -> list[str | None]:
    """input_precision of every tl.dot call in a @triton.jit function's own source (None: not given)."""
    src = getattr(fn, "src", "")
    calls = re.findall(r"tl\.dot\(([^()]*(?:\([^()]*\)[^()]*)*)\)", src)
    return [(re.search(r"input_precision\s*=\s*[\"'](\w+)[\"']", c) or [None, None])[1] for c in calls]


def expected_claims(spec) -> dict[str, bool]:
    """The claims an artifact of `spec` is checked against: DEFAULT_EXPECTS, the derived
    reduced_precision_mma of a Triton kernel, then the spec's expects; None entries dropped."""
    if isinstance(spec, TritonKernel):
        claims: dict = dict(DEFAULT_EXPECTS)
        if all(p == "ieee" for p in _dot_precisions(spec.fn)):
            claims["reduced_precision_mma"] = False
    else:
        claims = {}
    claims.update(spec.expects)
    return {k: v for k, v in claims.items() if v is not None}


def check_claims(kind: str, text: str, resources: dict, expects: dict[str, bool]) -> dict:
    """{claim: {"expected", "ok", "evidence"}} for the claims a listing can show (PTX, AMDGCN; for source
    listings only no_local from a binary's resources)."""
    out = {}
    for name, want in expects.items():
        if name == "no_local":
            if kind not in ("ptx", "amdgcn") and not {"local", "scratch"} & set(resources):
                continue  # source only: nothing to read the resources from
            problem = _local_memory(kind, text, resources)
            small = f"stack frame {resources['stack']} B, within the allowance" if resources.get("stack") else ""
            have, evidence = problem is None, problem or small or "no local memory or scratch"
        elif name == "vector_loads":
            if kind not in ("ptx", "amdgcn"):
                continue
            width = widest_global_load(kind, text)
            have, evidence = width >= 8, f"widest global load {width} B per thread"
        elif name in ("reduced_precision_mma", "scaled_mma"):
            if kind not in ("ptx", "amdgcn"):
                continue
            found = (reduced_precision_mma if name == "reduced_precision_mma" else scaled_mma)(kind, text)
            have, evidence = bool(found), (f"found {', '.join(found[:4])}" if found else "none found")
        elif name in ("cube_mma", "ub_budget"):
            if kind != "ascend-c":
                continue
            if name == "cube_mma":
                found = ascend_cube_calls(text)
                have, evidence = bool(found), (f"{len(found)} Cube GEMM calls on the AIC ({found[0]})" if found
                                               else "no Cube GEMM call on the AIC")
            else:
                extents = ascend_buffer_extents(text)
                over = [f"{scope} {used} B > {ASCEND_CAPACITY[scope]} B" for scope, used in extents.items()
                        if used > ASCEND_CAPACITY[scope]]
                have = not over
                evidence = "; ".join(over) or ", ".join(f"{s} {b} B" for s, b in extents.items()) or "no buffers"
        else:
            raise ValueError(f"unknown codegen claim {name!r}; expected no_local, vector_loads, "
                             f"reduced_precision_mma, scaled_mma, cube_mma or ub_budget")
        out[name] = {"expected": want, "ok": have == want, "evidence": evidence}
    return out


def _compile_triton(spec: TritonKernel, target) -> tuple[str, str, str, bytes, dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from dsv4_kernels.kernels._triton_util import compile_options, pointer_attrs
    if not isinstance(spec.fn, triton.runtime.JITFunction):
        raise RuntimeError("Triton kernels were imported under TRITON_INTERPRET=1; compile in a clean process")
    gpu = GPUTarget(*target.triton)
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                    attrs=pointer_attrs(spec.fn, spec.signature, gpu))
    compiled = triton.compile(src, target=gpu,
                              options=compile_options(spec.num_warps, spec.num_stages))
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
        claims = check_claims(kind, text, res, expected_claims(spec))
        if getattr(spec, "source_check", None) is not None:
            problems = spec.source_check(text)
            claims["source_plan"] = {"expected": True, "ok": not problems,
                                     "evidence": "; ".join(problems) or "the source shows the plan"}
        artifacts.append(Artifact(op, impl_name, target_name, spec.label, kind, text, bkind, binary, res,
                                  round(time.perf_counter() - t0, 3), claims))
    if not artifacts:
        raise RuntimeError(f"{op}/{impl_name} registered no kernel specs for {target_name}")
    return artifacts


def _describe(exc: BaseException) -> str:
    """The error and its causes: Triton's CompilationError shows where it failed, its __cause__ why (a
    non-constexpr global, a type error), which the outer message alone does not say."""
    parts = []
    while exc is not None and len(parts) < 4:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__
    return "\ncaused by ".join(parts)


def _compile_request(req: dict) -> dict:
    try:
        arts = compile_impl(req["op"], req["impl"], req["target"])
        return {**req, "ok": True, "artifacts": [a.to_json() for a in arts]}
    except Exception as exc:  # reported per request: one failing target must not hide the others
        return {**req, "ok": False, "error": _describe(exc)}


_RESULT_MARK = "dsv4k-codegen-result "
_WORKER = [sys.executable, "-c", "import sys; from dsv4_kernels.codegen import main; sys.exit(main())"]


WORKERS_ENV = "DSV4K_CODEGEN_WORKERS"


def _default_workers() -> int:
    """DSV4K_CODEGEN_WORKERS, else one compiler subprocess per core up to 2 (CI's machine has 2)."""
    raw = os.environ.get(WORKERS_ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{WORKERS_ENV}: expected an int >= 1, got {raw!r}")
        return int(raw)
    return max(1, min(2, os.cpu_count() or 1))


def compile_many(requests: list[dict], timeout: float = 1800, workers: int | None = None,
                 on_result: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Compile [{"op", "impl", "target"}, ...] in clean subprocesses; each result adds "ok" and
    "artifacts" or "error", in the order of the requests.

    workers: compiler subprocesses run side by side (default: _default_workers()); the requests are dealt
    out round-robin and the results put back in order.
    on_result: called with (request index, result) as each result arrives (from the workers' threads),
    for callers that report progress.
    """
    if not requests:
        return []
    workers = max(1, min(len(requests), workers or _default_workers()))
    if workers == 1:
        return _compile_serial(requests, timeout, on_result)
    from concurrent.futures import ThreadPoolExecutor

    def shard(i: int) -> list[dict]:
        report = None if on_result is None else (lambda j, r: on_result(i + j * workers, r))
        return _compile_serial(requests[i::workers], timeout, report)
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(shard, range(workers)))
    results: list[dict] = [{}] * len(requests)
    for i, part in enumerate(parts):
        results[i::workers] = part
    return results


def _run_worker(requests: list[dict], timeout: float, env: dict, got: Callable[[dict], None]) -> tuple[int, str]:
    """One compiler subprocess over `requests`, each result passed to `got` as its line arrives; returns
    (exit code, the tail of stderr). The subprocess is killed after `timeout` seconds."""
    import threading
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(_WORKER, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            proc.stdin.write(json.dumps(requests))
            proc.stdin.close()
            for line in proc.stdout:
                if line.startswith(_RESULT_MARK):
                    got(json.loads(line[len(_RESULT_MARK):]))
            code = proc.wait()
        finally:
            timer.cancel()
        err.seek(0)
        return code, err.read()[-4000:]


def _compile_serial(requests: list[dict], timeout: float,
                    on_result: Callable[[int, dict], None] | None = None) -> list[dict]:
    """compile_many in one subprocess at a time.

    The subprocess reports one result per line as it goes. When it dies (TVM's C++ code generator has
    been seen to segfault now and then on a build that succeeds when repeated), the results so far are
    kept, the request it died on is compiled once more in a fresh subprocess, and the rest follow. A
    request that kills the compiler twice fails with the crash's output; one that succeeded on the
    second try carries the first crash in "crash_retry", and the codegen tests warn about it.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results: list[dict] = []
    retried: dict[int, str] = {}

    def add(r: dict) -> None:
        first_crash = retried.pop(len(results), None)
        results.append({**r, "crash_retry": first_crash} if first_crash else r)
        if on_result is not None:
            on_result(len(results) - 1, results[-1])
    while len(results) < len(requests):
        before = len(results)
        code, stderr = _run_worker(requests[before:], timeout, env, add)
        if len(results) == len(requests):
            break  # every result arrived (a crash on the way out loses nothing)
        crash = f"codegen subprocess died (exit {code}):\n{stderr}"
        if code > 0 and len(results) == before:
            raise RuntimeError(crash)  # it failed before compiling anything: no retry
        index = len(results)
        if index in retried:  # the same request killed it twice: report it and go on with the rest
            del retried[index]
            add({**requests[index], "ok": False, "error": crash})
        else:
            retried[index] = crash
    return results


def main() -> int:
    """Subprocess entry of compile_many: JSON requests on stdin, one marked JSON result line per request
    on stdout, written as each finishes."""
    requests = json.loads(sys.stdin.read())
    for r in requests:
        print(f"compiling {r['op']}/{r['impl']} for {r['target']}", file=sys.stderr, flush=True)
        print(_RESULT_MARK + json.dumps(_compile_request(r)), flush=True)
    return 0
