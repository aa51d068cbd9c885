"""The Triton kernels of kernels/masked_conv2d.py (implicit-GEMM forward, dX, dW; the GEMM view and the
memory formats are described there), apart from their launchers."""
from __future__ import annotations

import triton
import triton.language as tl

# Rows past M (or taps off the image) must fail the bounds test below without int32 overflow.
_FAR_OUTSIDE = tl.constexpr(-(1 << 30))
# Filters with at most this many taps test input bounds with a per-pixel bitmask (see _tap_bits).
_MAX_BITMASK_TAPS = 31


@triton.jit
def _output_pixels(offs_m, H_out, W_out, INDEX_I64: tl.constexpr):
    # GEMM row m -> output pixel (image, row, column), m = (img * H_out + oh) * W_out + ow.
    img = offs_m // (H_out * W_out)
    pix = offs_m % (H_out * W_out)
    oh = pix // W_out
    ow = pix % W_out
    if INDEX_I64:  # only when a tensor's extent passes 2**31 elements: 64-bit offsets cost registers
        img = img.to(tl.int64)
    return img, oh, ow


@triton.jit
def _filter_columns(offs_k, C_in, K, KH: tl.constexpr, KW: tl.constexpr):
    # GEMM column k -> (k < K, input channel, filter tap (kh-major), tap row, tap column), tap-major:
    # k = tap * C_in + ci, so a run of C_in consecutive k is one tap's channels (contiguous in NHWC).
    k_ok = offs_k < K
    ci = offs_k % C_in
    tap = offs_k // C_in
    return k_ok, ci, tap, tap // KW, tap % KW


