"""Linear-layer benchmarks (pytest-benchmark): fastticket vs dense cuBLAS, prune-style and torch BSR.

The same cases as `fastticket bench linear` (fastticket.app.bench.linear.grid). Each benchmark's group is one
(case, mask, density, op), so `pytest bench/ --benchmark-group-by=group` lines the implementations up;
`extra_info` carries the do_bench median (the number the results tables use), the live-tile fraction and,
for fastticket, its parity against the float64 reference, which must be within the precision's tolerance.
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from fastticket.app.bench import linear as suite
from fastticket.app.bench import options_from_env
from fastticket.sparse.testing import parity_tolerance

OPTIONS = options_from_env()
CASES, MASKS, DENSITIES = suite.grid(OPTIONS)
IMPLS = ("dense", "fastticket", "fastticket-skip", "prune", "bsr")

_layers: dict = {}


@pytest.fixture(scope="module", autouse=True)
def matmul_precision(bench_options):
    """FASTTICKET_BENCH_DTYPE=tf32 means TF32 matmuls (float32 storage) for every implementation."""
    with suite.tf32(bench_options.dtype == "tf32"):
        yield


def get_layer(case, mask, density, dtype):
    """Layers are built once per (case, mask, density, dtype) and shared by the implementations."""
    key = (case.name, mask, density, dtype)
    if key not in _layers:
        _layers.clear()  # one large layer at a time: the 8K-token inputs are ~200 MB per set
        torch.cuda.empty_cache()
        seed = zlib.crc32(repr(key).encode()) & 0xFFFF
        _layers[key] = suite.BenchLayer(case, mask, density, dtype, torch.device("cuda"), seed=seed)
    return _layers[key]


PARAMS = [pytest.param(c, m, d, op, impl, id=f"{c.name}-{m}-d{d}-{op}-{impl}")
          for c, m, d, op, impl in itertools.product(CASES, MASKS, DENSITIES, suite.OPS, IMPLS)
          if impl != "bsr" or op == "fwd"]  # torch has no gradient for a BSR weight


@pytest.mark.parametrize("case,mask,density,op,impl", PARAMS)
def test_linear(layer_op_benchmark, benchmark, bench_options, bench_dtype, case, mask, density, op, impl):
    layer = get_layer(case, mask, density, bench_dtype)
    if impl == "bsr":
        fn, note = layer.bsr_forward()
        if fn is None:
            pytest.skip(note)
    else:
        fn = {"dense": layer.dense, "prune": layer.prune, "fastticket": layer.fastticket,
              "fastticket-skip": layer.fastticket}[impl]

    def record():
        benchmark.extra_info["live_fraction"] = suite.live_fraction(layer)
        if impl.startswith("fastticket"):
            parity = suite.parity(layer)["skip" if impl == "fastticket-skip" else "dispatch"][op]
            benchmark.extra_info["parity"] = parity
            assert parity <= parity_tolerance(bench_options.dtype), f"parity {parity}"

    layer_op_benchmark(layer, fn, op, suite.forced_skip if impl == "fastticket-skip" else None,
                       f"{case.name} {mask} d={density} {op}", record)
