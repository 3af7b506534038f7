"""The TileLang permutation and combine (kernels/moe/tilelang_route.py) against triton_route.py.

- codegen: their specs (`codegen_route`) are part of the TileLang fp4_grouped_moe's codegen job
  (`route_artifacts` picks them from `codegen_artifacts`: CUDA source plus a cubin with the machine's
  nvcc, HIP source; sm_90a and gfx942 by default, all four with --all-targets, only one vendor's with
  --backend). The sources are checked for what the module docstring claims: the barriers between the
  passes, the id / map / local range guards, the running count, the prefix sum, the padding and the
  scatter (permute); the invalid-slot guard, the fp32 pairwise tree in Triton's order, the integer
  bf16 rounding and its NaN rule (combine); no local memory in a cubin.
- the summation order: Triton 3.9's combine_kernel compiled for sm_90a, its PTX traced from the bf16
  loads to the adds: the pairwise tree this combine reproduces.
- CPU numerics through TileLang's C target: combine as built for the GPU (the same builder, 128
  threads, 1024 channels), bit for bit against triton_route.combine (interpreter) and an fp32 model,
  with -0 sums, NaN payloads, subnormals, odd dims, k 1..16; the permutation in its one-thread form
  (the C target has no SIMT threads: chunk 1, every pass, guard, prefix sum, padding and scatter the
  same source) against triton_route.permute: random, one expert, none valid, expert_map with remote and
  unknown ids, E 256 / 384 with k 6 and E 1024 with k 16.
- device tests (end of this file; skip on the CPU): the GPU forms against triton_route on the same device,
  bit for bit, at V4 shapes (up to 16K slots, E 256 / 384 / 1024, expert_map with remote experts, all
  tokens on one expert, invalid ids, zero tokens, dims 4096 / 7168 / 160) and replayed in a CUDA graph.
"""
from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("tilelang", reason="tilelang is not installed (pip install 'dsv4-kernels[cuda]')")

from dsv4_kernels.kernels.moe import tilelang_route as tr  # noqa: E402
from dsv4_kernels.kernels.moe import triton_route  # noqa: E402

TARGETS = ("sm_90a", "sm_100a", "gfx942", "gfx950")


# ----------------------------------------------------------------------------------------------- codegen

@pytest.fixture
def route_artifacts(codegen_artifacts):
    """artifacts(target) -> [permute Artifact, combine Artifact]: the route kernels' specs of the TileLang
    fp4_grouped_moe codegen job (codegen_artifacts: the first target of each backend unless --all-targets,
    only the --backend vendor's)."""
    def artifacts(name: str) -> list:
        return [a for a in codegen_artifacts("fp4_grouped_moe", "tilelang", name)
                if a.label.startswith(("permute-", "combine-"))]
    return artifacts


def _region(text: str, start: str, end: str) -> str:
    i = text.index(start)
    return text[i:text.index(end, i)]


def _in_order(text: str, needles: list[str]) -> bool:
    pos = 0
    for n in needles:
        pos = text.find(n, pos)
        if pos < 0:
            return False
        pos += len(n)
    return True


SYNC = "__syncthreads();"


