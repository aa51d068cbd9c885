"""Optimizer-step benchmarks (pytest-benchmark): fastticket's masked step vs torch.optim, and the dW+update
fusion. The same cases as `fastticket bench optim` (fastticket.app.bench.optim.step_grid / dw_grid); skipped
without CUDA (conftest).

Each benchmark's group is one (set, optimizer, mask, density) or (fusion shape, mask, density), so
`--benchmark-group-by=group` lines the implementations up; `extra_info` carries the do_bench median and, for
fastticket, the bytes the fused step moves and its parity against float64, which must be within the fp32
tolerance (TF32 for a fusion run under TF32 matmuls).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from fastticket.app.bench import optim as suite
from fastticket.app.bench import options_from_env
from fastticket.sparse.testing import parity_tolerance

OPTIONS = options_from_env()
SETS, STEP_CASES = suite.step_grid(OPTIONS)
DW_CASES, DW_MASKS = suite.dw_grid(OPTIONS)

_benches: dict = {}


def get_bench(key, build):
    """One bench in memory at a time: the 1B set with state is tens of GB."""
    if key not in _benches:
        _benches.clear()
        torch.cuda.empty_cache()
        _benches[key] = build()
    return _benches[key]


STEP_PARAMS = [pytest.param(s, k, m, d, i, id=f"{s.name}-{k}-{m}-d{d}-{i}")
               for s, k, (m, d), i in itertools.product(SETS, ("sgd", "adam"), STEP_CASES, suite.STEP_IMPLS)]


@pytest.mark.parametrize("pset,kind,mask,density,impl", STEP_PARAMS)
def test_optimizer_step(timed_benchmark, benchmark, pset, kind, mask, density, impl):
    from fastticket.sparse.backend import use_backend

    bench = get_bench(("step", pset.name, mask, density),
                      lambda: suite.StepBench(pset, mask, density, torch.device("cuda")))
    benchmark.group = f"{pset.name}-{kind}-{mask}-d{density}"
    with use_backend("triton"):
        if impl == "fastticket":
            benchmark.extra_info["bytes"] = bench.bytes_moved(kind)
            parity = bench.parity(kind)
            benchmark.extra_info["parity"] = parity
            assert parity <= parity_tolerance("fp32"), f"parity {parity}"
        fn, opt = bench.implementation(kind, impl)
        fn()  # state allocation outside the timed region
        timed_benchmark(fn)
    del fn, opt


@pytest.mark.parametrize("pset", SETS, ids=lambda s: s.name)
def test_copy_bandwidth(timed_benchmark, benchmark, pset):
    """The copy whose bandwidth is the reference of the step rows' bw_fraction: it must copy, at a real rate."""
    ms, gbs = suite.copy_bandwidth_gbs(pset.numel, torch.device("cuda"))
    benchmark.extra_info.update(copy_bandwidth_ms=ms, gbs=gbs)
    assert ms > 0 and 0 < gbs < float("inf")
    src = torch.randn(pset.numel, device="cuda")
    dst = torch.empty_like(src)
    timed_benchmark(lambda: dst.copy_(src))
    assert torch.equal(dst, src)


DW_PARAMS = [pytest.param(c, m, d, i, id=f"{c[0]}-{m}-d{d}-{i}")
             for c, (m, d), i in itertools.product(DW_CASES, DW_MASKS, suite.DW_IMPLS)]


@pytest.mark.parametrize("case,mask,density,impl", DW_PARAMS)
def test_dw_update_fusion(timed_benchmark, benchmark, case, mask, density, impl):
    name, m, n, k = case
    bench = get_bench(("dw", name, mask, density),
                      lambda: suite.DwUpdateBench(m, n, k, mask, density, torch.device("cuda")))
    benchmark.group = f"dw+sgd.{name}-{mask}-d{density}"
    benchmark.extra_info["live_fraction"] = bench.tile_map.live_fraction
    if impl == "fastticket-fused":
        parity = bench.parity()
        benchmark.extra_info["parity"] = parity
        assert parity <= parity_tolerance(bench.precision), f"parity {parity}"
    fn = bench.implementation(impl)
    fn()  # state allocation outside the timed region
    timed_benchmark(fn)
