"""The fused compressor update (SPEC 2): compressor_prefill, compressor_decode, compressor_norm_rope and
indexer_cache_quantize, plus the compressor_init_state helper.

Every r raw tokens pool into one compressed KV entry (per-channel softmax of score + ape over the rows
of the block; ratio 4 overlaps windows). The fused forms add RMSNorm + RoPE (bf16 entries) and, for
d = 512, the FP8 cache store. Ratios 0 and 1 mean "no compression": such layers have no compressor.
"""
from __future__ import annotations


import torch

from dsv4_kernels import dispatch
from dsv4_kernels.dispatch import Implementation
from dsv4_kernels.ladder import OpCheck, register_check
from dsv4_kernels.oracles import compressor as oracle
from dsv4_kernels.ops import _checks, _library, _values
from dsv4_kernels.reference import compressor as ref
from dsv4_kernels.testing import assert_close, assert_same_nonfinite, bf16_ulp

__all__ = [
    "compressor_init_state",
    "compressor_prefill",
    "compressor_prefill_batched",
    "compressor_decode",
    "compressor_norm_rope",
    "indexer_cache_quantize",
]

RATIOS = (4, 128)
WIDTHS = (512, 128)            # d: attention compressor, indexer compressor
CACHE_D = 512                  # the FP8 cache form (SPEC 1.2) holds 512-d entries
KV_TOKEN_BYTES = 584           # SPEC 1.2 bytes per cached token
ROPE_PAIRS = 32                # rope tables: [P, 64 / 2]
INDEXER_D = 128
_ALL_BACKENDS = ("cpu", "cuda", "rocm", "ascend")


def _coff(ratio: int) -> int:
    return 2 if ratio == 4 else 1


def _ratio(ratio) -> int:
    """ratio in {4, 128}; 0 and 1 get the explanation that they have no compressor."""
    _checks.integer("ratio", ratio)
    if ratio in (0, 1):
        raise ValueError(f"ratio: expected one of 4, 128, got {ratio}: ratio 0 and 1 mean no compression "
                         f"(window-only layers), which have no compressor")
    _checks.one_of("ratio", ratio, RATIOS)
    return _coff(ratio)


def _entry_width(name: str, x: torch.Tensor, ratio: int, coff: int) -> int:
    """d from the last dimension coff*d of x; d must be 512 or 128."""
    width = x.shape[-1]
    if width % coff or width // coff not in WIDTHS:
        raise ValueError(f"{name}: expected last dimension coff*d = {' or '.join(str(coff * d) for d in WIDTHS)} "
                         f"(ratio {ratio}: coff {coff}, d 512 or 128), got {width}")
    return width // coff


