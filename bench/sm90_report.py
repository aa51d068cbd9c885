"""sm_90 compile report for the hot linear kernels: registers, spills, MMA kind, pipelining, per kernel.

Offline (no GPU): every row is compiled for sm_90 by tests/sm90.py exactly as a launch with those shapes
would be, and read back from the PTX / TTGIR / `ptxas -v`. One config per kernel: the first the autotuner
keeps (so the table compares the same variant before and after a change). Shapes: the issue-22 reference
layer (8192 tokens, 4096 x 4096) and LeNet-300-100's odd ones (784->300, 300->100, 100->10, 256 tokens).
Precisions: bf16, fp32 with TF32, fp32 IEEE (no TF32). dW rows: `dw` / `dw-split` (64 x 64 tile programs,
direct store / split atomics) and `dw-quad` / `dw-quad-split` (128 x 128 programs over 2 x 2 tiles).

    PYTHONPATH=. python bench/sm90_report.py        # prints a markdown table (takes a few minutes on 2 cores)
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from sm90 import run_body  # noqa: E402

BODY = r"""
import torch
import fastticket.kernels.linear_dw_sgd as linear_dw_sgd
import fastticket.kernels.masked_linear as ml
import fastticket.kernels.masked_linear_dw as mld

ml._SMEM_BUDGET = SMEM_LIMIT_SM90
BN, BK = 64, 64
BUCKET = ml.live_bucket(0.4)
i32, u8, f32 = ptr(torch.int32), ptr(torch.uint8), ptr(torch.float32)
lists = dict(LIST_CHUNK=ml._LIST_CHUNK, GROUP_M=ml._GROUP_M)
SHAPES = {"4096": (8192, 4096, 4096), "784>300": (256, 300, 784), "300>100": (256, 100, 300),
          "100>10": (256, 10, 100)}
PRECISIONS = (("bf16", torch.bfloat16, None), ("tf32", torch.float32, "tf32"), ("ieee", torch.float32, "ieee"))
for shape, (M, N, K) in SHAPES.items():
    for tag, dtype, precision in PRECISIONS:
        t = ptr(dtype)
        pick = lambda cs: cs[0]
        strides = dict(stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1, stride_ym=N, stride_yn=1)
        c = pick(ml._prune_configs(ml._cuda_configs(), dict(M=M, x_ptr=Arg(dtype), **strides), BLOCK_N=64,
                                   INPUT_PRECISION=precision))
        meta = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        cfg = f"BM{c.kwargs['BLOCK_M']} w{c.num_warps} s{c.num_stages}"
        check(f"fwd|{shape}|{tag}|{cfg}", ml._fwd_kernel, t, t, t, t, i32, i32, i32, M, N, K, K, 1, K, 1, N, 1,
              BUCKET, HAS_BIAS=True, INPUT_PRECISION=precision, BLOCK_N=64, BLOCK_K=BK, TILE_N=BN, **lists, **meta)
        strides = dict(stride_dym=N, stride_dyn=1, stride_wn=K, stride_wk=1, stride_dxm=K, stride_dxk=1)
        c = pick(ml._prune_configs(ml._cuda_configs(), dict(M=M, dy_ptr=Arg(dtype), **strides), BLOCK_K=64,
                                   INPUT_PRECISION=precision))
        meta = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        cfg = f"BM{c.kwargs['BLOCK_M']} w{c.num_warps} s{c.num_stages}"
        check(f"dx|{shape}|{tag}|{cfg}", ml._dx_kernel, t, t, t, i32, i32, i32, M, N, K, N, 1, K, 1, K, 1, BUCKET,
              INPUT_PRECISION=precision, BLOCK_N=BN, BLOCK_K=64, TILE_K=BK, **lists, **meta)
        c = ml._dw_prune_configs(ml._dw_cuda_configs(), {"M": M})[0]
        cfg = f"BM{c.kwargs['BLOCK_M']} w{c.num_warps} s{c.num_stages}"
        dw_args = lambda atomic: (t, t, u8, f32 if atomic else t, i32, i32, i32, i32, M, N, K,  # noqa: E731
                                  1024 if atomic else M, N, 1, K, 1, K, 1, BK if atomic else K, 1, BUCKET)
        for atomic in (False, True):
            kind = "dw-split" if atomic else "dw"
            check(f"{kind}|{shape}|{tag}|{cfg}", ml._dw_kernel, *dw_args(atomic),
                  INPUT_PRECISION=precision, ATOMIC=atomic, BLOCK_N=BN, BLOCK_K=BK, TILE_N=BN, TILE_K=BK,
                  **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        # Quad programs (128 x 128 over 2 x 2 map tiles, kernels/masked_linear_dw.py): the first config kept.
        for atomic in (False, True):
            strides = dict(stride_xm=K, stride_xk=1, stride_dwn=BK if atomic else K, stride_dwk=1)
            c = mld._dw_quad_prune_configs(mld._dw_quad_cuda_configs(), dict(M=M, x_ptr=Arg(dtype), **strides),
                                           INPUT_PRECISION=precision, BLOCK_N=2 * BN, BLOCK_K=2 * BK)[0]
            cfg = f"BM{c.kwargs['BLOCK_M']} w{c.num_warps} s{c.num_stages}"
            kind = "dw-quad-split" if atomic else "dw-quad"
            check(f"{kind}|{shape}|{tag}|{cfg}", ml._dw_kernel, *dw_args(atomic),
                  INPUT_PRECISION=precision, ATOMIC=atomic, BLOCK_N=2 * BN, BLOCK_K=2 * BK, TILE_N=BN,
                  TILE_K=BK, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        fused = linear_dw_sgd.cuda_meta(precision, aligned=N % 16 == 0 and K % 16 == 0)
        cfg = f"BM{fused['BLOCK_M']} w{fused['num_warps']} s{fused['num_stages']}"
        check(f"dw+sgd|{shape}|{tag}|{cfg}", linear_dw_sgd._dw_sgd_kernel, t, t, u8, f32, f32, i32, i32, M, N, K,
              N, 1, K, 1, 0.1, 0.9, 0.0, 1e-4, INPUT_PRECISION=precision, HAS_MOMENTUM=True, FIRST=False,
              NESTEROV=False, MAXIMIZE=False, HAS_WD=True, BLOCK_N=BN, BLOCK_K=BK, **fused)
"""


def main() -> None:
    results = run_body(BODY, timeout=3000)
    print("| kernel | shape (N<K or MxNxK) | precision | config | regs | spills (B) | MMA | buffers | cp.async16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, p in results.items():
        kernel, shape, tag, cfg = name.split("|")
        print(f"| {kernel} | {shape} | {tag} | {cfg} | {p['registers']} | {p['spills']} | {p['mma']} | "
              f"{p['buffers']} | {'yes' if p['async16'] else 'no'} |")


if __name__ == "__main__":
    main()
