"""MoE routing ops (SPEC 3, SPEC 7 "Routing"): score_topk for score layers, hash_topk for hash layers.

Both take the fp32 gate logits, compute s = sqrt(softplus(logits)) and return (weights fp32, ids int32)
with the routed weights normalised from s alone. Implementations: the PyTorch reference and one fused
kernel per op and language (kernels/routing/triton.py and tilelang.py; up to 512 experts and top-16).
"""
from __future__ import annotations


import torch

from dsv4_kernels import dispatch
from dsv4_kernels.ladder import OpCheck, register_check
from dsv4_kernels.oracles import routing as oracle
from dsv4_kernels.ops import _checks, _library, _values
from dsv4_kernels.testing import assert_close

SCORE_OP = "score_topk"
HASH_OP = "hash_topk"
SHARED_EXPERTS = (0, 1)
ID_DTYPES = (torch.int32, torch.int64)

# Weights: fp32 quotients of fp32 s values. The reference rounds an fp64 quotient once; an fp32 kernel
# carries its softplus/sqrt error (a couple of ulps) and an fp32 normaliser, a few 1e-7 relative in
# all. rtol 1e-6 covers that, while weights taken from s + bias (the V4-Flash trap) or a wrong
# normaliser are off by percent. atol only matters for weights that are exactly 0.
WEIGHT_ATOL, WEIGHT_RTOL = 1e-12, 1e-6


def _shared_experts(value) -> None:
    _checks.one_of("num_fused_shared_experts", _checks.integer("num_fused_shared_experts", value), SHARED_EXPERTS)


LOGIT_DTYPES = (torch.float32, torch.bfloat16)


def _logits(router_logits) -> tuple[int, int]:
    _checks.tensor("router_logits", router_logits, LOGIT_DTYPES, ndim=2)
    T, E = router_logits.shape
    if E < 1:
        raise ValueError(f"router_logits: expected shape (T, E) with E >= 1 experts, got {tuple(router_logits.shape)}")
    return T, E


def validate_score_topk(router_logits, bias, topk, routed_scaling_factor, num_fused_shared_experts,
                        apply_routed_scaling_factor_on_output=False, renormalize=True) -> None:
    _, E = _logits(router_logits)
    _checks.tensor("bias", bias, torch.float32)
    _checks.shape("bias", bias, (E,))
    _checks.same_device(router_logits=router_logits, bias=bias)
    if not 1 <= _checks.integer("topk", topk) <= E:
        raise ValueError(f"topk: expected 1 <= topk <= {E} (the number of experts, router_logits.shape[1]), "
                         f"got {topk}")
    _checks.positive_float("routed_scaling_factor", routed_scaling_factor)
    _shared_experts(num_fused_shared_experts)
    _checks.boolean("apply_routed_scaling_factor_on_output", apply_routed_scaling_factor_on_output)
    _checks.boolean("renormalize", renormalize)


def validate_hash_topk(router_logits, input_ids, tid2eid, num_fused_shared_experts, routed_scaling_factor,
                       apply_routed_scaling_factor_on_output=False) -> None:
    T, E = _logits(router_logits)
    _checks.tensor("input_ids", input_ids, ID_DTYPES)
    _checks.shape("input_ids", input_ids, (T,))
    _checks.tensor("tid2eid", tid2eid, torch.int32, ndim=2)
    V, k = tid2eid.shape
    if V < 1:
        raise ValueError(f"tid2eid: expected shape (V, k) with V >= 1 table rows, got {tuple(tid2eid.shape)}")
    if not 1 <= k <= E:
        raise ValueError(f"tid2eid: expected shape (V, k) with 1 <= k <= {E} (k routed experts per token, at most "
                         f"router_logits.shape[1]), got {tuple(tid2eid.shape)}")
    _checks.same_device(router_logits=router_logits, input_ids=input_ids, tid2eid=tid2eid)
    _shared_experts(num_fused_shared_experts)
    _checks.positive_float("routed_scaling_factor", routed_scaling_factor)
    _checks.boolean("apply_routed_scaling_factor_on_output", apply_routed_scaling_factor_on_output)


