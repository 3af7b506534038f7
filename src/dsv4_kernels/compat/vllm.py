"""vLLM call sites of DeepSeek-V4, in vLLM's own signatures, served by dsv4_kernels ops.

Each function takes the argument names, order, defaults, shapes and dtypes of the vLLM function it
mirrors (named in its docstring) and returns what that function returns, in its order and shapes. The
work is one dsv4_kernels op; shapes change by views. The only copies are the dtype conversions vLLM's
int64 conventions force, each documented with its cost. A keyword-only `impl=` (ours, not vLLM's) picks an
implementation as in every dsv4_kernels op.

Semantics that differ from SGLang's and are easy to get wrong (tests/compat/test_vllm.py checks them):
- vLLM's DeepSeek-V4 router MULTIPLIES the routed weights by routed_scaling_factor (score and hash
  layers alike); the fused shared expert is appended by vLLM's router class, not by fused_topk_bias.
- the mHC ops take the RMS eps first and the hc eps after (rms_eps, hc_pre_eps, hc_sinkhorn_eps;
  hc_head: rms_norm_eps, hc_eps); dsv4_kernels.mhc_head takes (eps, norm_eps) in the other order.
- with the MegaMoE backend, tid2eid and topk_ids are int64.
"""
from __future__ import annotations

import torch

import dsv4_kernels as dk
from dsv4_kernels.compat import _common
from dsv4_kernels.ops import _checks

__all__ = ["fused_topk_bias", "mhc_pre", "mhc_post", "mhc_fused_post_pre", "hc_head"]

_ROUTER_NAMES = {"router_logits": "gating_output", "bias": "e_score_correction_bias", "input_ids": "input_tokens",
                 "tid2eid": "hash_indices_table"}


def _indices_type(indices_type) -> torch.dtype:
    if indices_type is None:
        return torch.int32
    if indices_type not in (torch.int32, torch.int64):
        raise ValueError(f"indices_type: expected None, torch.int32 or torch.int64, got {indices_type!r}")
    return indices_type