def check_permute_source(target: str, text: str) -> None:
    E, k, has_map = tr.CODEGEN_PERMUTE[target]
    C = tr.PERMUTE_CHUNK
    assert text.count("__global__ void __launch_bounds__(") == 1, "expected one kernel"
    assert f"__launch_bounds__({C}" in text, "one block of PERMUTE_THREADS threads"
    assert re.search(r"\bint S\b", text), "S is not symbolic"
    assert bool(re.search(r"\bint E_global\b", text)) == has_map, "E_global symbolic, used only with expert_map"
    assert "atomic" not in text, "no atomics"
    body = text[text.index("permute_kernel_kernel("):]
    # the running counts start at 0 before the first chunk, behind a barrier
    assert _in_order(body, ["run)[", "] = 0;", SYNC, "for (int c = 0;"]), "run not zeroed before pass 1"
    # pass 1: experts -> barrier -> in-chunk comparison -> rank -> barrier -> running count -> barrier
    p1 = _region(body, "for (int c = 0;", "if (((int)threadIdx.x) == 0)")
    assert _in_order(p1, ["((int*)ex)[((int)threadIdx.x)] = e;", SYNC, f"for (int j = 0; j < {C}; ++j)",
                          "RANK[", SYNC, "run)[e] = (rank + 1);", SYNC]), "pass 1 steps or barriers"
    assert p1.count(SYNC) == 3, f"pass 1: {p1.count(SYNC)} barriers, expected 3"
    assert "if (((int*)ex)[j] == e)" in p1 and "(j < ((int)threadIdx.x))" in p1 and \
        "(((int)threadIdx.x) < j)" in p1, "in-chunk earlier / later counts"
    assert re.search(r"rank = \(\w+ \+ before\);", p1), "rank = running count + earlier slots"
    assert "((int*)run)[" in _region(p1, "later = 0;" if "later = 0;" in p1 else "before = 0;", "rank ="), \
        "the rank does not read the running count"
    assert "if ((0 <= e) && (later == 0)) {\n      ((int*)run)[e] = (rank + 1);" in p1, \
        "only the last valid slot of an expert advances its running count"
    # the slot's expert: ids read only for s < S; the map behind its range check; the local range
    for region in (p1, _region(body, "for (int c_2 = 0;", "INV[")):
        assert re.search(r"if \(\(\(\(c\w* \* 256\) \+ \(\(int\)threadIdx\.x\)\) < S\)\) \{\s*\w+ = IDS\[", region), \
            "ids read without the s < S guard"
        if has_map:
            assert re.search(r"if \(\(0 <= e\) && \(e < E_global\)\) \{(?:(?!\} else).)*= MAP\[e\];", region, re.S), \
                "the map read is not behind 0 <= id < E_global"
            assert re.search(r"\} else \{\s*e = -1;", region), "an unknown global id is not invalid"
        else:
            assert "MAP[" not in text, "the map is read without expert_map"
        assert re.search(rf"if \(\(\(0 <= e\) && \(e < {E}\)\)\) \{{\s*\w+ = e;\s*\}} else \{{\s*\w+ = -1;", region), \
            "the local expert range check"
    # pass 2: one thread's exclusive prefix sum, then a barrier before anyone reads it
    p2 = _region(body, "if (((int)threadIdx.x) == 0)", "COUNTS[")
    assert _in_order(p2, ["acc = 0;", f"for (int x = 0; x < {E}; ++x)", "((int*)off)[x] = acc;",
                          "acc = (acc + ((int*)run)[x]);", f"((int*)off)[{E}] = acc;", SYNC]), "prefix sum"
    # padding rows past the total, a barrier, then the scatter
    tail = body[body.index("COUNTS["):]
    assert _in_order(tail, ["COUNTS[", "OFFSETS[", f"OFFSETS[{E}] = ((int*)off)[{E}];", "TOK[", "= -1;",
                            "EXP[", "= -1;", "ROWW[", SYNC, "for (int c_2 = 0;"]), "counts, offsets, padding"
    assert f"(((int*)off)[{E}] <= ((c_1 * 256) + ((int)threadIdx.x)))" in tail, "padding rows: p >= offsets[E]"
    scatter = tail[tail.index("for (int c_2 = 0;"):]
    row = r"\(\(\(int\*\)off\)\[e\] \+ RANK\[[^\]]*\]\)"
    for name in ("TOK", "EXP", "ROWW"):
        assert re.search(name + r"\[" + row + r"\] = ", scatter), f"{name} not stored at offsets[e] + rank"
    assert re.search(r"INV\[[^\]]*\] = " + row + ";", scatter), "inv of a valid slot"
    assert re.search(r"\} else \{\s*INV\[[^\]]*\] = -1;", scatter), "inv of an invalid slot"
    assert re.search(r"= W\[", scatter), "the routing weight"


