"""Peer libraries measured beside ours: same inputs, same timing, same correctness check.

A peer is a module to import and, per op, an adapter: adapter(*args, **kwargs) takes our op's inputs
and returns our op's outputs (converting layouts and conventions), or None when no adapter is written
for that op yet. A peer that does not import is reported as "missing (not installed)", never as a
number; an importable peer without an adapter for the op as "installed, no adapter for <op>".
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Callable

from dsv4_kernels import toolchains

__all__ = ["Peer", "PEERS", "peers_for", "availability"]

LN2 = math.log(2.0)


def _flash_mla_sparse(fn_path: str) -> Callable:
    """FlashMLA's sparse prefill interface, flash_mla_sparse_fwd(q [T, H, D], kv [N, 1, D],
    indices [T, 1, K], sm_scale, d_v, attn_sink, topk_length) -> (out, max_logits, lse base 2); our
    op is the same math with a natural-log lse."""
    module, _, name = fn_path.partition(":")

    def run(q, kv, indices, attn_sink, softmax_scale=None, topk_length=None):
        fn = getattr(importlib.import_module(module), name)
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        out, _max_logits, lse = fn(q, kv.unsqueeze(1), indices.unsqueeze(1), scale, 512, attn_sink, topk_length)
        return out, lse * LN2
    return run


@dataclass(frozen=True)
class Peer:
    name: str
    module: str                     # top-level module to import
    dist: str                       # distribution name, for the version
    adapters: dict[str, Callable | None] = field(default_factory=dict)


PEERS = (
    Peer("flashmla", "flash_mla", "flash_mla",
         {"sparse_mqa": _flash_mla_sparse("flash_mla:flash_mla_sparse_fwd"), "sparse_mqa_fp8": None}),
    Peer("deepgemm", "deep_gemm", "deep_gemm",
         {"mxfp4_grouped_gemm": None, "fp4_grouped_moe": None, "mhc_pre": None}),
    Peer("sgl-kernel", "sgl_kernel", "sgl-kernel",
         {"sparse_mqa": _flash_mla_sparse("sgl_kernel.flash_mla:flash_mla_sparse_fwd"), "score_topk": None,
          "hash_topk": None, "fp4_grouped_moe": None}),
    Peer("tilekernels", "tile_kernels", "tile-kernels",
         {"mhc_sinkhorn": None, "mhc_pre": None, "mhc_post": None, "score_topk": None}),
    Peer("aiter", "aiter", "amd-aiter",
         {"sparse_mqa": None, "score_topk": None, "fp4_grouped_moe": None}),
    Peer("vllm", "vllm", "vllm",
         {"sparse_mqa": None, "score_topk": None, "hash_topk": None, "fp4_grouped_moe": None}),
)


def peers_for(op: str) -> list[Peer]:
    return [p for p in PEERS if op in p.adapters]


def availability(peer: Peer, op: str) -> tuple[Callable | None, str]:
    """(adapter, status): the adapter when the peer imports and has one for `op`; else None and why."""
    if importlib.util.find_spec(peer.module) is None:
        return None, "missing (not installed)"
    version = toolchains.version(peer.dist) or "version unknown"
    try:
        importlib.import_module(peer.module)
    except Exception as exc:  # a peer that fails to import is missing, with the reason
        return None, f"missing (import failed: {type(exc).__name__}: {exc})"
    adapter = peer.adapters.get(op)
    if adapter is None:
        return None, f"installed ({version}), no adapter for {op}"
    return adapter, f"installed ({version})"
