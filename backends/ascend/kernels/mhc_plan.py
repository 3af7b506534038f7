"""Tiling plan of the Ascend mHC kernels (mhc.py): tile sizes, buffer budgets, trip counts, work lists.

Pure Python, no toolchain: the kernels are built from this plan, the tests check it (budgets, tails, trip
counts at V4 shapes) and `emulate_*` replays its tile decomposition in numpy against the reference.

Ascend AI core (a Cube core and two Vector cores per block):
- Cube (AIC): GM -> L1 (MTE2), L1 -> L0A/L0B (MTE1), `mmad` into L0C (fp32). The RMS-scaled projection
  xf @ hc_fn.T runs here as three bf16 GEMMs on the exact bf16 split of hc_fn (hi + mid + lo = hc_fn,
  each x * part exact in fp32: fp32-level accuracy from a bf16 Cube unit, as the Triton prefill path).
  Rows (24, or 4 at the head) are padded to a multiple of 16 (Cube fractal N); tokens are the M side.
- Vector (AIV): GM -> UB, SIMT vector functions on UB. Sum of squares, gates, Sinkhorn and the stream
  sums (y, mhc_post) run here. Budget: 192 KB of UB per Vector core for everything a kernel allocates,
  double-buffered stages counted twice (the dav-3510 compiler's own limit is 220160 B; we stay under 192 KB).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

HC = 4
MIX = (2 + HC) * HC          # 24 mixes: 4 pre, 4 post, 16 comb logits
UB_BYTES = 192 * 1024        # Unified Buffer per Vector core (the budget the plan keeps)
L1_BYTES = 512 * 1024        # Cube L1 (Ascend 910B public figure; conservative for 950)
L0A_BYTES = L0B_BYTES = 64 * 1024
L0C_BYTES = 128 * 1024
FRACTAL = 16                 # Cube M and N granularity
BLOCKS = 32                  # AI-core blocks a launch strides over (persistent loop)
DIM_TILE = 1024              # dim columns per Vector tile; dim % DIM_TILE == 0 (4096, 7168 ok)
CUBE_K = 256                 # K per Cube step (one L1 tile, one L0 stage: TILE_K_SUB = CUBE_K)
LANES = 64                   # SIMT lanes per token for the sum of squares
BYTES = {"bfloat16": 2, "float32": 4}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def padded_rows(rows: int) -> int:
    """Cube N: rows padded to the 16-row fractal (24 -> 32, 4 -> 16)."""
    return cdiv(rows, FRACTAL) * FRACTAL


def cube_m(T: int) -> int:
    """Tokens per Cube tile: 16 at decode (T <= 16: the Cube's minimum M), 64 at prefill (the L0A stage
    64 x 256 bf16 x 2 stages = 64 KB, all of L0A)."""
    return 16 if T <= 16 else 64


def split_k(T: int, dim: int, blocks: int = BLOCKS) -> tuple[int, int]:
    """(splits, K tiles per split) of the projection: the largest divisor of the K-tile count that keeps
    token blocks x splits <= blocks (no short last split, no empty split). Decode spreads the hc_fn read
    over the cores; prefill (token blocks >= blocks) runs one split."""
    tiles = HC * dim // CUBE_K
    want = max(1, min(tiles, blocks // max(1, cdiv(T, cube_m(T)))))
    splits = max(d for d in range(1, want + 1) if tiles % d == 0)
    return splits, tiles // splits


@dataclass(frozen=True)
class Buf:
    name: str
    scope: str   # "ub", "l1", "l0a", "l0b", "l0c"
    shape: tuple
    dtype: str
    stages: int = 1

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * BYTES[self.dtype] * self.stages


# Vector-kernel token blocks (tokens per UB tile): small, so that one dim tile of the 4 streams fits.
VEC_TOKENS = {"gates": 4, "y": 4, "post": 4, "sinkhorn": 64}


def buffers(kernel: str, T: int, dim: int, rows: int = MIX) -> tuple[Buf, ...]:
    """What one block of `kernel` allocates (mhc_kernels.py allocates exactly these buffers). stages 2: the
    buffer is filled inside a T.Pipelined loop, which the compiler double-buffers (every buffer of the
    y and post loops, the x tiles of gates and mix)."""
    npad, bt = padded_rows(rows), VEC_TOKENS.get(kernel, 0)
    if kernel == "mix":
        m = cube_m(T)
        return (Buf("x_l1", "l1", (m, CUBE_K), "bfloat16", 2),
                *(Buf(f"w{p}_l1", "l1", (npad, CUBE_K), "bfloat16", 2) for p in range(3)),
                Buf("l0a", "l0a", (m, CUBE_K), "bfloat16", 2), Buf("l0b", "l0b", (npad, CUBE_K), "bfloat16", 2),
                Buf("acc", "l0c", (m, npad), "float32"), Buf("acc_ub", "ub", (m // 2, npad), "float32"))
    if kernel == "gates":
        return (Buf("x_ub", "ub", (HC * bt, DIM_TILE), "bfloat16", 2), Buf("part", "ub", (bt, LANES), "float32"),
                Buf("proj", "ub", (bt, npad), "float32"), Buf("p_ub", "ub", (bt, npad), "float32"),
                Buf("par", "ub", (32,), "float32"), Buf("gate", "ub", (bt, 2 * HC), "float32"),
                Buf("comb", "ub", (bt, HC * HC), "float32"))
    if kernel == "sinkhorn":
        return (Buf("m_ub", "ub", (bt, MIX), "float32"), Buf("par", "ub", (32,), "float32"),
                Buf("gate", "ub", (bt, 2 * HC), "float32"), Buf("comb", "ub", (bt, HC * HC), "float32"))
    if kernel == "y":
        return (Buf("x_ub", "ub", (HC * bt, DIM_TILE), "bfloat16", 2), Buf("pre", "ub", (bt, HC), "float32", 2),
                Buf("y_ub", "ub", (bt, DIM_TILE), "bfloat16", 2))
    if kernel == "post":
        return (Buf("f_ub", "ub", (bt, DIM_TILE), "bfloat16", 2), Buf("x_ub", "ub", (HC * bt, DIM_TILE), "bfloat16", 2),
                Buf("g_ub", "ub", (bt, HC), "float32", 2), Buf("c_ub", "ub", (bt, HC * HC), "float32", 2),
                Buf("o_ub", "ub", (HC * bt, DIM_TILE), "bfloat16", 2))
    raise ValueError(f"kernel: expected one of mix, gates, sinkhorn, y, post, got {kernel!r}")


CAPACITY = {"ub": UB_BYTES, "l1": L1_BYTES, "l0a": L0A_BYTES, "l0b": L0B_BYTES, "l0c": L0C_BYTES}


def budget(kernel: str, T: int, dim: int, rows: int = MIX) -> dict[str, int]:
    """Bytes per on-chip scope that one block of `kernel` uses."""
    out: dict[str, int] = {}
    for b in buffers(kernel, T, dim, rows):
        out[b.scope] = out.get(b.scope, 0) + b.bytes
    return out


def over_budget(kernel: str, T: int, dim: int, rows: int = MIX) -> list[str]:
    return [f"{kernel}: {scope} {used} B > {CAPACITY[scope]} B"
            for scope, used in budget(kernel, T, dim, rows).items() if used > CAPACITY[scope]]


def trips(kernel: str, T: int, dim: int) -> dict[str, int]:
    """Loop trip counts of one launch: work items (token blocks x splits or x dim tiles), inner loops."""
    if kernel == "mix":
        splits, per = split_k(T, dim)
        return {"token_blocks": cdiv(T, cube_m(T)), "splits": splits, "k_steps": per}
    bt = VEC_TOKENS[kernel]
    if kernel in ("gates",):
        return {"token_blocks": cdiv(T, bt), "dim_tiles": dim // DIM_TILE,
                "lane_steps": HC * DIM_TILE // LANES}
    if kernel == "sinkhorn":
        return {"token_blocks": cdiv(T, bt)}
    return {"token_blocks": cdiv(T, bt), "dim_tiles": dim // DIM_TILE}


def token_tiles(T: int, bt: int) -> list[tuple[int, int]]:
    """(first token, tokens) of every token tile: the last is short when bt does not divide T; none for
    T = 0 (the wrappers return before any launch)."""
    return [(t0, min(bt, T - t0)) for t0 in range(0, T, bt)]


def block_items(items: int, blocks: int = BLOCKS) -> list[list[int]]:
    """Work items each block runs in the persistent loop: block b takes b, b + blocks, ..."""
    return [list(range(b, items, blocks)) for b in range(blocks)]
