"""The search bench's LeNet cases with the stacked step captured as a CUDA graph (`--cuda-graph`) against eager.

One arm and K = 8 LeNet-300-100 arms, each as the stacked engine the search uses, with MaskedSGD (momentum
0.9: the optimizer fastticket/lottery/cuda_graph.py captures), the same starting weights and masks on both
sides. Rows: iterations/s eager and graphed, their ratio (the median of back-to-back pairs, as the search
bench), parity (the arms' parameters after the timed steps, graphed against eager: the graph must give
eager's numbers), and the mode the graphed engine ran in ("cuda_graph", or "eager: <why>": on a CPU this
is the eager path twice, which the rehearsal exercises). Run by the GPU session's `search-cuda-graph` step.
"""
from __future__ import annotations

from typing import List

import torch

from fastticket.app.bench import BenchOptions, BenchRow
from fastticket.app.bench.search import ARMS, BATCH, _arm, _seconds, _synthetic
from fastticket.lottery.config import SearchConfig
from fastticket.lottery.engine import Engine
from fastticket.sparse.testing import rel_error

__all__ = ["graph_rows"]


def _case(k: int, data, device: torch.device, steps: int, repeats: int) -> BenchRow:
    config = SearchConfig(model="lenet300", batch_size=BATCH, optimizer="sgd", momentum=0.9, lr=0.05)
    engines = {}
    for graphed in (False, True):
        pairs = [_arm(config, data, seed, device) for seed in range(k)]
        engines[graphed] = Engine(config.replace(cuda_graph=graphed), [j for j, _ in pairs],
                                  [s for _, s in pairs], data, stacked=True)
    acc = torch.zeros(k, dtype=torch.float64, device=device)

    def run(engine):
        return lambda it: acc.add_(engine.step(it))

    (t_eager, t_graph), speedup = _seconds([run(engines[False]), run(engines[True])], steps, device, repeats)
    # Both engines took the same iterations (the same batches), so their parameters must agree.
    parity = max(rel_error(a.double(), b.double()) for a, b in zip(engines[True].params, engines[False].params))
    mode = engines[True].step_mode
    return BenchRow(suite="search-cuda-graph", case=f"{k} arm{'s' if k > 1 else ''} lenet300",
                    op="train step (all arms)", shape=f"K={k} B={BATCH}", dtype="fp32", mask="element 50%",
                    density=0.5, times_ms={"eager": t_eager * 1e3, "cuda graph": t_graph * 1e3},
                    ratio_vs_dense={"cuda graph": speedup}, parity=parity,
                    extra={"iters_per_s": {"eager": 1 / t_eager, "cuda graph": 1 / t_graph}, "step_mode": mode,
                           "summary": f"search --cuda-graph: {k} lenet300 arm(s) run {speedup:.2f}x eager's "
                                      f"iterations/s ({1 / t_graph:.0f} vs {1 / t_eager:.0f} it/s, "
                                      f"{device.type}; {mode})"})


def graph_rows(options: BenchOptions) -> List[BenchRow]:
    device = options.torch_device
    steps, repeats = (10, 3) if options.quick else (50, 9)
    mnist = _synthetic((1, 28, 28), 3500, device)
    return [_case(1, mnist, device, steps, repeats), _case(ARMS, mnist, device, steps, repeats)]
