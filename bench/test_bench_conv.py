"""Conv2d benchmarks (pytest-benchmark): fastticket's masked Conv2d vs dense cuDNN and the prune-style path.

The same cases as `fastticket bench conv` (fastticket.app.bench.conv.grid): conv layers of Conv-6, VGG-19 and
ResNet-20 on CIFAR-10 inputs and an ImageNet-sized layer, fwd / bwd / fwd+bwd, element and block:64x64
masks. Each benchmark's group is one (case, mask, density, op), so
`pytest bench/test_bench_conv.py --benchmark-group-by=group` lines the implementations up; `extra_info`
carries the do_bench median (the number the results tables use), the live-tile fraction and, for
fastticket, its parity against the float64 reference, which must be within the precision's tolerance.
Skipped without CUDA (bench/conftest.py).
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from fastticket.app.bench import conv as suite
from fastticket.app.bench import options_from_env
from fastticket.sparse.testing import parity_tolerance

OPTIONS = options_from_env()
CASES, MASKS, DENSITIES = suite.grid(OPTIONS)
IMPLS = ("dense", "fastticket", "fastticket-skip", "prune")

_layers: dict = {}


@pytest.fixture(scope="module", autouse=True)
def conv_precision(bench_options):
    """FASTTICKET_BENCH_DTYPE=tf32 means TF32 convolutions: cuDNN's flag, which the kernels follow too."""
    with suite.tf32(bench_options.dtype == "tf32"):
        yield


def get_layer(case, mask, density, dtype):
    """Layers are built once per (case, mask, density, dtype) and shared by the implementations."""
    key = (case.name, mask, density, dtype)
    if key not in _layers:
        _layers.clear()  # one layer at a time: the ImageNet-sized inputs are ~400 MB per set in fp32
        torch.cuda.empty_cache()
        _layers[key] = suite.BenchLayer(case, mask, density, dtype, torch.device("cuda"),
                                        seed=zlib.crc32(repr(key).encode()) & 0xFFFF)
    return _layers[key]


PARAMS = [pytest.param(c, m, d, op, impl, id=f"{c.name}-{m}-d{d}-{op}-{impl}")
          for c, m, d, op, impl in itertools.product(CASES, MASKS, DENSITIES, suite.OPS, IMPLS)]


@pytest.mark.parametrize("case,mask,density,op,impl", PARAMS)
def test_conv(layer_op_benchmark, benchmark, bench_options, bench_dtype, case, mask, density, op, impl):
    layer = get_layer(case, mask, density, bench_dtype)
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
