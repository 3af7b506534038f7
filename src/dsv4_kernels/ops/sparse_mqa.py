"""Sparse MQA (SPEC 1, 1.2, 1.3): `sparse_mqa` on a bf16 KV pool and `sparse_mqa_fp8` on the paged FP8 KV
cache (one cache, or two read in place; padded pages). Implementations: the PyTorch reference, one
Triton source and one TileLang source for both ops, decode and prefill (kernels/sparse_mqa/README.md). Also re-exports the
SPEC 1.1 index builders (`build_sparse_indices` and its parts, validated in ops/indices.py): plain
functions that callers run before the op, not ops themselves.

Bad values (issue 11). Default path: an index outside [0, N) is invalid and contributes nothing (never
wrapped around: -2 is as empty as -1), a topk_length outside [0, K] is clamped to it; nothing is read
back to the host. Checked mode (DSV4K_CHECK=1, ops/_values.py) refuses, with one host sync, a
topk_length outside [0, K] and a used index (within its row's topk_length) outside [0, N) other than -1.
Non-finite q or kv values are not refused: they propagate as the math says."""
from __future__ import annotations


import torch

from dsv4_kernels import dispatch
from dsv4_kernels.ladder import OpCheck, register_check
from dsv4_kernels.ops import _checks, _library, _values
from dsv4_kernels.oracles import sparse_mqa as oracle
from dsv4_kernels.reference.formats import KV_TOKEN_BYTES, quantize_kv_cache_fp8
from dsv4_kernels.ops.indices import (WINDOW, build_sparse_indices, compact_indices, compressed_indices,
                                      num_visible_compressed, selected_compressed_indices, window_indices)
from dsv4_kernels.testing import assert_same_nonfinite, calc_diff

__all__ = ["sparse_mqa", "sparse_mqa_fp8", "validate", "validate_fp8", "index_rules", "HEAD_DIM", "HEAD_COUNTS",
           "WINDOW", "build_sparse_indices", "window_indices", "num_visible_compressed", "compressed_indices",
           "selected_compressed_indices", "compact_indices"]

OP = "sparse_mqa"
OP_FP8 = "sparse_mqa_fp8"
HEAD_DIM = 512
HEAD_COUNTS = tuple(range(8, 129, 8))   # SPEC 0: per-rank H after tensor parallelism, 8 .. 128


def _heads(q: torch.Tensor) -> None:
    H = q.shape[1]
    if H not in HEAD_COUNTS:
        raise ValueError(f"q: expected a head count H that is a multiple of 8 from 8 to 128 "
                         f"(one of {', '.join(map(str, HEAD_COUNTS))}), got H = {H} (shape {tuple(q.shape)})")


def _common(q, indices, attn_sink, softmax_scale, topk_length) -> dict[str, torch.Tensor]:
    """Checks shared by both ops; returns the tensors that must share q's device."""
    _checks.tensor("q", q, torch.bfloat16, ndim=3)
    _checks.shape("q", q, (None, None, HEAD_DIM))
    _heads(q)
    T, H, _ = q.shape
    _checks.tensor("indices", indices, torch.int32, ndim=2)
    _checks.shape("indices", indices, (T, None))
    _checks.tensor("attn_sink", attn_sink, torch.float32, ndim=1)
    _checks.shape("attn_sink", attn_sink, (H,))
    tensors = {"q": q, "indices": indices, "attn_sink": attn_sink}
    if topk_length is not None:
        _checks.tensor("topk_length", topk_length, torch.int32, ndim=1)
        _checks.shape("topk_length", topk_length, (T,))
        tensors["topk_length"] = topk_length
    _checks.positive_float("softmax_scale", softmax_scale, optional=True)
    return tensors