# Triton: BLOCK_T tokens per program, all experts of a token in one program (kernels/routing/README.md).
TRITON_DEFAULTS = {SCORE_OP: {"BLOCK_T": 4, "num_warps": 4}, HASH_OP: {"BLOCK_T": 4, "num_warps": 4}}
# TileLang: TOKENS 32-lane groups (one token each) per block; the same values as kernels/routing/tilelang.py's
# DEFAULTS (a test keeps them equal), repeated here so that registering the ops does not import tilelang.
TILELANG_DEFAULTS = {SCORE_OP: {"TOKENS": 4}, HASH_OP: {"TOKENS": 4}}


for _op in (SCORE_OP, HASH_OP):
    dispatch.register_family_op(_op, "routing", triton=TRITON_DEFAULTS[_op], tilelang=TILELANG_DEFAULTS[_op])


def _fake_outputs(like: torch.Tensor, rows, cols) -> tuple[torch.Tensor, torch.Tensor]:
    return like.new_empty((rows, cols), dtype=torch.float32), like.new_empty((rows, cols), dtype=torch.int32)


@_library.custom_op("dsv4::score_topk", mutates_args=())
def _score_topk_op(router_logits: torch.Tensor, bias: torch.Tensor, topk: int, routed_scaling_factor: float,
                   num_fused_shared_experts: int, apply_routed_scaling_factor_on_output: bool, renormalize: bool,
                   impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch.call(SCORE_OP, router_logits, bias, topk, routed_scaling_factor, num_fused_shared_experts,
                         apply_routed_scaling_factor_on_output, renormalize, impl=impl or None)


@_score_topk_op.register_fake
def _(router_logits, bias, topk, routed_scaling_factor, num_fused_shared_experts, apply_routed_scaling_factor_on_output,
      renormalize, impl):
    return _fake_outputs(router_logits, router_logits.shape[0], topk + num_fused_shared_experts)


@_library.custom_op("dsv4::hash_topk", mutates_args=())
def _hash_topk_op(router_logits: torch.Tensor, input_ids: torch.Tensor, tid2eid: torch.Tensor,
                  num_fused_shared_experts: int, routed_scaling_factor: float,
                  apply_routed_scaling_factor_on_output: bool, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch.call(HASH_OP, router_logits, input_ids, tid2eid, num_fused_shared_experts, routed_scaling_factor,
                         apply_routed_scaling_factor_on_output, impl=impl or None)


@_hash_topk_op.register_fake
def _(router_logits, input_ids, tid2eid, num_fused_shared_experts, routed_scaling_factor,
      apply_routed_scaling_factor_on_output, impl):
    return _fake_outputs(router_logits, router_logits.shape[0], tid2eid.shape[1] + num_fused_shared_experts)


def score_topk(router_logits: torch.Tensor, bias: torch.Tensor, topk: int = 6, routed_scaling_factor: float = 1.0,
               num_fused_shared_experts: int = 0, apply_routed_scaling_factor_on_output: bool = False,
               renormalize: bool = True, *, impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Score-layer routing (layers >= 3): top-k experts of s + bias, weights from s alone.

    s = sqrt(softplus(router_logits)) in fp32 (softplus(x) = x for x > 20).
    router_logits: [T, E] fp32 (bf16 accepted, upcast), contiguous: the gate GEMM output (E = 256 V4-Flash,
        384 V4-Pro). T may be 0.
    bias: [E] fp32, contiguous, same device: the score-correction bias, used for selection only.
    topk: routed experts per token, an int with 1 <= topk <= E (6 in V4).
    routed_scaling_factor: positive finite float (1.5 Flash, 2.5 Pro). By default (the engines'
        convention: FlashInfer, SGLang) it does NOT scale the routed weights: the caller scales the MoE
        output, and a fused shared expert gets 1 / routed_scaling_factor.
    num_fused_shared_experts: 0 or 1. With 1, a trailing column holds expert id E (the shared expert
        fused into the routed MoE) with weight 1 / routed_scaling_factor, or 1.0 when applied on output.
    apply_routed_scaling_factor_on_output: bool; True multiplies the routed weights by the factor (the
        official model's arithmetic) and gives the shared column 1.0.
    renormalize: bool; False returns the raw selected s (a checkpoint's norm_topk_prob=False).
    impl: run this implementation ("reference", "triton", "tilelang") or raise.
    Returns (weights, ids), both [T, topk + num_fused_shared_experts]:
        weights fp32: routed columns s[ids] / (sum of those s + 1e-20), so a row sums to 1 (0 if every
            selected s is 0); times routed_scaling_factor when applied on the output;
        ids int32: distinct experts in descending order of the fp32 key s + bias; ties go to the smaller
            expert index first.
    Edge cases: T = 0 gives [0, topk + n] outputs. NaN in, NaN out: a row with a NaN logit (every row,
    for a NaN in the bias) gets NaN routed weights; its ids are still distinct experts in [0, E).
    Raises ValueError for a wrong dtype, rank, shape, device or layout, topk outside [1, E], a
    routed_scaling_factor that is not a positive finite number, or num_fused_shared_experts not in
    {0, 1} (V4 fuses one shared expert; engines disagree on what n > 1 means, so it is refused).
    """
    args = (router_logits, bias, topk, routed_scaling_factor, num_fused_shared_experts,
            apply_routed_scaling_factor_on_output, renormalize)
    known = _score_topk_op.known(args, impl)
    if known is None:
        validate_score_topk(*args)
    return _score_topk_op.run(known, args, impl, router_logits, bias, topk, float(routed_scaling_factor),
                              num_fused_shared_experts, apply_routed_scaling_factor_on_output, renormalize)


def hash_topk(router_logits: torch.Tensor, input_ids: torch.Tensor, tid2eid: torch.Tensor,
              num_fused_shared_experts: int = 0, routed_scaling_factor: float = 1.0,
              apply_routed_scaling_factor_on_output: bool = False, *,
              impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash-layer routing (layers 0, 1, 2): experts looked up from the token id, weights from s.

    router_logits: [T, E] fp32 (bf16 accepted, upcast), contiguous: the gate GEMM output. T may be 0.
    input_ids: [T] int32 or int64, contiguous, same device: token ids, each in [0, V).
    tid2eid: [V, k] int32, contiguous, same device: the frozen token-to-experts table (V = 129280 and
        k = 6 in V4), 1 <= k <= E, every entry in [0, E).
    num_fused_shared_experts: 0 or 1, as in score_topk.
    routed_scaling_factor: positive finite float, as in score_topk (by default it only sets the shared
        column's weight, 1 / routed_scaling_factor).
    apply_routed_scaling_factor_on_output: bool, as in score_topk.
    impl: run this implementation ("reference", "triton", "tilelang") or raise.
    Returns (weights, ids), both [T, k + num_fused_shared_experts]:
        ids int32: tid2eid[input_ids] in table order (not sorted), then E for the shared column;
        weights fp32: s = sqrt(softplus(router_logits)) gathered at ids and normalised as in score_topk
            (no bias in hash layers); a repeated expert in a table row counts once per occurrence.
    Edge cases: T = 0 gives [0, k + n] outputs. Nothing is wrapped: a token id outside [0, V) gives
    routed ids -1 with weight 0 for its row (the shared column stays); a table entry outside [0, E)
    gives id -1 with weight 0 and the row is normalised over its valid entries (an engine's MoE skips
    id -1). A NaN logit at one of the row's experts makes its routed weights NaN (the other logits are
    not read). DSV4K_CHECK=1 (off by default; it syncs)
    refuses out-of-range token ids and table entries instead, naming the first one.
    Raises ValueError for a wrong dtype, rank, shape, device or layout, an empty table, k outside
    [1, E], a routed_scaling_factor that is not a positive finite number, or num_fused_shared_experts
    not in {0, 1}.
    """
    args = (router_logits, input_ids, tid2eid, num_fused_shared_experts, routed_scaling_factor,
            apply_routed_scaling_factor_on_output)
    known = _hash_topk_op.known(args, impl)
    if known is None:
        validate_hash_topk(*args)
        if _values.enabled():
            _values.check(_values.InRange("input_ids", input_ids, 0, tid2eid.shape[0], what="rows of tid2eid"),
                          _values.InRange("tid2eid", tid2eid, 0, router_logits.shape[1], what="experts"))
    return _hash_topk_op.run(known, args, impl, router_logits, input_ids, tid2eid, num_fused_shared_experts,
                             float(routed_scaling_factor), apply_routed_scaling_factor_on_output)


def _compare(out: torch.Tensor, expected: torch.Tensor) -> None:
    if out.dtype != expected.dtype:
        raise AssertionError(f"dtype {out.dtype} != expected {expected.dtype}")
    if expected.is_floating_point():
        assert_close(out, expected, atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL, what="weights")
        return
    # ids: bit-exact (SPEC 6). Selection and order are discrete: a different id is a different routing.
    if out.shape != expected.shape:
        raise AssertionError(f"ids: shape {tuple(out.shape)} != expected {tuple(expected.shape)}")
    bad = out != expected
    if bad.any():
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"ids: {int(bad.sum())} of {out.numel()} differ, first at {pos}: actual "
                             f"{out[pos].item()} expected {expected[pos].item()}")


FLASH = dict(model="flash", E=256, rsf=1.5)
PRO = dict(model="pro", E=384, rsf=2.5)
VOCAB = 129280


def _bias(E: int, device) -> torch.Tensor:
    if E == FLASH["E"]:
        return 8.08 + 0.003 * torch.randn(E, device=device)  # the V4-Flash trap: large, nearly uniform
    return 0.1 * torch.randn(E, device=device)


def _score_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    cases = []
    for cfg in (FLASH, PRO):
        E, rsf = cfg["E"], cfg["rsf"]
        for T, shared in ((0, 1), (1, 0), (3, 1), (100, 1)):
            logits = 2.0 * torch.randn(T, E, device=device)
            label = f"{cfg['model']}-E{E}-T{T}" + ("-shared" if shared else "")
            cases.append((label, (logits, _bias(E, device), 6, rsf, shared), {}))
    # Logits from 4 values and bias from 2: many exact key ties, ordered by expert index.
    logits = torch.tensor([21.0, 25.0, 30.25, 36.0], device=device)[torch.randint(0, 4, (63, 384), device=device)]
    bias = torch.tensor([0.0, 0.5], device=device)[torch.randint(0, 2, (384,), device=device)]
    cases.append(("ties-E384-T63", (logits, bias, 6, 2.5, 0), {}))
    cases.append(("odd-E100-T7-top1", (torch.randn(7, 100, device=device), torch.randn(100, device=device), 1, 0.7, 1),
                  {}))
    logits = 2.0 * torch.randn(5, PRO["E"], device=device)
    cases.append(("pro-T5-scaled-on-output", (logits, _bias(PRO["E"], device), 6, PRO["rsf"], 1),
                  {"apply_routed_scaling_factor_on_output": True}))
    cases.append(("pro-T5-raw-scores", (logits, _bias(PRO["E"], device), 6, PRO["rsf"], 0), {"renormalize": False}))
    cases.append(("flash-T4-bf16-logits", (logits[:4, :FLASH["E"]].bfloat16(), _bias(FLASH["E"], device), 6,
                                           FLASH["rsf"], 1), {}))
    return cases


def _hash_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    cases = []
    for cfg in (FLASH, PRO):
        E, rsf = cfg["E"], cfg["rsf"]
        tid2eid = torch.randint(0, E, (VOCAB, 6), dtype=torch.int32, device=device)
        for T, shared, id_dtype in ((0, 0, torch.int64), (1, 1, torch.int32), (3, 0, torch.int64),
                                    (100, 1, torch.int64)):
            input_ids = torch.randint(0, VOCAB, (T,), dtype=id_dtype, device=device)
            if T:
                input_ids[-1] = VOCAB - 1
            logits = 2.0 * torch.randn(T, E, device=device)
            label = f"{cfg['model']}-E{E}-T{T}" + ("-shared" if shared else "") + f"-{str(id_dtype)[6:]}"
            cases.append((label, (logits, input_ids, tid2eid, shared, rsf), {}))
        cases.append((f"{cfg['model']}-E{E}-T3-scaled-on-output", (2.0 * torch.randn(3, E, device=device),
                      torch.tensor([0, 1, VOCAB - 1], device=device), tid2eid, 1, rsf),
                      {"apply_routed_scaling_factor_on_output": True}))
    return cases


register_check(OpCheck(SCORE_OP, _score_cases, _compare, oracle=oracle.score_topk))
register_check(OpCheck(HASH_OP, _hash_cases, _compare, oracle=oracle.hash_topk))