def check_combine_source(target: str, text: str) -> None:
    D = tr.CODEGEN_COMBINE[target]
    kp = tr.combine_k_pad(6)
    hip = target.startswith("gfx")
    assert text.count("__global__ void __launch_bounds__(") == 1, "expected one kernel"
    assert f"__launch_bounds__({tr.COMBINE_THREADS}" in text
    assert re.search(r"\bint T\b", text) and re.search(r"\bint k\b", text), "T and k are not symbolic"
    # the token's rows: lanes past k are -1
    assert re.search(r"if \(\(\(\(int\)threadIdx\.x\) < k\)\) \{\s*\w+ = INV\[", text), "lanes past k read inv"
    assert f"if (((int)threadIdx.x) < {kp})" in text
    assert f"float acc[{tr.COMBINE_BLOCK_D // tr.COMBINE_THREADS}];" in text, "fp32 accumulators"
    # every lane: an invalid or out-of-range row adds +0 (fp32), a valid one its bf16 bits << 16
    zero = "0.000000e+00f" if hip else "0x0p+0f"
    for j in range(kp):
        assert re.search(rf"float (\w+);\s*if \(\(\(0 <= rows\[{j}\]\) && \(rows\[{j}\] < S\)\)\) \{{", text), \
            f"lane {j}: no invalid-slot guard"
    assert text.count(f"= {zero}") >= kp, "invalid lanes must add +0"
    assert re.search(rf"YS\[\(\(\(\(\(\(int64_t\)rows\[\(int64_t\)\d+\]\) \* \(int64_t\){D}\)", text), "64-bit row offsets"
    assert "<< (uint)16" in text, "bf16 bits to fp32"
    # the pairwise tree of Triton's within-thread reduction over K_PAD lanes, in fp32
    v = r"(\w+)"
    tree = rf"acc\[i\] = \(\(\({v} \+ {v}\) \+ \({v} \+ {v}\)\) \+ \(\({v} \+ {v}\) \+ \({v} \+ {v}\)\)\);"
    m = re.search(tree, text)
    assert m, "no pairwise fp32 tree over the 8 lanes"
    lanes = [re.search(rf"float {name};\s*if \(\(\(0 <= rows\[(\d+)\]\)", text).group(1) for name in m.groups()]
    assert lanes == [str(j) for j in range(kp)], f"tree lanes in the order {lanes}"
    # fp32 -> bf16: round to nearest even by integer ops, NaN: the top half with the quiet bit
    assert "+ (uint)32767) + ((" in text and ">> (uint)16) & (uint)1)) >> (uint)16)" in text, "bf16 RNE"
    assert "(uint)2139095040 < (" in text and "& (uint)2147483647)" in text, "NaN test on the bits"
    assert ">> (uint)16) | (uint)64)" in text, "NaN keeps its top half with the quiet bit"
    assert re.search(r"if \(\(\(\(\(int\)blockIdx\.y\) \* 1024\) \+ |\bY\[", text), "store"


@pytest.mark.codegen
@pytest.mark.parametrize("target", TARGETS)
def test_codegen(target, route_artifacts):
    arts = route_artifacts(target)
    E, k, has_map = tr.CODEGEN_PERMUTE[target]
    assert [a.label for a in arts] == [f"permute-E{E}-k{k}" + ("-map" if has_map else ""),
                                       f"combine-D{tr.CODEGEN_COMBINE[target]}-k6"]
    check_permute_source(target, arts[0].text)
    check_combine_source(target, arts[1].text)
    for a in arts:
        assert not a.failed_claims(), f"{a.label}: {a.failed_claims()}"
        if target.startswith("sm_"):
            assert a.binary_kind == "cubin", f"{a.label}: no cubin ({a.resources})"
            assert a.resources["local"] == 0 and a.resources["stack"] == 0, f"{a.label}: {a.resources}"
        else:
            assert a.kind == "hip-source"


def test_codegen_specs_cover_the_v4_shapes():
    from dsv4_kernels.ops import moe as ops
    dims = {dim for dim, _, _ in ops.MODELS.values()}
    experts = {E for _, _, E in ops.MODELS.values()}
    assert set(tr.CODEGEN_COMBINE.values()) == dims
    assert {E for E, _, _ in tr.CODEGEN_PERMUTE.values()} == experts
    assert {m for _, _, m in tr.CODEGEN_PERMUTE.values()} == {True, False}
    assert set(tr.CODEGEN_COMBINE) == set(tr.CODEGEN_PERMUTE) == set(TARGETS)


# ------------------------------------------------------------------------ Triton's summation order (PTX)

def _triton_combine_tree(k: int) -> str:
    """The expression of one output channel of triton_route.combine_kernel (sm_90a PTX), lanes j0..jK_PAD-1:
    the bf16 loads in element order (lane-major, 8 channel repetitions per thread), through the
    unpacking movs and cvt.f32.bf16, to the add.f32 that combines all lanes."""
    import os
    import subprocess
    import sys
    kp = tr.combine_k_pad(k)
    script = f"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dsv4_kernels.kernels._triton_util import compile_options, pointer_attrs
