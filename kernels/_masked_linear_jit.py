"""The Triton kernels of kernels/masked_linear.py (forward, dX, dW over a tile map's live tiles; the math,
the program widths and the pipelining are described there), apart from their configs and launchers."""
from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def _grouped_tile(pid, tiles_m, tiles_other, GROUP_M: tl.constexpr):
    """Program id -> (m tile, other tile), walking GROUP_M m-tiles down before moving across, so the X rows
    of a group and the W tiles they meet stay in L2 (the ordering of Triton's matmul tutorial)."""
    per_group = GROUP_M * tiles_other
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    local = pid % per_group
    return first_m + local % size_m, local // size_m


@triton.jit
def _live_tiles_dot(
    list_ptr, list_idx, list_bits, group,
    a_ptr, offs_m, m_ok, stride_am, stride_aj,
    b_ptr, offs_c, c_ok, stride_bj, stride_bc,
    J, acc,
    INPUT_PRECISION: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, TILE_C: tl.constexpr,
    LIST_CHUNK: tl.constexpr,
):
    """acc + A[offs_m, j] @ B[j, offs_c], summed over the j-tiles that the grouped CSR lists (list_ptr,
    list_idx, list_bits; kernels/tile_map.py) name for `group`: the main loop of the forward (j = live K-tiles,
    A = X, B = W^T) and of dX (j = live N-tiles, A = dY, B = W). J bounds j.

    The program's list is staged in registers LIST_CHUNK entries at a time and each step's tile index is
    picked out of that register block: the loads of A and B then depend on the loop counter only, not on a
    load from memory in the same loop, so the software pipeliner keeps num_stages - 1 tiles in flight (with
    the index loaded inside the loop it spends a stage on it, leaving one).

    A program covers BLOCK_C = ROWS * TILE_C columns (ROWS map tiles). Its list is the union of its ROWS
    tile lists; bit r of an entry's bits says whether sub-tile r is live there, and dead sub-tiles are not
    loaded (zero in registers): the MMA spans the whole width, memory traffic only the live tiles.
    """
    ROWS: tl.constexpr = BLOCK_C // TILE_C
    start = tl.load(list_ptr + group)
    end = tl.load(list_ptr + group + 1)
    arange_j = tl.arange(0, BLOCK_J)
    slots = tl.arange(0, LIST_CHUNK)
    sub = tl.arange(0, BLOCK_C) // TILE_C
    for c0 in range(start, end, LIST_CHUNK):
        in_chunk = c0 + slots < end
        chunk_idx = tl.load(list_idx + c0 + slots, mask=in_chunk, other=0)
        if ROWS > 1:
            chunk_bits = tl.load(list_bits + c0 + slots, mask=in_chunk, other=0)
        for i in range(0, tl.minimum(end - c0, LIST_CHUNK)):
            pick = slots == i
            jt = tl.sum(tl.where(pick, chunk_idx, 0), axis=0)
            offs_j = jt.to(tl.int64) * BLOCK_J + arange_j
            j_ok = offs_j < J
            b_ok = j_ok[:, None] & c_ok[None, :]
            if ROWS > 1:
                live_bits = tl.sum(tl.where(pick, chunk_bits, 0), axis=0)
                b_ok = b_ok & (((live_bits >> sub) & 1) != 0)[None, :]
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_j[None, :] * stride_aj,
                        mask=m_ok[:, None] & j_ok[None, :], other=0.0)
            b = tl.load(b_ptr + offs_j[:, None] * stride_bj + offs_c[None, :] * stride_bc, mask=b_ok, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, row_ptr, col_idx, row_bits,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    LIVE_BUCKET,  # bucketed live fraction (live_bucket): only an autotune key
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_N: tl.constexpr,
    LIST_CHUNK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # BLOCK_N = program width (a multiple of the map's TILE_N); the lists are grouped by BLOCK_N // TILE_N.
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    # int64 row offsets: M * K can exceed 2^31 for long token batches.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # X tiles times W^T tiles [BLOCK_K, BLOCK_N], read straight from W's [N, K] layout (k strides as rows).
    acc = _live_tiles_dot(row_ptr, col_idx, row_bits, pid_n,
                          x_ptr, offs_m, m_ok, stride_xm, stride_xk,
                          w_ptr, offs_n, n_ok, stride_wk, stride_wn,
                          K, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INPUT_PRECISION, BLOCK_K, BLOCK_N,
                          TILE_N, LIST_CHUNK)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dx_kernel(
    dy_ptr, w_ptr, dx_ptr, col_ptr, row_idx, col_bits,
    M, N, K,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dxm, stride_dxk,
    LIVE_BUCKET,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_K: tl.constexpr,
    LIST_CHUNK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # BLOCK_K = program width (a multiple of the map's TILE_K); BLOCK_N = the map's N tile (the reduction step).
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    m_ok = offs_m < M
    k_ok = offs_k < K
    # dY tiles times W tiles [BLOCK_N, BLOCK_K] over the transposed lists (the live N-tiles of the K-tiles).
    acc = _live_tiles_dot(col_ptr, row_idx, col_bits, pid_k,
                          dy_ptr, offs_m, m_ok, stride_dym, stride_dyn,
                          w_ptr, offs_k, k_ok, stride_wn, stride_wk,
                          N, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), INPUT_PRECISION, BLOCK_N, BLOCK_K,
                          TILE_K, LIST_CHUNK)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def dw_rows_dot(
    dy_ptr, x_ptr, offs_n, n_ok, offs_k, k_ok, m_lo, m_hi,
    stride_dym, stride_dyn, stride_xm, stride_xk,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dY[m_lo:m_hi, offs_n]^T @ X[m_lo:m_hi, offs_k] in fp32, one tl.dot per BLOCK_M tokens. Rows outside
    n_ok and columns outside k_ok are not loaded (zeros in registers): the bounds, and for a quad program
    the halves of its operands whose two sub-tiles are both dead."""
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = offs_m < m_hi
        # dY^T tile [BLOCK_N, BLOCK_M] read from dY's [M, N] layout.
        dyt = tl.load(dy_ptr + offs_m[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
                      mask=m_ok[None, :] & n_ok[:, None], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(dyt, x, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def dw_program(tile_rows, tile_cols, quad_bits, t, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               TILE_N: tl.constexpr, TILE_K: tl.constexpr):
    """Where dW program t works: live tile t of the COO list (tile_rows / tile_cols = coo_rows / coo_cols,
    BLOCK = TILE), or with BLOCK_N = 2 * TILE_N and BLOCK_K = 2 * TILE_K live quad t (its row / column and
    quad_bits' 4-bit live mask; kernels/tile_map.py). Returns (nt, kt, offs_n, offs_k, n_load, k_load,
    tile_ok): the rows of dY^T and columns of X to load (a quad's dead top / bottom or left / right pair of
    sub-tiles is not loaded) and the part of the output tile to read and write (its live sub-tiles, in bounds).
    Shared by the dW kernel and the fused dW + SGD (kernels/linear_dw_sgd.py)."""
    nt = tl.load(tile_rows + t)
    kt = tl.load(tile_cols + t)
    offs_n = (nt * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (kt * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    n_ok = offs_n < N
    k_ok = offs_k < K
    if BLOCK_N != TILE_N:
        bits = tl.load(quad_bits + t)
        sub_n = tl.arange(0, BLOCK_N) // TILE_N  # 0: top sub-tiles (bits 0, 1), 1: bottom (bits 2, 3)
        sub_k = tl.arange(0, BLOCK_K) // TILE_K  # 0: left (bits 0, 2), 1: right (bits 1, 3)
        n_load = n_ok & (((bits >> (2 * sub_n)) & 3) != 0)
        k_load = k_ok & (((bits >> sub_k) & 5) != 0)
        sub_live = ((bits >> (2 * sub_n[:, None] + sub_k[None, :])) & 1) != 0
        tile_ok = n_ok[:, None] & k_ok[None, :] & sub_live
    else:
        n_load = n_ok
        k_load = k_ok
        tile_ok = n_ok[:, None] & k_ok[None, :]
    return nt, kt, offs_n, offs_k, n_load, k_load, tile_ok


@triton.jit
def _dw_kernel(
    dy_ptr, x_ptr, mask_ptr, dw_ptr, tile_rows, tile_cols, quad_bits, quad_slabs,
    M, N, K, M_PER_SPLIT,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_mn, stride_mk, stride_dwn, stride_dwk,
    LIVE_BUCKET,
    INPUT_PRECISION: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_N: tl.constexpr,
    TILE_K: tl.constexpr,
):
    # Program (entry t, token split s): rows [s * M_PER_SPLIT, (s + 1) * M_PER_SPLIT) of the reduction.
    # Entry t is a live tile or, with BLOCK = 2 * TILE (QUAD), a live quad (dw_program; quad_slabs [n_quads, 4]:
    # its sub-tiles' COO indices): one (2 TILE_N) x (2 TILE_K) product per step, twice the arithmetic intensity
    # of a single tile, of which only the live sub-tiles are written.
    # With more than one split (ATOMIC) the partial tiles add into a zeroed compact fp32 buffer of one
    # TILE_N x TILE_K slab per live tile ([n_live, TILE_N, TILE_K], COO order): its size, its zero-fill and
    # the epilogue that scatters it into dW scale with the live tiles, not with N x K.
    QUAD: tl.constexpr = BLOCK_N != TILE_N
    t = tl.program_id(0)
    m_lo = tl.program_id(1) * M_PER_SPLIT
    m_hi = tl.minimum(m_lo + M_PER_SPLIT, M)
    nt, kt, offs_n, offs_k, n_load, k_load, tile_ok = dw_program(
        tile_rows, tile_cols, quad_bits, t, N, K, BLOCK_N, BLOCK_K, TILE_N, TILE_K)
    acc = dw_rows_dot(dy_ptr, x_ptr, offs_n, n_load, offs_k, k_load, m_lo, m_hi, stride_dym, stride_dyn,
                      stride_xm, stride_xk, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    # Element mask in the epilogue: pruned entries of a live tile get exactly zero gradient. Dead sub-tiles of
    # a quad are outside tile_ok: never read, never written.
    keep = tl.load(mask_ptr + offs_n[:, None] * stride_mn + offs_k[None, :] * stride_mk, mask=tile_ok, other=0)
    acc = tl.where(keep != 0, acc, 0.0)
    if ATOMIC:
        if QUAD:
            # Each live sub-tile adds into its own COO slab.
            s0 = tl.load(quad_slabs + 4 * t).to(tl.int64)
            s1 = tl.load(quad_slabs + 4 * t + 1).to(tl.int64)
            s2 = tl.load(quad_slabs + 4 * t + 2).to(tl.int64)
            s3 = tl.load(quad_slabs + 4 * t + 3).to(tl.int64)
            left = (tl.arange(0, BLOCK_K) < TILE_K)[None, :]
            top = (tl.arange(0, BLOCK_N) < TILE_N)[:, None]
            slab_t = tl.where(top, tl.where(left, s0, s1), tl.where(left, s2, s3))
            slab = (slab_t * (TILE_N * TILE_K) + (tl.arange(0, BLOCK_N) % TILE_N)[:, None] * TILE_K
                    + (tl.arange(0, BLOCK_K) % TILE_K)[None, :])
        else:
            slab = (t.to(tl.int64) * (BLOCK_N * BLOCK_K) + (offs_n - nt * BLOCK_N)[:, None] * BLOCK_K
                    + (offs_k - kt * BLOCK_K)[None, :])
        tl.atomic_add(dw_ptr + slab, acc, mask=tile_ok, sem="relaxed")
    else:
        dw_offs = offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk
        tl.store(dw_ptr + dw_offs, acc.to(dw_ptr.dtype.element_ty), mask=tile_ok)
