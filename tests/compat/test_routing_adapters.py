"""compat routing adapters against the engines' documented semantics, written out here in fp64:

- SGLang (hash_topk, moe_fused_gate): routed weights s[ids] / sum, NOT scaled; a fused shared column
  with id E and weight 1 / routed_scaling_factor, or with apply_routed_scaling_factor_on_output every
  column times the factor (shared 1.0); moe_fused_gate's topk counts the shared column.
- vLLM (fused_topk_bias): routed weights s[ids] / sum * routed_scaling_factor, no shared column; int64
  tables and ids on the MegaMoE path.
Both select score-layer experts by s + bias (ties to the smaller id) and take weights from s alone. The
V4-Flash bias (about 8.08, nearly uniform) is in every Flash case: weights taken from s + bias would be
flat and fail.
"""
from __future__ import annotations

import pytest
import torch

import dsv4_kernels as dk
from dsv4_kernels.compat import _common, sglang, vllm

FLASH = dict(E=256, rsf=1.5)
PRO = dict(E=384, rsf=2.5)
VOCAB = 129280
RTOL = 1e-6  # fp32 quotients against fp64 (ops/routing.py WEIGHT_RTOL)


def _s(logits):
    x = logits.double()
    return torch.where(x > 20, x, torch.log1p(torch.exp(x.clamp(max=20)))).sqrt()


def _bias(E):
    return 8.08 + 0.003 * torch.randn(E) if E == FLASH["E"] else 0.1 * torch.randn(E)


def _select(logits, bias, k):
    key = (_s(logits).float() + bias).double()
    order = torch.sort(-key, dim=-1, stable=True).indices  # descending, equal keys keep the smaller id first
    return order[:, :k]


def _normalised(logits, ids):
    w = _s(logits).gather(1, ids.long())
    return w / w.sum(-1, keepdim=True)


def _sglang_expected(logits, ids, E, rsf, shared, apply):
    w = _normalised(logits, ids)
    if shared:
        w = torch.cat([w, torch.full((w.shape[0], 1), 1.0 / rsf, dtype=w.dtype)], 1)
        ids = torch.cat([ids, torch.full((ids.shape[0], 1), E, dtype=ids.dtype)], 1)
    return (w * rsf if apply else w), ids