from dsv4_kernels.kernels.moe.triton_route import COMBINE_BLOCK_D, combine_kernel as fn
gpu = GPUTarget("cuda", 90, 32)
sig = {{"ys_ptr": "*bf16", "inv_ptr": "*i32", "y_ptr": "*bf16", "T": "i32", "D": "i32"}}
src = ASTSource(fn=fn, signature=sig, attrs=pointer_attrs(fn, sig, gpu),
                constexprs={{"TOPK": {k}, "K_PAD": {kp}, "BLOCK_D": COMBINE_BLOCK_D, "ROWS": 1}})
print(triton.compile(src, target=gpu, options=compile_options(4, 3)).asm["ptx"])
"""
    # the Triton kernels of this process may be the interpreter's: compile in a clean one, as codegen does
    env = {name: v for name, v in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ptx = run.stdout
    loads = re.findall(r"ld\.global\.b16 \{ %(rs\d+) \}", ptx)
    reps = len(loads) // kp
    expr: dict = {r: (f"j{i // reps}" if i % reps == 0 else None) for i, r in enumerate(loads)}
    pat = (r"mov\.b32 \t%(r\d+), \{%(rs\d+), %(rs\d+)\};|mov\.b32 \t\{%(rs\d+), %(rs\d+)\}, %(r\d+);|"
           r"cvt\.f32\.bf16 \t%(r\d+), %(rs\d+);|add(?:\.rn)?\.f32 \t%(r\d+), %(r\d+), %(r\d+);")
    for m in re.finditer(pat, ptx):
        g = m.groups()
        if g[0]:
            expr[g[0]] = (expr.get(g[1]), expr.get(g[2]))
        elif g[3]:
            pair = expr.get(g[5])
            expr[g[3]], expr[g[4]] = pair if isinstance(pair, tuple) else (None, None)
        elif g[6]:
            expr[g[6]] = expr.get(g[7])
        else:
            a, b = expr.get(g[9]), expr.get(g[10])
            expr[g[8]] = f"({a}+{b})" if isinstance(a, str) and isinstance(b, str) else None
    full = [v for v in expr.values() if isinstance(v, str) and v.count("j") == kp]
    return max(full, key=len) if full else ""


def _pairwise(kp: int) -> str:
    terms = [f"j{j}" for j in range(kp)]
    while len(terms) > 1:
        terms = [f"({terms[i]}+{terms[i + 1]})" for i in range(0, len(terms), 2)]
    return terms[0]


def test_triton_combine_sums_its_lanes_in_the_pairwise_tree_this_combine_uses():
    """Bit-identity with triton_route.combine rests on the same fp32 summation order: Triton 3.9 reduces the
    K_PAD lanes a thread holds as a pairwise tree (PTX of the decode specialisation, k 6 -> 8 lanes)."""
    assert _triton_combine_tree(6) == _pairwise(8)


# --------------------------------------------------------------------------- CPU numerics (C target)

def _c_combine(D: int, k: int):
    import tilelang
    return tilelang.compile(tr.make_combine_kernel(D, tr.combine_k_pad(k)), target="c")


def _run_c_combine(y_sorted: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    kernel = _c_combine(y_sorted.shape[1], inv.shape[1])
    y = torch.full((inv.shape[0], y_sorted.shape[1]), float("nan"), dtype=torch.bfloat16)
    kernel(y_sorted.view(torch.uint16), inv, y.view(torch.uint16))
    return y


def _rne(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 as _triton_util.bf16_rne: round to nearest even on the bits, NaN: top half | 0x40."""
    bits = x.view(torch.int32).long() & 0xFFFFFFFF
    top = bits >> 16
    out = torch.where(x.isnan(), top | 0x40, (bits + 0x7FFF + (top & 1)) >> 16) & 0xFFFF
    return torch.where(out >= 0x8000, out - 0x10000, out).to(torch.int16).view(torch.bfloat16)


def _tree_model(y_sorted: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """fp32 model: lanes past k and invalid slots are +0, summed as the pairwise tree, then bf16 RNE."""
    T_, k = inv.shape
    kp = tr.combine_k_pad(k)
    f = y_sorted.float()
    terms = [torch.where((inv[:, j] >= 0)[:, None], f[inv[:, j].clamp(min=0).long()], torch.zeros(()))
             if j < k else torch.zeros(T_, f.shape[1]) for j in range(kp)]
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] for i in range(0, len(terms), 2)]
    return _rne(terms[0])


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16)


