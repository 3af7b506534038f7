"""The TileLang routing kernels (kernels/routing/tilelang.py) beyond what the impl-parametrised op tests
of test_routing_ops.py cover.

- codegen (from the session's `codegen_results`: sm_90a and gfx942, all four GPU targets with --all-targets): both V4 expert counts and both
  logit dtypes, one launch per op, symbolic token (and vocabulary) counts, vector loads, 32-lane xor
  shuffles, libm expf, and no local memory (spills or register arrays indexed at run time) in any cubin;
- host logic in pure Python: the lane plan, the guards and their reasons, the configs;
- on a CUDA/ROCm device (`--backend=cuda|rocm`): V4-Flash/V4-Pro shapes in both dtypes and every weight
  convention, odd expert counts and top-k, ties and near-ties, NaN rows, invalid ids, T = 0 and CUDA-graph
  capture, against the reference. TileLang GPU kernels do not run on the CPU, so these skip there.
"""
import pytest
import torch

pytest.importorskip("tilelang", reason="tilelang is not installed (pip install 'dsv4-kernels[cuda]')")

from dsv4_kernels import dispatch, ladder  # noqa: E402
from dsv4_kernels.backends import find_target  # noqa: E402
from dsv4_kernels.kernels import routing as shared  # noqa: E402
from dsv4_kernels.kernels.routing import tilelang as tl  # noqa: E402
from dsv4_kernels.ops import routing as ops  # noqa: E402
from dsv4_kernels.ops.routing import hash_topk, score_topk  # noqa: E402
from dsv4_kernels.reference import routing as reference  # noqa: E402

TARGETS = ("sm_90a", "sm_100a", "gfx942", "gfx950")
OPS = (ops.SCORE_OP, ops.HASH_OP)
LABELS = {ops.SCORE_OP: ["E256-fp32", "E384-bf16"], ops.HASH_OP: ["E256-fp32-ids64", "E384-bf16-ids32"]}
# score_topk's row load: E256 fp32 in 16-byte vectors (VEC 4), E384 bf16 in 8-byte ones (VEC 4).
ROW_VECTOR = {"E256": "float4", "E384": "uint2"}
MODELS = {"flash": (256, 1.5), "pro": (384, 2.5)}  # (routed experts E, routed_scaling_factor)
VOCAB = 129280


@pytest.mark.codegen
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("op", OPS)
def test_codegen(op, target, codegen_artifacts):
    backend = find_target(target).backend
    arts = codegen_artifacts(op, "tilelang", target)
    assert [a.label for a in arts] == LABELS[op]
    shuffle = "__shfl_xor_sync(" if backend == "cuda" else "__shfl_xor("
    for a in arts:
        assert a.text.count("__global__ void __launch_bounds__") == 1, f"{a.label}: expected one kernel"
        # One compile serves every token count (and vocabulary size): they are kernel arguments.
        assert "int n" in a.text, f"{a.label}: the token count is not symbolic"
        if op == ops.HASH_OP:
            assert "int V" in a.text, f"{a.label}: the table row count is not symbolic"
            # Only the k logits the table names are read: scalar gathers, no vector load of the row.
            assert "X[" in a.text and "*)(X + " not in a.text, f"{a.label}: the whole row is read"
        else:
            assert f"*({ROW_VECTOR[a.label[:4]]}*)(X + " in a.text, f"{a.label}: the row is not loaded in vectors"
        assert shuffle in a.text and ", 32)" in a.text, f"{a.label}: expected 32-lane xor shuffles"
        assert "expf(" in a.text and "__expf(" not in a.text, f"{a.label}: expected libm expf, not the fast one"
        if backend == "cuda":
            assert a.binary_kind == "cubin", f"{a.label}: no cubin ({a.resources})"
            res = a.resources
            assert res["reg"] > 0 and res["local"] == 0 and res["stack"] == 0, f"{a.label}: {res} (spills?)"
        else:
            assert a.kind == "hip-source"


