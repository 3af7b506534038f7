"""Engine adapters: DeepSeek-V4 call sites of SGLang, vLLM and FlashMLA in their own signatures, layouts
and return conventions, each served by one dsv4_kernels op without copies.

    from dsv4_kernels.compat import flashmla, sglang, vllm
    weights, ids = sglang.hash_topk(router_logits, input_ids, tid2eid, 1, 2.5, "sqrtsoftplus")
    weights, ids = vllm.fused_topk_bias(x, logits, "sqrtsoftplus", bias, 6, True, routed_scaling_factor=2.5)

The engines disagree on conventions a drop-in must keep: SGLang's routed weights exclude
routed_scaling_factor, vLLM's include it; the mHC eps arguments come in the other order than
dsv4_kernels.mhc_head's; vLLM's MegaMoE path keeps tid2eid and topk_ids as int64. Each module's
docstring lists its functions and the engine function each one mirrors (flashmla: the sparse decode on
the padded FP8 pages, two caches in place, and the sparse prefill). Importing this package imports no
engine.
"""
from dsv4_kernels.compat import flashmla, sglang, vllm

__all__ = ["flashmla", "sglang", "vllm"]