# A token whose fp32 sum depends on the order: the pairwise tree (2^24 + 2^16) + (1 + 1) is 2^24 + 2^16 + 2,
# which rounds up to bf16 2^24 + 2^17; left to right, each + 1 ties back to 2^24 + 2^16, which rounds (to
# even) down to 2^24. The interpreter's tl.sum is numpy's, not the GPU's tree: such rows, and -0 sums
# with no lane past k (the GPU's tree keeps -0, the interpreter gives +0), are compared with the model only.
ORDER_ROWS = [2.0 ** 24, 2.0 ** 16, 1.0, 1.0]


def test_combine_on_the_cpu_is_bitwise_triton_and_the_model():
    """The GPU build of combine (128 threads, 1024 channels, K_PAD 8) through the C target, dim 1100 (a
    channel tail), k 6: bit for bit the fp32 tree model and triton_route.combine (interpreter) on every
    token whose sum does not depend on the order, including a token with no valid slot, repeated rows,
    all -0 terms (then +0 lanes past k: +0, as Triton), NaN rows of other tokens that must not leak, NaN
    payloads, inf, subnormals; a token whose sum depends on the order gets the tree's value."""
    gen = torch.Generator().manual_seed(3)
    ys = (torch.randn(40, 1100, generator=gen) * torch.exp(4 * torch.randn(40, 1, generator=gen))).to(torch.bfloat16)
    ys[3, 5] = float("nan")                                  # row 3 is nobody's
    ys[6] = -0.0
    ys[7] = -0.0
    ys[8, :4] = torch.tensor([2.0 ** 30, 1.0, -(2.0 ** 30), float("inf")])
    ys.view(torch.int16)[9, :3] = torch.tensor([0x7F81, -0x7F, 0x7FA0], dtype=torch.int16)   # NaN payloads
    ys[10, :3] = torch.tensor([1e-39, -3e-40, 9e-41])        # bf16 subnormals
    for j, v in enumerate(ORDER_ROWS):
        ys[12 + j] = v
    inv = torch.randint(-1, 40, (9, 6), generator=gen, dtype=torch.int32)
    inv[inv == 3] = 4
    inv[0] = torch.tensor([0, -1, 4, -1, -1, 2])
    inv[1] = -1
    inv[2] = torch.tensor([6, 7, -1, 6, 7, -1])              # -0 sums
    inv[3] = torch.tensor([8, 9, 8, 9, 10, 10])
    inv[4] = torch.tensor([11, 11, 11, 11, 11, 11])
    inv[5] = torch.tensor([12, 13, 14, 15, -1, -1])          # order-dependent
    y = _run_c_combine(ys, inv)
    assert torch.equal(_bits(y), _bits(_tree_model(ys, inv))), "differs from the fp32 tree model"
    want = triton_route.combine(ys, inv)
    free = [t for t in range(9) if t != 5]
    assert torch.equal(_bits(y[free]), _bits(want[free])), "differs from triton_route.combine"
    assert (y[5] == 2.0 ** 24 + 2.0 ** 17).all(), "the pairwise tree's value"
    assert (y[1] == 0).all() and not y[[0, 2, 4]].isnan().any()
    assert (_bits(y[2]) == 0).all(), "-0 + -0 ... then +0 lanes past k give +0"


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8, 16])
def test_combine_on_the_cpu_every_k_pad(k):
    """k 1..16 (K_PAD 2, 4, 8, 16: lanes past k add +0; k = K_PAD has none), dim 160, NaN payloads in a
    token's own rows, -0 sums, an order-dependent token (k >= 4): bit for bit the model; Triton's
    interpreter on the tokens whose sum does not depend on the order (no -0 sum at k = K_PAD)."""
    gen = torch.Generator().manual_seed(k)
    ys = (torch.randn(3 * k + 8, 160, generator=gen) * 50).to(torch.bfloat16)
    ys[0] = -0.0
    ys[1, 7] = float("nan")
    ys.view(torch.int16)[1, 9] = 0x7F81                      # a signalling payload
    ys.view(torch.int16)[1, 11] = -0x7F                      # 0xFF81: a negative NaN
    for j, v in enumerate(ORDER_ROWS):
        ys[2 + j] = v
    inv = torch.randint(-1, 3 * k + 8, (7, k), generator=gen, dtype=torch.int32)
    inv[0] = 0
    inv[1] = -1
    inv[2, 0] = 1
    if k >= 4:
        inv[3] = -1
        inv[3, :4] = torch.arange(2, 6, dtype=torch.int32)
    y = _run_c_combine(ys, inv)
    assert torch.equal(_bits(y), _bits(_tree_model(ys, inv)))
    pad = k < tr.combine_k_pad(k)
    assert (_bits(y[0]) == (0 if pad else -32768)).all(), "-0 sums: +0 with lanes past k, else -0"
    if k >= 4:
        assert (y[3] == 2.0 ** 24 + 2.0 ** 17).all(), "the pairwise tree's value"
    want = triton_route.combine(ys, inv)
    free = [t for t in range(7) if (t != 0 or pad) and (t != 3 or k < 4)]
    assert torch.equal(_bits(y[free]), _bits(want[free]))