def validate(q, kv, indices, attn_sink, softmax_scale=None, topk_length=None) -> None:
    """Metadata checks of sparse_mqa (no tensor value is read: the decode path stays CUDA-graph safe)."""
    tensors = _common(q, indices, attn_sink, softmax_scale, topk_length)
    _checks.tensor("kv", kv, torch.bfloat16, ndim=2)
    _checks.shape("kv", kv, (None, HEAD_DIM))
    _checks.same_device(**tensors, kv=kv)


KV_CACHE_DTYPES = (torch.uint8, torch.float8_e4m3fn)


def _kv_cache(name: str, cache, block_size: int) -> None:
    """A SPEC 1.2 cache [P, page_bytes]: uint8 or a float8_e4m3fn view of the bytes, page_bytes >=
    block_size * 584, the bytes of a page contiguous, any page stride >= page_bytes (a padded page or a
    slice of a wider buffer, never copied)."""
    _checks.tensor(name, cache, KV_CACHE_DTYPES, ndim=2, contiguous=False)
    row = block_size * KV_TOKEN_BYTES
    pages, width = cache.shape
    if width < row:
        raise ValueError(f"{name}: expected shape (*, >= {row}) (pages of at least block_size {block_size} * 584 "
                         f"bytes), got {tuple(cache.shape)}")
    if cache.stride(1) != 1:
        raise ValueError(f"{name}: expected the bytes of a page to be contiguous (stride 1 in dim 1), got strides "
                         f"{cache.stride()} for shape {tuple(cache.shape)}")
    if pages > 1 and cache.stride(0) < width:
        raise ValueError(f"{name}: expected a page stride >= the page width {width} (pages must not overlap), got "
                         f"strides {cache.stride()} for shape {tuple(cache.shape)}")


def validate_fp8(q, kv_cache, indices, attn_sink, softmax_scale=None, topk_length=None, block_size=64,
                 extra_kv_cache=None, extra_indices=None, extra_topk_length=None) -> None:
    """Metadata checks of sparse_mqa_fp8 (no tensor value is read)."""
    tensors = _common(q, indices, attn_sink, softmax_scale, topk_length)
    _checks.integer("block_size", block_size, minimum=1)
    _kv_cache("kv_cache", kv_cache, block_size)
    tensors["kv_cache"] = kv_cache
    if extra_kv_cache is None:
        for name, value in (("extra_indices", extra_indices), ("extra_topk_length", extra_topk_length)):
            if value is not None:
                raise ValueError(f"{name}: expected None when extra_kv_cache is None (the second list indexes "
                                 f"the second cache, SPEC 1.3), got a {type(value).__name__}")
    else:
        if extra_indices is None:
            raise ValueError("extra_indices: expected an int32 tensor [T, K2] of indices into extra_kv_cache when "
                             "extra_kv_cache is given (SPEC 1.3), got None")
        _kv_cache("extra_kv_cache", extra_kv_cache, block_size)
        _checks.tensor("extra_indices", extra_indices, torch.int32, ndim=2)
        _checks.shape("extra_indices", extra_indices, (q.shape[0], None))
        tensors.update(extra_kv_cache=extra_kv_cache, extra_indices=extra_indices)
        if extra_topk_length is not None:
            _checks.tensor("extra_topk_length", extra_topk_length, torch.int32, ndim=1)
            _checks.shape("extra_topk_length", extra_topk_length, (q.shape[0],))
            tensors["extra_topk_length"] = extra_topk_length
    _checks.same_device(**tensors)


def index_rules(indices: torch.Tensor, topk_length: torch.Tensor | None, num_rows: int, rows: str,
                name: str = "indices", length_name: str = "topk_length") -> tuple[_values.Rule, ...]:
    """Checked-mode rules of one index list: topk_length in [0, K], and every used index (position j <
    topk_length[t]) in [0, num_rows) or -1. Entries past a row's topk_length are never read, so they
    may hold anything. `rows` names what the indices point into, for the message. The masked copy of
    the indices is built only in checked mode (the default path allocates nothing here)."""
    if not _values.enabled():
        return ()
    K = indices.shape[1]
    rules = []
    used = indices
    if topk_length is not None:
        rules.append(_values.InRange(length_name, topk_length, 0, K + 1,
                                     what=f"entries used of the K = {K} of {name}"))
        unused = torch.arange(K, device=indices.device)[None, :] >= topk_length[:, None]
        used = indices.masked_fill(unused, -1)
    rules.append(_values.InRange(name, used, 0, num_rows, what=rows, allow=(-1,)))
    return tuple(rules)


