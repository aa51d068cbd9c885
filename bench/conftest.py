"""pytest-benchmark suites: `pytest bench/` on a machine with a CUDA GPU (not part of CI).

Without CUDA every benchmark is skipped with a reason: a CPU time of a kernel run in the Triton interpreter
says nothing about the GPU, and DESIGN.md section 8 forbids reporting it. Parity on CPU is covered by
tests/ and by `fastticket bench` (which prints parity without timings).

FASTTICKET_BENCH_QUICK=1 limits the suites to a small subset (a smoke run of the harness on a GPU).
"""
from __future__ import annotations

import contextlib
import itertools
import os
from typing import Callable, Optional

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
QUICK = os.environ.get("FASTTICKET_BENCH_QUICK", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU; on CPU run `fastticket bench` for parity only")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_dtype() -> torch.dtype:
    """FASTTICKET_BENCH_DTYPE=bf16|fp16|fp32|tf32 (default bf16, the precision the targets are stated in)."""
    from fastticket.bench import parse_dtype

    name = os.environ.get("FASTTICKET_BENCH_DTYPE", "bf16")
    if name.lower() == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    return parse_dtype(name)


@pytest.fixture
def layer_op_benchmark(benchmark):
    """Time one implementation of a linear / conv layer benchmark (test_bench_linear.py, test_bench_conv.py).

    Returns run(layer, fn, op, grads, forced_skip, group, record): under `forced_skip()` (or as is when None),
    times op "fwd" (fn(x)), "bwd" (the graphs built once, `grads(y, layer, x, g, retain=True)` timed alone) or
    "fwd+bwd" over the layer's rotated (x, g) input sets: sets the benchmark group to `group`, records the
    do_bench median (the number the results tables use), calls `record()` (more extra_info, parity
    assertions), then runs pytest-benchmark. Timed calls end with torch.cuda.synchronize() so its wall-clock timer sees the GPU work.
    """

    def run(layer, fn: Callable, op: str, grads: Callable, forced_skip: Optional[Callable], group: str,
            record: Callable[[], None]) -> None:
        from fastticket.bench import time_ms

        sets = list(zip(layer.xs, layer.gs))
        with (forced_skip or contextlib.nullcontext)():
            if op == "fwd":
                def step(x, g):
                    return fn(x)
            elif op == "bwd":
                ys = {id(x): fn(x) for x, _ in sets}  # graphs built once, backward timed with retain_graph

                def step(x, g):
                    return grads(ys[id(x)], layer, x, g, retain=True)
            else:
                def step(x, g):
                    return grads(fn(x), layer, x, g, retain=False)

            cycle = itertools.cycle(sets)

            def timed():
                step(*next(cycle))
                torch.cuda.synchronize()

            benchmark.group = group
            benchmark.extra_info["do_bench_median_ms"] = time_ms(step, sets)
            record()
            benchmark.pedantic(timed, warmup_rounds=5, rounds=30, iterations=1)

    return run
