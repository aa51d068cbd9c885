"""Multi-tensor launches: the device tables through which one Triton launch reaches many tensors.

Shared by the masked optimizer step (kernels/masked_optim.py) and the rewind / state-reset pass
(kernels/rewind.py). Host side: `TensorTable` (address, meta and chunk tables, cached across steps),
`kernel_supported` (which tensors a table can take), `pointer_type` / `tl_dtype`; device side: the
@triton.jit helpers `chunk_geometry` (a program's block of its tensor) and `tensor_ptr`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # the torch backend works without triton
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "FLAG_MASK", "FLAG_TILE", "DEFAULT_TILE", "TensorTable", "kernel_supported",
           "pointer_type", "tl_dtype"]

# One launch covers every tensor of a bucket (same dtype, same device, same hyperparameters). The kernel
# finds its tensors through device tables instead of arguments:
#   addr  int64 [T, 6]  addresses of p, grad, mask, state0, state1, state2 (0 where absent)
#   meta  int64 [T, 4]  numel, rows N, cols K (the 2-D view the tiles cut), flags
#   chunk int32 [C, 3]  per program: tensor index, a, b. Element chunks (a = chunk index, b = 0) cover
#                       BN*BK consecutive elements; tile chunks (a, b) = live tile (row, col) of a block mask,
#                       taken from the layer's tile map COO list, so dead tiles are never read or written.
# The chunk table depends only on sizes and tile maps, so it is cached across steps; the address table is
# rebuilt each step because gradients are reallocated after zero_grad(set_to_none=True).
# Pointer tables work in the Triton interpreter too (checked: it dereferences raw host addresses), so the
# CPU tests run the same single-launch code as the GPU.

FLAG_MASK, FLAG_TILE = 1, 2  # meta flag bits every table kernel reads: the tensor has a mask / is stepped by tiles
DEFAULT_TILE = (64, 64)  # BN x BK: the unit of block-mask skipping, and the element-chunk size (4096)

_TL_DTYPES: dict = {}


def tl_dtype(dtype: torch.dtype):
    """The triton dtype of a torch float dtype the kernels take."""
    if not _TL_DTYPES:
        _TL_DTYPES.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                           torch.float64: tl.float64})
    return _TL_DTYPES[dtype]


def pointer_type(dtype: torch.dtype):
    """The kernels' PTR_TY: a pointer to `dtype`, built here because triton 3.1 cannot build it in a kernel."""
    return tl.pointer_type(tl_dtype(dtype))


def kernel_supported(param: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """Whether the fused kernel can take this tensor: a float dtype it knows, contiguous storage shared
    layout with its gradient/state/mask. Anything else goes through the reference (documented fallback)."""
    if param.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64) or param.numel() == 0:
        return False
    if not param.is_contiguous():
        return False
    for t in others:
        if t is not None and (not t.is_contiguous() or t.shape != param.shape or t.device != param.device):
            return False
    return True



