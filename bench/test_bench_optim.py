"""Optimizer-step benchmarks (pytest-benchmark): fastticket's masked step vs torch.optim, and the dW+update
fusion. The same cases as `fastticket bench optim` (fastticket.bench.optim); skipped without CUDA (conftest).

Each benchmark's group is one (set, optimizer, mask, density), so `--benchmark-group-by=group` lines the
implementations up; `extra_info` carries the do_bench median, the bytes the fused step moves and its parity
against float64. Timed calls end with torch.cuda.synchronize() so pytest-benchmark's timer sees the GPU work.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from fastticket.bench import optim as suite
from fastticket.bench import time_ms

QUICK = os.environ.get("FASTTICKET_BENCH_QUICK", "0") not in ("", "0")
SETS = [suite.vgg19_set()] if QUICK else [suite.vgg19_set(), suite.synthetic_set()]
DENSITIES = (1.0, 0.1) if QUICK else suite.DENSITIES
IMPLS = ("fastticket", "torch-fused", "torch-fused+mask", "torch-foreach+mask")

_benches: dict = {}


def get_bench(pset, mask, density):
    key = (pset.name, mask, density)
    if key not in _benches:
        _benches.clear()  # one set in memory at a time: the 1B set with state is tens of GB
        torch.cuda.empty_cache()
        _benches[key] = suite.StepBench(pset, mask, density, torch.device("cuda"))
    return _benches[key]


STEP_PARAMS = [pytest.param(s, k, m, d, i, id=f"{s.name}-{k}-{m}-d{d}-{i}")
               for s, k, m, d, i in itertools.product(SETS, ("sgd", "adam"), suite.MASKS, DENSITIES, IMPLS)
               if d < 1.0 or m == suite.MASKS[0]]


@pytest.mark.parametrize("pset,kind,mask,density,impl", STEP_PARAMS)
def test_optimizer_step(benchmark, pset, kind, mask, density, impl):
    from fastticket.backend import use_backend

    bench = get_bench(pset, mask, density)
    benchmark.group = f"{pset.name}-{kind}-{mask}-d{density}"
    with use_backend("triton"):
        if impl == "fastticket":
            fn, opt = bench.fastticket(kind)
            benchmark.extra_info["bytes"] = bench.bytes_moved(kind)
            benchmark.extra_info["parity"] = bench.parity(kind)
        else:
            mode = "fused" if impl.startswith("torch-fused") else "foreach"
            fn, opt = bench.torch_step(kind, mode, mask=impl.endswith("+mask"))
        fn()
        benchmark.extra_info["do_bench_ms"] = time_ms(fn)

        def timed():
            fn()
            torch.cuda.synchronize()

        benchmark(timed)
    del fn, opt


@pytest.mark.parametrize("impl", ["copy"])
@pytest.mark.parametrize("pset", SETS, ids=lambda s: s.name)
def test_copy_bandwidth(benchmark, pset, impl):
    ms, gbs = suite.copy_bandwidth_gbs(pset.numel, torch.device("cuda"))
    benchmark.extra_info.update(do_bench_ms=ms, gbs=gbs)
    src = torch.empty(pset.numel, device="cuda")
    dst = torch.empty_like(src)

    def timed():
        dst.copy_(src)
        torch.cuda.synchronize()

    benchmark(timed)


@pytest.mark.parametrize("density", (1.0, 0.1))
def test_dw_update_fusion(benchmark, density):
    from fastticket.bench import BenchOptions

    rows = suite._dw_rows(BenchOptions(quick=False), [("fc4096.b4k", 4096, 4096, 4096)], (density,),
                          ("block:64x64",))
    benchmark.extra_info.update({k: v for k, v in rows[0].times_ms.items()})
    benchmark.extra_info["parity"] = rows[0].parity
    benchmark(lambda: None)  # the numbers are the do_bench medians in extra_info
