"""Linear-layer benchmarks (pytest-benchmark): fastticket vs dense cuBLAS, prune-style and torch BSR.

The same cases as `fastticket bench linear` (fastticket.bench.linear). Each benchmark's group is one
(case, mask, density, op), so `pytest bench/ --benchmark-group-by=group` lines the implementations up;
`extra_info` carries the do_bench median (the number the results tables use), the live-tile fraction and
the parity of fastticket against the float64 reference. Timed calls end with torch.cuda.synchronize() so
pytest-benchmark's wall-clock timer sees the GPU work.
"""
from __future__ import annotations

import itertools
import os
import zlib

import pytest
import torch

from fastticket.bench import linear as suite

HAS_CUDA = torch.cuda.is_available()
QUICK = os.environ.get("FASTTICKET_BENCH_QUICK", "0") not in ("", "0")

if QUICK:
    CASES = suite.quick_gpu_cases()
    MASKS = ("element", "block:64x64")
    DENSITIES = (1.0, 0.5, 0.1)
else:
    CASES = suite.full_cases()
    MASKS = suite.GPU_MASKS
    DENSITIES = suite.DENSITIES
IMPLS = ("dense", "fastticket", "fastticket-skip", "prune", "bsr")

_layers: dict = {}


def get_layer(case, mask, density, dtype):
    """Layers are built once per (case, mask, density, dtype) and shared by the implementations."""
    key = (case.name, mask, density, dtype)
    if key not in _layers:
        _layers.clear()  # one large layer at a time: the 8K-token inputs are ~200 MB per set
        if HAS_CUDA:
            torch.cuda.empty_cache()
        seed = zlib.crc32(repr(key).encode()) & 0xFFFF
        _layers[key] = suite.BenchLayer(case, mask, density, dtype, torch.device("cuda"), seed=seed)
    return _layers[key]


PARAMS = [pytest.param(c, m, d, op, impl, id=f"{c.name}-{m}-d{d}-{op}-{impl}")
          for c, m, d, op, impl in itertools.product(CASES, MASKS, DENSITIES, suite.OPS, IMPLS)]


@pytest.mark.parametrize("case,mask,density,op,impl", PARAMS)
def test_linear(layer_op_benchmark, benchmark, bench_dtype, case, mask, density, op, impl):
    layer = get_layer(case, mask, density, bench_dtype)
    if impl == "bsr":
        if op != "fwd":
            pytest.skip("torch has no gradient for a BSR weight")
        fn, note = layer.bsr_forward()
        if fn is None:
            pytest.skip(note)
    else:
        fn = {"dense": layer.dense, "prune": layer.prune, "fastticket": layer.fastticket,
              "fastticket-skip": layer.fastticket}[impl]

    def record():
        benchmark.extra_info["live_fraction"] = suite._live_fraction(layer, torch.device("cuda"), bench_dtype)
        if impl.startswith("fastticket"):
            parity = suite._parity(layer, bench_dtype)["skip" if impl == "fastticket-skip" else "dispatch"][op]
            benchmark.extra_info["parity"] = parity
            assert parity < (1e-5 if bench_dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
                             else 1e-3 if bench_dtype == torch.float32 else 1e-2), f"parity {parity}"

    layer_op_benchmark(layer, fn, op, suite._grads, suite.forced_skip if impl == "fastticket-skip" else None,
                       f"{case.name} {mask} d={density} {op}", record)
