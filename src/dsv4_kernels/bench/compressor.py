"""Benchmark cases of the fused compressor update (SPEC 2): compressor_prefill, compressor_prefill_batched,
compressor_decode,
compressor_norm_rope, indexer_cache_quantize.

V4-Flash and V4-Pro share every compressor shape (d = 512 attention and d = 128 indexer entries, ratios
4 and 128), so the cases are labelled "v4". Prefill: one sequence of S tokens from position 0, plain
(fp32 entries) and, for d = 512, the fused form (RMSNorm + RoPE + FP8 cache store). Decode: B sequences,
one token each, either every row completing a block ("emit", the heavy step) or none ("store").
The entry ops (norm-rope, indexer store) run the entries of a decode step (n = B) or of a prefill's CSA
entries (n = S // 4), and the indexer store also the CSA entries of 4 longest prefills in one call.

Byte model (W = coff * d; coff = 2 for ratio 4, 1 for ratio 128; n = S // ratio entries; R = pooled
rows per entry, 8 for ratio 4, 128 for ratio 128):
- prefill: kv and score 2 * S * W * 4, ape ratio * W * 4, the two states 2 * coff * ratio * W * 4,
  entries n * d * 4 (fp32) or n * d * 2 (bf16, fused); fused also reads norm_weight d * 4 and one cos
  and sin row per entry (2 * 32 * 4), and stores n * 584 cache bytes from n int64 slots.
- batched prefill (B chunks of N tokens in all, each continuing a prefix): kv and score 2 * N * W * 4
  (bf16: * 2), ape, per chunk its slot's pooled rows read once (2 * coff * ratio * W * 4) and the rows
  it leaves written (2 * coff * ratio * W * 4 at most), entries N * d * 4 (or 2: one row per token,
  zeros where nothing emits) and N emitted flags, cu_seqlens, starts and slots; fused as prefill.
- decode: kv and score 2 * B * W * 4, one ape row and one int64 position per token, the token's state
  row written (2 * B * W * 4); per emitting row the whole state slot read (2 * coff * ratio * W * 4) and,
  for ratio 4, the shift of rows 4:8 into 0:4 written (2 * ratio * W * 4); entries B * d * 4 (or 2) and
  B emitted flags; fused as prefill, per emitting row.
FLOP model: the ape add (one per score value read), per pooled channel 5 R + 1 (subtract max, exp,
sum, multiply, add per row, one divide); RMSNorm + RoPE 4 d + 194 per entry (square, add, two
multiplies per value, mean and rsqrt, 32 pairs of 4 multiplies and 2 adds); the FP8 store 448
multiplies per entry; the indexer cache form d * (log2 d + 1) per row (the fast Hadamard transform's
butterflies and the 128^-0.5 scale; the FP4 rounding is compares, not FLOPs).
"""
from __future__ import annotations

import math

import torch

from dsv4_kernels.bench.case import Case, generator, seed_of
from dsv4_kernels.reference.formats import KV_NOPE_DIM, KV_TOKEN_BYTES
from dsv4_kernels.reference.transforms import rope_tables
from dsv4_kernels.shapes import Grid

FAMILY = "compressor"
RATIOS = (4, 128)
WIDTHS = (512, 128)
CACHE_D = 512
INDEXER_D = 128
ROPE_PAIRS = 32
CACHE_BLOCK = 64
INDEXER_BATCH = 4          # prefills whose indexer entries one large-batch case stores
NORM_ROPE_FLOPS = 194     # per entry beyond 4 d: mean + rsqrt (2) and 32 RoPE pairs of 6


def _coff(ratio: int) -> int:
    return 2 if ratio == 4 else 1


def pooled_rows(ratio: int) -> int:
    return 2 * ratio if ratio == 4 else ratio


def norm_rope_bytes(n: int, d: int) -> int:
    return n * d * 4 + d * 4 + n * ROPE_PAIRS * 4 * 2 + n * 8 + n * d * 2


def norm_rope_flops(n: int, d: int) -> int:
    return n * (4 * d + NORM_ROPE_FLOPS)


def _fused_extra_bytes(n: int, d: int, norm_rope: bool, cache: bool) -> int:
    extra = d * 4 + n * ROPE_PAIRS * 4 * 2 if norm_rope else 0
    return extra + (n * (KV_TOKEN_BYTES + 8) if cache else 0)


