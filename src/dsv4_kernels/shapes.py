"""The shape grid shared by tests and benchmarks: one importable place for every size the project uses.

- `V4_FLASH`, `V4_PRO` (`MODELS`): the two model configs of SPEC 0 as frozen dataclasses.
- `DECODE_BATCHES`, `PREFILL_TOKENS`, `CONTEXTS`: the sizes a GPU benchmark sweeps.
- `decode_index_shape` / `prefill_index_width` / `prefill_valid_entries`: the CSA / HCA index lengths of
  sparse MQA (SPEC 1.1) and how many entries of them are valid, as pure functions of the sizes.
- `Grid` with `FULL` (GPU) and `CPU` (small token counts, still both models' hidden sizes, heads and
  experts); `get_grid(name)`.
- `ODD_TOKENS`: token counts correctness tests add to the grid (zero, one, odd sizes).

Nothing here touches a device or imports a kernel toolchain.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelConfig", "V4_FLASH", "V4_PRO", "MODELS", "get_model", "WINDOW", "CSA_RATIO", "HCA_RATIO",
           "INDEX_KINDS", "DECODE_BATCHES", "PREFILL_TOKENS", "CONTEXTS", "ODD_TOKENS", "IndexShape",
           "decode_index_shape", "prefill_index_width", "prefill_valid_entries", "Grid", "FULL", "CPU",
           "GRIDS", "get_grid"]

WINDOW = 128          # sliding-window slots of every layer
CSA_RATIO = 4         # compressed sparse attention: indexer top-k over entries of 4 tokens
HCA_RATIO = 128       # heavily compressed attention: every visible entry of 128 tokens
INDEX_KINDS = ("csa", "hca", "swa")   # swa: window only (compress ratio 0)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """One DeepSeek-V4 model (SPEC 0). Sizes are before tensor parallelism (H = all query heads)."""

    name: str                      # short key: "flash" or "pro"
    title: str                     # "V4-Flash" or "V4-Pro"
    hidden: int                    # model dim
    layers: int                    # without the MTP layer
    heads: int                     # query heads H; one KV head
    index_topk: int                # lightning indexer top-k (CSA layers)
    experts: int                   # routed experts E
    moe_intermediate: int          # expert intermediate size I
    routed_scaling_factor: float
    first_ratio: int               # compress ratio of layers 0 and 1
    head_dim: int = 512            # D; the last rope_dim dims carry RoPE
    rope_dim: int = 64
    window: int = WINDOW
    index_heads: int = 64
    index_head_dim: int = 128
    experts_per_token: int = 6
    shared_experts: int = 1
    hash_layers: tuple[int, ...] = (0, 1, 2)
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    vocab: int = 129280

    def compress_ratio(self, layer: int) -> int:
        """SPEC 0: layers 0 and 1 use `first_ratio`, then 4 (even layers) and 128 (odd layers); the MTP
        layer (index `layers`) is window only (0)."""
        if not 0 <= layer <= self.layers:
            raise ValueError(f"layer: expected 0 <= layer <= {self.layers} ({self.title}, MTP = {self.layers}), "
                             f"got {layer}")
        if layer == self.layers:
            return 0
        if layer < 2:
            return self.first_ratio
        return CSA_RATIO if layer % 2 == 0 else HCA_RATIO


V4_FLASH = ModelConfig(name="flash", title="V4-Flash", hidden=4096, layers=43, heads=64, index_topk=512,
                       experts=256, moe_intermediate=2048, routed_scaling_factor=1.5, first_ratio=0)
V4_PRO = ModelConfig(name="pro", title="V4-Pro", hidden=7168, layers=61, heads=128, index_topk=1024,
                     experts=384, moe_intermediate=3072, routed_scaling_factor=2.5, first_ratio=HCA_RATIO)
MODELS = (V4_FLASH, V4_PRO)


def get_model(name: str) -> ModelConfig:
    for m in MODELS:
        if name in (m.name, m.title):
            return m
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(m.name for m in MODELS)}")


DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFILL_TOKENS = (1024, 4096, 16384, 65536)
# Sequence lengths of the decode sweeps: at 2048 tokens a V4-Pro CSA list is only partly filled (512 of
# 1024 indexer slots visible, the rest -1), at 131072 every list is full and HCA reads 1024 entries.
CONTEXTS = (2048, 131072)
ODD_TOKENS = (0, 1, 3, 63, 100)


@dataclass(frozen=True)
class IndexShape:
    """One decode index list: `width` = K (columns of `indices`), `valid` = entries that name a row."""

    kind: str
    context: int
    width: int
    valid: int


def _compressed_visible(kind: str, tokens_seen: int, topk: int) -> int:
    """Compressed entries a query at position tokens_seen - 1 uses: entry j is visible once its block is
    complete, (j + 1) * r <= tokens_seen (SPEC 1.1); CSA keeps the indexer's top-k of them."""
    if kind == "csa":
        return min(topk, tokens_seen // CSA_RATIO)
    if kind == "hca":
        return tokens_seen // HCA_RATIO
    if kind == "swa":
        return 0
    raise ValueError(f"kind: expected one of {', '.join(INDEX_KINDS)}, got {kind!r}")


def decode_index_shape(model: ModelConfig, kind: str, context: int) -> IndexShape:
    """The index list of a decode step of a sequence of `context` tokens (the current one included).

    Window part: min(context, 128) valid slots of 128. CSA: 128 + index_topk columns, of which
    min(index_topk, context // 4) compressed entries are valid. HCA: 128 + context // 128 columns, all
    valid once context >= 128. Window only (swa): 128 columns.
    """
    if context < 1:
        raise ValueError(f"context: expected >= 1 tokens, got {context}")
    comp = _compressed_visible(kind, context, model.index_topk)
    width = WINDOW + (model.index_topk if kind == "csa" else comp)
    return IndexShape(kind, context, width, min(context, WINDOW) + comp)


def prefill_index_width(model: ModelConfig, kind: str, tokens: int) -> int:
    """K of a prefill of `tokens` tokens from position 0: 128 + index_topk (CSA), 128 + tokens // 128
    (HCA: the last query sees the most entries), 128 (window only)."""
    if kind == "csa":
        return WINDOW + model.index_topk
    return WINDOW + _compressed_visible(kind, tokens, model.index_topk)


def prefill_valid_entries(model: ModelConfig, kind: str, tokens: int) -> int:
    """Valid index entries summed over the rows of a prefill from position 0: query i uses
    min(i + 1, 128) window rows and the compressed entries visible after i + 1 tokens."""
    return sum(min(i + 1, WINDOW) + _compressed_visible(kind, i + 1, model.index_topk) for i in range(tokens))


@dataclass(frozen=True)
class Grid:
    """The sizes one benchmark run sweeps.

    decode_batches: sequences per decode step (one token each). prefill_tokens: tokens of a prefill
    for the cheap per-token ops. attention_prefill_tokens: the prefill sizes of sparse MQA, whose
    reference (the correctness check of every case) grows fastest. contexts: decode sequence lengths
    (index lengths). moe_batches / moe_tokens: the decode batches and prefill sizes of the FP4 MoE;
    moe_intermediate: None keeps each model's expert intermediate size I, the CPU grid shrinks it (and
    runs one token) so that the fp64 reference GEMMs stay fast.
    """

    name: str
    decode_batches: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
    attention_prefill_tokens: tuple[int, ...]
    contexts: tuple[int, ...]
    moe_batches: tuple[int, ...]
    moe_tokens: tuple[int, ...]
    moe_intermediate: int | None = None


FULL = Grid("full", DECODE_BATCHES, PREFILL_TOKENS, (1024, 4096, 16384), CONTEXTS, DECODE_BATCHES, (1024, 2048))
CPU = Grid("cpu", (1, 4), (64,), (16,), (2048,), (1,), (), moe_intermediate=128)
GRIDS = {g.name: g for g in (FULL, CPU)}


def get_grid(name: str) -> Grid:
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; expected one of {', '.join(GRIDS)}")
    return GRIDS[name]