@triton.jit
def _aligned_tap(kt, C_in, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    # With C_in a multiple of BLOCK_K every K tile lies inside one filter tap: (tap row, tap column, the
    # tile's input channels, a contiguous run). Gathers then need one bounds bit per pixel, not per element.
    k0 = kt * BLOCK_K
    tap = k0 // C_in
    # k0 - tap * C_in rather than k0 % C_in: the compiler's alignment analysis sees through a product and a
    # difference (a multiple of 16 when C_in is) but not through a remainder, and needs it for vector loads.
    return tap // KW, tap % KW, (k0 - tap * C_in) + tl.arange(0, BLOCK_K)


@triton.jit
def _tap_bits(ih0, iw0, m_ok, H, W, dil_h, dil_w, KH: tl.constexpr, KW: tl.constexpr, USE_BITS: tl.constexpr):
    # Bit t of a pixel's word says whether filter tap t (kh-major) reads inside the image. K is ordered
    # c_in-major, so every column of a K tile can have a different tap; a per-element bounds test would need
    # [BLOCK_M, BLOCK_K] row and column indices live in registers. With the word, the test is one shift.
    # Without USE_BITS (filters with more than _MAX_BITMASK_TAPS taps) the result is a placeholder that
    # _gather_ok ignores.
    bits = tl.zeros_like(ih0)
    if USE_BITS:
        for t in tl.static_range(KH * KW):
            ih = ih0 + (t // KW) * dil_h
            iw = iw0 + (t % KW) * dil_w
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & m_ok
            bits = bits | (inside.to(tl.int32) << t)
    return bits


@triton.jit
def _gather_ok(bits, ih0, iw0, m_ok, tap, k_ok, H, W, dil_h, dil_w, KW: tl.constexpr, USE_BITS: tl.constexpr):
    # [BLOCK_M, BLOCK_K] validity of gathered input taps: inside the image, real pixel, real k.
    if USE_BITS:
        # Padding columns (k >= K) get tap 31, a bit no filter with <= 31 taps sets.
        shift = tl.where(k_ok, tap, 31)
        ok = ((bits[:, None] >> shift[None, :]) & 1) != 0
    else:
        ih = tl.where(m_ok, ih0, _FAR_OUTSIDE)[:, None] + ((tap // KW) * dil_h)[None, :]
        iw = iw0[:, None] + ((tap % KW) * dil_w)[None, :]
        ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & k_ok[None, :]
    return ok


@triton.jit
def _conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, row_ptr_ptr, col_idx_ptr,
    M, C_in, H, W, C_out, H_out, W_out, LIVE_BUCKET,
    sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_i, sw_h, sw_w,
    sy_n, sy_c, sy_h, sy_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, INDEX_I64: tl.constexpr, USE_BITS: tl.constexpr,
    TAP_ALIGNED: tl.constexpr, FLAT_OUT: tl.constexpr, LIST_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    K = C_in * KH * KW

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    img, oh, ow = _output_pixels(offs_m, H_out, W_out, INDEX_I64)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    # Offsets split into a per-pixel part (here) and a per-k part (in the loop): the [BLOCK_M, BLOCK_K]
    # gather then costs one broadcast add, and little stays live across iterations.
    x_row = img * sx_n + ih0 * sx_h + iw0 * sx_w
    bits = _tap_bits(ih0, iw0, m_ok, H, W, dil_h, dil_w, KH, KW, USE_BITS)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_out
    w_row = offs_n * sw_o

    lo = tl.load(row_ptr_ptr + pid_n)
    hi = tl.load(row_ptr_ptr + pid_n + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The live list is staged in registers LIST_CHUNK entries at a time (as in kernels/masked_linear.py):
    # operand addresses then depend on the loop counter only and the pipeliner keeps num_stages tiles in flight.
    slots = tl.arange(0, LIST_CHUNK)
    for c0 in range(lo, hi, LIST_CHUNK):
        chunk = tl.load(col_idx_ptr + c0 + slots, mask=c0 + slots < hi, other=0)
        for i in range(0, tl.minimum(hi - c0, LIST_CHUNK)):
            kt = tl.sum(tl.where(slots == i, chunk, 0), axis=0)
            if TAP_ALIGNED:
                # One tap per K tile: the X tile is BLOCK_M runs of BLOCK_K consecutive channels (16-byte
                # vectors in NHWC), masked per pixel.
                rh, rw, ci = _aligned_tap(kt, C_in, KW, BLOCK_K)
                ih = ih0 + rh * dil_h
                iw = iw0 + rw * dil_w
                row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                tap_row = x_row + (rh * dil_h) * sx_h + (rw * dil_w) * sx_w
                a = tl.load(x_ptr + (tap_row[:, None] + (ci * sx_c)[None, :]), mask=row_ok[:, None], other=0.0)
                b = tl.load(w_ptr + (w_row[None, :] + (ci * sw_i + rh * sw_h + rw * sw_w)[:, None]),
                            mask=n_ok[None, :], other=0.0)
            else:
                offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
                k_ok, ci, tap, rh, rw = _filter_columns(offs_k, C_in, K, KH, KW)
                a_ok = _gather_ok(bits, ih0, iw0, m_ok, tap, k_ok, H, W, dil_h, dil_w, KW, USE_BITS)
                x_col = ci * sx_c + (rh * dil_h) * sx_h + (rw * dil_w) * sx_w
                a = tl.load(x_ptr + (x_row[:, None] + x_col[None, :]), mask=a_ok, other=0.0)
                b = tl.load(w_ptr + (w_row[None, :] + (ci * sw_i + rh * sw_h + rw * sw_w)[:, None]),
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if FLAT_OUT:
        # Contiguous NCHW Y: a pixel tile is a contiguous run of each channel plane (within one image when
        # H_out*W_out is a multiple of BLOCK_M), so the compiler can prove contiguity along M and store
        # vectors, staging the MMA-layout tile through shared memory to get there.
        y_rows = y_ptr + (img * sy_n + offs_m % (H_out * W_out))
    else:
        y_rows = y_ptr + (img * sy_n + oh * sy_h + ow * sy_w)
    tl.store(y_rows[:, None] + (offs_n * sy_c)[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv2d_dx_kernel(
    dy_ptr, w_ptr, dx_ptr, col_ptr_ptr, row_idx_ptr,
    M, C_in, H, W, C_out, H_out, W_out, LIVE_BUCKET,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sw_o, sw_i, sw_h, sw_w,
    sdx_n, sdx_c, sdx_h, sdx_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, ATOMIC: tl.constexpr, INDEX_I64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    kt = tl.program_id(1)
    lo = tl.load(col_ptr_ptr + kt)
    hi = tl.load(col_ptr_ptr + kt + 1)
    if hi > lo:  # a K tile with no live weight tile adds nothing: dX there stays as zeroed by the launcher
        K = C_in * KH * KW
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        img, oh, ow = _output_pixels(offs_m, H_out, W_out, INDEX_I64)
        dy_row = img * sdy_n + oh * sdy_h + ow * sdy_w

        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok, ci, tap, rh, rw = _filter_columns(offs_k, C_in, K, KH, KW)
        w_col = ci * sw_i + rh * sw_h + rw * sw_w

        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for i in range(lo, hi):
            nt = tl.load(row_idx_ptr + i)
            offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < C_out
            a = tl.load(dy_ptr + (dy_row[:, None] + (offs_n * sdy_c)[None, :]),
                        mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            b = tl.load(w_ptr + (w_col[None, :] + (offs_n * sw_o)[:, None]), mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

        # col2im: column (pixel, k) is the gradient of input tap (img, ci, ih, iw); taps in the padding drop.
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        dh = rh * dil_h
        dw = rw * dil_w
        ih = tl.where(m_ok, ih0, _FAR_OUTSIDE)[:, None] + dh[None, :]
        iw = iw0[:, None] + dw[None, :]
        ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & k_ok[None, :]
        dx_rows = dx_ptr + (img * sdx_n + ih0 * sdx_h + iw0 * sdx_w)
        dx_ptrs = dx_rows[:, None] + (ci * sdx_c + dh * sdx_h + dw * sdx_w)[None, :]
        if ATOMIC:
            tl.atomic_add(dx_ptrs, acc, mask=ok, sem="relaxed")
        else:
            tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _conv2d_dx_gather_kernel(
    dy_ptr, w_ptr, dx_ptr, col_ptr_ptr, row_idx_ptr,
    M_in, C_in, H, W, C_out, H_out, W_out, LIVE_BUCKET,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sw_o, sw_i, sw_h, sw_w,
    sdx_n, sdx_c, sdx_h, sdx_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, INDEX_I64: tl.constexpr, FLAT_OUT: tl.constexpr, LIST_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # dX as an implicit GEMM over input pixels (needs C_in % BLOCK_K == 0): program (input-pixel tile,
    # C_in tile ct) owns dX[pixels, ct's channels] and sums, per filter tap, dY at the output pixel that tap
    # maps to (gathered; none when the stride skips it or it falls outside) times W[live C_out tiles, tap, ct].
    # The tap's K tile is tap * (C_in / BLOCK_K) + ct, so the transposed lists name its live C_out tiles.
    # Every dX element is written exactly once: no atomics, no zeroing, deterministic.
    pid_m = tl.program_id(0)
    ct = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M_in
    img, ih, iw = _output_pixels(offs_m, H, W, INDEX_I64)
    ci = ct * BLOCK_K + tl.arange(0, BLOCK_K)
    ci_tiles = C_in // BLOCK_K
    slots = tl.arange(0, LIST_CHUNK)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for t in tl.static_range(KH * KW):
        rh = t // KW
        rw = t % KW
        nh = ih + pad_h - rh * dil_h
        nw = iw + pad_w - rw * dil_w
        oh = nh // stride_h
        ow = nw // stride_w
        ok = (m_ok & (nh >= 0) & (nw >= 0) & (nh % stride_h == 0) & (nw % stride_w == 0)
              & (oh < H_out) & (ow < W_out))
        dy_row = img * sdy_n + oh * sdy_h + ow * sdy_w
        w_col = ci * sw_i + rh * sw_h + rw * sw_w
        kt = t * ci_tiles + ct
        lo = tl.load(col_ptr_ptr + kt)
        hi = tl.load(col_ptr_ptr + kt + 1)
        for c0 in range(lo, hi, LIST_CHUNK):  # the tap's live C_out tiles, staged as in the forward
            chunk = tl.load(row_idx_ptr + c0 + slots, mask=c0 + slots < hi, other=0)
            for i in range(0, tl.minimum(hi - c0, LIST_CHUNK)):
                nt = tl.sum(tl.where(slots == i, chunk, 0), axis=0)
                offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
                n_ok = offs_n < C_out
                a = tl.load(dy_ptr + (dy_row[:, None] + (offs_n * sdy_c)[None, :]),
                            mask=ok[:, None] & n_ok[None, :], other=0.0)
                b = tl.load(w_ptr + ((offs_n * sw_o)[:, None] + w_col[None, :]), mask=n_ok[:, None], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if FLAT_OUT:  # contiguous NCHW dX: vector stores along pixels, as in the forward's epilogue
        dx_rows = img * sdx_n + offs_m % (H * W)
    else:
        dx_rows = img * sdx_n + ih * sdx_h + iw * sdx_w
    tl.store(dx_ptr + (dx_rows[:, None] + (ci * sdx_c)[None, :]), acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None])


@triton.jit
def _conv2d_dw_kernel(
    x_ptr, dy_ptr, mask_ptr, dw_ptr, coo_rows_ptr, coo_cols_ptr,
    M, C_in, H, W, C_out, H_out, W_out, m_per_split, LIVE_BUCKET,
    sx_n, sx_c, sx_h, sx_w,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sm_o, sm_i, sm_h, sm_w,
    sdw_o, sdw_i, sdw_h, sdw_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, ATOMIC: tl.constexpr, INDEX_I64: tl.constexpr, USE_BITS: tl.constexpr,
    TAP_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    split = tl.program_id(1)
    K = C_in * KH * KW
    tile_n = tl.load(coo_rows_ptr + t)
    tile_k = tl.load(coo_cols_ptr + t)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_out
    if TAP_ALIGNED:
        rh, rw, ci = _aligned_tap(tile_k, C_in, KW, BLOCK_K)
        k_ok = ci < C_in  # always true: kept for the shared epilogue below
        tap = rh * KW + rw
    else:
        offs_k = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok, ci, tap, rh, rw = _filter_columns(offs_k, C_in, K, KH, KW)
    x_col = ci * sx_c + (rh * dil_h) * sx_h + (rw * dil_w) * sx_w
    dy_col = offs_n * sdy_c

    m_lo = split * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_hi
        img, oh, ow = _output_pixels(offs_m, H_out, W_out, INDEX_I64)
        a = tl.load(dy_ptr + (dy_col[:, None] + (img * sdy_n + oh * sdy_h + ow * sdy_w)[None, :]),
                    mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        if TAP_ALIGNED:
            ih = ih0 + rh * dil_h
            iw = iw0 + rw * dil_w
            b_ok = (m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None]
        else:
            bits = _tap_bits(ih0, iw0, m_ok, H, W, dil_h, dil_w, KH, KW, USE_BITS)
            b_ok = _gather_ok(bits, ih0, iw0, m_ok, tap, k_ok, H, W, dil_h, dil_w, KW, USE_BITS)
        x_row = img * sx_n + ih0 * sx_h + iw0 * sx_w
        b = tl.load(x_ptr + (x_row[:, None] + x_col[None, :]), mask=b_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # The element mask inside a live tile: pruned weights get an exactly-zero gradient.
    tile_ok = n_ok[:, None] & k_ok[None, :]
    keep = tl.load(mask_ptr + (offs_n * sm_o)[:, None] + (ci * sm_i + rh * sm_h + rw * sm_w)[None, :],
                   mask=tile_ok, other=0)
    acc = tl.where(keep != 0, acc, 0.0)
    dw_ptrs = dw_ptr + (offs_n * sdw_o)[:, None] + (ci * sdw_i + rh * sdw_h + rw * sdw_w)[None, :]
    if ATOMIC:
        tl.atomic_add(dw_ptrs, acc, mask=tile_ok, sem="relaxed")
    else:
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=tile_ok)