# Triton (kernels/sparse_mqa/README.md): H_BLOCK heads x BLOCK_N entries per step, the index list split
# over enough programs to fill the device (PROGRAMS, 0 = two per multiprocessor), at most MAX_SPLITS;
# the merge folds MERGE_H heads per program. 32 x 16 at 8 warps is the largest tile that compiles without
# spills for both ops on sm_90a, sm_100a, gfx942 and gfx950 (a 64-head block spills on sm_90a). Under the
# Triton interpreter the same code runs with INTERPRET_BLOCK_N entries per step (fewer, larger numpy steps:
# the interpreter's cost is per step, not per element).
TRITON_DEFAULTS = {"H_BLOCK": 32, "BLOCK_N": 16, "INTERPRET_BLOCK_N": 64, "PROGRAMS": 0, "MAX_SPLITS": 32,
                   "MERGE_H": 16, "MERGE_WARPS": 4, "num_warps": 8, "num_stages": 2}
# TileLang (kernels/sparse_mqa/tilelang.py): H_TILE heads (the tensor-core M of one warpgroup) x BLOCK_N
# gathered rows per step in shared memory, `threads` per block; splits as for Triton (PROGRAMS, MAX_SPLITS).
# H_TILE 64 x BLOCK_N 64 at 256 threads: 146 KB of shared memory (bf16 pool) and 184 KB (FP8) on sm_90a /
# sm_100a, no spills; on gfx942 / gfx950 the kernel halves BLOCK_N, then H_TILE, to fit the LDS (tiles()).
TILELANG_DEFAULTS = {"H_TILE": 64, "BLOCK_N": 64, "threads": 256, "PROGRAMS": 0, "MAX_SPLITS": 32}
dispatch.register_family_op(OP, "sparse_mqa", triton=TRITON_DEFAULTS, tilelang=TILELANG_DEFAULTS)
dispatch.register_family_op(OP_FP8, "sparse_mqa", triton=TRITON_DEFAULTS, tilelang=TILELANG_DEFAULTS)