KERNELS = [
    ("score-E1-top1", lambda: tl.make_score_kernel(1, "float32", 1, 1, True, False, 4)),
    ("score-E100-bf16-top16-raw-scaled", lambda: tl.make_score_kernel(100, "bfloat16", 16, 0, False, True, 8)),
    ("score-E511-top3", lambda: tl.make_score_kernel(511, "float32", 3, 1, True, False, 1)),
    ("hash-E512-bf16-k16", lambda: tl.make_hash_kernel(512, "bfloat16", "int32", 16, 1, True, 32)),
]


@pytest.mark.codegen
@pytest.mark.parametrize("make", [k[1] for k in KERNELS], ids=[k[0] for k in KERNELS])
def test_kernels_lower_for_other_shapes(make):
    """Expert counts with partial or single-element vectors, the largest top-k, other block sizes."""
    import tilelang
    from tvm.target import Target
    cuda = find_target("sm_90a").tilelang
    with Target(cuda):
        source = str(tilelang.lower(make(), target=cuda, enable_device_compile=False).kernel_source)
    assert "__global__" in source


def test_registration_matches_this_module():
    for op in OPS:
        impl = dispatch.get(op, "tilelang")
        assert impl.entry == f"dsv4_kernels.kernels.routing.tilelang:{op}"
        assert impl.codegen == f"dsv4_kernels.kernels.routing.tilelang:codegen_{op}"
        assert impl.defaults == tl.DEFAULTS[op], f"{op}: registered defaults differ from tilelang.DEFAULTS"
        assert set(impl.backends) == {"cuda", "rocm"} and impl.priority == 10


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lane_plan_covers_every_expert_once_within_the_limits(dtype):
    esize = tl.ELEMENT_BYTES[dtype]
    for E in range(1, shared.MAX_EXPERTS + 1):
        vec, steps = tl.lane_plan(E, dtype)
        assert E % vec == 0 and vec * esize <= 16, (E, vec)  # a vector is all in the row or all past it
        assert (steps - 1) * 32 * vec < E <= steps * 32 * vec, (E, vec, steps)  # no step wholly past E
        assert vec * steps <= 16, (E, vec, steps)  # the taken bitmask and the registers per lane
        experts = sorted(s * 32 * vec + lane * vec + v for s in range(steps) for lane in range(32)
                         for v in range(vec) if s * 32 * vec + lane * vec < E)
        assert experts == list(range(E))


def test_lane_plan_at_v4_shapes():
    assert tl.lane_plan(256, "float32") == (4, 2) and tl.lane_plan(384, "float32") == (4, 3)
    assert tl.lane_plan(256, "bfloat16") == (8, 1) and tl.lane_plan(384, "bfloat16") == (4, 3)
    assert tl.lane_plan(7, "float32") == (1, 1) and tl.lane_plan(100, "float32") == (4, 1)


def _score(n=3, E=256, dtype=torch.float32, topk=6):
    return torch.zeros(n, E, dtype=dtype), torch.zeros(E), topk


def _hash(n=3, E=256, dtype=torch.float32, k=6, ids=torch.int64):
    return torch.zeros(n, E, dtype=dtype), torch.zeros(n, dtype=ids), torch.zeros(10, k, dtype=torch.int32)


def _shifted(t: torch.Tensor, elements: int) -> torch.Tensor:
    """Contiguous, `elements` elements past a 16-byte boundary."""
    return torch.zeros(t.numel() + elements, dtype=t.dtype)[elements:].view(t.shape)


