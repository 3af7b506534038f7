"""dsv4-kernels: the DeepSeek-V4 operators for CUDA, ROCm and Ascend, one kernel source per operator.

Every public op validates its arguments (ValueError naming the expected and the actual value), then the
dispatcher picks an implementation; `explain(op, *args)` says which one and why, and
`precompile(op, *args)` selects and compiles it ahead of a CUDA-graph capture. Importing this package
touches no device and imports neither triton nor tilelang.
"""
from dsv4_kernels import dispatch, platform
from dsv4_kernels.dispatch import CaptureError, FallbackError, ImplementationUnavailable, explain, precompile
from dsv4_kernels.ops.compressor import (compressor_decode, compressor_init_state, compressor_norm_rope,
                                         compressor_prefill, compressor_prefill_batched, indexer_cache_quantize)
from dsv4_kernels.ops.formats import (dequantize_kv_cache_fp8, dequantize_mxfp4, quantize_fp8_blockwise,
                                      quantize_kv_cache_fp8, quantize_mxfp4)
from dsv4_kernels.ops.mhc import mhc_head, mhc_post, mhc_post_pre, mhc_pre, mhc_sinkhorn
from dsv4_kernels.ops.moe import fp4_grouped_moe, mxfp4_grouped_gemm
from dsv4_kernels.ops.routing import hash_topk, score_topk
from dsv4_kernels.ops.sigmoid_gate import sigmoid_gate
from dsv4_kernels.ops.indices import (build_sparse_indices, compact_indices, compressed_indices,
                                      selected_compressed_indices, window_indices)
from dsv4_kernels.ops.sparse_mqa import sparse_mqa, sparse_mqa_fp8

__version__ = "0.1.0"

__all__ = [
    "quantize_fp8_blockwise", "quantize_mxfp4", "dequantize_mxfp4", "quantize_kv_cache_fp8",
    "dequantize_kv_cache_fp8",
    "sparse_mqa", "sparse_mqa_fp8", "build_sparse_indices", "window_indices", "compressed_indices",
    "selected_compressed_indices", "compact_indices",
    "compressor_prefill", "compressor_prefill_batched", "compressor_decode", "compressor_norm_rope", "indexer_cache_quantize",
    "compressor_init_state",
    "score_topk", "hash_topk",
    "mhc_sinkhorn", "mhc_pre", "mhc_post", "mhc_head", "mhc_post_pre",
    "mxfp4_grouped_gemm", "fp4_grouped_moe",
    "sigmoid_gate",
    "explain", "precompile", "dispatch", "platform", "FallbackError", "ImplementationUnavailable", "CaptureError",
]