def _fused_extra_flops(n: int, d: int, norm_rope: bool, cache: bool) -> int:
    return (norm_rope_flops(n, d) if norm_rope else 0) + (n * KV_NOPE_DIM if cache else 0)


def prefill_bytes(seq_len: int, ratio: int, d: int, norm_rope: bool = False, cache: bool = False) -> int:
    coff = _coff(ratio)
    width, n = coff * d, seq_len // ratio
    inputs = 2 * seq_len * width * 4 + ratio * width * 4
    states = 2 * coff * ratio * width * 4
    entries = n * d * (2 if norm_rope else 4)
    return inputs + states + entries + _fused_extra_bytes(n, d, norm_rope, cache)


def prefill_flops(seq_len: int, ratio: int, d: int, norm_rope: bool = False, cache: bool = False) -> int:
    n = seq_len // ratio
    pool = n * d * (5 * pooled_rows(ratio) + 1)
    return seq_len * _coff(ratio) * d + pool + _fused_extra_flops(n, d, norm_rope, cache)


def batched_bytes(tokens: int, chunks: int, ratio: int, d: int, fused: bool = False, in_bytes: int = 4) -> int:
    coff = _coff(ratio)
    width, n = coff * d, tokens // ratio
    inputs = 2 * tokens * width * in_bytes + ratio * width * 4 + (chunks + 1) * 4 + 2 * chunks * 8
    states = chunks * 2 * (2 * coff * ratio * width * 4)
    outputs = tokens * d * (2 if fused else 4) + tokens
    return inputs + states + outputs + _fused_extra_bytes(n, d, fused, fused)


def decode_bytes(batch: int, ratio: int, d: int, emitting: int, norm_rope: bool = False, cache: bool = False) -> int:
    coff = _coff(ratio)
    width = coff * d
    inputs = 2 * batch * width * 4 + batch * width * 4 + batch * 8
    state = 2 * batch * width * 4 + emitting * 2 * coff * ratio * width * 4
    if coff == 2:
        state += emitting * 2 * ratio * width * 4
    outputs = batch * d * (2 if norm_rope else 4) + batch
    return inputs + state + outputs + _fused_extra_bytes(emitting, d, norm_rope, cache)


def decode_flops(batch: int, ratio: int, d: int, emitting: int, norm_rope: bool = False, cache: bool = False) -> int:
    pool = emitting * d * (5 * pooled_rows(ratio) + 1)
    return batch * _coff(ratio) * d + pool + _fused_extra_flops(emitting, d, norm_rope, cache)


def indexer_bytes(n: int, d: int = INDEXER_D) -> int:
    """Per row: d bf16 values read (256 B), d / 2 packed code bytes and d / 32 scale bytes written (68 B)."""
    return n * d * 2 + n * d // 2 + n * d // 32


def indexer_flops(n: int, d: int = INDEXER_D) -> int:
    return n * d * (int(math.log2(d)) + 1)