def _check(weights, ids, expected_w, expected_ids, id_dtype=torch.int32):
    assert weights.dtype == torch.float32 and ids.dtype == id_dtype
    assert torch.equal(ids.long(), expected_ids.long())
    torch.testing.assert_close(weights.double(), expected_w, rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("cfg", [FLASH, PRO], ids=["flash-E256", "pro-E384"])
@pytest.mark.parametrize("T", [0, 5])
@pytest.mark.parametrize("shared,apply", [(0, False), (1, False), (1, True)])
def test_sglang_moe_fused_gate(cfg, T, shared, apply):
    E, rsf = cfg["E"], cfg["rsf"]
    logits, bias = 2.0 * torch.randn(T, E), _bias(E)
    w, ids = sglang.moe_fused_gate(logits, bias, 6 + shared, "sqrtsoftplus", shared, True, rsf, apply,
                                   impl="reference")
    assert w.shape == ids.shape == (T, 6 + shared)
    _check(w, ids, *_sglang_expected(logits, _select(logits, bias, 6), E, rsf, shared, apply))
    if T and not apply:  # the trap: routed weights sum to 1, not to routed_scaling_factor
        torch.testing.assert_close(w[:, :6].sum(-1), torch.ones(T))


def test_sglang_moe_fused_gate_flash_bias_trap():
    logits, bias = 2.0 * torch.randn(4, 256), _bias(256)
    w, ids = sglang.moe_fused_gate(logits, bias, 6, "sqrtsoftplus", impl="reference")
    biased = (_s(logits).float() + bias).double().gather(1, ids.long())
    flat = biased / biased.sum(-1, keepdim=True)  # what weights from s + bias would be: almost 1/6 each
    assert (w.double() - flat).abs().max() > 1e-2


@pytest.mark.parametrize("cfg", [FLASH, PRO], ids=["flash-E256", "pro-E384"])
@pytest.mark.parametrize("T", [0, 4])
@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_sglang_hash_topk(cfg, T, shared, table_dtype):
    E, rsf = cfg["E"], cfg["rsf"]
    tid2eid = torch.randint(0, E, (VOCAB, 6), dtype=table_dtype)
    input_ids = torch.randint(0, VOCAB, (T,), dtype=torch.int64)
    if T:
        input_ids[-1] = VOCAB - 1
    logits = 2.0 * torch.randn(T, E)
    w, ids = sglang.hash_topk(logits, input_ids, tid2eid, shared, rsf, "sqrtsoftplus", impl="reference")
    _check(w, ids, *_sglang_expected(logits, tid2eid[input_ids], E, rsf, shared, False))


@pytest.mark.parametrize("cfg", [FLASH, PRO], ids=["flash-E256", "pro-E384"])
@pytest.mark.parametrize("T", [0, 5])
@pytest.mark.parametrize("indices_type", [None, torch.int64])
def test_vllm_fused_topk_bias_score(cfg, T, indices_type):
    E, rsf = cfg["E"], cfg["rsf"]
    logits, bias = 2.0 * torch.randn(T, E), _bias(E)
    hidden = torch.randn(T, 64).bfloat16()
    w, ids = vllm.fused_topk_bias(hidden, logits, "sqrtsoftplus", bias, 6, True, indices_type,
                                  routed_scaling_factor=rsf, impl="reference")
    ids_expected = _select(logits, bias, 6)
    _check(w, ids, _normalised(logits, ids_expected) * rsf, ids_expected, indices_type or torch.int32)
    if T:  # the trap: vLLM's weights carry the factor
        torch.testing.assert_close(w.sum(-1), torch.full((T,), rsf))


@pytest.mark.parametrize("cfg", [FLASH, PRO], ids=["flash-E256", "pro-E384"])
@pytest.mark.parametrize("T", [0, 4])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_vllm_fused_topk_bias_hash(cfg, T, dtype):
    E, rsf = cfg["E"], cfg["rsf"]
    table = torch.randint(0, E, (VOCAB, 6), dtype=dtype)  # int64: vLLM's MegaMoE hash_indices_dtype
    tokens = torch.randint(0, VOCAB, (T,), dtype=dtype)
    logits = 2.0 * torch.randn(T, E)
    w, ids = vllm.fused_topk_bias(logits, logits, "sqrtsoftplus", None, 6, True, dtype, tokens, table, rsf,
                                  impl="reference")
    expected_ids = table[tokens]
    _check(w, ids, _normalised(logits, expected_ids) * rsf, expected_ids, dtype)


def test_vllm_renormalize_false_keeps_raw_scores_times_factor():
    logits, bias = torch.randn(3, 384), _bias(384)
    w, ids = vllm.fused_topk_bias(logits, logits, "sqrtsoftplus", bias, 6, False, routed_scaling_factor=2.5,
                                  impl="reference")
    _check(w, ids, _s(logits).gather(1, ids.long()) * 2.5, _select(logits, bias, 6))


def test_int64_table_converted_once_and_invalidated_by_writes():
    table = torch.randint(0, 256, (VOCAB, 6), dtype=torch.int64)
    first = _common.int32_table("tid2eid", table)
    assert first.dtype == torch.int32 and _common.int32_table("tid2eid", table) is first
    table[0, 0] = 2 ** 40  # an entry outside int32 must not wrap into a valid expert id
    second = _common.int32_table("tid2eid", table)
    assert second is not first and second[0, 0] == -1
    w, ids = sglang.hash_topk(torch.randn(1, 256), torch.tensor([0]), table, impl="reference")
    assert ids[0, 0] == -1 and w[0, 0] == 0  # hash_topk's masking of an invalid table entry


def test_adapters_pass_tensors_through_without_copies(monkeypatch):
    seen = {}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen[name] = (args, out)
            return out
        monkeypatch.setattr(dk, name, wrapped)

    spy("score_topk", dk.score_topk)
    spy("hash_topk", dk.hash_topk)
    logits, bias = torch.randn(2, 256), _bias(256)
    w, ids = sglang.moe_fused_gate(logits, bias, 7, "sqrtsoftplus", 1, impl="reference")
    args, out = seen["score_topk"]
    assert args[0] is logits and args[1] is bias and out[0] is w and out[1] is ids
    table = torch.randint(0, 256, (VOCAB, 6), dtype=torch.int32)
    tokens = torch.randint(0, VOCAB, (2,))
    w, ids = vllm.fused_topk_bias(logits, logits, "sqrtsoftplus", None, 6, True, None, tokens, table, 1.5,
                                  impl="reference")
    args, out = seen["hash_topk"]
    assert args[0] is logits and args[1] is tokens and args[2] is table and out[1] is ids


def test_adapters_trace_under_dynamic_torch_compile():
    """As tests/test_public_surface.py traces the ops: fullgraph, symbolic shapes and floats."""
    logits, bias = 2.0 * torch.randn(3, 256), _bias(256)
    table = torch.randint(0, 256, (VOCAB, 6), dtype=torch.int32)
    tokens = torch.randint(0, VOCAB, (3,))
    calls = [(sglang.moe_fused_gate, (logits, bias, 7, "sqrtsoftplus", 1, True, 1.5)),
             (vllm.fused_topk_bias, (logits, logits, "sqrtsoftplus", None, 6, True, torch.int64, tokens, table, 2.5))]
    for fn, args in calls:
        torch._dynamo.reset()
        with torch._dynamo.config.patch(specialize_float=False):
            got = torch.compile(lambda *a: fn(*a, impl="reference"), dynamic=True, backend="eager",
                                fullgraph=True)(*args)
        for g, w in zip(got, fn(*args, impl="reference")):
            assert torch.equal(g, w)


def test_default_dispatch():
    logits, bias = 2.0 * torch.randn(3, 256), _bias(256)
    w, ids = sglang.moe_fused_gate(logits, bias, 6, "sqrtsoftplus")
    _check(w, ids, _normalised(logits, _select(logits, bias, 6)), _select(logits, bias, 6))


@pytest.mark.parametrize("call,match", [
    (lambda l, b: sglang.moe_fused_gate(l, b, 6), "scoring_func: expected 'sqrtsoftplus'"),
    (lambda l, b: sglang.moe_fused_gate(l, b, 6, "sqrtsoftplus", num_expert_group=8, topk_group=4),
     "num_expert_group: expected 1"),
    (lambda l, b: sglang.moe_fused_gate(l, b, 1, "sqrtsoftplus", 1), "topk: expected > num_fused_shared_experts"),
    (lambda l, b: sglang.moe_fused_gate(l, b, 7, "sqrtsoftplus", 1, False), "num_fused_shared_experts: expected 0"),
    (lambda l, b: sglang.moe_fused_gate(l.half(), b, 6, "sqrtsoftplus"), "scores: expected dtype"),
    (lambda l, b: sglang.moe_fused_gate(l, b, 6, "sqrtsoftplus", moe_softcapping=30.0), "moe_softcapping"),
    (lambda l, b: sglang.hash_topk(l, torch.zeros(3, dtype=torch.long), torch.zeros(9, 6), 0),
     "tid2eid: expected dtype"),
    (lambda l, b: vllm.fused_topk_bias(l, l, "sqrtsoftplus", None, 6, True), "e_score_correction_bias"),
    (lambda l, b: vllm.fused_topk_bias(l[:2], l, "sqrtsoftplus", b, 6, True), "hidden_states: expected 3 rows"),
    (lambda l, b: vllm.fused_topk_bias(l, l, "sqrtsoftplus", b, 6, True, torch.int16), "indices_type"),
    (lambda l, b: vllm.fused_topk_bias(l, l, "sqrtsoftplus", None, 6, True, input_tokens=torch.zeros(3).long()),
     "input_tokens: hash routing needs"),
    (lambda l, b: vllm.fused_topk_bias(l, l, "sqrtsoftplus", None, 6, False, None, torch.zeros(3).long(),
                                       torch.zeros(9, 6, dtype=torch.int32)), "renormalize: expected True"),
    (lambda l, b: vllm.fused_topk_bias(l, l, "sqrtsoftplus", None, 5, True, None, torch.zeros(3).long(),
                                       torch.zeros(9, 6, dtype=torch.int32)), "hash_indices_table: expected 5"),
    (lambda l, b: vllm.fused_topk_bias(l, l, "sqrtsoftplus", b[:100], 6, True),
     r"^e_score_correction_bias: expected shape \(256,\).*calls it bias"),
    (lambda l, b: vllm.fused_topk_bias(l, l, "sqrtsoftplus", None, 6, True, None, torch.zeros(2).long(),
                                       torch.zeros(9, 6, dtype=torch.int32)), r"^input_tokens: expected shape"),
    (lambda l, b: sglang.moe_fused_gate(l[0], b, 6, "sqrtsoftplus"), r"^scores: expected 2 dimensions"),
])
def test_refusals_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(3, 256), _bias(256))
