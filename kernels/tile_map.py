"""Live-tile lists derived from a mask: which (BN x BK) tiles of a 2-D weight hold any unpruned entry.

Built on the mask's device with nonzero / cumsum (no host loop), once per mask change, never per step.
A weight of shape [N, K] (a conv filter is viewed as [C_out, C_in*kh*kw] in the mask's own order, or as
[C_out, kh*kw*C_in] with k_order="tap_major", the order the conv kernels reduce in) is cut into
ceil(N/BN) x ceil(K/BK) tiles; edge tiles are partial. The lists:

- CSR by output tile-row (forward): k-tiles `col_idx[row_ptr[r]:row_ptr[r+1]]` are live in tile-row r;
- CSR by k tile-column (dX):        n-tiles `row_idx[col_ptr[c]:col_ptr[c+1]]` are live in tile-column c;
- COO (dW, optimizer):              live tile t is (`coo_rows[t]`, `coo_cols[t]`), row-major order.

All index tensors are int32 on the mask's device; every list is sorted ascending.

Grouped lists (`TileMap.grouped`), for kernels whose program covers several tile-rows (or tile-columns) at
once: per group of `rows` consecutive tile-rows, the union of their live lists, and per entry a bitmask whose
bit r says whether the group's r-th tile-row is live there (so a wide program still loads only live tiles).
Derived from `live` on first use and cached on the map, i.e. once per mask change.

Quads (`TileMap.quads`), for the dW kernel's wide programs (one program per 2 x 2 block of map tiles): every
2 x 2 block of tiles (quad row qr = tile-row // 2, quad column qc = tile-column // 2) holding any live tile,
row-major, with a 4-bit live mask (bit 2 * dr + dc: tile (2 qr + dr, 2 qc + dc) is live; edge quads of an odd
tile count have their outside tiles dead) and, per sub-tile, its index in the COO list (-1 when dead): where
the split dW's compact slab of that tile is. Built on the device like the rest, cached like `grouped`.

Stacked maps (`StackedTileMap`, `build_stacked_tile_map`), for K arms trained as one stacked model (a mask
[A, N, K], one [N, K] mask per arm) and walked by one grouped launch whose grid has the arm as a dimension
(kernels/grouped_linear.py): the arms' lists concatenated, arm after arm, into one ptr / idx pair, so arm a's
tile-row r is entry `a * tiles_n + r` of `row_ptr` (its K-tiles `col_idx[row_ptr[a*tiles_n + r]:...]`), and
arm a's tile-column c is entry `a * tiles_k + c` of `col_ptr`. The ptr arrays hold absolute offsets into the
concatenated idx array (each arm's lists start where the previous arm's end). `live` is [A, tiles_n, tiles_k].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Hashable, Optional, Tuple

import torch


@dataclass(frozen=True)
class GroupedLists:
    """CSR over groups of `rows` tile-rows of a live-tile matrix (see the module docstring)."""
    rows: int
    ptr: torch.Tensor            # int32 [groups + 1]
    idx: torch.Tensor            # int32 [n_entries]: tile-columns live in any row of the group, ascending
    bits: Optional[torch.Tensor]  # int32 [n_entries]: bit r = the group's r-th tile-row is live; None if rows == 1
    n_entries: int

    @property
    def groups(self) -> int:
        return self.ptr.numel() - 1


def group_lists(live: torch.Tensor, rows: int) -> GroupedLists:
    """Grouped CSR of a bool live-tile matrix [tile_rows, tile_cols], `rows` tile-rows per group (1 <= rows <= 30)."""
    if not 1 <= rows <= 30:
        raise ValueError(f"rows per group must be in 1..30, got {rows}")
    t_rows, t_cols = live.shape
    groups = -(-t_rows // rows)
    padded = torch.zeros(groups * rows, t_cols, dtype=torch.int32, device=live.device)
    padded[:t_rows] = live.to(torch.int32)
    weights = (1 << torch.arange(rows, dtype=torch.int32, device=live.device)).view(1, rows, 1)
    bits_full = (padded.view(groups, rows, t_cols) * weights).sum(dim=1, dtype=torch.int32)
    union = bits_full != 0
    ptr, idx = _csr(union)
    bits = bits_full[union].contiguous() if rows > 1 else None  # boolean indexing is row-major, as idx
    return GroupedLists(rows=rows, ptr=ptr, idx=idx, bits=bits, n_entries=int(idx.numel()))


@dataclass(frozen=True)
class QuadLists:
    """The live 2 x 2 blocks of a tile map (see the module docstring), one entry per quad, row-major."""
    rows: torch.Tensor   # int32 [n_quads]: quad row (tile-rows 2 * rows, 2 * rows + 1)
    cols: torch.Tensor   # int32 [n_quads]: quad column
    bits: torch.Tensor   # int32 [n_quads]: bit 2 * dr + dc = tile (2 * row + dr, 2 * col + dc) is live
    slabs: torch.Tensor  # int32 [n_quads, 4]: COO index of sub-tile 2 * dr + dc, -1 where it is dead
    n_quads: int


def quad_lists(live: torch.Tensor) -> QuadLists:
    """The quads of a bool live-tile matrix [tile_rows, tile_cols] (on its device, no host loop)."""
    t_rows, t_cols = live.shape
    q_rows, q_cols = -(-t_rows // 2), -(-t_cols // 2)
    # COO index of every tile (row-major rank among the live ones), -1 for dead and padding tiles.
    flat = live.reshape(-1).to(torch.int32)
    rank = torch.where(flat != 0, torch.cumsum(flat, 0, dtype=torch.int32) - 1, -1).view(t_rows, t_cols)
    padded = torch.full((2 * q_rows, 2 * q_cols), -1, dtype=torch.int32, device=live.device)
    padded[:t_rows, :t_cols] = rank
    # [q_rows, q_cols, 4]: sub-tile 2 * dr + dc of each quad.
    sub = padded.view(q_rows, 2, q_cols, 2).permute(0, 2, 1, 3).reshape(q_rows, q_cols, 4)
    weights = (1 << torch.arange(4, dtype=torch.int32, device=live.device))
    bits = ((sub >= 0).to(torch.int32) * weights).sum(dim=2, dtype=torch.int32)
    where = (bits != 0).nonzero().to(torch.int32)  # row-major, as the COO list
    return QuadLists(rows=where[:, 0].contiguous(), cols=where[:, 1].contiguous(), bits=bits[bits != 0].contiguous(),
                     slabs=sub[bits != 0].contiguous(), n_quads=int(where.shape[0]))


@dataclass(frozen=True)
class TileMap:
    shape: Tuple[int, int]
    block: Tuple[int, int]
    live: torch.Tensor      # bool [tiles_n, tiles_k]
    row_ptr: torch.Tensor   # int32 [tiles_n + 1]
    col_idx: torch.Tensor   # int32 [n_live]
    col_ptr: torch.Tensor   # int32 [tiles_k + 1]
    row_idx: torch.Tensor   # int32 [n_live]
    coo_rows: torch.Tensor  # int32 [n_live]
    coo_cols: torch.Tensor  # int32 [n_live]
    n_live: int
    max_live_per_row: int   # longest forward list (bounds loop trip counts / autotune keys)
    max_live_per_col: int   # longest dX list
    k_order: str = "mask"   # "mask": K in the mask's flattening; "tap_major": conv filters as (kh, kw, C_in)
    _grouped: Dict[Tuple[str, int], GroupedLists] = field(default_factory=dict, repr=False, compare=False)
    _quads: Dict[str, QuadLists] = field(default_factory=dict, repr=False, compare=False)

    def grouped(self, axis: str, rows: int) -> GroupedLists:
        """Lists for programs covering `rows` tile-rows (axis "rows": forward, lists of k-tiles) or `rows`
        tile-columns (axis "cols": dX, lists of n-tiles) at once; rows == 1 gives the plain CSR lists."""
        if axis not in ("rows", "cols"):
            raise ValueError(f"axis must be 'rows' or 'cols', got {axis!r}")
        if rows == 1:
            ptr, idx = (self.row_ptr, self.col_idx) if axis == "rows" else (self.col_ptr, self.row_idx)
            return GroupedLists(rows=1, ptr=ptr, idx=idx, bits=None, n_entries=self.n_live)
        key = (axis, rows)
        if key not in self._grouped:
            self._grouped[key] = group_lists(self.live if axis == "rows" else self.live.t(), rows)
        return self._grouped[key]

    def quads(self) -> QuadLists:
        """The live 2 x 2 blocks of tiles (the quad dW's programs), derived once per map."""
        if "quads" not in self._quads:
            self._quads["quads"] = quad_lists(self.live)
        return self._quads["quads"]

    @property
    def tiles(self) -> Tuple[int, int]:
        return tuple(self.live.shape)  # type: ignore[return-value]

    @property
    def n_tiles(self) -> int:
        return self.live.numel()

    @property
    def live_fraction(self) -> float:
        return self.n_live / max(1, self.n_tiles)


K_ORDERS = ("mask", "tap_major")


def as_2d_mask(mask: torch.Tensor, k_order: str = "mask") -> torch.Tensor:
    """A weight mask as the [rows, cols] matrix the kernels tile: conv filters [C_out, C_in, kh, kw] flatten
    C_in*kh*kw ("mask") or, permuted, kh*kw*C_in ("tap_major": each K run of C_in entries is one filter tap)."""
    if mask.dim() < 2:
        raise ValueError(f"a weight mask needs at least 2 dims, got shape {tuple(mask.shape)}")
    if k_order not in K_ORDERS:
        raise ValueError(f"k_order must be one of {K_ORDERS}, got {k_order!r}")
    if k_order == "tap_major":
        if mask.dim() != 4:
            raise ValueError(f"k_order='tap_major' is for 4-D conv filters, got shape {tuple(mask.shape)}")
        mask = mask.permute(0, 2, 3, 1)
    return mask.reshape(mask.shape[0], -1)


def live_tiles(mask2d: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    """bool [ceil(N/BN), ceil(K/BK)]: True where the tile holds any nonzero mask entry."""
    n, k = mask2d.shape
    tn, tk = -(-n // block_n), -(-k // block_k)
    padded = torch.zeros(tn * block_n, tk * block_k, dtype=torch.uint8, device=mask2d.device)
    padded[:n, :k] = mask2d != 0
    return padded.view(tn, block_n, tk, block_k).amax(dim=(1, 3)).bool()


def _csr(live: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    counts = live.sum(dim=1, dtype=torch.int32)
    ptr = torch.zeros(live.shape[0] + 1, dtype=torch.int32, device=live.device)
    ptr[1:] = torch.cumsum(counts, dim=0)
    idx = live.nonzero()[:, 1].to(torch.int32)  # nonzero is row-major, so each row's list is sorted
    return ptr, idx


def build_tile_map(mask: torch.Tensor, block_n: int, block_k: int, k_order: str = "mask") -> TileMap:
    mask2d = as_2d_mask(mask, k_order)
    if block_n <= 0 or block_k <= 0:
        raise ValueError(f"tile sizes must be positive, got ({block_n}, {block_k})")
    live = live_tiles(mask2d, block_n, block_k)
    row_ptr, col_idx = _csr(live)
    col_ptr, row_idx = _csr(live.t())
    coo = live.nonzero().to(torch.int32)
    row_counts, col_counts = row_ptr.diff(), col_ptr.diff()
    # One host sync per mask change: launch grids need the live count as a Python int.
    stats = torch.stack([row_ptr[-1], row_counts.max(), col_counts.max()]).tolist()
    return TileMap(
        shape=(mask2d.shape[0], mask2d.shape[1]),
        block=(block_n, block_k),
        live=live,
        row_ptr=row_ptr,
        col_idx=col_idx,
        col_ptr=col_ptr,
        row_idx=row_idx,
        coo_rows=coo[:, 0].contiguous(),
        coo_cols=coo[:, 1].contiguous(),
        n_live=int(stats[0]),
        max_live_per_row=int(stats[1]),
        max_live_per_col=int(stats[2]),
        k_order=k_order,
    )


@dataclass(frozen=True)
class StackedTileMap:
    """The live-tile lists of A arms' masks (one [N, K] mask per arm), concatenated arm after arm (see the module
    docstring). No COO: the grouped dW runs one program per tile of every arm and reads `live` itself, so it
    also writes the dead tiles (as exact zeros)."""
    arms: int
    shape: Tuple[int, int]
    block: Tuple[int, int]
    live: torch.Tensor      # bool [arms, tiles_n, tiles_k]
    row_ptr: torch.Tensor   # int32 [arms * tiles_n + 1]
    col_idx: torch.Tensor   # int32 [n_live]
    col_ptr: torch.Tensor   # int32 [arms * tiles_k + 1]
    row_idx: torch.Tensor   # int32 [n_live]
    live_flags: torch.Tensor  # uint8 [arms, tiles_n * tiles_k], contiguous: `live` as the grouped dW reads it
    n_live: int             # live tiles of all arms together

    @property
    def tiles(self) -> Tuple[int, int]:
        return tuple(self.live.shape[1:])  # type: ignore[return-value]

    @property
    def n_tiles(self) -> int:
        return self.live.numel()

    @property
    def live_fraction(self) -> float:
        """Live tiles / all tiles over every arm: the grouped launch's work relative to the dense batched GEMM,
        so the one dispatch rule (kernels/dispatch.py) decides for the whole launch."""
        return self.n_live / max(1, self.n_tiles)


def build_stacked_tile_map(mask: torch.Tensor, block_n: int, block_k: int) -> StackedTileMap:
    """The stacked tile map of a linear layer's stacked mask [A, N, K] (arm-major concatenated lists)."""
    if mask.dim() != 3:
        raise ValueError(f"a stacked linear mask is [arms, N, K], got shape {tuple(mask.shape)}")
    if block_n <= 0 or block_k <= 0:
        raise ValueError(f"tile sizes must be positive, got ({block_n}, {block_k})")
    arms, n, k = mask.shape
    tn, tk = -(-n // block_n), -(-k // block_k)
    padded = torch.zeros(arms, tn * block_n, tk * block_k, dtype=torch.uint8, device=mask.device)
    padded[:, :n, :k] = mask != 0
    live = padded.view(arms, tn, block_n, tk, block_k).amax(dim=(2, 4)).bool()
    # Arm-major rows: CSR over [A * tiles_n, tiles_k] is every arm's forward lists one after the other.
    row_ptr, col_idx = _csr(live.reshape(arms * tn, tk))
    col_ptr, row_idx = _csr(live.transpose(1, 2).reshape(arms * tk, tn))
    return StackedTileMap(arms=arms, shape=(n, k), block=(block_n, block_k), live=live, row_ptr=row_ptr,
                          col_idx=col_idx, col_ptr=col_ptr, row_idx=row_idx,
                          live_flags=live.reshape(arms, tn * tk).to(torch.uint8).contiguous(),
                          n_live=int(row_ptr[-1].item()))  # one host sync per mask change, as build_tile_map


class TileMapCache:
    """Tile maps of one mask, per tile size, rebuilt only when the mask changes.

    A mask "changes" when its owner's version counter moves, or when the tensor is modified in place
    (torch's own `_version` counter) or replaced (new storage), so users editing the buffer directly are safe.
    """

    def __init__(self) -> None:
        self._maps: Dict[Hashable, Tuple[Hashable, TileMap]] = {}

    def get(self, mask: torch.Tensor, block_n: int, block_k: int, version: int = 0, k_order: str = "mask") -> TileMap:
        key = (block_n, block_k, mask.device, k_order)
        token = (version, mask._version, mask.data_ptr(), tuple(mask.shape))
        hit = self._maps.get(key)
        if hit is not None and hit[0] == token:
            return hit[1]
        tile_map = build_tile_map(mask, block_n, block_k, k_order)
        self._maps[key] = (token, tile_map)
        return tile_map

    def clear(self) -> None:
        self._maps.clear()


def reference_live_tiles(mask: torch.Tensor, block_n: int, block_k: int, k_order: str = "mask") -> torch.Tensor:
    """Plain-loop reference of `live_tiles` for tests."""
    mask2d = as_2d_mask(mask, k_order).cpu()
    n, k = mask2d.shape
    tn, tk = -(-n // block_n), -(-k // block_k)
    out = torch.zeros(tn, tk, dtype=torch.bool)
    for r in range(tn):
        for c in range(tk):
            out[r, c] = bool(mask2d[r * block_n:(r + 1) * block_n, c * block_k:(c + 1) * block_k].any())
    return out