def _c_permute(E: int, k: int, has_map: bool):
    import tilelang
    return tilelang.compile(tr.make_permute_kernel(E, k, has_map, chunk=1, threads=1), target="c")


def _run_c_permute(ids, w, E, emap=None) -> dict:
    T_, k = ids.shape
    S = T_ * k
    kernel = _c_permute(E, k, emap is not None)
    i32 = dict(dtype=torch.int32)
    out = {"counts": torch.full((E,), -7, **i32), "offsets": torch.full((E + 1,), -7, **i32),
           "tokens": torch.full((S,), -7, **i32), "experts": torch.full((S,), -7, **i32),
           "weights": torch.full((S,), float("nan")), "inv": torch.full((T_, k), -7, **i32)}
    rank = torch.full((S,), -7, **i32)
    flat = ids.reshape(S)
    kernel(flat, emap if emap is not None else flat, w.reshape(S), out["counts"], out["offsets"], rank, out["tokens"],
           out["experts"], out["weights"], out["inv"].view(S))
    return out


def _permute_case(case: str, gen):
    E, k, T_, emap = 9, 6, 7, None
    ids = torch.randint(-2, E + 2, (T_, k), generator=gen, dtype=torch.int32)
    if case == "one-expert":
        ids = torch.full((T_, k), 4, dtype=torch.int32)
    if case == "none-valid":
        ids = torch.tensor([[-1, E, -7, 2 ** 31 - 1, -(2 ** 31), E + 5]] * T_, dtype=torch.int32)
    if case == "expert-map":
        emap = torch.tensor([-1, 8, 0, -1, 3, 3, 12, -5, 1, 2, 7, -1], dtype=torch.int32)  # E_global 12
        ids = torch.randint(-2, 14, (T_, k), generator=gen, dtype=torch.int32)
        ids[0] = torch.tensor([2 ** 31 - 1, -(2 ** 31), 6, 7, 11, 12])                   # unknown, -> 12, -5
    if case == "flash":
        E, T_ = 256, 97
        ids = torch.randint(0, E, (T_, k), generator=gen, dtype=torch.int32)
    if case == "pro-ep":
        E, T_ = 384, 61
        emap = torch.full((768,), -1, dtype=torch.int32)
        emap[torch.randperm(768, generator=gen)[:E]] = torch.randperm(E, generator=gen).to(torch.int32)
        ids = torch.randint(0, 768, (T_, k), generator=gen, dtype=torch.int32)
    if case == "E1024-k16":
        E, k, T_ = 1024, 16, 40
        ids = torch.randint(-1, 40, (T_, k), generator=gen, dtype=torch.int32) * 25
    w = torch.rand(T_, k, generator=gen)
    w.view(-1)[3] = float("nan")
    w.view(-1)[4] = -0.0
    return ids, w, E, emap


@pytest.mark.parametrize("case", ["random", "one-expert", "none-valid", "expert-map", "flash", "pro-ep", "E1024-k16"])
def test_permute_one_thread_form_on_the_cpu_is_triton(case):
    """The permutation's one-thread form (chunk 1: every pass, guard, prefix sum, padding and the scatter
    of the GPU source, without the in-chunk comparison and barriers) through the C target, against
    triton_route.permute (interpreter): every output equal, bit for bit (weights NaN and -0 included)."""
    gen = torch.Generator().manual_seed(len(case))
    ids, w, E, emap = _permute_case(case, gen)
    got = _run_c_permute(ids, w, E, emap)
    want = triton_route.permute(ids, w, E, emap)
    assert set(got) == set(want)
    for name in want:
        g, t = got[name], want[name]
        assert g.dtype == t.dtype and g.shape == t.shape, f"{name}: {g.dtype} {tuple(g.shape)} vs {t.dtype} {tuple(t.shape)}"
        same = torch.equal(g.view(torch.int32), t.view(torch.int32)) if g.dtype == torch.float32 else torch.equal(g, t)
        assert same, f"{name} differs"


