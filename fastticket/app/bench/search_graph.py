"""The search bench's LeNet cases with the stacked step captured as a CUDA graph (`--cuda-graph`) against eager.

One arm and K = 8 LeNet-300-100 arms, each as the stacked engine the search uses, with MaskedSGD (momentum
0.9) and with MaskedAdam (the optimizer most searches train with), the same starting weights and masks on
both sides, and an lr that moves every step (a schedule: the graph-safe step reads it on the device, so the
graph is captured once, never again; the row's `captures` says so). Rows: iterations/s eager and graphed,
their ratio (the median of back-to-back pairs, as the search bench), parity (the arms' parameters after the
timed steps, graphed against eager: the graph must give eager's numbers), and the mode the graphed engine
ran in ("cuda_graph", or "eager: <why>": on a CPU this is the eager path twice, which the rehearsal
exercises). Run by the GPU session's `search-cuda-graph` step.
"""
from __future__ import annotations

from typing import Iterator, List

import torch

from fastticket.app.bench import BenchOptions, BenchRow
from fastticket.app.bench.search import ARMS, BATCH, _arm, _seconds, _synthetic
from fastticket.lottery.config import SearchConfig
from fastticket.lottery.engine import Engine
from fastticket.sparse.testing import rel_error

__all__ = ["graph_rows", "iter_graph_rows", "OPTIMIZERS"]

# The optimizers timed, as a search configures them: SGD with momentum, and Adam at its usual lr.
OPTIMIZERS = {"sgd": dict(optimizer="sgd", momentum=0.9, lr=0.05), "adam": dict(optimizer="adam", lr=1e-3)}
LR_DECAY = 0.999  # per step: every step has another lr, as under a schedule


def _case(k: int, optimizer: str, data, device: torch.device, steps: int, repeats: int) -> BenchRow:
    config = SearchConfig(model="lenet300", batch_size=BATCH, **OPTIMIZERS[optimizer])
    engines = {}
    for graphed in (False, True):
        pairs = [_arm(config, data, seed, device) for seed in range(k)]
        engines[graphed] = Engine(config.replace(cuda_graph=graphed), [j for j, _ in pairs],
                                  [s for _, s in pairs], data, stacked=True)
    acc = torch.zeros(k, dtype=torch.float64, device=device)

    def run(engine):
        def one(it: int) -> None:
            engine.set_lr(config.lr * LR_DECAY ** it)
            acc.add_(engine.step(it))
        return one

    (t_eager, t_graph), speedup = _seconds([run(engines[False]), run(engines[True])], steps, device, repeats)
    # Both engines took the same iterations (the same batches and lrs), so their parameters must agree.
    parity = max(rel_error(a.double(), b.double()) for a, b in zip(engines[True].params, engines[False].params))
    mode = engines[True].step_mode
    graphed = engines[True].graphed
    captures = graphed.captures if graphed is not None else 0
    name = type(engines[True].optimizer).__name__
    return BenchRow(suite="search-cuda-graph", case=f"{k} arm{'s' if k > 1 else ''} lenet300 {optimizer}",
                    op=f"train step (all arms), {name}", shape=f"K={k} B={BATCH}", dtype="fp32",
                    mask="element 50%", density=0.5, times_ms={"eager": t_eager * 1e3, "cuda graph": t_graph * 1e3},
                    ratio_vs_dense={"cuda graph": speedup}, parity=parity,
                    extra={"iters_per_s": {"eager": 1 / t_eager, "cuda graph": 1 / t_graph}, "step_mode": mode,
                           "optimizer": name, "captures": captures, "lr_schedule": f"x{LR_DECAY} per step",
                           "summary": f"search --cuda-graph, {name}: {k} lenet300 arm(s) run {speedup:.2f}x "
                                      f"eager's iterations/s ({1 / t_graph:.0f} vs {1 / t_eager:.0f} it/s, "
                                      f"{device.type}; {mode}; {captures} capture(s) under an lr schedule)"})


def iter_graph_rows(options: BenchOptions) -> Iterator[BenchRow]:
    """The rows one case at a time (the session writes each as it comes: a deadline keeps the earlier ones),
    the stacked K arms first (a search's case), Adam first (never measured in a graph before)."""
    device = options.torch_device
    steps, repeats = (10, 3) if options.quick else (50, 9)
    mnist = _synthetic((1, 28, 28), 3500, device)
    for k in (ARMS, 1):
        for optimizer in ("adam", "sgd"):
            yield _case(k, optimizer, mnist, device, steps, repeats)


def graph_rows(options: BenchOptions) -> List[BenchRow]:
    return list(iter_graph_rows(options))