@pytest.mark.parametrize("E", [1, 7, 100, 256, 384, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_supports_accepts_what_the_kernels_were_built_for(E, dtype):
    for n in (0, 5):
        assert tl.supports_score_topk(*_score(n, E, dtype, min(E, 6)), 2.5, 1) is None
        for ids in (torch.int32, torch.int64):
            assert tl.supports_hash_topk(*_hash(n, E, dtype, min(E, 6), ids), 1, 2.5) is None
    # E = 7: one expert per vector, so 4-byte alignment is enough; hash_topk gathers scalars.
    assert tl.supports_score_topk(_shifted(torch.zeros(3, 7), 1), torch.zeros(7), 6) is None
    assert tl.supports_hash_topk(_shifted(torch.zeros(3, 256), 1), torch.arange(3),
                                 torch.zeros(10, 6, dtype=torch.int32)) is None


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


REFUSALS = [
    ("E 513", lambda: tl.supports_score_topk(*_score(E=513)), "built for up to 512 experts"),
    ("topk 17", lambda: tl.supports_score_topk(*_score(topk=17)), "built for top-k up to 16"),
    ("fp16 logits", lambda: tl.supports_hash_topk(*_hash(dtype=torch.float16)), "fp32 or bf16"),
    ("misaligned fp32 logits", lambda: tl.supports_score_topk(_shifted(torch.zeros(3, 256), 1), torch.zeros(256), 6),
     "router_logits: the TileLang kernels load 16-byte vectors"),
    ("misaligned bf16 logits", lambda: tl.supports_score_topk(
        _shifted(torch.zeros(3, 384, dtype=torch.bfloat16), 2), torch.zeros(384), 6),
     "router_logits: the TileLang kernels load 8-byte vectors"),
    ("misaligned bias", lambda: tl.supports_score_topk(torch.zeros(3, 256), _shifted(torch.zeros(256), 2), 6),
     "bias: the TileLang kernels load 16-byte vectors"),
    ("2^31 tokens", lambda: tl.supports_score_topk(_meta(2**31, 256), _meta(256), 6), "int32 token count"),
    ("2^31 hash tokens", lambda: tl.supports_hash_topk(_meta(2**31, 256), _meta(2**31, dtype=torch.int64),
                                                       _meta(10, 6, dtype=torch.int32)), "int32 token count"),
    ("2^31 table rows", lambda: tl.supports_hash_topk(_meta(3, 256), _meta(3, dtype=torch.int64),
                                                      _meta(2**31, 6, dtype=torch.int32)), "int32 table row count"),
]


@pytest.mark.parametrize("check, needle", [(c, n) for _, c, n in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_supports_refuses_with_a_reason(check, needle):
    reason = check()
    assert reason and needle in reason, reason


def test_registered_tilelang_refuses_misaligned_logits():
    """The dispatcher must ask the TileLang guard: a vector load from a misaligned row faults the device."""
    impl = dispatch.get(ops.SCORE_OP, "tilelang")
    assert "16-byte" in impl.supports(_shifted(torch.zeros(3, 256), 1), torch.zeros(256), 6, 1.5, 0, False, True)


def test_kernel_configs_are_checked():
    with pytest.raises(ValueError, match="TOKENS"):
        tl.make_score_kernel(256, "float32", 6, 1, True, False, 33)
    with pytest.raises(ValueError, match="TOKENS"):
        tl.make_hash_kernel(256, "float32", "int32", 6, 1, False, 0)
    with pytest.raises(ValueError, match="topk"):
        tl.make_score_kernel(4, "float32", 5, 0, True, False, 4)
    with pytest.raises(ValueError, match="topk"):
        tl.make_hash_kernel(513, "float32", "int64", 6, 0, False, 4)


def _on_device(device):
    if device.type == "cpu":
        pytest.skip("TileLang GPU kernels run only on CUDA/ROCm devices (on the CPU they are codegen-verified)")


def _compare(op: str, out, expected) -> None:
    for o, e in zip(out, expected):
        ladder.get_check(op).compare(o.cpu(), e)


def _bias(E: int) -> torch.Tensor:
    if E == 256:
        return 8.08 + 0.003 * torch.randn(E)  # V4-Flash: large, nearly uniform (the trap)
    return 0.1 * torch.randn(E)


def _on(device, *ts):
    return tuple(t.to(device) for t in ts)


CONVENTIONS = [{}, {"apply_routed_scaling_factor_on_output": True}, {"renormalize": False}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("n", [1, 37, 4096])
def test_device_score_topk_v4_shapes(device, model, dtype, n):
    _on_device(device)
    E, rsf = MODELS[model]
    logits, bias = (2.0 * torch.randn(n, E)).to(dtype), _bias(E)
    for shared_experts in (0, 1):
        for kwargs in CONVENTIONS:
            args = (logits, bias, 6, rsf, shared_experts)
            out = score_topk(*_on(device, logits, bias), *args[2:], **kwargs, impl="tilelang")
            _compare(ops.SCORE_OP, out, reference.score_topk(*args, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("n", [1, 37, 4096])
def test_device_hash_topk_v4_shapes(device, model, dtype, n):
    _on_device(device)
    E, rsf = MODELS[model]
    table = torch.randint(0, E, (VOCAB, 6), dtype=torch.int32)
    logits = (2.0 * torch.randn(n, E)).to(dtype)
    for id_dtype in (torch.int32, torch.int64):
        input_ids = torch.randint(0, VOCAB, (n,), dtype=id_dtype)
        input_ids[0] = VOCAB - 1
        for shared_experts, apply in ((0, False), (1, False), (1, True)):
            args = (logits, input_ids, table, shared_experts, rsf, apply)
            out = hash_topk(*_on(device, logits, input_ids, table), *args[3:], impl="tilelang")
            _compare(ops.HASH_OP, out, reference.hash_topk(*args))


@pytest.mark.parametrize("E, topk", [(1, 1), (7, 7), (100, 6), (257, 16), (511, 3), (512, 16)])
def test_device_odd_sizes(device, E, topk):
    _on_device(device)
    logits, bias = 3.0 * torch.randn(37, E), 0.5 * torch.randn(E)
    args = (logits, bias, topk, 2.5, 1)
    _compare(ops.SCORE_OP, score_topk(*_on(device, logits, bias), *args[2:], impl="tilelang"),
             reference.score_topk(*args))
    table = torch.randint(0, E, (1000, topk), dtype=torch.int32)
    input_ids = torch.randint(0, 1000, (37,))
    hargs = (logits.bfloat16(), input_ids, table, 1, 2.5)
    _compare(ops.HASH_OP, hash_topk(*_on(device, *hargs[:3]), *hargs[3:], impl="tilelang"),
             reference.hash_topk(*hargs))


def test_device_exact_ties_go_to_the_smaller_index(device):
    _on_device(device)
    # Logits from 4 squares above 20 (their own softplus, exact s) and a bias from 2 values: many equal keys.
    logits = torch.tensor([21.0, 25.0, 30.25, 36.0])[torch.randint(0, 4, (63, 384))]
    bias = torch.tensor([0.0, 0.5])[torch.randint(0, 2, (384,))]
    for topk in (6, 16):
        out = score_topk(*_on(device, logits, bias), topk, 2.5, 1, impl="tilelang")
        _compare(ops.SCORE_OP, out, reference.score_topk(logits, bias, topk, 2.5, 1))
    w, ids = score_topk(*_on(device, torch.full((2, 256), 25.0), torch.zeros(256)), 6, impl="tilelang")
    assert ids.tolist() == [list(range(6))] * 2  # all keys equal: the six smallest indices, in order


def test_device_near_ties_follow_the_spec_rule(device):
    """SPEC 6: another choice or order only where the keys differ by <= 2^-21 * max(1, |key|)."""
    _on_device(device)
    logits = 2.0 * torch.randn(2000, 384)
    logits[:, 1::2] = logits[:, 0::2] + 1e-6  # neighbours a few fp32 ulps apart
    bias = 0.1 * torch.randn(384)
    w, ids = (t.cpu() for t in score_topk(*_on(device, logits, bias), 6, 2.5, 0, impl="tilelang"))
    rw, rids = reference.score_topk(logits, bias, 6, 2.5, 0)
    key = reference.sqrt_softplus(logits).double() + bias.double()
    for t in torch.nonzero((ids != rids).any(dim=1)).flatten().tolist():
        got, want = key[t, ids[t].long()], key[t, rids[t].long()]
        assert len(set(ids[t].tolist())) == 6, f"row {t}: repeated expert {ids[t]}"
        tol = 2.0 ** -21 * torch.clamp(want.abs(), min=1.0)
        assert ((got - want).abs() <= tol).all(), f"row {t}: {ids[t]} vs {rids[t]} beyond the near-tie rule"
    same = (ids == rids).all(dim=1)
    _compare(ops.SCORE_OP, (w[same], ids[same]), (rw[same], rids[same]))


def test_device_nan_rows(device):
    _on_device(device)
    E = 256
    logits, bias = torch.randn(9, E), torch.zeros(E)
    logits[2, 17] = float("nan")
    logits[5, :] = float("nan")
    w, ids = (t.cpu() for t in score_topk(*_on(device, logits, bias), 6, 2.5, 1, impl="tilelang"))
    assert w[[2, 5], :6].isnan().all() and not w[:, 6].isnan().any()
    for r in (2, 5):  # a NaN key selects as -inf: still six distinct experts, never a confident choice
        assert len(set(ids[r, :6].tolist())) == 6 and ((ids[r, :6] >= 0) & (ids[r, :6] < E)).all()
    good = [0, 1, 3, 4, 6, 7, 8]
    _compare(ops.SCORE_OP, (w[good], ids[good]), reference.score_topk(logits[good], bias, 6, 2.5, 1))
    # hash_topk reads only the k logits the table names: NaN there gives NaN weights, elsewhere nothing.
    table = torch.arange(6 * 50, dtype=torch.int32).view(50, 6) % E  # table row r: experts 6r .. 6r + 5
    input_ids = torch.tensor([2, 2, 2, 30, 30, 30, 40, 40, 40])  # row 2 names expert 17
    hash_logits = logits.clone()
    hash_logits[6, 100] = float("nan")  # an expert row 40 does not name
    args = (hash_logits, input_ids, table, 1, 2.5)
    w, ids = hash_topk(*_on(device, *args[:3]), *args[3:], impl="tilelang")
    _compare(ops.HASH_OP, (w, ids), reference.hash_topk(*args))
    assert w.cpu()[[2, 5], :6].isnan().all() and not w.cpu()[[0, 1, 3, 4, 6, 7, 8]].isnan().any()
    nan_bias = bias.clone()
    nan_bias[5] = float("nan")
    w, ids = score_topk(*_on(device, logits[good], nan_bias), 6, 2.5, 0, impl="tilelang")
    assert w.isnan().all() and ((ids >= 0) & (ids < E)).all()


def test_device_invalid_ids_route_nowhere(device):
    _on_device(device)
    E, V = 384, 50
    logits = torch.randn(6, E)
    table = torch.randint(0, E, (V, 6), dtype=torch.int32)
    table[3, 1], table[4, :] = -1, E + 5  # one entry invalid; every entry invalid
    for id_dtype in (torch.int32, torch.int64):
        input_ids = torch.tensor([3, 4, -1, V, -V, 7], dtype=id_dtype)
        args = (logits, input_ids, table, 1, 2.5)
        w, ids = hash_topk(*_on(device, *args[:3]), *args[3:], impl="tilelang")
        _compare(ops.HASH_OP, (w, ids), reference.hash_topk(*args))
        assert ids[2:5, :6].eq(-1).all() and w[2:5, :6].eq(0).all() and ids[:, 6].eq(E).all()


def test_device_zero_tokens(device):
    _on_device(device)
    w, ids = score_topk(*_on(device, torch.zeros(0, 256), torch.zeros(256)), 6, 1.5, 1, impl="tilelang")
    assert w.shape == ids.shape == (0, 7)
    w, ids = hash_topk(*_on(device, torch.zeros(0, 384), torch.zeros(0, dtype=torch.int64),
                            torch.zeros(10, 6, dtype=torch.int32)), 0, 2.5, impl="tilelang")
    assert w.shape == ids.shape == (0, 6)


def test_device_graph_safe(device):
    """No host synchronisation: both ops capture into a CUDA graph and replay to the eager result."""
    _on_device(device)
    logits, bias = 2.0 * torch.randn(8, 384, device=device), 0.1 * torch.randn(384, device=device)
    table = torch.randint(0, 384, (VOCAB, 6), dtype=torch.int32, device=device)
    input_ids = torch.randint(0, VOCAB, (8,), device=device)

    def step():
        return (score_topk(logits, bias, 6, 2.5, 1, impl="tilelang")
                + hash_topk(logits, input_ids, table, 1, 2.5, impl="tilelang"))

    eager = step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)