def fused_topk_bias(hidden_states: torch.Tensor, gating_output: torch.Tensor, scoring_func: str,
                    e_score_correction_bias: torch.Tensor | None, topk: int, renormalize: bool,
                    indices_type: torch.dtype | None = None, input_tokens: torch.Tensor | None = None,
                    hash_indices_table: torch.Tensor | None = None, routed_scaling_factor: float = 1.0, *,
                    impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirrors vLLM's `fused_topk_bias` (vllm.model_executor.layers.fused_moe.router.fused_topk_bias_router),
    the biased / hash router of DeepSeek-V4 (scoring_func "sqrtsoftplus").

    hidden_states: [M, hidden]; only its row count is read (it must equal gating_output's).
    gating_output: [M, E] fp32 (bf16 accepted), contiguous: the router logits. M may be 0.
    scoring_func: "sqrtsoftplus" only.
    e_score_correction_bias: [E] fp32 for score layers (selection only); None in hash layers.
    topk: routed experts per token (6); in hash layers it must equal hash_indices_table.shape[1].
    renormalize: the checkpoint's norm_topk_prob. Hash layers are served with True only.
    indices_type: None or torch.int32 (ids returned as is) or torch.int64 (vLLM's MegaMoE path: the ids are
        converted, one [M, topk] int64 write, 48 bytes per token for V4).
    input_tokens: [M] int32 or int64 token ids, with hash_indices_table (both or neither).
    hash_indices_table: [V, topk] int32 or int64 (MegaMoE). An int64 table is converted to int32 once per
        table and the copy cached (_common.int32_table; 3.1 MB write for V4's table).
    routed_scaling_factor: positive float (1.5 V4-Flash, 2.5 V4-Pro); vLLM multiplies it INTO the routed
        weights, so these weights carry it (dsv4_kernels' apply_routed_scaling_factor_on_output=True).
    Returns (topk_weights [M, topk] fp32, topk_ids [M, topk] int32 or indices_type):
        score layers: the topk experts with the largest s + bias (s = sqrt(softplus(logits))), descending,
        ties to the smaller id, weights s[ids] / sum(s[ids]) (if renormalize) * routed_scaling_factor;
        hash layers: ids hash_indices_table[input_tokens] in table order, weights as above, no bias.
        vLLM's kernels clamp the sum at 1e-20, we add 1e-20: the same fp32 weights for any sum above 1e-13.
    """
    _common.scoring(scoring_func)
    _checks.tensor("hidden_states", hidden_states, contiguous=False)
    _checks.tensor("gating_output", gating_output, (torch.float32, torch.bfloat16), ndim=2)
    if hidden_states.dim() < 1 or hidden_states.shape[0] != gating_output.shape[0]:
        raise ValueError(f"hidden_states: expected {gating_output.shape[0]} rows (gating_output.shape[0]), got shape "
                         f"{tuple(hidden_states.shape)}")
    out_dtype = _indices_type(indices_type)
    _checks.integer("topk", topk, minimum=1)
    _checks.boolean("renormalize", renormalize)
    _checks.positive_float("routed_scaling_factor", routed_scaling_factor)
    if (input_tokens is None) != (hash_indices_table is None):
        given = "input_tokens" if hash_indices_table is None else "hash_indices_table"
        raise ValueError(f"{given}: hash routing needs input_tokens and hash_indices_table together; got {given} "
                         f"alone")
    if hash_indices_table is not None:
        table = _common.int32_table("hash_indices_table", hash_indices_table)
        if table.shape[1] != topk:
            raise ValueError(f"hash_indices_table: expected {topk} columns (topk), got shape {tuple(table.shape)}")
        if not renormalize:
            raise ValueError("renormalize: expected True in hash layers (dsv4_kernels.hash_topk always normalises "
                             "the looked-up weights), got False")
        with _common.engine_names("hash_topk", _ROUTER_NAMES):
            weights, ids = dk.hash_topk(gating_output, input_tokens, table, 0, routed_scaling_factor, True,
                                        impl=impl)
    else:
        if e_score_correction_bias is None:
            raise ValueError("e_score_correction_bias: expected a [E] fp32 tensor for score routing (DeepSeek-V4's "
                             "noaux_tc layers have one), got None")
        with _common.engine_names("score_topk", _ROUTER_NAMES):
            weights, ids = dk.score_topk(gating_output, e_score_correction_bias, topk, routed_scaling_factor, 0,
                                         True, renormalize, impl=impl)
    return weights, (ids if out_dtype == torch.int32 else ids.to(out_dtype))


def mhc_pre(residual: torch.Tensor, fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, rms_eps: float,
            hc_pre_eps: float, hc_sinkhorn_eps: float, hc_post_mult_value: float, sinkhorn_repeat: int,
            n_splits: int = 1, norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0, *,
            impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mirrors vLLM's `MHCPreOp.forward` (vllm.model_executor.layers.mhc; torch.ops.vllm.mhc_pre_tilelang).

    residual: [..., 4, dim] bf16, contiguous. fn: [24, 4 * dim] fp32. hc_scale [3], hc_base [24] fp32.
    rms_eps: the RMS eps (first, unlike dsv4_kernels.mhc_pre's eps-then-norm_eps). hc_pre_eps and
        hc_sinkhorn_eps: must be equal (DeepSeek-V4 passes hc_eps twice). hc_post_mult_value: 2.0 only.
    sinkhorn_repeat: int >= 1. n_splits: vLLM's split-K knob, an int >= 1, accepted and not used.
    norm_weight: None only (no fused RMSNorm); norm_eps: ignored with it.
    Returns (post_mix [..., 4, 1] fp32, comb_mix [..., 4, 4] fp32, layer_input [..., dim] bf16).
    """
    _common.split_knob("n_splits", n_splits)
    return _common.mhc_pre(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
                           sinkhorn_repeat, norm_weight, impl)


def mhc_post(x: torch.Tensor, residual: torch.Tensor, post_layer_mix: torch.Tensor, comb_res_mix: torch.Tensor, *,
             impl: str | None = None) -> torch.Tensor:
    """Mirrors vLLM's `MHCPostOp.forward` (vllm.model_executor.layers.mhc).

    x: [..., dim] bf16 sublayer output; residual: [..., 4, dim] bf16; post_layer_mix: [..., 4, 1] fp32 (or
    [..., 4]); comb_res_mix: [..., 4, 4] fp32, comb[i, j] from stream i to stream j. All contiguous.
    Returns the new residual [..., 4, dim] bf16: out[j] = post[j] * x + sum_i comb[i, j] * residual[i].
    """
    return _common.mhc_post(x, residual, post_layer_mix, comb_res_mix, impl)


def mhc_fused_post_pre(x: torch.Tensor, residual: torch.Tensor, post_layer_mix: torch.Tensor,
                       comb_res_mix: torch.Tensor, fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
                       rms_eps: float, hc_pre_eps: float, hc_sinkhorn_eps: float, hc_post_mult_value: float,
                       sinkhorn_repeat: int, n_splits: int = 1, tile_n: int = 1,
                       norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0, *,
                       impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mirrors vLLM's `MHCFusedPostPreOp.forward` (vllm.model_executor.layers.mhc): mhc_post of the previous
    sublayer, then mhc_pre of the next site, in one dsv4_kernels.mhc_post_pre call.

    x, residual, post_layer_mix, comb_res_mix: as in mhc_post. fn, hc_scale, hc_base, rms_eps, hc_pre_eps,
    hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, norm_weight, norm_eps: as in mhc_pre (the next
    site's). n_splits, tile_n: vLLM's tuning knobs, ints >= 1, accepted and not used.
    Returns vLLM's order (residual_cur [..., 4, dim] bf16, post_mix_cur [..., 4, 1] fp32,
        comb_mix_cur [..., 4, 4] fp32, layer_input_cur [..., dim] bf16); dsv4_kernels.mhc_post_pre returns
        (x_new, y, post, comb).
    """
    _common.split_knob("n_splits", n_splits)
    _common.split_knob("tile_n", tile_n)
    res = _common.flat("residual", residual, 2)
    f = _common.flat("x", x, 1)
    post = _common.post_gates("post_layer_mix", post_layer_mix)
    comb = _common.flat("comb_res_mix", comb_res_mix, 2)
    eps = _common.same_eps("hc_pre_eps", hc_pre_eps, "hc_sinkhorn_eps", hc_sinkhorn_eps)
    _common.equal_float("hc_post_mult_value", hc_post_mult_value, _common.HC_POST_MULT,
                        "DeepSeek-V4's post gate 2 * sigmoid")
    _common.no_fused_norm(norm_weight)
    _checks.positive_float("rms_eps", rms_eps)
    with _common.engine_names("mhc_post_pre", {**_common.MHC_PRE_NAMES, **_common.MHC_POST_NAMES}):
        x_new, y, post_new, comb_new = dk.mhc_post_pre(f, res, post, comb, fn, hc_scale, hc_base, sinkhorn_repeat,
                                                       eps, float(rms_eps), impl=impl)
    outer, m = _common.lead(residual, 2), _common.HC_MULT
    return (x_new.view(residual.shape), post_new.view(*outer, m, 1), comb_new.view(*outer, m, m),
            y.view(*outer, y.shape[-1]))


def hc_head(hidden_states: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
            rms_norm_eps: float, hc_eps: float, *, impl: str | None = None) -> torch.Tensor:
    """Mirrors vLLM's `HCHeadOp.forward` (vllm.model_executor.layers.mhc). Trap: vLLM's rms_norm_eps comes
    first and hc_eps second; dsv4_kernels.mhc_head takes (eps=hc_eps, norm_eps=rms_norm_eps).

    hidden_states: [..., 4, dim] bf16, contiguous; hc_fn: [4, 4 * dim] fp32; hc_scale [1], hc_base [4] fp32.
    Returns [..., dim] bf16.
    """
    return _common.mhc_head(hidden_states, hc_fn, hc_scale, hc_base, rms_norm_eps, hc_eps, impl,
                            x_name="hidden_states", rms_name="rms_norm_eps")