def compressor_init_state(ratio: int, d: int, slots: int | None = None,
                          device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh decode state (SPEC 2): kv 0, score -inf.

    ratio: 4 or 128 (0 and 1 mean no compression and are refused). d: 512 (attention compressor) or 128
    (indexer compressor). slots: None for one state, else an int >= 0 number of sequences.
    device: None (torch's default), a torch.device or a device string.
    Returns (kv_state, score_state), fp32, [coff*ratio, coff*d] or [slots, coff*ratio, coff*d], coff = 2
    for ratio 4 and 1 for ratio 128.
    Raises ValueError for any other ratio, d, slots or device.
    """
    _ratio(ratio)
    _checks.one_of("d", _checks.integer("d", d), WIDTHS)
    if slots is not None:
        _checks.integer("slots", slots, minimum=0)
    if device is not None and not isinstance(device, torch.device):
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device: expected None, a torch.device or a device string, got "
                             f"{type(device).__name__} {device!r} ({err})") from None
    return ref.compressor_init_state(ratio, d, slots, device)


_INT64_MAX = 2 ** 63 - 1
_INT64_MIN = -2 ** 63


def _cache_rules(kv_cache, cache_block_size, cache_slots, rows_used=None) -> tuple[_values.Rule, ...]:
    """Checked-mode rules of the FP8 cache store: slots in [0, pages * block) or -1 (skip), distinct.
    rows_used: [rows] bool, the rows whose slot is read (decode: the emitting rows); None means all."""
    if kv_cache is None:
        return ()
    slots = cache_slots if rows_used is None else torch.where(rows_used, cache_slots, -1)
    capacity = kv_cache.shape[0] * cache_block_size
    return (_values.InRange("cache_slots", slots, 0, capacity, what="cache pages x cache_block_size", allow=(-1,)),
            _values.Distinct("cache_slots", slots, ignore=(-1,)))


def _fused(d: int, rows: int, norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size, cache_slots,
           min_positions: int | None = None) -> dict[str, torch.Tensor]:
    """Checks of the optional fused-form arguments; returns the given tensors by name (for the device
    check). rows: the first dimension cache_slots must have (S // r for prefill, B for decode).
    min_positions: rows the rope tables need when it is known from shapes alone (prefill)."""
    _checks.integer("cache_block_size", cache_block_size, minimum=1)
    given: dict[str, torch.Tensor] = {}
    if (rope_cos is None) != (rope_sin is None):
        missing, present = ("rope_sin", "rope_cos") if rope_sin is None else ("rope_cos", "rope_sin")
        raise ValueError(f"{missing}: expected a tensor together with {present} (both or neither), got None")
    if rope_cos is not None and norm_weight is None:
        raise ValueError("norm_weight: expected a [d] fp32 tensor with rope_cos and rope_sin (the fused form is "
                         "RMSNorm then RoPE), got None")
    if norm_weight is not None and rope_cos is None:
        raise ValueError("rope_cos: expected [P, 32] fp32 tables with norm_weight (the fused form is RMSNorm "
                         "then RoPE), got None")
    if norm_weight is not None:
        _checks.tensor("norm_weight", norm_weight, torch.float32, ndim=1)
        _checks.shape("norm_weight", norm_weight, (d,))
        _checks.tensor("rope_cos", rope_cos, torch.float32, ndim=2)
        _checks.shape("rope_cos", rope_cos, (None, ROPE_PAIRS))
        _checks.tensor("rope_sin", rope_sin, torch.float32, ndim=2)
        _checks.shape("rope_sin", rope_sin, tuple(rope_cos.shape))
        if min_positions is not None and rope_cos.shape[0] < min_positions:
            raise ValueError(f"rope_cos: expected at least {min_positions} rows (entries sit at positions up to "
                             f"{min_positions - 1}), got {rope_cos.shape[0]}")
        given.update(norm_weight=norm_weight, rope_cos=rope_cos, rope_sin=rope_sin)
    if kv_cache is None:
        if cache_slots is not None:
            raise ValueError("cache_slots: expected None without kv_cache, got a tensor")
        return given
    if norm_weight is None:
        raise ValueError("kv_cache: the FP8 cache store is part of the fused form only; expected norm_weight, "
                         "rope_cos and rope_sin with it, got norm_weight None")
    if d != CACHE_D:
        raise ValueError(f"kv_cache: the FP8 cache form (SPEC 1.2) holds d = {CACHE_D} entries, got d = {d} "
                         f"(d = 128 indexer entries go through indexer_cache_quantize)")
    _checks.tensor("kv_cache", kv_cache, torch.uint8, ndim=2)
    _checks.shape("kv_cache", kv_cache, (None, cache_block_size * KV_TOKEN_BYTES))
    if cache_slots is None:
        raise ValueError(f"cache_slots: expected an int64 tensor [{rows}] with kv_cache, got None")
    _checks.tensor("cache_slots", cache_slots, torch.int64, ndim=1)
    _checks.shape("cache_slots", cache_slots, (rows,))
    given.update(kv_cache=kv_cache, cache_slots=cache_slots)
    return given


def _entry_dtype(norm_weight) -> torch.dtype:
    return torch.float32 if norm_weight is None else torch.bfloat16


OP_PREFILL = "compressor_prefill"


_INPUT_DTYPES = (torch.float32, torch.bfloat16)   # kv and score: the GEMM's fp32 result, or bf16 (upcast)


def _inputs(kv, score, ape, ratio) -> int:
    """Checks of kv, score (same shape and dtype, fp32 or bf16) and ape; returns d."""
    coff = _ratio(ratio)
    _checks.tensor("kv", kv, _INPUT_DTYPES, ndim=2)
    d = _entry_width("kv", kv, ratio, coff)
    _checks.tensor("score", score, kv.dtype, ndim=2)
    _checks.shape("score", score, tuple(kv.shape))
    _checks.tensor("ape", ape, torch.float32, ndim=2)
    _checks.shape("ape", ape, (ratio, coff * d))
    return d


def validate_prefill(kv, score, ape, ratio, norm_weight=None, rope_cos=None, rope_sin=None, kv_cache=None,
                     cache_block_size=64, cache_slots=None) -> None:
    d = _inputs(kv, score, ape, ratio)
    n = kv.shape[0] // ratio
    given = _fused(d, n, norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size, cache_slots,
                   min_positions=(n - 1) * ratio + 1 if n > 0 else None)
    _checks.same_device(kv=kv, score=score, ape=ape, **given)


def validate_prefill_batched(kv, score, ape, ratio, cu_seqlens, kv_state, score_state, start_positions=None,
                             slot_ids=None, norm_weight=None, rope_cos=None, rope_sin=None, kv_cache=None,
                             cache_block_size=64, cache_slots=None) -> None:
    """Metadata checks of the batched prefill (no tensor value is read)."""
    d = _inputs(kv, score, ape, ratio)
    coff = _coff(ratio)
    _checks.tensor("cu_seqlens", cu_seqlens, (torch.int32, torch.int64), ndim=1)
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens: expected [B + 1] cumulative lengths (at least one element, 0 for B = 0), "
                         "got shape (0,)")
    batch = cu_seqlens.shape[0] - 1
    _checks.tensor("kv_state", kv_state, torch.float32, ndim=3)
    _checks.shape("kv_state", kv_state, (None, coff * ratio, coff * d))
    _checks.tensor("score_state", score_state, torch.float32, ndim=3)
    _checks.shape("score_state", score_state, tuple(kv_state.shape))
    given = {}
    for name, t in (("start_positions", start_positions), ("slot_ids", slot_ids)):
        if t is not None:
            _checks.tensor(name, t, torch.int64, ndim=1)
            _checks.shape(name, t, (batch,))
            given[name] = t
    if slot_ids is None and batch > kv_state.shape[0]:
        raise ValueError(f"kv_state: expected at least {batch} slots (slot_ids defaults to arange(B) for the "
                         f"B = {batch} sequences of cu_seqlens), got {kv_state.shape[0]}")
    given.update(_fused(d, kv.shape[0], norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size, cache_slots))
    _checks.same_device(kv=kv, score=score, ape=ape, cu_seqlens=cu_seqlens, kv_state=kv_state,
                        score_state=score_state, **given)


def _batched_rules(kv, ratio, cu_seqlens, kv_state, start_positions, slot_ids, rope_cos, kv_cache,
                   cache_block_size, cache_slots) -> tuple[_values.Rule, ...]:
    """Checked-mode rules of the batched prefill (built only when checked mode is on)."""
    total = kv.shape[0]
    rules = [_values.InRange("cu_seqlens", cu_seqlens, 0, total + 1, what="token rows of kv"),
             _values.NonDecreasing("cu_seqlens", cu_seqlens)]
    batch = cu_seqlens.shape[0] - 1
    starts = start_positions if start_positions is not None else torch.zeros(batch, dtype=torch.int64,
                                                                              device=kv.device)
    if rope_cos is None:
        rules.append(_values.InRange("start_positions", starts, 0, _INT64_MAX, what=">= 0"))
    else:
        last = starts + (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64) - ratio
        rules += [_values.InRange("start_positions", starts, 0, _INT64_MAX, what=">= 0"),
                  _values.InRange("start_positions + chunk length - ratio", last, _INT64_MIN, rope_cos.shape[0],
                                  what="start + length - ratio < rope rows: the chunk's entries need RoPE rows")]
    if slot_ids is not None:
        rules += [_values.InRange("slot_ids", slot_ids, 0, kv_state.shape[0], what="state slots"),
                  _values.Distinct("slot_ids", slot_ids)]
    if kv_cache is not None:
        emitting = torch.zeros(total, dtype=torch.bool, device=kv.device)
        if batch > 0 and total > 0:
            token = torch.arange(total, device=kv.device)
            seq = (torch.searchsorted(cu_seqlens.to(torch.int64), token, right=True) - 1).clamp(0, batch - 1)
            pos = starts[seq] + token - cu_seqlens.to(torch.int64)[seq]
            emitting = (token < cu_seqlens[-1]) & ((pos + 1) % ratio == 0)
        rules += list(_cache_rules(kv_cache, cache_block_size, cache_slots, rows_used=emitting))
    return tuple(rules)


# Triton: both forms run the batched kernel (kernels/compressor), one program per entry; ROW_CHUNK rows per
# step of the online softmax. TileLang: the same grid, one block of `threads` per entry, CHUNK rows per
# online-softmax step of a thread; the values of kernels/compressor/tilelang_prefill.py's DEFAULTS (a test
# keeps them equal), repeated so that registering the op does not import tilelang.
TILELANG_PREFILL_DEFAULTS = {"threads": 256, "CHUNK": 8}
dispatch.register_family_op(OP_PREFILL, "compressor", triton={"ROW_CHUNK": 8, "num_warps": 4},
                            tilelang=TILELANG_PREFILL_DEFAULTS)
OP_PREFILL_BATCHED = "compressor_prefill_batched"
dispatch.register_family_op(OP_PREFILL_BATCHED, "compressor", triton={"ROW_CHUNK": 8, "num_warps": 4},
                            tilelang=TILELANG_PREFILL_DEFAULTS)


@_library.custom_op("dsv4::compressor_prefill", mutates_args=("kv_cache",))
def _compressor_prefill_op(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int,
                           norm_weight: torch.Tensor | None, rope_cos: torch.Tensor | None,
                           rope_sin: torch.Tensor | None, kv_cache: torch.Tensor | None, cache_block_size: int,
                           cache_slots: torch.Tensor | None,
                           impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch.call(OP_PREFILL, kv, score, ape, ratio, norm_weight, rope_cos, rope_sin, kv_cache,
                         cache_block_size, cache_slots, impl=impl or None)


@_compressor_prefill_op.register_fake
def _(kv, score, ape, ratio, norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size, cache_slots, impl):
    coff = _coff(ratio)
    d = kv.shape[1] // coff
    entries = kv.new_empty((kv.shape[0] // ratio, d), dtype=_entry_dtype(norm_weight))
    state = (coff * ratio, coff * d)
    return (entries, kv.new_empty(state, dtype=torch.float32), kv.new_empty(state, dtype=torch.float32))


@_library.custom_op("dsv4::compressor_prefill_batched", mutates_args=("kv_state", "score_state", "kv_cache"))
def _compressor_prefill_batched_op(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int,
                                   cu_seqlens: torch.Tensor, kv_state: torch.Tensor, score_state: torch.Tensor,
                                   start_positions: torch.Tensor | None, slot_ids: torch.Tensor | None,
                                   norm_weight: torch.Tensor | None, rope_cos: torch.Tensor | None,
                                   rope_sin: torch.Tensor | None, kv_cache: torch.Tensor | None,
                                   cache_block_size: int, cache_slots: torch.Tensor | None,
                                   impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch.call(OP_PREFILL_BATCHED, kv, score, ape, ratio, cu_seqlens, kv_state, score_state,
                         start_positions, slot_ids, norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size,
                         cache_slots, impl=impl or None)


@_compressor_prefill_batched_op.register_fake
def _(kv, score, ape, ratio, cu_seqlens, kv_state, score_state, start_positions, slot_ids, norm_weight, rope_cos,
      rope_sin, kv_cache, cache_block_size, cache_slots, impl):
    total = kv.shape[0]
    entries = kv.new_empty((total, kv.shape[1] // _coff(ratio)), dtype=_entry_dtype(norm_weight))
    return entries, kv.new_empty((total,), dtype=torch.bool)


def compressor_prefill(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int,
                       norm_weight: torch.Tensor | None = None, rope_cos: torch.Tensor | None = None,
                       rope_sin: torch.Tensor | None = None, kv_cache: torch.Tensor | None = None,
                       cache_block_size: int = 64, cache_slots: torch.Tensor | None = None, *,
                       cu_seqlens: torch.Tensor | None = None, kv_state: torch.Tensor | None = None,
                       score_state: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
                       slot_ids: torch.Tensor | None = None,
                       impl: str | None = None) -> tuple[torch.Tensor, ...]:
    """Compress a prefill (SPEC 2): one sequence from position 0 (the default), or a ragged batch of
    chunks that continue their sequences from their states (the batched form, given `cu_seqlens`).

    kv: [S, coff*d] fp32 or bf16 (upcast before any math), the kv projections; coff = 2 for ratio 4, 1
        for ratio 128; d = 512 (attention compressor) or 128 (indexer compressor), inferred as
        kv.shape[1] // coff.
    score: [S, coff*d], kv's dtype, the gate projections (before the ape bias).
    ape: [ratio, coff*d] fp32; the token at position p gets ape[p mod ratio] (the score only, never kv).
    ratio: 4 (overlapping windows) or 128. 0 and 1 mean no compression and are refused.
    norm_weight: optional [d] fp32; with rope_cos and rope_sin (all three or none) it selects the fused
        form: entries come back as compressor_norm_rope(entries, ..., positions j*ratio), bf16.
    rope_cos, rope_sin: optional [P, 32] fp32 tables indexed by position, P > (S//ratio - 1) * ratio.
    kv_cache: optional [pages, cache_block_size*584] uint8 FP8 cache (SPEC 1.2), only with the fused form
        and d = 512. Entry j is stored in place at flat slot cache_slots[j] (page slot // cache_block_size,
        row slot % cache_block_size); a slot outside [0, pages * cache_block_size) (-1 by convention)
        skips the entry, never wrapped; other bytes are left as they were. Slots must be distinct
        (checked only in checked mode).
    cache_block_size: tokens per cache page, >= 1.
    cache_slots: [S//ratio] int64 (batched form: [S], one per token, read where the token emits),
        required with kv_cache and refused without it.
    impl: run this implementation ("reference" or "triton") or raise.
    Returns, single-sequence form, (entries, kv_state, score_state):
        entries: [S//ratio, d], fp32 (bf16 in the fused form). Entry j pools tokens [j*r, (j+1)*r) with a
            per-channel softmax of score + ape; for ratio 4 it pools the A halves ([:d]) of block j-1 (none
            for j = 0) and the B halves ([d:]) of block j.
        kv_state, score_state: [coff*ratio, coff*d] fp32, the decode state after S tokens: ratio 4 rows
            0:4 hold the last complete block (kv, score + ape), or kv 0 / score -inf when S < 4, and rows
            4 .. 4 + S mod 4 the incomplete block; ratio 128 rows 0 .. S mod 128 the incomplete block.
            The other rows (unspecified in SPEC 2) hold kv 0 / score -inf, as in compressor_init_state.
    Batched form (keyword arguments; chunked prefill, extend on a cached prefix, several sequences):
        cu_seqlens: [B + 1] int32 or int64, non-decreasing, 0 <= cu_seqlens <= S: chunk b is rows
            cu_seqlens[b] .. cu_seqlens[b+1] - 1 of kv and score (as engines pass cumulative lengths;
            rows past cu_seqlens[B], e.g. CUDA-graph padding, belong to no chunk).
        kv_state, score_state: [slots, coff*ratio, coff*d] fp32 (compressor_init_state(ratio, d, slots) or
            decode's states), required: chunk b continues from slot slot_ids[b] and leaves it as
            compressor_decode of its tokens one by one would (the same entries, the same specified rows).
        start_positions: optional [B] int64 >= 0, the position of each chunk's first token (its prefix
            length); default zeros. A chunk at position 0 starts a new sequence: its slot is not read
            (no reset needed; ratio 4 rows 0:4 become kv 0 / score -inf until its first block completes).
        slot_ids: optional [B] int64, distinct, in [0, slots); default arange(B).
        Returns (entries, emitted): entries [S, d] fp32 (bf16 fused), the row of the token at position p
        holds entry p // r where (p + 1) mod ratio == 0 (RoPE at p + 1 - ratio), zeros elsewhere;
        emitted [S] bool. States are updated in place. A chunk whose slot id is outside [0, slots), whose
        start is negative, or (fused form) whose last position p has p + 1 - ratio past the RoPE tables
        reads and writes nothing and emits nothing; rows of no chunk are zero. prefill(S1) then a chunk of
        S2 tokens from position S1 equals prefill(S1 + S2), entries and state alike.
    Edge cases: S = 0 gives [0, d] entries and a fresh state (batched: nothing changes); S < ratio gives no
    entries. A score of -inf gives its row weight 0; a channel whose pooled scores are all -inf comes out
    NaN (0 / 0). Equal scores weigh their rows equally (no tie-breaking is involved).
    Raises ValueError for a wrong ratio, dtype, shape, device or layout, or an inconsistent fused form,
    before any launch; no check reads tensor values. With DSV4K_CHECK=1 (off by default; it syncs) also
    for cache slots that are neither -1 nor in range, or repeated, and in the batched form for
    cu_seqlens that decrease or leave [0, S], negative starts, slot ids out of range or repeated, and
    chunks past the RoPE tables: the error names the first bad position.
    """
    if cu_seqlens is None:
        args = (kv, score, ape, ratio, norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size, cache_slots)
        single = kv_state is None and score_state is None and start_positions is None and slot_ids is None
        known = _compressor_prefill_op.known(args, impl) if single else None
        if known is None:
            for name, t in (("kv_state", kv_state), ("score_state", score_state),
                            ("start_positions", start_positions), ("slot_ids", slot_ids)):
                if t is not None:
                    raise ValueError(f"{name}: belongs to the batched form; expected None without cu_seqlens, "
                                     f"got a tensor")
            validate_prefill(*args)
            if _values.enabled():
                _values.check(*_cache_rules(kv_cache, cache_block_size, cache_slots))
        return _compressor_prefill_op.run(known, args, impl, *args)
    args = (kv, score, ape, ratio, cu_seqlens, kv_state, score_state, start_positions, slot_ids, norm_weight,
            rope_cos, rope_sin, kv_cache, cache_block_size, cache_slots)
    known = _compressor_prefill_batched_op.known(args, impl)
    if known is None:
        for name, t in (("kv_state", kv_state), ("score_state", score_state)):
            if t is None:
                raise ValueError(f"{name}: expected [slots, coff*ratio, coff*d] fp32 state with cu_seqlens (the "
                                 f"batched form continues each chunk from its slot), got None")
        validate_prefill_batched(*args)
        if _values.enabled():
            _values.check(*_batched_rules(kv, ratio, cu_seqlens, kv_state, start_positions, slot_ids, rope_cos,
                                          kv_cache, cache_block_size, cache_slots))
    return _compressor_prefill_batched_op.run(known, args, impl, *args)


def compressor_prefill_batched(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int,
                               cu_seqlens: torch.Tensor, kv_state: torch.Tensor, score_state: torch.Tensor,
                               start_positions: torch.Tensor | None = None, slot_ids: torch.Tensor | None = None,
                               norm_weight: torch.Tensor | None = None, rope_cos: torch.Tensor | None = None,
                               rope_sin: torch.Tensor | None = None, kv_cache: torch.Tensor | None = None,
                               cache_block_size: int = 64, cache_slots: torch.Tensor | None = None, *,
                               impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The batched form of compressor_prefill with positional arguments (torch.ops.dsv4.compressor_prefill_batched):
    exactly compressor_prefill(kv, score, ape, ratio, norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size,
    cache_slots, cu_seqlens=..., kv_state=..., score_state=..., start_positions=..., slot_ids=...), which
    documents the arguments. Returns (entries [S, d], emitted [S] bool); the states are updated in place."""
    return compressor_prefill(kv, score, ape, ratio, norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size,
                              cache_slots, cu_seqlens=cu_seqlens, kv_state=kv_state, score_state=score_state,
                              start_positions=start_positions, slot_ids=slot_ids, impl=impl)


OP_DECODE = "compressor_decode"


def validate_decode(kv_state, score_state, kv, score, ape, positions, ratio, slot_ids=None, norm_weight=None,
                    rope_cos=None, rope_sin=None, kv_cache=None, cache_block_size=64, cache_slots=None) -> None:
    coff = _ratio(ratio)
    _checks.tensor("kv", kv, torch.float32, ndim=2)
    d = _entry_width("kv", kv, ratio, coff)
    batch = kv.shape[0]
    _checks.tensor("kv_state", kv_state, torch.float32, ndim=3)
    _checks.shape("kv_state", kv_state, (None, coff * ratio, coff * d))
    _checks.tensor("score_state", score_state, torch.float32, ndim=3)
    _checks.shape("score_state", score_state, tuple(kv_state.shape))
    if batch > kv_state.shape[0]:
        raise ValueError(f"kv: expected at most {kv_state.shape[0]} rows (one per state slot; slot ids are "
                         f"distinct), got {batch}")
    _checks.tensor("score", score, torch.float32, ndim=2)
    _checks.shape("score", score, tuple(kv.shape))
    _checks.tensor("ape", ape, torch.float32, ndim=2)
    _checks.shape("ape", ape, (ratio, coff * d))
    _checks.tensor("positions", positions, torch.int64, ndim=1)
    _checks.shape("positions", positions, (batch,))
    given = {}
    if slot_ids is not None:
        _checks.tensor("slot_ids", slot_ids, torch.int64, ndim=1)
        _checks.shape("slot_ids", slot_ids, (batch,))
        given["slot_ids"] = slot_ids
    given.update(_fused(d, batch, norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size, cache_slots))
    _checks.same_device(kv=kv, kv_state=kv_state, score_state=score_state, score=score, ape=ape,
                        positions=positions, **given)


# Triton: one program per sequence; ROW_CHUNK state rows per step of the online softmax (kernels/compressor).
# TileLang: one block of `threads` per sequence, CHUNK rows per online-softmax step of a thread; the values of
# kernels/compressor/tilelang.py's DEFAULTS (a test keeps them equal), repeated so that registering the op
# does not import tilelang.
TILELANG_DECODE_DEFAULTS = {"threads": 256, "CHUNK": 8}
dispatch.register_family_op(OP_DECODE, "compressor", triton={"ROW_CHUNK": 8, "num_warps": 4},
                            tilelang=TILELANG_DECODE_DEFAULTS)


@_library.custom_op("dsv4::compressor_decode", mutates_args=("kv_state", "score_state", "kv_cache"))
def _compressor_decode_op(kv_state: torch.Tensor, score_state: torch.Tensor, kv: torch.Tensor,
                          score: torch.Tensor, ape: torch.Tensor, positions: torch.Tensor, ratio: int,
                          slot_ids: torch.Tensor | None, norm_weight: torch.Tensor | None,
                          rope_cos: torch.Tensor | None, rope_sin: torch.Tensor | None,
                          kv_cache: torch.Tensor | None, cache_block_size: int, cache_slots: torch.Tensor | None,
                          impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch.call(OP_DECODE, kv_state, score_state, kv, score, ape, positions, ratio, slot_ids,
                         norm_weight, rope_cos, rope_sin, kv_cache, cache_block_size, cache_slots,
                         impl=impl or None)


@_compressor_decode_op.register_fake
def _(kv_state, score_state, kv, score, ape, positions, ratio, slot_ids, norm_weight, rope_cos, rope_sin,
      kv_cache, cache_block_size, cache_slots, impl):
    batch = kv.shape[0]
    entries = kv.new_empty((batch, kv.shape[1] // _coff(ratio)), dtype=_entry_dtype(norm_weight))
    return entries, kv.new_empty((batch,), dtype=torch.bool)


def compressor_decode(kv_state: torch.Tensor, score_state: torch.Tensor, kv: torch.Tensor, score: torch.Tensor,
                      ape: torch.Tensor, positions: torch.Tensor, ratio: int, slot_ids: torch.Tensor | None = None,
                      norm_weight: torch.Tensor | None = None, rope_cos: torch.Tensor | None = None,
                      rope_sin: torch.Tensor | None = None, kv_cache: torch.Tensor | None = None,
                      cache_block_size: int = 64, cache_slots: torch.Tensor | None = None, *,
                      impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step for B sequences: each token goes into its state; a completed block emits an entry.

    kv_state, score_state: [slots, coff*ratio, coff*d] fp32 (SPEC 2 layout, e.g. compressor_init_state
        or a prefill's state stacked per slot), updated in place; slots >= B.
    kv, score: [B, coff*d] fp32, this step's projections (score before the ape bias); d = 512 or 128.
    ape: [ratio, coff*d] fp32.
    positions: [B] int64 >= 0, the position p of each token in its sequence.
    ratio: 4 or 128 (0 and 1 mean no compression and are refused).
    slot_ids: optional [B] int64, distinct, in [0, slots): the state slot of each row; default arange(B).
    Invalid rows: a row whose slot id is outside [0, slots) (-1 for a padding row), whose position is
        negative, or, in the fused form, whose entry position p + 1 - r is past the RoPE tables, reads
        and writes nothing (no state row, no cache byte), does not emit, and gets a zero entries row.
        Nothing is ever wrapped to another sequence's slot.
    norm_weight, rope_cos, rope_sin: the fused form as in compressor_prefill (RoPE at position p + 1 - r,
        the first position of the emitted entry's block).
    kv_cache, cache_block_size: the FP8 cache store as in compressor_prefill (fused form, d = 512).
    cache_slots: [B] int64 flat cache slots, required with kv_cache; read only where a row emits; a slot
        outside [0, pages * cache_block_size) (-1 by convention) skips the store.
    impl: run this implementation ("reference", "triton", "tilelang"; default: the dispatcher's choice) or raise.
    Returns (entries, emitted):
        entries: [B, d] fp32 (bf16 in the fused form): row b holds entry p // r where row b emits, zeros
            elsewhere.
        emitted: [B] bool, the row is valid and (p + 1) mod ratio == 0.
    State update: row (4 if ratio == 4 else 0) + p mod ratio <- (kv, score + ape[p mod ratio]); on
    emission ratio 128 pools rows 0:128; ratio 4 pools rows[0:4, :d] ++ rows[4:8, d:] and then copies rows
    4:8 to rows 0:4 (rows 4:8 are unspecified until rewritten). Slots not named by slot_ids are untouched.
    Edge cases: B = 0 gives [0, d] entries and [0] emitted and leaves the states alone. -inf scores as in
    compressor_prefill (a fresh state's score -inf rows weigh nothing in the first ratio-4 entry). Duplicate
    slot ids (or cache slots of emitting rows) give unspecified results: checked mode refuses them.
    Raises ValueError for a wrong ratio, dtype, shape, device or layout, or an inconsistent fused form,
    before any launch; no check reads tensor values, so the step is CUDA-graph safe. With DSV4K_CHECK=1
    (off by default; it syncs) also for the invalid rows above, repeated slot ids, and emitting rows'
    cache slots that are neither -1 nor in range, or repeated: the error names the first bad position.
    """
    args = (kv_state, score_state, kv, score, ape, positions, ratio, slot_ids, norm_weight, rope_cos, rope_sin,
            kv_cache, cache_block_size, cache_slots)
    known = _compressor_decode_op.known(args, impl)
    if known is None:
        validate_decode(*args)
        if _values.enabled():
            top = _INT64_MAX if rope_cos is None else rope_cos.shape[0] + ratio - 1
            emitting = (positions + 1) % ratio == 0
            _values.check(_values.InRange("positions", positions, 0, top, what="p >= 0" + (
                                              "" if rope_cos is None else ", p + 1 - ratio < rope rows")),
                          _values.InRange("slot_ids", slot_ids, 0, kv_state.shape[0], what="state slots"),
                          _values.Distinct("slot_ids", slot_ids),
                          *_cache_rules(kv_cache, cache_block_size, cache_slots, rows_used=emitting))
    return _compressor_decode_op.run(known, args, impl, *args)


OP_NORM_ROPE = "compressor_norm_rope"


def validate_norm_rope(entries, norm_weight, rope_cos, rope_sin, positions, eps=1e-6) -> None:
    _checks.tensor("entries", entries, torch.float32, ndim=2)
    d = entries.shape[1]
    if d not in WIDTHS:
        raise ValueError(f"entries: expected last dimension d = 512 or 128, got {d}")
    _checks.tensor("norm_weight", norm_weight, torch.float32, ndim=1)
    _checks.shape("norm_weight", norm_weight, (d,))
    _checks.tensor("rope_cos", rope_cos, torch.float32, ndim=2)
    _checks.shape("rope_cos", rope_cos, (None, ROPE_PAIRS))
    _checks.tensor("rope_sin", rope_sin, torch.float32, ndim=2)
    _checks.shape("rope_sin", rope_sin, tuple(rope_cos.shape))
    _checks.tensor("positions", positions, torch.int64, ndim=1)
    _checks.shape("positions", positions, (entries.shape[0],))
    _checks.finite_float("eps", eps, minimum=0)
    _checks.same_device(entries=entries, norm_weight=norm_weight, rope_cos=rope_cos, rope_sin=rope_sin,
                        positions=positions)


dispatch.register(Implementation(
    OP_NORM_ROPE, "reference", "reference", _ALL_BACKENDS,
    entry="dsv4_kernels.reference.compressor:compressor_norm_rope", priority=0))


@_library.custom_op("dsv4::compressor_norm_rope", mutates_args=())
def _compressor_norm_rope_op(entries: torch.Tensor, norm_weight: torch.Tensor, rope_cos: torch.Tensor,
                             rope_sin: torch.Tensor, positions: torch.Tensor, eps: float,
                             impl: str) -> torch.Tensor:
    return dispatch.call(OP_NORM_ROPE, entries, norm_weight, rope_cos, rope_sin, positions, eps,
                         impl=impl or None)


@_compressor_norm_rope_op.register_fake
def _(entries, norm_weight, rope_cos, rope_sin, positions, eps, impl):
    return entries.new_empty(entries.shape, dtype=torch.bfloat16)


def compressor_norm_rope(entries: torch.Tensor, norm_weight: torch.Tensor, rope_cos: torch.Tensor,
                         rope_sin: torch.Tensor, positions: torch.Tensor, eps: float = 1e-6, *,
                         impl: str | None = None) -> torch.Tensor:
    """RMSNorm then interleaved RoPE on the last 64 dims (SPEC 2, 6): the fused form's stage after pooling.

    entries: [n, d] fp32 pooled entries, d = 512 or 128.
    norm_weight: [d] fp32.
    rope_cos, rope_sin: [P, 32] fp32 tables indexed by position (the same shape).
    positions: [n] int64 in [0, P), the RoPE position of each entry (j*r for entry j). A row whose
        position is outside [0, P) reads no table row and comes out zero, never wrapped; DSV4K_CHECK=1
        refuses it instead, naming the first such row.
    eps: RMSNorm epsilon, a finite float >= 0.
    impl: run this implementation (only "reference" exists yet) or raise.
    Returns: [n, d] bf16. y = bf16(x * rsqrt(mean(x^2) + eps) * w) in fp32 math; the last 64 dims, as pairs
        (y[2i], y[2i+1]), are rotated by the angle of their position in fp32 math on the bf16 values and
        rounded to bf16. n = 0 gives [0, d]; an all-zero row with eps = 0 gives NaN.
    Raises ValueError for a wrong dtype, shape, device, layout or eps, before any launch.
    """
    args = (entries, norm_weight, rope_cos, rope_sin, positions, eps)
    known = _compressor_norm_rope_op.known(args, impl)
    if known is None:
        validate_norm_rope(*args)
        if _values.enabled():
            _values.check(_values.InRange("positions", positions, 0, rope_cos.shape[0], what="rows of rope_cos"))
    return _compressor_norm_rope_op.run(known, args, impl, entries, norm_weight, rope_cos, rope_sin, positions,
                                        float(eps))


OP_INDEXER = "indexer_cache_quantize"


def validate_indexer(x) -> None:
    _checks.tensor("x", x, torch.bfloat16, ndim=2)
    _checks.shape("x", x, (None, INDEXER_D))


# Triton: one program per BLOCK_ROWS rows (kernels/compressor/triton_indexer.py). TileLang: one block of
# `threads` threads, a warp (32 lanes x 4 values) per row: threads / 32 rows per block; the value of
# kernels/compressor/tilelang_indexer.py's DEFAULTS (a test keeps them equal), repeated so that registering
# the op does not import tilelang.
TILELANG_INDEXER_DEFAULTS = {"threads": 256}
dispatch.register_family_op(OP_INDEXER, "compressor", triton={"BLOCK_ROWS": 16, "num_warps": 4},
                            tilelang=TILELANG_INDEXER_DEFAULTS)


@_library.custom_op("dsv4::indexer_cache_quantize", mutates_args=())
def _indexer_cache_quantize_op(x: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch.call(OP_INDEXER, x, impl=impl or None)


@_indexer_cache_quantize_op.register_fake
def _(x, impl):
    n = x.shape[0]
    return x.new_empty((n, INDEXER_D // 2), dtype=torch.uint8), x.new_empty((n, INDEXER_D // 32), dtype=torch.uint8)


def indexer_cache_quantize(x: torch.Tensor, *, impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The indexer's cache form of d = 128 entries (SPEC 2): Hadamard rotation (scale 128^-0.5), then MXFP4.

    x: [n, 128] bf16, the indexer compressor's normed, RoPE'd entries (compressor_norm_rope output).
    impl: run this implementation ("reference", "triton", "tilelang"; default: the dispatcher's choice) or raise.
    Returns (packed, scale):
        packed: [n, 64] uint8, two e2m1 codes per byte, low nibble = even index.
        scale: [n, 4] uint8 ue8m0 bytes, 2^ceil(log2(max(amax, 1e-4) / 6)) per block of 32 rotated values.
    The rotation runs in fp32 on the bf16 values, in one fixed order that every implementation reproduces
    bit for bit (reference/compressor.py: walsh_hadamard_fp32, the fast Walsh-Hadamard transform with
    stages h = 1, 2, ..., 64, then one multiplication by fp32(128^-0.5)), and is quantised without a bf16
    rounding in between; values round to the nearest e2m1 magnitude, ties to the even code, saturating at
    6; the sign bit is the IEEE sign (-0 gives code 8). The bytes are exact in every implementation. The
    exactly rounded rotation (the fp64 oracle) differs from this order by a few fp32 ulps, which moves a
    byte only for a value within those ulps of an e2m1 midpoint or a block amax at 6 * 2^k.
    A row holding a NaN or an infinity (or whose rotation overflows fp32) gets scale byte 255 (NaN) in all
    4 blocks and codes 0: every rotated value mixes all 128 inputs. n = 0 gives [0, 64] and [0, 4].
    Raises ValueError for a wrong dtype, shape or layout, before any launch.
    """
    known = _indexer_cache_quantize_op.known((x,), impl)
    if known is None:
        validate_indexer(x)
    return _indexer_cache_quantize_op.run(known, (x,), impl, x)


POOL_ATOL, POOL_RTOL = 2e-5, 1e-4     # SPEC 6, compressor pooling (fp32)


def _assert_equal(out: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if out.shape != expected.shape or out.dtype != expected.dtype:
        raise AssertionError(f"{what}: {out.dtype} {tuple(out.shape)} != expected {expected.dtype} "
                             f"{tuple(expected.shape)}")
    same = out == expected
    if out.dtype.is_floating_point:
        same |= out.isnan() & expected.isnan()
    if not bool(same.all()):
        pos = tuple(int(i) for i in (~same).nonzero()[0])
        raise AssertionError(f"{what}: {int((~same).sum())} of {out.numel()} elements differ; first at {pos}: "
                             f"actual {out[pos].item()} expected {expected[pos].item()}")


def _assert_bf16_entries(out: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """SPEC 6: bf16 outputs within two bf16 ulps of the expected value. On the 64 RoPE dims add one ulp of
    the pair's magnitude: the normed bf16 value feeding RoPE may round the other way (fp32 vs fp64 or a
    kernel's own order) and the rotation carries that ulp of its input into both outputs of the pair,
    which can be far smaller than the input (cancellation). The rotation keeps the pair's magnitude, so
    the expected output gives it. Non-finite values must sit at the same positions."""
    if out.shape != expected.shape or out.dtype != expected.dtype:
        raise AssertionError(f"{what}: {out.dtype} {tuple(out.shape)} != expected {expected.dtype} "
                             f"{tuple(expected.shape)}")
    assert_same_nonfinite(out, expected, what)
    a, e = out.double(), expected.double()
    bound = 2 * bf16_ulp(expected).double()
    if e.dim() == 2 and e.shape[1] in WIDTHS:
        pair = e[:, -64:].reshape(-1, ROPE_PAIRS, 2).norm(dim=-1).repeat_interleave(2, dim=-1)
        bound[:, -64:] += bf16_ulp(pair.float()).double()
    bad = e.isfinite() & ((a - e).abs() > bound)
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements beyond two bf16 ulps; first at "
                             f"{pos}: actual {a[pos].item():.8g} expected {e[pos].item():.8g}")


def _compare(out: torch.Tensor, expected: torch.Tensor) -> None:
    """One rule per output kind:
    - bool (emitted) and uint8 (the indexer's FP4 codes and ue8m0 scales): exact. emitted is integer
      arithmetic. The indexer's rotation is defined in fp32 in one order (walsh_hadamard_fp32) that the
      kernels reproduce, so their bytes equal the reference's. The fp64 oracle rotates exactly and rounds
      once, a few fp32 ulps away, which moves a code or a scale only when a value sits within those ulps
      of an e2m1 midpoint or a block amax of 6 * 2^k (none in 25.6M codes of order-1 rows): exact is the
      right check there too.
    - bf16 entries (fused form, compressor_norm_rope): two bf16 ulps (SPEC 6), see _assert_bf16_entries.
    - fp32 entries: SPEC 6 pooling tolerance, atol 2e-5 + rtol 1e-4: kernels pool in fp32 with their own
      reduction order and exp; the reference pools in fp64 and rounds once.
    """
    if out.dtype != expected.dtype:
        raise AssertionError(f"dtype {out.dtype} != expected {expected.dtype}")
    if expected.dtype in (torch.bool, torch.uint8, torch.int32, torch.int64):
        _assert_equal(out, expected, "ids/bytes")
    elif expected.dtype == torch.bfloat16:
        _assert_bf16_entries(out, expected, "bf16 entries")
    else:
        assert_close(out, expected, atol=POOL_ATOL, rtol=POOL_RTOL, what="fp32 entries")


def _compare_state(out: torch.Tensor, expected: torch.Tensor) -> None:
    """The fp32 prefill states, exactly: every specified state value is a copy of an input row or one fp32
    addition score + ape (correctly rounded, so identical in every implementation), and this op defines
    the rows SPEC 2 leaves unspecified as those of a fresh state (kv 0, score -inf), so a kernel may not
    hand back uninitialised memory there. -inf positions must match as well."""
    _assert_equal(out, expected, "state")


def _prefill_inputs(seq_len: int, ratio: int, d: int, device) -> tuple[torch.Tensor, ...]:
    """Realistic projections: kv of order 1, gate scores and ape of order a few."""
    width = _coff(ratio) * d
    kv = torch.randn(seq_len, width, device=device)
    score = 2.0 * torch.randn(seq_len, width, device=device)
    ape = 0.5 * torch.randn(ratio, width, device=device)
    return kv, score, ape


def _rope(num_positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain RoPE tables (theta 10000) for the sample cases: angle p * 10000^(-i/32), i < 32."""
    angles = torch.outer(torch.arange(num_positions, dtype=torch.float64),
                         10000.0 ** (-torch.arange(ROPE_PAIRS, dtype=torch.float64) / ROPE_PAIRS))
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _prefill_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    """V4-Flash and V4-Pro share the compressor shapes (d = 512 attention, d = 128 indexer; ratios 4 and
    128), so the cases span d x ratio with S = 0, 5 and one length past a block boundary (13 for ratio 4,
    130 for ratio 128), plus the fused form with the FP8 cache (d = 512)."""
    cases = []
    for ratio in RATIOS:
        for d in WIDTHS:
            for seq_len in (0, 5, 13 if ratio == 4 else 130):
                kind = "csa" if ratio == 4 else "hca"
                args = (*_prefill_inputs(seq_len, ratio, d, device), ratio)
                cases.append((f"{kind}-r{ratio}-d{d}-S{seq_len}", args, {}))
    for ratio, seq_len in ((4, 13), (128, 130)):
        kv, score, ape = _prefill_inputs(seq_len, ratio, 512, device)
        n, block = seq_len // ratio, 16
        cos, sin = _rope(seq_len, device)
        pages = torch.zeros(2, block * KV_TOKEN_BYTES, dtype=torch.uint8, device=device)
        slots = torch.randperm(2 * block, device=device)[:n]
        weight = 1.0 + 0.2 * torch.randn(512, device=device)
        cases.append((f"fused-fp8-cache-r{ratio}-d512-S{seq_len}",
                      (kv, score, ape, ratio, weight, cos, sin, pages, block, slots), {}))
    return cases


def _decode_state(ratio: int, d: int, lengths: tuple[int, ...], slot_ids: torch.Tensor, slots: int, device):
    """States [slots, ...] with slot slot_ids[b] holding the prefill of lengths[b] tokens, plus this step's
    kv/score/ape rows (token lengths[b] of the same sequence). Ratio-4 rows that emit get the A halves
    (kv and score, so also score + ape) of their current block equal to those of the previous block
    (see _decode_cases)."""
    coff, width = _coff(ratio), _coff(ratio) * d
    kv_state, score_state = compressor_init_state(ratio, d, slots=slots, device=device)
    ape = 0.5 * torch.randn(ratio, width, device=device)
    step_kv = torch.empty(len(lengths), width, device=device)
    step_score = torch.empty(len(lengths), width, device=device)
    for b, seq_len in enumerate(lengths):
        kv, score, _ = _prefill_inputs(seq_len + 1, ratio, d, device)
        end = seq_len + 1
        if coff == 2 and end % ratio == 0 and end >= 2 * ratio:
            kv[end - ratio:end, :d] = kv[end - 2 * ratio:end - ratio, :d]
            score[end - ratio:end, :d] = score[end - 2 * ratio:end - ratio, :d]
        _, kvs, scs = compressor_prefill(kv[:seq_len], score[:seq_len], ape, ratio, impl="reference")
        kv_state[slot_ids[b]] = kvs
        score_state[slot_ids[b]] = scs
        step_kv[b], step_score[b] = kv[seq_len], score[seq_len]
    positions = torch.tensor(lengths, dtype=torch.int64, device=device)
    return kv_state, score_state, step_kv, step_score, ape, positions


def _decode_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    """Fresh states per call, built by prefills of different lengths into permuted slots.

    The ladder hands the expected side (oracle or reference) the same state tensors after the
    implementation under test has updated them in place (on a device, a CPU copy of the updated
    states). The cases are therefore built so that applying the same step twice gives the same outputs:
    writing a token's row twice is idempotent, ratio 128 pools the rows it has just written, and each
    ratio-4 slot that emits (never entry 0, whose previous rows are the initial ones) is prepared so
    that the A halves of its current block equal those of the previous block (the shift rows[0:4] <-
    rows[4:8] then leaves the pooled rows as they were). The B halves, which tell the blocks apart, stay
    random. The state updates themselves are tested in tests/compressor/test_compressor_ops.py.
    """
    slot_ids = torch.tensor([3, 0, 2], dtype=torch.int64, device=device)
    cases = []
    for ratio, d, lengths, label in ((128, 512, (127, 257, 0), "hca-r128-d512"),
                                     (4, 512, (7, 5, 11), "csa-r4-d512"),
                                     (4, 128, (11, 0, 7), "indexer-r4-d128")):
        args = _decode_state(ratio, d, lengths, slot_ids, 4, device)
        cases.append((f"{label}-B3-permuted-slots", (*args, ratio, slot_ids), {}))
    args = _decode_state(128, 512, (255, 3, 383), slot_ids, 4, device)
    cos, sin = _rope(384, device)
    weight = 1.0 + 0.2 * torch.randn(512, device=device)
    pages = torch.zeros(3, 16 * KV_TOKEN_BYTES, dtype=torch.uint8, device=device)
    cache_slots = torch.tensor([17, 40, 2], dtype=torch.int64, device=device)
    cases.append(("fused-fp8-cache-r128-d512-B3",
                  (*args, 128, slot_ids, weight, cos, sin, pages, 16, cache_slots), {}))
    kv_state, score_state = compressor_init_state(4, 512, slots=2, device=device)
    cases.append(("zero-tokens", (kv_state, score_state, torch.zeros(0, 1024, device=device),
                                  torch.zeros(0, 1024, device=device), torch.zeros(4, 1024, device=device),
                                  torch.zeros(0, dtype=torch.int64, device=device), 4), {}))
    return cases


def _batched_case(ratio, d, prefixes, chunks, device, slot_ids=None, dtype=torch.float32):
    """A ragged batch continuing sequences whose prefixes (reference prefills) sit in the state slots."""
    width = _coff(ratio) * d
    batch = len(prefixes)
    slots = batch + 1
    slot_ids = torch.arange(batch, device=device) if slot_ids is None else slot_ids.to(device)
    kv_state, score_state = compressor_init_state(ratio, d, slots=slots, device=device)
    kv_state[-1], score_state[-1] = 5.0, 3.0                      # a slot no chunk names: never read
    ape = 0.5 * torch.randn(ratio, width, device=device)
    kvs, scores = [], []
    for b, (prefix, chunk) in enumerate(zip(prefixes, chunks)):
        kv, score, _ = _prefill_inputs(prefix + chunk, ratio, d, device)
        _, kv_state[slot_ids[b]], score_state[slot_ids[b]] = compressor_prefill(kv[:prefix], score[:prefix], ape,
                                                                                 ratio, impl="reference")
        kvs.append(kv[prefix:].to(dtype))
        scores.append(score[prefix:].to(dtype))
    cu = torch.tensor([0] + [sum(chunks[:b + 1]) for b in range(batch)], dtype=torch.int32, device=device)
    starts = torch.tensor(prefixes, dtype=torch.int64, device=device)
    return (torch.cat(kvs), torch.cat(scores), ape, ratio, cu, kv_state, score_state, starts, slot_ids)


def _batched_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    """Ragged batches (V4-Flash and V4-Pro share the compressor shapes): chunks continuing prefixes that
    are not multiples of r, a chunk from position 0, an empty chunk, permuted slots; the fused form with
    the FP8 cache and bf16 inputs; zero tokens."""
    perm = torch.tensor([2, 0, 1], dtype=torch.int64)
    cases = [("csa-r4-d128-B3", _batched_case(4, 128, (5, 0, 10), (9, 3, 0), device, perm), {}),
             ("hca-r128-d512-B3", _batched_case(128, 512, (100, 0, 3), (160, 2, 125), device, perm), {})]
    args = _batched_case(4, 512, (6, 0), (7, 4), device, dtype=torch.bfloat16)
    cos, sin = _rope(64, device)
    weight = 1.0 + 0.2 * torch.randn(512, device=device)
    pages = torch.zeros(2, 16 * KV_TOKEN_BYTES, dtype=torch.uint8, device=device)
    token_slots = torch.randperm(32, device=device)[:11]
    token_slots[0] = -1
    cases.append(("fused-fp8-cache-r4-d512-bf16-in", (*args, weight, cos, sin, pages, 16, token_slots), {}))
    cases.append(("zero-tokens", _batched_case(128, 128, (3, 0), (0, 0), device), {}))
    return cases


def _norm_rope_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    cos, sin = _rope(300, device)
    cases = []
    for label, n, d in (("attn-n3-d512", 3, 512), ("indexer-n5-d128", 5, 128), ("zero-entries", 0, 512)):
        positions = torch.randint(0, 300, (n,), device=device)
        cases.append((label, (0.3 * torch.randn(n, d, device=device), 1.0 + 0.2 * torch.randn(d, device=device),
                              cos, sin, positions), {}))
    return cases


def _indexer_cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    """Normed entries are of order 1; row 0 of n7 is all zeros (the 1e-4 amax floor) and row 1 has one
    block of -0 and tiny values (codes 8 and 0)."""
    x = torch.randn(7, INDEXER_D, device=device)
    x[0] = 0.0
    x[1, :32] = -0.0
    x[1, 32:64] = 1e-6 * torch.randn(32, device=device)
    return [("n7", (x.to(torch.bfloat16),), {}),
            ("n1", (torch.randn(1, INDEXER_D, device=device).to(torch.bfloat16),), {}),
            ("zero-entries", (torch.zeros(0, INDEXER_D, dtype=torch.bfloat16, device=device),), {})]


register_check(OpCheck(OP_PREFILL, _prefill_cases, (_compare, _compare_state, _compare_state),
                           oracle=oracle.compressor_prefill))
register_check(OpCheck(OP_PREFILL_BATCHED, _batched_cases, _compare, oracle=oracle.compressor_prefill_batched))
register_check(OpCheck(OP_DECODE, _decode_cases, _compare, oracle=oracle.compressor_decode))
register_check(OpCheck(OP_NORM_ROPE, _norm_rope_cases, _compare, oracle=oracle.compressor_norm_rope))
register_check(OpCheck(OP_INDEXER, _indexer_cases, _compare, oracle=oracle.indexer_cache_quantize))