def _rope(positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_tables(torch.arange(positions, device=device))


def _fused_kwargs(n: int, d: int, max_position: int, cache: bool, device, gen) -> dict:
    cos, sin = _rope(max_position + 1, device)
    kwargs = {"norm_weight": 1.0 + 0.2 * torch.randn(d, generator=gen, device=device),
              "rope_cos": cos, "rope_sin": sin}
    if cache:
        pages = max(1, -(-n // CACHE_BLOCK))
        kwargs.update(kv_cache=torch.zeros(pages, CACHE_BLOCK * KV_TOKEN_BYTES, dtype=torch.uint8, device=device),
                      cache_block_size=CACHE_BLOCK, cache_slots=torch.arange(n, device=device, dtype=torch.int64))
    return kwargs


def _prefill_inputs(seq_len: int, ratio: int, d: int, fused: bool, seed: int):
    def make(device):
        gen = generator(device, seed)
        width = _coff(ratio) * d
        # kv of order 1, gate scores and ape of order a few, as the projections give.
        kv = torch.randn(seq_len, width, generator=gen, device=device)
        score = 2.0 * torch.randn(seq_len, width, generator=gen, device=device)
        ape = 0.5 * torch.randn(ratio, width, generator=gen, device=device)
        kwargs = _fused_kwargs(seq_len // ratio, d, seq_len, True, device, gen) if fused else {}
        return (kv, score, ape, ratio), kwargs
    return make


def _batched_inputs(tokens: int, chunks: int, ratio: int, d: int, fused: bool, seed: int):
    """Chunks of tokens // chunks tokens (the last takes the rest), each continuing a prefix of 1000 +
    a random length (not a multiple of the ratio) held in its slot."""
    def make(device):
        gen = generator(device, seed)
        coff = _coff(ratio)
        width = coff * d
        dtype = torch.bfloat16 if fused else torch.float32
        kv = torch.randn(tokens, width, generator=gen, device=device).to(dtype)
        score = (2.0 * torch.randn(tokens, width, generator=gen, device=device)).to(dtype)
        ape = 0.5 * torch.randn(ratio, width, generator=gen, device=device)
        lengths = [tokens // chunks] * (chunks - 1) + [tokens - (tokens // chunks) * (chunks - 1)]
        cu = torch.tensor([0] + [sum(lengths[:b + 1]) for b in range(chunks)], dtype=torch.int32, device=device)
        starts = 1000 + torch.randint(1, 1000, (chunks,), generator=gen, device=device)
        shape = (chunks, coff * ratio, width)
        kv_state = torch.randn(shape, generator=gen, device=device)
        score_state = 2.0 * torch.randn(shape, generator=gen, device=device)
        args = (kv, score, ape, ratio, cu, kv_state, score_state, starts,
                torch.arange(chunks, device=device, dtype=torch.int64))
        kwargs = {}
        if fused:
            kwargs = _fused_kwargs(tokens, d, 4000 + tokens, True, device, gen)
        return args, kwargs
    return make


def _decode_inputs(batch: int, ratio: int, d: int, emit: bool, fused: bool, seed: int):
    def make(device):
        gen = generator(device, seed)
        coff = _coff(ratio)
        width = coff * d
        shape = (batch, coff * ratio, width)
        kv_state = torch.randn(shape, generator=gen, device=device)
        score_state = 2.0 * torch.randn(shape, generator=gen, device=device)
        kv = torch.randn(batch, width, generator=gen, device=device)
        score = 2.0 * torch.randn(batch, width, generator=gen, device=device)
        ape = 0.5 * torch.randn(ratio, width, generator=gen, device=device)
        blocks = torch.randint(1, 64, (batch,), generator=gen, device=device)
        positions = blocks * ratio + (ratio - 1 if emit else 0)
        kwargs = _fused_kwargs(batch, d, 64 * ratio, True, device, gen) if fused else {}
        return (kv_state, score_state, kv, score, ape, positions, ratio), kwargs
    return make


def _entries_inputs(n: int, d: int, quantize: bool, seed: int):
    def make(device):
        gen = generator(device, seed)
        if quantize:
            return (torch.randn(n, d, generator=gen, device=device, dtype=torch.bfloat16),), {}
        cos, sin = _rope(4096, device)
        positions = torch.randint(0, 4096, (n,), generator=gen, device=device)
        x = 0.3 * torch.randn(n, d, generator=gen, device=device)
        return (x, 1.0 + 0.2 * torch.randn(d, generator=gen, device=device), cos, sin, positions), {}
    return make


def _kind(ratio: int) -> str:
    return "csa" if ratio == 4 else "hca"


def _prefill_cases(grid: Grid) -> list[Case]:
    op = "compressor_prefill"
    out = []
    for ratio in RATIOS:
        for d, fused in [(w, False) for w in WIDTHS] + [(CACHE_D, True)]:
            variant = f"{_kind(ratio)}-r{ratio}-d{d}" + ("-fused-fp8" if fused else "")
            for s in grid.prefill_tokens:
                label = f"v4-prefill-{variant}-S{s}"
                shape = {"S": s, "ratio": ratio, "d": d, "fused": fused}
                out.append(Case(op, FAMILY, label, "v4", "prefill", s, variant, shape,
                                bytes=prefill_bytes(s, ratio, d, fused, fused),
                                flops=prefill_flops(s, ratio, d, fused, fused), compute="none",
                                make_inputs=_prefill_inputs(s, ratio, d, fused, seed_of(op, label))))
    return out


BATCHED_CHUNKS = 8


def _batched_cases(grid: Grid) -> list[Case]:
    """Chunked prefill of 8 sequences at once: d = 128 fp32 (indexer) and d = 512 fused with bf16 inputs."""
    op = "compressor_prefill_batched"
    out = []
    for ratio in RATIOS:
        for d, fused in ((INDEXER_D, False), (CACHE_D, True)):
            variant = f"{_kind(ratio)}-r{ratio}-d{d}-B{BATCHED_CHUNKS}" + ("-bf16-fused-fp8" if fused else "")
            for s in grid.prefill_tokens:
                label = f"v4-prefill-batched-{variant}-S{s}"
                shape = {"S": s, "B": BATCHED_CHUNKS, "ratio": ratio, "d": d, "fused": fused}
                out.append(Case(op, FAMILY, label, "v4", "prefill", s, variant, shape,
                                bytes=batched_bytes(s, BATCHED_CHUNKS, ratio, d, fused, 2 if fused else 4),
                                flops=prefill_flops(s, ratio, d, fused, fused), compute="none",
                                make_inputs=_batched_inputs(s, BATCHED_CHUNKS, ratio, d, fused, seed_of(op, label))))
    return out


def _decode_cases(grid: Grid) -> list[Case]:
    op = "compressor_decode"
    out = []
    for ratio in RATIOS:
        combos = [(w, emit, False) for w in WIDTHS for emit in (True, False)] + [(CACHE_D, True, True)]
        for d, emit, fused in combos:
            variant = f"{_kind(ratio)}-r{ratio}-d{d}-{'emit' if emit else 'store'}" + ("-fused-fp8" if fused else "")
            for b in grid.decode_batches:
                label = f"v4-decode-{variant}-B{b}"
                emitting = b if emit else 0
                shape = {"B": b, "ratio": ratio, "d": d, "emitting": emitting, "fused": fused}
                out.append(Case(op, FAMILY, label, "v4", "decode", b, variant, shape,
                                bytes=decode_bytes(b, ratio, d, emitting, fused, fused),
                                flops=decode_flops(b, ratio, d, emitting, fused, fused), compute="none",
                                make_inputs=_decode_inputs(b, ratio, d, emit, fused, seed_of(op, label))))
    return out


def _entry_counts(grid: Grid) -> list[tuple[str, int]]:
    """Entries per call: a decode step where all B rows emit, or the CSA entries of an S-token prefill."""
    return [("decode", b) for b in grid.decode_batches] + [("prefill", s // 4) for s in grid.prefill_tokens]


def _entry_cases(grid: Grid) -> list[Case]:
    out = []
    for op, widths in (("compressor_norm_rope", WIDTHS), ("indexer_cache_quantize", (INDEXER_D,))):
        quantize = op == "indexer_cache_quantize"
        for d in widths:
            variant = f"d{d}"
            for phase, n in _entry_counts(grid):
                label = f"v4-{phase}-{variant}-n{n}"
                shape = {"n": n, "d": d}
                nbytes = indexer_bytes(n, d) if quantize else norm_rope_bytes(n, d)
                flops = indexer_flops(n, d) if quantize else norm_rope_flops(n, d)
                out.append(Case(op, FAMILY, label, "v4", phase, n, variant, shape, bytes=nbytes, flops=flops,
                                compute="none", make_inputs=_entries_inputs(n, d, quantize, seed_of(op, label))))
    # the indexer store of a large batch: the CSA entries of INDEXER_BATCH prefills of the longest length in
    # one call (65536 rows on the full grid), where the kernel runs at full bandwidth
    n = INDEXER_BATCH * max(grid.prefill_tokens) // 4
    label = f"v4-prefill-batch{INDEXER_BATCH}-d{INDEXER_D}-n{n}"
    op = "indexer_cache_quantize"
    out.append(Case(op, FAMILY, label, "v4", "prefill", n, f"d{INDEXER_D}", {"n": n, "d": INDEXER_D},
                    bytes=indexer_bytes(n), flops=indexer_flops(n), compute="none",
                    make_inputs=_entries_inputs(n, INDEXER_D, True, seed_of(op, label))))
    return out


def cases(grid: Grid) -> list[Case]:
    return _prefill_cases(grid) + _batched_cases(grid) + _decode_cases(grid) + _entry_cases(grid)