@_library.custom_op("dsv4::sparse_mqa", mutates_args=())
def _sparse_mqa_op(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor,
                   softmax_scale: float | None, topk_length: torch.Tensor | None,
                   impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = dispatch.call(OP, q, kv, indices, attn_sink, softmax_scale, topk_length, impl=impl or None)
    return out, lse


@_sparse_mqa_op.register_fake
def _(q, kv, indices, attn_sink, softmax_scale, topk_length, impl):
    T, H, D = q.shape
    return q.new_empty((T, H, D), dtype=torch.bfloat16), q.new_empty((T, H), dtype=torch.float32)


@_library.custom_op("dsv4::sparse_mqa_fp8", mutates_args=())
def _sparse_mqa_fp8_op(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor,
                       softmax_scale: float | None, topk_length: torch.Tensor | None, block_size: int,
                       extra_kv_cache: torch.Tensor | None, extra_indices: torch.Tensor | None,
                       extra_topk_length: torch.Tensor | None, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = dispatch.call(OP_FP8, q, kv_cache, indices, attn_sink, softmax_scale, topk_length, block_size,
                             extra_kv_cache, extra_indices, extra_topk_length, impl=impl or None)
    return out, lse


@_sparse_mqa_fp8_op.register_fake
def _(q, kv_cache, indices, attn_sink, softmax_scale, topk_length, block_size, extra_kv_cache, extra_indices,
      extra_topk_length, impl):
    T, H, D = q.shape
    return q.new_empty((T, H, D), dtype=torch.bfloat16), q.new_empty((T, H), dtype=torch.float32)


def sparse_mqa(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor,
               softmax_scale: float | None = None, topk_length: torch.Tensor | None = None, *,
               impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse multi-query attention: every head of query t attends to the KV rows indices[t] names (SPEC 1).

    Per (t, h), over the valid entries j of row t, with s_j = softmax_scale * <q[t, h], kv[indices[t, j]]>
    (fp32 accumulation):
        out[t, h] = sum_j exp(s_j) kv[idx_j] / (sum_j exp(s_j) + exp(attn_sink[h]))
        lse[t, h] = log(sum_j exp(s_j))          (natural log, sink excluded)

    Args:
        q: [T, H, 512] bf16, contiguous; RoPE and the per-head norm already applied. H must be a multiple
            of 8 from 8 to 128 (per-rank heads under tensor parallelism: V4-Flash 64, V4-Pro 128 / TP).
            T = 0 is allowed.
        kv: [N, 512] bf16, contiguous, on q's device: the pool of KV rows (each row is both key and value).
            N = 0 is allowed (every index is then invalid).
        indices: [T, K] int32, contiguous, on q's device; K >= 0 (K = 0 is accepted: every row is empty).
            An entry < 0 (the -1 padding, or any other negative value: never wrapped around) or >= N is
            invalid and contributes nothing. Checked mode (DSV4K_CHECK=1) refuses a used entry (one
            within its row's topk_length) outside [0, N) other than -1; entries past topk_length are not
            looked at. Duplicates are kept: each occurrence adds its term again. Build the lists with
            build_sparse_indices (window part, then compressed part).
        attn_sink: [H] fp32, contiguous, on q's device: per-head logit added to the denominator only, as
            exp(attn_sink[h]) (not multiplied by the scale). -inf means no sink (plain softmax). +inf and
            NaN are not allowed (not checked: the values stay on the device).
        softmax_scale: None (512 ** -0.5) or a positive finite float.
        topk_length: None or [T] int32, contiguous, on q's device: row t uses only its first
            topk_length[t] entries, the value clamped to [0, K] (a value <= 0 uses none, a value >= K
            all K). Checked mode refuses a value outside [0, K].
        impl: run this implementation (e.g. "reference") or raise; None lets the dispatcher choose.
    Returns:
        out: [T, H, 512] bf16, rounded once from fp32.
        lse: [T, H] fp32.
        A row with no valid entry (all invalid, K = 0, N = 0 or topk_length[t] <= 0) gives out = 0 for
        every head, whatever the sink, and lse = +inf (FlashMLA's convention). Equal logits (ties) are
        ordinary: they share the weight. T = 0 gives empty outputs of these shapes.
    Raises:
        ValueError naming the argument, the expected and the actual value for a wrong dtype, rank, shape
        (including H and D = 512), device, layout, or softmax_scale, before any launch; in checked mode
        also for a bad index or topk_length value (naming its position).
    """
    args = (q, kv, indices, attn_sink, softmax_scale, topk_length)
    known = _sparse_mqa_op.known(args, impl)
    if known is None:
        validate(*args)
        if _values.enabled():
            _values.check(*index_rules(indices, topk_length, kv.shape[0], f"rows of kv, N = {kv.shape[0]}"))
    scale = None if softmax_scale is None else float(softmax_scale)
    return _sparse_mqa_op.run(known, args, impl, q, kv, indices, attn_sink, scale, topk_length)


def sparse_mqa_fp8(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor,
                   softmax_scale: float | None = None, topk_length: torch.Tensor | None = None,
                   block_size: int = 64, extra_kv_cache: torch.Tensor | None = None,
                   extra_indices: torch.Tensor | None = None, extra_topk_length: torch.Tensor | None = None, *,
                   impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MQA over the paged FP8 KV cache (SPEC 1.2), optionally over two caches in place (SPEC 1.3):
    sparse_mqa on the dequantised cache(s).

    Args:
        q: [T, H, 512] bf16, as in sparse_mqa (H a multiple of 8 from 8 to 128; T = 0 allowed).
        kv_cache: [P, page_bytes] uint8, or a float8_e4m3fn view of the same bytes, on q's device, in the
            SPEC 1.2 page layout: the first block_size * 576 bytes of a page hold [448 e4m3fn nope values |
            64 bf16 rope values] per token, then block_size * 8 bytes of [7 ue8m0 scales | 1 pad] per
            token. page_bytes >= block_size * 584; the bytes of a page are contiguous (stride 1) and the
            page stride is any value >= page_bytes, so an engine's padded pages are taken as they are,
            without a copy: FlashMLA's [P, 37440] pages at block 64, or the view [:, :37376] of them.
            Bytes past block_size * 584 of a page are never read. The bytes are OCP e4m3fn on every
            device (a gfx942 kernel must decode them as e4m3fn, not e4m3fnuz). Build it with
            dsv4_kernels.reference.formats.quantize_kv_cache_fp8 / store_kv_cache_fp8. P = 0 is allowed.
        indices: [T, K] int32 token indices into the cache: token n is page n // block_size, slot
            n % block_size. Valid range 0 <= n < P * block_size: every slot of every page is a row,
            including slots never written (they dequantise to whatever their bytes hold; zero bytes give a
            zero row, which still takes part with logit 0). Entries outside it are invalid and contribute
            nothing (negative values never wrap around); checked mode refuses used ones other than -1, as
            in sparse_mqa. K = 0 is accepted.
        attn_sink, softmax_scale, topk_length, impl: as in sparse_mqa.
        block_size: tokens per page (of both caches), a positive int (64 in V4).
        extra_kv_cache: None, or a second cache with the same layout rules and block_size (SPEC 1.3: an
            engine's sliding-window cache and compressed cache, each read where it lives).
        extra_indices: [T, K2] int32 into extra_kv_cache (valid range 0 <= n < P2 * block_size, the same
            invalid-entry rules); required when extra_kv_cache is given, None otherwise. K2 = 0 is accepted.
        extra_topk_length: None or [T] int32: row t uses only its first extra_topk_length[t] entries of
            extra_indices (clamped to [0, K2]); only with extra_kv_cache.
    Returns:
        (out [T, H, 512] bf16, lse [T, H] fp32), equal to sparse_mqa applied to
        dequantize_kv_cache_fp8(kv_cache, P * block_size, block_size), including the empty-row
        (out 0, lse +inf) and T = 0 cases. With two caches: one softmax, one sink and one lse over the
        union of both lists' valid entries, as if both caches were one pool (the second's rows after the
        first's) and both lists one list; a row is empty when neither list has a valid entry.
    Raises:
        ValueError as sparse_mqa; for a block_size that is not a positive int; a cache that is not uint8 or
        float8_e4m3fn, has pages shorter than block_size * 584 bytes, a page dimension that is not
        contiguous or overlapping pages; extra_indices without extra_kv_cache or the reverse, or
        extra_topk_length without them; extra_indices / extra_topk_length whose T is not q's. Checked
        mode also refuses bad extra_indices / extra_topk_length values, naming them.
    """
    args = (q, kv_cache, indices, attn_sink, softmax_scale, topk_length, block_size, extra_kv_cache, extra_indices,
            extra_topk_length)
    known = _sparse_mqa_fp8_op.known(args, impl)
    if known is None:
        validate_fp8(*args)
        if _values.enabled():  # the message names symbolic sizes under torch.compile: build it only when used
            rules = index_rules(indices, topk_length, kv_cache.shape[0] * block_size,
                                f"slots of kv_cache, {kv_cache.shape[0]} pages * block_size {block_size}")
            if extra_kv_cache is not None:
                rules += index_rules(extra_indices, extra_topk_length, extra_kv_cache.shape[0] * block_size,
                                     f"slots of extra_kv_cache, {extra_kv_cache.shape[0]} pages * block_size "
                                     f"{block_size}", name="extra_indices", length_name="extra_topk_length")
            _values.check(*rules)
    scale = None if softmax_scale is None else float(softmax_scale)
    return _sparse_mqa_fp8_op.run(known, args, impl, q, kv_cache, indices, attn_sink, scale, topk_length,
                                  int(block_size), extra_kv_cache, extra_indices, extra_topk_length)


def _pool_case(gen, heads, positions, capacity, topk, compact):
    """CSA decode step of len(positions) sequences, each owning a ring of WINDOW rows and `capacity`
    compressed entries in one pool; the indexer picks up to `topk` distinct entry ids (some of them not
    yet visible, hence -1), one repeated, -1 after them."""
    T = len(positions)
    pos = torch.tensor(positions, dtype=torch.int64)
    raw_offset = torch.arange(T, dtype=torch.int64) * (WINDOW + capacity)
    selection = torch.full((T, topk), -1, dtype=torch.int64)
    for t in range(T):
        picked = torch.randperm(capacity + 20, generator=gen)[:topk - 1]
        selection[t, :len(picked)] = picked
        selection[t, len(picked)] = picked[0]                                  # one duplicate
    indices = build_sparse_indices(pos, 4, decode=True, compressed_selection=selection, raw_offset=raw_offset,
                                   compressed_offset=raw_offset + WINDOW)
    lengths = None
    if compact:
        indices, lengths = compact_indices(indices)
    return heads, max(T, 1) * (WINDOW + capacity), indices, lengths


def _inputs(label: str):
    """(q, kv, indices, attn_sink, softmax_scale, topk_length) on the CPU. q, kv ~ N(0, 1) so that the
    default scale 512 ** -0.5 gives logits of order 1, as in the model (SPEC 6 assumes it)."""
    gen = torch.Generator().manual_seed(sum(map(ord, label)))
    scale, lengths = None, None
    if label == "flash-decode-H64-K640":      # V4-Flash: 64 heads, 128 + 512 slots, compacted + topk_length
        H, N, indices, lengths = _pool_case(gen, 64, [398, 150], 100, 512, compact=True)
    elif label == "pro-decode-H128-K1152":    # V4-Pro: 128 heads, 128 + 1024 slots, one sequence
        H, N, indices, lengths = _pool_case(gen, 128, [4390], 1100, 1024, compact=False)
    elif label == "tp8-odd-H8-K100":          # per-rank H = 8, odd K and N, every kind of invalid entry
        H, N, T, K = 8, 63, 5, 100
        indices = torch.randint(-3, N + 7, (T, K), generator=gen, dtype=torch.int32)
        indices[2] = -1
        lengths = torch.tensor([K, 37, K, K + 50, -2], dtype=torch.int32)
        scale = 0.06
    elif label == "prefill-H16-hca":          # chunked prefill tail of 6 tokens, ratio 128, H = 128 / TP8
        H, N = 16, 258
        indices = build_sparse_indices(torch.arange(250, 256), 128)
    elif label == "zero-tokens":
        H, N = 64, 456
        indices = torch.zeros(0, WINDOW + 512, dtype=torch.int32)
    else:
        raise ValueError(label)
    T = indices.shape[0]
    q = torch.randn(T, H, HEAD_DIM, generator=gen).to(torch.bfloat16)
    kv = torch.randn(N, HEAD_DIM, generator=gen).to(torch.bfloat16)
    sink = torch.randn(H, generator=gen)
    sink[1] = float("-inf")
    return q, kv, indices.contiguous(), sink, scale, lengths


CASE_LABELS = ("flash-decode-H64-K640", "pro-decode-H128-K1152", "tp8-odd-H8-K100", "prefill-H16-hca",
               "zero-tokens")
FP8_BLOCK_SIZE = {"tp8-odd-H8-K100": 16}


def _to(device, *xs):
    """Tensors onto `device`, keeping a strided view's strides (a padded-page cache stays a view there)."""
    def move(x):
        if not isinstance(x, torch.Tensor) or x.device == torch.device(device) or x.is_contiguous():
            return x.to(device) if isinstance(x, torch.Tensor) else x
        y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
        return y.copy_(x)
    return tuple(move(x) for x in xs)


def _cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    return [(label, _to(device, *_inputs(label)), {}) for label in CASE_LABELS]


def fp8_inputs(label: str):
    """(q, kv_cache, indices, attn_sink, softmax_scale, topk_length, block_size) on the CPU; one used
    entry points at an unwritten slot of the last page (a valid zero row) and one just past the cache."""
    q, kv, indices, sink, scale, lengths = _inputs(label)
    block_size = FP8_BLOCK_SIZE.get(label, 64)
    cache = quantize_kv_cache_fp8(kv, block_size)
    slots = cache.shape[0] * block_size
    if indices.shape[0]:
        indices[0, 1] = slots - 1
        indices[-1, 2] = slots
    return q, cache, indices, sink, scale, lengths, block_size


FLASHMLA_PAGE_BYTES = 37440   # FlashMLA's page at block 64: 64 * 584 rounded up to a multiple of 576


def padded_pages(cache: torch.Tensor, page_bytes: int = FLASHMLA_PAGE_BYTES, slice_view: bool = False,
                 fp8_view: bool = False) -> torch.Tensor:
    """The same cache in an engine's padded allocation: [P, page_bytes] pages whose bytes past the SPEC
    1.2 row are 0xA5 (never read), or (slice_view) the [P, block_size * 584] strided view of them, and
    (fp8_view) as float8_e4m3fn. No copy is made of the result by the op."""
    P, row = cache.shape
    buffer = torch.full((P, page_bytes), 0xA5, dtype=torch.uint8, device=cache.device)
    buffer[:, :row] = cache
    out = buffer[:, :row] if slice_view else buffer
    return out.view(torch.float8_e4m3fn) if fp8_view else out


def _two_cache_inputs():
    """V4-Flash decode of 3 sequences read where they live (SPEC 1.3): a sliding-window cache (a 128-slot
    ring per sequence, FlashMLA-padded pages, float8 view) and a compressed cache (the [:, :37376] view of
    padded pages), extra_topk_length per row; one row with a short window, one whose window list is all -1."""
    gen = torch.Generator().manual_seed(1403)
    T, H, capacity, picks = 3, 64, 150, 100
    positions = torch.tensor([700, 40, 2000])
    ring = torch.arange(WINDOW)[None, :]
    window = torch.where(ring <= positions[:, None], torch.arange(T)[:, None] * WINDOW + ring, -1)
    window[2, :] = -1                                              # the third row: compressed entries only
    comp = torch.stack([torch.randperm(capacity, generator=gen)[:picks] for _ in range(T)])
    comp = comp + torch.arange(T)[:, None] * capacity
    comp[0, 5] = comp[0, 6]                                        # a duplicate
    comp[1, 7] = T * capacity + 3                                  # past the compressed cache: invalid
    lengths = torch.tensor([picks, 61, picks], dtype=torch.int32)
    q = torch.randn(T, H, HEAD_DIM, generator=gen).to(torch.bfloat16)
    window_kv = torch.randn(T * WINDOW, HEAD_DIM, generator=gen).to(torch.bfloat16)
    comp_kv = torch.randn(T * capacity, HEAD_DIM, generator=gen).to(torch.bfloat16)
    sink = torch.randn(H, generator=gen)
    window_cache = padded_pages(quantize_kv_cache_fp8(window_kv, 64), fp8_view=True)
    comp_cache = padded_pages(quantize_kv_cache_fp8(comp_kv, 64), slice_view=True)
    args = (q, window_cache, window.to(torch.int32).contiguous(), sink, None, None, 64)
    kwargs = {"extra_kv_cache": comp_cache, "extra_indices": comp.to(torch.int32).contiguous(),
              "extra_topk_length": lengths}
    return args, kwargs


FP8_CASE_LABELS = CASE_LABELS + ("two-cache-H64", "padded-pages-H16")


def _fp8_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    cases = [(label, _to(device, *fp8_inputs(label)), {}) for label in CASE_LABELS]
    args, kwargs = _two_cache_inputs()
    cases.append(("two-cache-H64", _to(device, *args), dict(zip(kwargs, _to(device, *kwargs.values())))))
    q, cache, indices, sink, scale, lengths, block_size = fp8_inputs("prefill-H16-hca")
    cases.append(("padded-pages-H16", _to(device, q, padded_pages(cache, slice_view=True), indices, sink, scale,
                                           lengths, block_size), {}))
    return cases


# SPEC 6 attention tolerances (FlashMLA's test practice), valid for realistic data (logits of order 1):
#   out: |a - e| <= 1e-3 or |a - e| <= 2/128 |e| elementwise, and cos-diff (calc_diff) < 5e-6;
#   lse: |a - e| <= 1e-5 or |a - e| <= 8/65536 |e|;  +inf/-inf/NaN at identical positions (empty rows
#   give lse = +inf). A kernel against the fp32 reference differs by its fp32 summation order, i.e. at
#   most one bf16 ulp (<= 2^-7 |e|) of out after rounding and ~1e-6 of lse. The reference against the
#   fp64 oracle (the ladder's CPU check; the oracle rounds out once from fp64): the reference is exact
#   up to fp32 arithmetic (~1e-6 relative), so its bf16 out is within one ulp of the oracle's and its lse
#   within ~1e-6: the same bounds hold with a margin, and the tests also check the reference against the
#   unrounded fp64 oracle within half a bf16 ulp + 1e-5 (out) and 1e-5 + 1e-6 |e| (lse).
OUT_ATOL, OUT_RTOL, OUT_COS_DIFF = 1e-3, 2 / 128, 5e-6
LSE_ATOL, LSE_RTOL = 1e-5, 8 / 65536


def _abs_or_rel(actual, expected, atol, rtol, what) -> None:
    a, e = actual.double(), expected.double()
    finite = e.isfinite()
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bad = finite & (err > atol) & (err > rtol * e.abs())
    if bad.any():
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements exceed abs {atol:g} and rel "
                             f"{rtol:g}; first at {pos}: actual {a[pos].item():.8g} expected {e[pos].item():.8g}")


def compare(out: torch.Tensor, expected: torch.Tensor) -> None:
    """One output of either op against the expected one: bf16 -> the `out` rule, fp32 -> the `lse` rule."""
    what = "out" if expected.dtype == torch.bfloat16 else "lse"
    if out.dtype != expected.dtype or out.shape != expected.shape:
        raise AssertionError(f"{what}: got {out.dtype} {tuple(out.shape)}, expected {expected.dtype} "
                             f"{tuple(expected.shape)}")
    assert_same_nonfinite(out, expected, what)
    if what == "out":
        _abs_or_rel(out, expected, OUT_ATOL, OUT_RTOL, what)
        finite = expected.isfinite() & out.isfinite()
        diff = calc_diff(out[finite], expected[finite])
        if not diff < OUT_COS_DIFF:
            raise AssertionError(f"out: cos-diff {diff:.3e} is not below {OUT_COS_DIFF:g}")
    else:
        _abs_or_rel(out, expected, LSE_ATOL, LSE_RTOL, what)


register_check(OpCheck(OP, _cases, compare, oracle=oracle.sparse_mqa))
register_check(OpCheck(OP_FP8, _fp8_cases, compare, oracle=oracle.sparse_mqa_fp8))