# ------------------------------------------------------------------------------------------ host side

@pytest.mark.parametrize("kwargs, needle", [
    (dict(E=0, K=6, has_map=False), "n_experts must be in [1, 1024], got 0"),
    (dict(E=1025, K=6, has_map=False), "n_experts must be in [1, 1024], got 1025"),
    (dict(E=8, K=17, has_map=False), "top-k must be in [1, 16], got 17"),
    (dict(E=8, K=6, has_map=False, chunk=64), "chunk must equal threads"),
])
def test_permute_builder_checks_its_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        tr.make_permute_kernel(**kwargs)


def test_combine_builder_checks_its_arguments():
    with pytest.raises(ValueError, match=re.escape("k_pad must be 2, 4, 8 or 16, got 6")):
        tr.make_combine_kernel(4096, 6)
    assert [tr.combine_k_pad(k) for k in (1, 2, 3, 4, 5, 8, 9, 16)] == [2, 2, 4, 4, 8, 8, 16, 16]


def test_zero_tokens_launch_nothing():
    r = tr.permute(torch.zeros(0, 6, dtype=torch.int32), torch.zeros(0, 6), 256)
    want = triton_route.permute(torch.zeros(0, 6, dtype=torch.int32), torch.zeros(0, 6), 256)
    for name in want:
        assert r[name].shape == want[name].shape and r[name].dtype == want[name].dtype
        assert torch.equal(r[name], want[name]), name
    assert tr.combine(torch.zeros(0, 4096, dtype=torch.bfloat16), torch.zeros(0, 6, dtype=torch.int32)).shape == (0, 4096)


# --------------------------------------------------------------------------------------------- device

def _device_only(device):
    if device.type == "cpu":
        pytest.skip("the GPU forms of the TileLang permutation and combine run on a device (--backend=cuda|rocm); "
                    "on the CPU the C target runs combine as built and the permutation's one-thread form")


