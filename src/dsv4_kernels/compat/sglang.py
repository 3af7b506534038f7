"""SGLang call sites of DeepSeek-V4, in SGLang's own signatures, served by dsv4_kernels ops.

Each function takes the argument names, order, defaults, shapes and dtypes of the SGLang function it
mirrors (named in its docstring) and returns what that function returns, in its order and shapes. The
work is one dsv4_kernels op; shapes change by views, nothing is copied. A keyword-only `impl=` (ours,
not SGLang's) picks an implementation as in every dsv4_kernels op.

Arguments SGLang accepts but dsv4_kernels does not serve (other scoring functions, grouped routing,
softcapping, two different mHC eps values, a fused RMSNorm weight, more than one fused shared expert) are
refused with a ValueError naming the argument, the expected and the actual value, never ignored.

Semantics (SGLang's, checked in tests/compat/test_sglang.py): routed weights come back normalised and NOT
multiplied by routed_scaling_factor (SGLang scales the MoE output); a fused shared expert gets id E and
weight 1 / routed_scaling_factor, or 1.0 with apply_routed_scaling_factor_on_output=True, which also
scales the routed weights. The mHC post gate travels as [..., 4, 1].
"""
from __future__ import annotations

import torch

import dsv4_kernels as dk
from dsv4_kernels.compat import _common
from dsv4_kernels.ops import _checks

__all__ = ["hash_topk", "moe_fused_gate", "hc_split_sinkhorn", "mhc_pre", "mhc_post", "fused_hc_head"]

MIX_ROWS = (2 + _common.HC_MULT) * _common.HC_MULT


