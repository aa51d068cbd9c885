"""Per-layer choice between the dense vendor op (cuBLAS / cuDNN) and the tile-skipping Triton kernels.

Under the zero invariant the dense op is exact, so the only question is speed: above a live-tile fraction
the dense op wins. The thresholds live here, one per op and (for the one-arm linear kernels) one per compute
precision, so every kernel reads the same numbers. Overrides, for experiments and benchmarks:
`FASTTICKET_DENSE_THRESHOLD_<OP>` (e.g. ..._LINEAR=0.6) sets the op's threshold for every precision;
`FASTTICKET_DENSE_THRESHOLD_<OP>_<PRECISION>` (e.g. ..._LINEAR_BF16=0.4; precisions bf16, fp16, tf32, ieee)
sets one precision and wins over the op-wide one. See the README's "Backend" section.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

# Live-tile fraction at or above which the dense op runs. `fastticket bench` measures the crossover;
# these defaults must be replaced by measured values (see README), they are not tuned yet.
# "linear" here is the grouped (stacked-arms) kernels' threshold and the fallback when no precision is known.
# conv2d is 0.0 (every layer to cuDNN) until a GPU measures a crossover: compiled offline for sm_90, the
# implicit-GEMM kernels are predicted to lose to cuDNN at every density above ~5% live (no async copies
# for the gathers, scalar NCHW stores, atomics in dX), and "never slower than dense" comes first.
# `fastticket bench --suite conv` still times the tile-skipping path (forced with ..._CONV2D=1.01).
DENSE_THRESHOLDS = {"linear": 0.5, "conv2d": 0.0}

# One-arm linear kernels, per compute precision: PREDICTED crossovers (issue 22's roofline from the sm_90
# compile, H100, 4096 x 4096, 8192 tokens, block-64 masks: ~0.35-0.45 live for bf16 / fp16 and TF32, ~0.2-0.3
# for IEEE fp32, whose kernels run FMA against cuBLAS's FMA), each set at the low end of its range so that a
# path no GPU has measured faster is not the default ("never slower than dense"). No GPU has measured them.
PRECISION_THRESHOLDS = {("linear", "bf16"): 0.35, ("linear", "fp16"): 0.35, ("linear", "tf32"): 0.35,
                        ("linear", "ieee"): 0.25}
PRECISIONS = ("bf16", "fp16", "tf32", "ieee")


def _env_threshold(name: str) -> Optional[float]:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number: set it to a live-tile fraction such as 0.4") from None


def _override_names(op: str, precision: Optional[str]) -> Tuple[str, ...]:
    """The environment variables that override `op`'s threshold for `precision`, the one that wins first."""
    op_wide = f"FASTTICKET_DENSE_THRESHOLD_{op.upper()}"
    return (op_wide,) if precision is None else (f"{op_wide}_{precision.upper()}", op_wide)


def dense_threshold(op: str, precision: Optional[str] = None) -> float:
    """The live-tile fraction at or above which `op` runs dense, for `precision` (bf16 / fp16 / tf32 / ieee,
    None for the op-wide value): the per-precision override, else the op override, else the defaults."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for name in _override_names(op, precision):
        value = _env_threshold(name)
        if value is not None:
            return value
    return PRECISION_THRESHOLDS.get((op, precision), DENSE_THRESHOLDS[op])


# What the one-arm tile kernels compute in (their dots run in fp32 or tensor-core precisions): a float64 layer
# takes the dense op, which is exact under the invariant, instead of silently losing precision. (The grouped
# kernels of kernels/grouped_linear.py accumulate float64 in float64 and do not pass a dtype.)
TILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def compute_precision(dtype: torch.dtype, library: str = "matmul") -> str:
    """The precision the one-arm kernels would compute `dtype` inputs in: bf16 / fp16, or for fp32 "tf32" or
    "ieee" after torch's TF32 switch of `library` (as the kernels and cuBLAS / cuDNN read it at launch)."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    from fastticket.kernels._common import tf32_enabled
    return "tf32" if tf32_enabled(library) else "ieee"


def threshold_overridden(op: str, precision: Optional[str] = None) -> bool:
    """Whether FASTTICKET_DENSE_THRESHOLD_<OP> (or its <PRECISION> variant) is set: someone asked for this op's
    split by hand (a benchmark forcing one path), so rules that would otherwise keep a layer dense step aside."""
    return any(name in os.environ for name in _override_names(op, precision))


# 16-bit rows (the forward's reduction, in_features) not a multiple of this many elements compile for sm_90 with
# no async copies and no pipelining: the masks' bound K is not known divisible by 16, so no load vectorises
# (compiled offline, triton 3.8: the bf16 forward at K = 296, 300 or 100 holds 0 buffers and 161 registers,
# at K = 304 4 buffers with 16-byte cp.async and 93 registers; fp32 keeps its 3 buffers either way).
PIPELINE_ROW_MULTIPLE = 16


def use_tile_skipping(live_fraction: float, op: str, dtype: Optional[torch.dtype] = None,
                      row_elements: Optional[int] = None, cuda: bool = False) -> bool:
    """True when the tile-skipping kernel should run for a layer whose live-tile fraction is given (and, with
    `dtype`, whose inputs the one-arm kernels compute in: that also picks the per-precision threshold).

    `row_elements` (the reduction length K of the forward) with `cuda`: a 16-bit layer whose K is not a multiple
    of PIPELINE_ROW_MULTIPLE runs dense on a GPU, where its kernels would run unpipelined against cuBLAS (never
    slower than dense), unless a threshold override asks for the kernels."""
    if dtype is not None and dtype not in TILE_DTYPES:
        return False
    precision = None
    if dtype is not None and any(key[0] == op for key in PRECISION_THRESHOLDS):
        precision = compute_precision(dtype, "cudnn" if op == "conv2d" else "matmul")
    if (cuda and row_elements is not None and row_elements % PIPELINE_ROW_MULTIPLE
            and dtype in (torch.float16, torch.bfloat16) and not threshold_overridden(op, precision)):
        return False
    return live_fraction < dense_threshold(op, precision)