def _host_slots(ids: torch.Tensor, E: int, emap=None) -> list[tuple[int, int, int]]:
    """(local expert, token, slot) of every valid slot, by expert then slot (the stable order)."""
    T_, k = ids.shape
    flat = ids.reshape(-1).tolist()
    table = emap.tolist() if emap is not None else None
    out = []
    for s, e in enumerate(flat):
        if table is not None:
            e = table[e] if 0 <= e < len(table) else -1
        if 0 <= e < E:
            out.append((e, s // k, s))
    return sorted(out)


def _route_case(case: str, gen):
    """V4 routing at up to 16K slots: Flash E 256, Pro E 384 (k 6), Pro under expert parallelism (384 global
    experts, 96 local, the rest remote: -1 in the map), all tokens on one expert, invalid ids."""
    k, emap = 6, None
    if case == "flash-decode":
        E, T_ = 256, 16
        ids = torch.randint(0, E, (T_, k), generator=gen)
    elif case == "flash-prefill-16k":
        E, T_ = 256, 2730
        ids = torch.randint(0, E, (T_, k), generator=gen)
    elif case == "pro-prefill":
        E, T_ = 384, 1024
        ids = torch.randint(-2, E + 3, (T_, k), generator=gen)
    elif case == "pro-ep-16k":
        E, T_ = 96, 2730
        emap = torch.full((384,), -1, dtype=torch.int32)
        emap[torch.randperm(384, generator=gen)[:E]] = torch.randperm(E, generator=gen).to(torch.int32)
        ids = torch.randint(-1, 386, (T_, k), generator=gen)
    elif case == "one-expert":
        E, T_ = 384, 2000
        ids = torch.full((T_, k), 17)
    elif case == "E1024-k16":
        E, k, T_ = 1024, 16, 1000
        ids = torch.randint(-1, E, (T_, k), generator=gen)
    else:
        raise ValueError(case)
    w = torch.softmax(torch.randn(T_, k, generator=gen), dim=-1)
    return ids.to(torch.int32), w, E, emap


ROUTE_CASES = ["flash-decode", "flash-prefill-16k", "pro-prefill", "pro-ep-16k", "one-expert", "E1024-k16"]


@pytest.mark.parametrize("case", ROUTE_CASES)
def test_permute_on_device_is_triton_and_the_host_model(device, case):
    _device_only(device)
    gen = torch.Generator().manual_seed(len(case))
    ids, w, E, emap = _route_case(case, gen)
    dev = [t.to(device) if t is not None else None for t in (ids, w, emap)]
    got = tr.permute(dev[0], dev[1], E, dev[2])
    want = triton_route.permute(dev[0], dev[1], E, dev[2])
    for name in want:
        g, t = got[name].cpu(), want[name].cpu()
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert torch.equal(g.view(torch.int32), t.view(torch.int32)), f"{name} differs from triton_route.permute"
    slots = _host_slots(ids, E, emap)
    n = len(slots)
    assert got["offsets"][-1].item() == n
    assert got["experts"][:n].cpu().tolist() == [e for e, _, _ in slots]
    assert got["tokens"][:n].cpu().tolist() == [t for _, t, _ in slots]
    assert (got["experts"][n:] == -1).all() and (got["tokens"][n:] == -1).all() and (got["weights"][n:] == 0).all()


def test_permute_and_combine_zero_tokens_on_device(device):
    _device_only(device)
    ids = torch.zeros(0, 6, dtype=torch.int32, device=device)
    r = tr.permute(ids, torch.zeros(0, 6, device=device), 256)
    assert (r["counts"] == 0).all() and (r["offsets"] == 0).all() and r["inv"].shape == (0, 6)
    assert tr.combine(torch.zeros(0, 7168, dtype=torch.bfloat16, device=device), ids).shape == (0, 7168)


@pytest.mark.parametrize("dim", [4096, 7168, 160])
@pytest.mark.parametrize("case", ["flash-prefill-16k", "pro-ep-16k", "one-expert", "E1024-k16"])
def test_combine_on_device_is_triton(device, dim, case):
    """combine through the real inverse map (invalid and remote slots: inv -1; a token with no local
    expert: 0), rows with -0, NaN payloads and order-dependent values: bit for bit triton_route.combine
    on the same device, and the fp32 tree model."""
    _device_only(device)
    gen = torch.Generator().manual_seed(dim + len(case))
    ids, w, E, emap = _route_case(case, gen)
    inv = triton_route.permute(ids.to(device), w.to(device), E, emap.to(device) if emap is not None else None)["inv"]
    S = inv.numel()
    ys = (torch.randn(S, dim, generator=gen) * torch.exp(3 * torch.randn(S, 1, generator=gen))).to(torch.bfloat16)
    ys[0] = -0.0
    ys.view(torch.int16)[1, :3] = torch.tensor([0x7F81, -0x7F, 0x7FA0], dtype=torch.int16)
    for j, v in enumerate(ORDER_ROWS):
        ys[2 + j] = v
    ys = ys.to(device)
    y = tr.combine(ys, inv)
    want = triton_route.combine(ys, inv)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16)), "differs from triton_route.combine"
    # the model on the CPU: NaN payloads there survive the adds (NVIDIA's adds give the canonical NaN)
    model, got = _tree_model(ys.cpu(), inv.cpu()), y.cpu()
    assert torch.equal(got.isnan(), model.isnan())
    ok = ~model.isnan()
    assert torch.equal(got[ok].view(torch.int16), model[ok].view(torch.int16)), "differs from the fp32 tree model"


def test_permute_and_combine_replay_in_a_cuda_graph(device):
    _device_only(device)
    gen = torch.Generator().manual_seed(11)
    ids, w, E, emap = _route_case("pro-ep-16k", gen)
    ids, w, emap = ids[:8].to(device), w[:8].to(device), emap.to(device)
    ys = torch.randn(48, 7168, generator=gen).to(torch.bfloat16).to(device)

    def step():
        r = tr.permute(ids, w, E, emap)
        return r, tr.combine(ys, r["inv"])
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        r, y = step()
    for _ in range(2):
        ids.copy_(torch.randint(-1, 386, ids.shape, generator=gen).to(torch.int32).to(device))
        graph.replay()
        want = triton_route.permute(ids, w, E, emap)
        for name in want:
            assert torch.equal(r[name].view(torch.int32), want[name].view(torch.int32)), name
        assert torch.equal(y.view(torch.int16), triton_route.combine(ys, want["inv"]).view(torch.int16))