class _ChunkCache:
    """Chunk tables keyed by (sizes, tile maps); holds the tile maps so their identity keys stay valid."""

    def __init__(self, capacity: int = 64) -> None:
        self._store: dict = {}
        self._capacity = capacity

    def get(self, device: torch.device, entries: Sequence[tuple], block: Tuple[int, int]) -> Tuple[torch.Tensor, int]:
        # entries: per tensor, ("e", numel) or ("t", tile_map)
        key = (device, block, tuple((kind, x if kind == "e" else id(x)) for kind, x in entries))
        hit = self._store.get(key)
        if hit is not None and all(kind == "e" or hit[2][i] is x for i, (kind, x) in enumerate(entries)):
            return hit[0], hit[1]
        block_elems = block[0] * block[1]
        parts, total = [], 0
        for t, (kind, x) in enumerate(entries):
            if kind == "e":
                n = -(-x // block_elems)
                a = torch.arange(n, dtype=torch.int32, device=device)
                b = torch.zeros(n, dtype=torch.int32, device=device)
            else:
                n = x.n_live
                a, b = x.coo_rows.to(device), x.coo_cols.to(device)
            if n == 0:
                continue
            parts.append(torch.stack([torch.full((n,), t, dtype=torch.int32, device=device), a, b], dim=1))
            total += n
        table = (torch.cat(parts).contiguous() if parts
                 else torch.zeros((0, 3), dtype=torch.int32, device=device))
        if len(self._store) >= self._capacity:
            self._store.pop(next(iter(self._store)))
        self._store[key] = (table, total, [x for _, x in entries])
        return table, total


_chunk_cache = _ChunkCache()
_address_tables: dict = {}


class TensorTable:
    """Address/meta/chunk tables for one multi-tensor launch (see the comment block above)."""

    def __init__(self, device: torch.device, block: Tuple[int, int]) -> None:
        self.device, self.block = device, block
        self._addr: List[int] = []
        self._meta: List[int] = []
        self._entries: List[tuple] = []
        # Hints claim 16-byte bases and offsets in multiples of 4 elements: BK must keep that too.
        self.aligned = block[1] % 4 == 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, tensors: Sequence[Optional[torch.Tensor]], numel: int, rows: int, cols: int, flags: int,
            tile_map=None) -> None:
        addrs = [0 if t is None else t.data_ptr() for t in tensors] + [0] * (6 - len(tensors))
        fallback = addrs[0]  # masked-off lanes never dereference; any valid address keeps sanitizers quiet
        addrs = [a if a else fallback for a in addrs]
        self._addr += addrs
        self._meta += [numel, rows, cols, flags]
        self._entries.append(("t", tile_map) if tile_map is not None else ("e", numel))
        # The kernel's divisibility hints claim 16-byte aligned bases and row strides that are multiples of
        # 4 elements; any tensor breaking that turns the hints off for the whole launch.
        tile_misaligned = tile_map is not None and (cols % 4 or (cols * tensors[0].element_size()) % 16)
        if any(a % 16 for a in addrs) or tile_misaligned:
            self.aligned = False

    def build(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        # The caching allocator hands gradients the same addresses step after step, so the device copy of
        # the table is reused while its contents are unchanged (saves a host-to-device copy per launch).
        key = (self.device, tuple(self._addr), tuple(self._meta))
        hit = _address_tables.get(key)
        if hit is None:
            addr = torch.tensor(self._addr, dtype=torch.int64).to(self.device, non_blocking=True)
            meta = torch.tensor(self._meta, dtype=torch.int64).to(self.device, non_blocking=True)
            if len(_address_tables) >= 16:
                _address_tables.pop(next(iter(_address_tables)))
            _address_tables[key] = hit = (addr, meta)
        addr, meta = hit
        chunks, n_chunks = _chunk_cache.get(self.device, self._entries, self.block)
        return addr, meta, chunks, n_chunks



if HAS_TRITON:

    @triton.jit
    def chunk_geometry(chunk_ptr, meta_ptr, BN: tl.constexpr, BK: tl.constexpr, ALIGNED: tl.constexpr):
        """Offsets of this program's [BN, BK] block of its tensor, its in-bounds lanes, and whether the
        block lies wholly in bounds (then loads need no bounds mask and can vectorize)."""
        c = tl.program_id(0).to(tl.int64)
        t = tl.load(chunk_ptr + 3 * c).to(tl.int64)
        a = tl.load(chunk_ptr + 3 * c + 1).to(tl.int64)
        b = tl.load(chunk_ptr + 3 * c + 2).to(tl.int64)
        numel = tl.load(meta_ptr + 4 * t)
        n_rows = tl.load(meta_ptr + 4 * t + 1)
        n_cols = tl.load(meta_ptr + 4 * t + 2)
        flags = tl.load(meta_ptr + 4 * t + 3)
        is_tile = (flags & 2) != 0
        # Element chunk a: elements [a*BN*BK, (a+1)*BN*BK) seen as BN rows of BK. Tile (a, b): rows
        # a*BN.., cols b*BK.. of the [n_rows, n_cols] view.
        row_stride = tl.where(is_tile, n_cols, BK)
        base = tl.where(is_tile, a * BN * n_cols + b * BK, a * (BN * BK))
        row_limit = tl.where(is_tile, n_rows - a * BN, BN)
        col_limit = tl.where(is_tile, n_cols - b * BK, BK)
        lin_limit = tl.where(is_tile, numel, numel - a * (BN * BK))
        if ALIGNED:
            # Host-checked: addresses 16-byte aligned, tile row strides multiples of 16 bytes.
            row_stride = tl.multiple_of(row_stride, 4)
            base = tl.multiple_of(base, 4)
        r = tl.arange(0, BN)[:, None]
        k = tl.arange(0, BK)[None, :]
        offs = base + r * row_stride + k
        valid = (r < row_limit) & (k < col_limit) & (r * BK + k < lin_limit)
        full = (row_limit >= BN) & (col_limit >= BK) & (lin_limit >= BN * BK)
        return t, offs, valid, full, flags

    @triton.jit
    def tensor_ptr(addr_ptr, i, PTR_TY: tl.constexpr, ALIGNED: tl.constexpr):
        """Address i of the table as a typed pointer. In aligned launches the pointer carries a 16-byte
        divisibility hint so full chunks compile to 128-bit accesses (checked in the PTX of an sm90 compile:
        the hint must sit on the pointer; on the int64 before the cast it is lost). PTR_TY is a pointer type
        built on the host: triton 3.1 cannot build `tl.pointer_type` of a constexpr dtype inside a kernel."""
        p = tl.load(addr_ptr + i).to(PTR_TY)
        if ALIGNED:
            p = tl.multiple_of(p, 16)
        return p
