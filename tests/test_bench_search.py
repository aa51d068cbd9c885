"""The `search` bench suite: registered, CPU-timed rows with parity, on tiny settings (speed is never
asserted here; `fastticket bench --suite search` measures it)."""
import pytest
import torch

from fastticket.app import bench
from fastticket.app.bench import search as search_bench

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_search_suite_times_one_arm_and_batched_arms_on_cpu(monkeypatch):
    monkeypatch.setattr(search_bench, "ARMS", 2)
    monkeypatch.setattr(search_bench, "BATCH", 8)
    assert bench.SUITES["search"] is search_bench.search_suite and "search" in bench.KNOWN_SUITES
    device = torch.device("cpu")
    data = search_bench._synthetic((1, 28, 28), 64, device)
    one = search_bench._one_arm("lenet300", data, device, steps=2, repeats=1)
    k = search_bench._k_arms("lenet300", data, device, steps=2, repeats=1)
    for row in (one, k):
        assert row.suite == "search" and all(t > 0 for t in row.times_ms.values()) and len(row.times_ms) == 2
        assert "summary" in row.extra
    assert one.parity == 0.0  # same weights, same batch: the masked arm and the plain model agree exactly
    assert k.parity < 1e-5    # first-step losses, batched vs one at a time (fp32 rounding)


def test_block_row_prunes_whole_tiles_and_keeps_parity(monkeypatch):
    """Row (d) (timed on CUDA only, where the triton backend runs the grouped tile-skipping launch): its arms'
    hidden layers hold whole dead 64 x 64 tiles, the output layer an element mask; batched and one-at-a-time
    agree on the first step. Here on the CPU's torch backend, at tiny settings."""
    from fastticket.lottery.config import SearchConfig
    from fastticket.kernels.tile_map import build_tile_map
    from fastticket.sparse.nn import masked_modules

    monkeypatch.setattr(search_bench, "ARMS", 2)
    monkeypatch.setattr(search_bench, "BATCH", 8)
    device = torch.device("cpu")
    data = search_bench._synthetic((1, 28, 28), 64, device)
    job, _ = search_bench._arm(SearchConfig(model="lenet300"), data, 0, device, block=True)
    fractions = [build_tile_map(layer.weight_mask, 64, 64).live_fraction for _, layer in masked_modules(job.model)]
    assert all(f < 0.5 for f in fractions[:-1]) and fractions[-1] == 1.0
    row = search_bench._k_arms("lenet300", data, device, steps=1, repeats=1, block=True)
    assert row.case == "2 arms lenet300 block" and row.parity < 1e-5
