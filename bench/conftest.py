"""pytest-benchmark suites: `pytest bench/` on a machine with a CUDA GPU (not part of CI).

Without CUDA every benchmark is skipped with a reason: a CPU time of a kernel run in the Triton interpreter
says nothing about the GPU and is never reported. Parity on CPU is covered by tests/ and by
`fastticket bench` (which prints parity without timings).

The suites take their cases from the library's suites (fastticket.app.bench.linear / conv / optim: `grid`,
`step_grid`, `dw_grid`), their options from `fastticket.app.bench.options_from_env()` (FASTTICKET_BENCH_QUICK=1:
the small grid; FASTTICKET_BENCH_DTYPE=bf16|fp16|fp32|tf32) and their do_bench medians from
`fastticket.app.bench.time_ms`, so `fastticket bench` and `pytest bench/` measure the same work the same way.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional

import pytest
import torch

from fastticket.app.bench import BenchOptions, op_step, options_from_env, rotating, time_ms

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU; on CPU run `fastticket bench` for parity only")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_options() -> BenchOptions:
    """The run's options (quick, dtype name) from the environment."""
    return options_from_env()


@pytest.fixture(scope="session")
def bench_dtype(bench_options) -> torch.dtype:
    """The storage dtype of the layer benchmarks ("tf32" is float32 storage; the suites' `tf32` switches the
    matmul / convolution flags)."""
    return bench_options.torch_dtype


def synchronized(call: Callable[[], Any]) -> Callable[[], None]:
    """`call` followed by torch.cuda.synchronize(), so pytest-benchmark's wall-clock timer sees the GPU work."""

    def timed() -> None:
        call()
        torch.cuda.synchronize()

    return timed


@pytest.fixture
def timed_benchmark(benchmark):
    """run(fn, inputs=None): record fastticket.app.bench.time_ms(fn, inputs) (the number the results tables use) as
    extra_info["do_bench_ms"] (it must be a positive, finite time), then let pytest-benchmark time the same
    rotating call, synchronized. Returns the do_bench median."""

    def run(fn: Callable[..., Any], inputs=None) -> float:
        ms = time_ms(fn, inputs)
        benchmark.extra_info["do_bench_ms"] = ms
        assert math.isfinite(ms) and ms > 0, f"do_bench returned {ms} ms"
        benchmark.pedantic(synchronized(rotating(fn, inputs)), warmup_rounds=5, rounds=30, iterations=1)
        return ms

    return run


@pytest.fixture
def layer_op_benchmark(benchmark, timed_benchmark):
    """Time one implementation of a linear / conv layer benchmark (test_bench_linear.py, test_bench_conv.py).

    run(layer, fn, op, forced_skip, group, record): under `forced_skip()` (or as is when None), builds the
    op's work with fastticket.app.bench.op_step ("fwd": fn(x); "bwd": the graphs built once, `layer.grads` timed
    alone; "fwd+bwd": both) over the layer's rotated (x, g) input sets, sets the benchmark group to `group`,
    calls `record()` (more extra_info, parity assertions), then times it (`timed_benchmark`).
    """

    def run(layer, fn: Callable, op: str, forced_skip: Optional[Callable], group: str,
            record: Callable[[], None]) -> None:
        sets = list(zip(layer.xs, layer.gs))
        with (forced_skip or contextlib.nullcontext)():
            step = op_step(op, fn, sets, layer.grads)
            benchmark.group = group
            record()
            timed_benchmark(step, sets)

    return run
