"""Per-layer choice between the dense vendor op (cuBLAS / cuDNN) and the tile-skipping Triton kernels.

Under the zero invariant the dense op is exact, so the only question is speed: above a live-tile fraction
the dense op wins. The thresholds live here, one per op, so every kernel reads the same numbers;
`FASTTICKET_DENSE_THRESHOLD_<OP>` (e.g. ..._LINEAR=0.6) overrides one for experiments and benchmarks.
See the README's "Backend" section for how the values were chosen.
"""
from __future__ import annotations

import os

# Live-tile fraction at or above which the dense op runs. `fastticket bench` measures the crossover;
# these defaults must be replaced by measured values (see README), they are not tuned yet.
DENSE_THRESHOLDS = {"linear": 0.5, "conv2d": 0.5}


def dense_threshold(op: str) -> float:
    value = os.environ.get(f"FASTTICKET_DENSE_THRESHOLD_{op.upper()}")
    if value is None:
        return DENSE_THRESHOLDS[op]
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"FASTTICKET_DENSE_THRESHOLD_{op.upper()}={value!r} is not a number") from None


def use_tile_skipping(live_fraction: float, op: str) -> bool:
    """True when the tile-skipping kernel should run for a layer whose live-tile fraction is given."""
    return live_fraction < dense_threshold(op)
