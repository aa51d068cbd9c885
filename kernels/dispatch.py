"""Per-layer choice between the dense vendor op (cuBLAS / cuDNN) and the tile-skipping Triton kernels.

Under the zero invariant the dense op is exact, so the only question is speed: above a live-tile fraction
the dense op wins. The thresholds live here, one per op, so every kernel reads the same numbers;
`FASTTICKET_DENSE_THRESHOLD_<OP>` (e.g. ..._LINEAR=0.6) overrides one for experiments and benchmarks.
See the README's "Backend" section for how the values were chosen.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

# Live-tile fraction at or above which the dense op runs. `fastticket bench` measures the crossover;
# these defaults must be replaced by measured values (see README), they are not tuned yet.
# conv2d is 0.0 (every layer to cuDNN) until a GPU measures a crossover: compiled offline for sm_90, the
# implicit-GEMM kernels are predicted to lose to cuDNN at every density above ~5% live (no async copies
# for the gathers, scalar NCHW stores, atomics in dX), and "never slower than dense" comes first.
# `fastticket bench --suite conv` still times the tile-skipping path (forced with ..._CONV2D=1.01).
DENSE_THRESHOLDS = {"linear": 0.5, "conv2d": 0.0}


def dense_threshold(op: str) -> float:
    value = os.environ.get(f"FASTTICKET_DENSE_THRESHOLD_{op.upper()}")
    if value is None:
        return DENSE_THRESHOLDS[op]
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"FASTTICKET_DENSE_THRESHOLD_{op.upper()}={value!r} is not a number") from None


# What the one-arm tile kernels compute in (their dots run in fp32 or tensor-core precisions): a float64 layer
# takes the dense op, which is exact under the invariant, instead of silently losing precision. (The grouped
# kernels of kernels/grouped_linear.py accumulate float64 in float64 and do not pass a dtype.)
TILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_tile_skipping(live_fraction: float, op: str, dtype: Optional[torch.dtype] = None) -> bool:
    """True when the tile-skipping kernel should run for a layer whose live-tile fraction is given (and, with
    `dtype`, whose inputs the one-arm kernels compute in)."""
    if dtype is not None and dtype not in TILE_DTYPES:
        return False
    return live_fraction < dense_threshold(op)