def hash_topk(router_logits: torch.Tensor, input_ids: torch.Tensor, tid2eid: torch.Tensor,
              num_fused_shared_experts: int = 0, routed_scaling_factor: float = 1.0,
              scoring_func: str = "sqrtsoftplus", *,
              impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirrors SGLang's `hash_topk` (sglang.jit_kernel.deepseek_v4, the hash-layer router of layers 0-2).

    router_logits: [T, E] fp32 (bf16 accepted), contiguous. T may be 0.
    input_ids: [T] int64 (SGLang's kernel reads int64; int32 is accepted too).
    tid2eid: [V, k] int32 (SGLang's table dtype). An int64 table is converted to int32 once per table and
        the copy cached (_common.int32_table: 3.1 MB write for V4's 129280 x 6 table, then free).
    num_fused_shared_experts: 0 or 1 (SGLang allows more; dsv4_kernels refuses them).
    routed_scaling_factor: only sets the shared column's weight, 1 / routed_scaling_factor.
    scoring_func: "sqrtsoftplus" only.
    Returns (topk_weights [T, k + n] fp32, topk_ids [T, k + n] int32): ids tid2eid[input_ids] in table
        order, then E; weights s[ids] / sum(s[ids]) with s = sqrt(softplus(logits)), then
        1 / routed_scaling_factor for the shared column. SGLang divides by the plain sum, we by
        sum + 1e-20: the same fp32 result for any sum above 1e-13.
    """
    _common.scoring(scoring_func)
    table = _common.int32_table("tid2eid", tid2eid)
    return dk.hash_topk(router_logits, input_ids, table, num_fused_shared_experts, routed_scaling_factor, impl=impl)


def moe_fused_gate(scores: torch.Tensor, bias: torch.Tensor, topk: int, scoring_func: str = "sigmoid",
                   num_fused_shared_experts: int = 0, renormalize: bool = True, routed_scaling_factor: float = 1.0,
                   apply_routed_scaling_factor_on_output: bool = False, moe_softcapping: float = 0.0,
                   num_expert_group: int = 1, topk_group: int = 1, *,
                   impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirrors SGLang's fused biased gate `moe_fused_gate` (sglang.jit_kernel.moe_fused_gate), which its
    DeepSeek-V4 score layers reach through `biased_topk_jit_kernel_impl` with scoring_func="sqrtsoftplus".

    scores: [T, E] fp32 or bf16 (the raw gate logits; SGLang also takes fp16, refused here), contiguous.
    bias: [E] fp32, the score-correction bias, used for selection only.
    topk: the total width, routed + fused shared columns (SGLang's convention), > num_fused_shared_experts.
    scoring_func: must be given as "sqrtsoftplus" (SGLang's default "sigmoid" is not DeepSeek-V4's).
    num_fused_shared_experts: 0 or 1.
    renormalize: False is served without a shared column only: SGLang then gives the shared column the raw
        routed sum / routed_scaling_factor, which dsv4_kernels does not compute.
    routed_scaling_factor: positive float or None (1.0).
    apply_routed_scaling_factor_on_output: as in SGLang: routed weights times the factor, shared 1.0.
    moe_softcapping, num_expert_group, topk_group: 0.0, 1 and 1 only (DeepSeek-V4 routes ungrouped).
    Returns (topk_weights [T, topk] fp32, topk_ids [T, topk] int32): the topk - n experts with the largest
        s + bias in descending order, ties to the smaller expert id (as SGLang's kernel), weights from s
        alone, then id E with the shared weight.
    """
    _common.scoring(scoring_func)
    _checks.tensor("scores", scores, (torch.float32, torch.bfloat16), ndim=2)
    n = _checks.integer("num_fused_shared_experts", num_fused_shared_experts)
    _checks.integer("topk", topk)
    if topk <= n:
        raise ValueError(f"topk: expected > num_fused_shared_experts ({n}; SGLang's topk counts the shared "
                         f"columns too), got {topk}")
    _checks.boolean("renormalize", renormalize)
    if not renormalize and n:
        raise ValueError(f"num_fused_shared_experts: expected 0 with renormalize=False (SGLang's shared weight is "
                         f"then the raw routed sum / routed_scaling_factor, not served), got {n}")
    _common.zero("moe_softcapping", moe_softcapping, "softcapping applies to softmax routing only")
    for name, value in (("num_expert_group", num_expert_group), ("topk_group", topk_group)):
        if _checks.integer(name, value) != 1:
            raise ValueError(f"{name}: expected 1 (DeepSeek-V4 routes without expert groups), got {value}")
    rsf = _common.optional_rsf(routed_scaling_factor)
    with _common.engine_names("score_topk", {"router_logits": "scores"}):
        return dk.score_topk(scores, bias, topk - n, rsf, n, apply_routed_scaling_factor_on_output, renormalize,
                             impl=impl)


def hc_split_sinkhorn(mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc_mult: int = 4,
                      sinkhorn_iters: int = 20, eps: float = 1e-6, *,
                      impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mirrors SGLang's `hc_split_sinkhorn` (sglang.srt.layers.mhc).

    mixes: [..., 24] fp32, contiguous (SGLang passes [b, s, 24]; any leading dims are viewed as one).
    hc_scale [3], hc_base [24] fp32; hc_mult: 4 only; sinkhorn_iters: int >= 1; eps: positive float.
    Returns (pre [..., 4], post [..., 4], comb [..., 4, 4]) fp32, views of dsv4_kernels.mhc_sinkhorn's
        outputs: pre = sigmoid + eps, post = 2 sigmoid, comb row softmax + eps then column/row
        normalisations ending on a column step.
    """
    x = _common.flat("mixes", mixes, 1)
    outer = _common.lead(mixes, 1)
    with _common.engine_names("mhc_sinkhorn", {"iters": "sinkhorn_iters"}):
        pre, post, comb = dk.mhc_sinkhorn(x, hc_scale, hc_base, hc_mult, sinkhorn_iters, eps, impl=impl)
    m = pre.shape[-1]
    return pre.view(*outer, m), post.view(*outer, m), comb.view(*outer, m, m)


def mhc_pre(residual: torch.Tensor, fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, rms_eps: float,
            hc_pre_eps: float, hc_sinkhorn_eps: float, hc_post_mult_value: float, sinkhorn_repeat: int,
            n_splits: int = 1, n_splits_pre: int = 32, norm_weight: torch.Tensor | None = None,
            norm_eps: float | None = None, *,
            impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mirrors SGLang's `mhc_pre` (sglang.srt.layers.mhc), SGLang's return order (post, comb, y).

    residual: [..., 4, dim] bf16, contiguous. fn: [24, 4 * dim] fp32. hc_scale [3], hc_base [24] fp32.
    rms_eps: the eps of the RMS scaling (our norm_eps). hc_pre_eps, hc_sinkhorn_eps: must be equal (our
        single eps; DeepSeek-V4 passes hc_eps for both). hc_post_mult_value: 2.0 only.
    sinkhorn_repeat: int >= 1 (our iters). n_splits, n_splits_pre: SGLang's split-K knobs, ints >= 1,
        accepted and not used. norm_weight: None only (no fused RMSNorm; SGLang's caller then applies
        the norm itself); norm_eps: ignored with it.
    Returns (post_mix [..., 4, 1] fp32, comb_mix [..., 4, 4] fp32, layer_input [..., dim] bf16), views of
        dsv4_kernels.mhc_pre's (y, post, comb).
    """
    _common.split_knob("n_splits", n_splits)
    _common.split_knob("n_splits_pre", n_splits_pre)
    return _common.mhc_pre(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
                           sinkhorn_repeat, norm_weight, impl)


def mhc_post(x: torch.Tensor, residual: torch.Tensor, post_layer_mix: torch.Tensor, comb_res_mix: torch.Tensor, *,
             impl: str | None = None) -> torch.Tensor:
    """Mirrors SGLang's `mhc_post` (sglang.srt.layers.mhc): x is the sublayer output, residual the state.

    x: [..., dim] bf16; residual: [..., 4, dim] bf16; post_layer_mix: [..., 4, 1] (or [..., 4]) fp32;
    comb_res_mix: [..., 4, 4] fp32 with comb[i, j] from source stream i to destination j. All contiguous.
    Returns the new residual [..., 4, dim] bf16: out[j] = post[j] * x + sum_i comb[i, j] * residual[i].
    """
    return _common.mhc_post(x, residual, post_layer_mix, comb_res_mix, impl)


def fused_hc_head(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
                  norm_eps: float, hc_eps: float, *, impl: str | None = None) -> torch.Tensor:
    """Mirrors SGLang's `fused_hc_head` (sglang.srt.layers.mhc_head). Trap: SGLang's norm_eps (the RMS eps)
    comes first and hc_eps second; dsv4_kernels.mhc_head takes (eps=hc_eps, norm_eps=...).

    x: [T, 4, dim] bf16 (leading dims beyond T are viewed as one); hc_fn: [4, 4 * dim] fp32; hc_scale: [1];
    hc_base: [4]. Returns y [T, dim] bf16.
    """
    return _common.mhc_head(x, hc_fn, hc_scale, hc_base, norm_eps, hc_eps, impl, rms_name="norm_eps")
