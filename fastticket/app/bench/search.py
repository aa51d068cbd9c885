"""`fastticket bench --suite search`: the search's training loop against plain PyTorch, and batched arms.

(a) one arm: iterations/s of the search's one-arm step (masked model, masked Adam, the loop's device-side loss
    accumulation) against a plain PyTorch loop of the same model (nn.Linear/nn.Conv2d, torch.optim.Adam) on the
    same batches;
(b) K = 8 LeNet-300-100 arms as one stacked model (fastticket.lottery.batched) against the same 8 arms one at a time;
(c) the same for Conv-2 on CIFAR-shaped synthetic data;
(d) on CUDA only: (b) with block masks (whole 64 x 64 tiles pruned, BLOCK_LIVE of them live), where the
    triton backend runs each masked linear layer of the 8 arms as one grouped tile-skipping launch
    (kernels/grouped_linear.py) against each arm's own tile-skipping launches. On a CPU the torch backend
    runs both masks alike (dense ops), so the row would repeat (b); it is not timed there.
The batched rows run the engine the search uses, so on the torch backend its hand-stacked forward
(fastticket.lottery.stacked_plan) for LeNet and Conv-2.

Unlike the kernel suites these are timed on a CPU too (wall clock; ratios are the median over repeats of
the two sides' times measured back to back): the question is how the
loop compares with plain PyTorch on the same machine, which a CPU answers. Every row also checks parity: the
first step's losses of the fastticket side against the reference side.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from fastticket.app.bench import BenchOptions, BenchRow, suite
from fastticket.lottery.config import SearchConfig
from fastticket.lottery.data import DatasetInfo, DeviceData, Split
from fastticket.sparse.nn import masked_modules
from fastticket.sparse.testing import rel_error
from fastticket.lottery.engine import Engine, make_optimizer
from fastticket.lottery.arm_state import ArmJob, ArmSpec, ArmState
from fastticket.lottery.train import build_masked_model

ARMS = 8
BATCH = 60
DENSITY = 0.5  # masks of a mid-search level (every layer keeps half its weights)
BLOCK = 64         # block masks of row (d): the CUDA kernels' tile
BLOCK_LIVE = 0.25  # live fraction of the tiles (below the linear dispatch threshold, so tiles are skipped)


def _synthetic(shape: Tuple[int, int, int], n: int, device: torch.device) -> DeviceData:
    g = torch.Generator().manual_seed(0)
    info = DatasetInfo("synthetic", shape, 10, (0.0,) * shape[0], (1.0,) * shape[0])

    def split(size: int) -> Split:
        return Split(torch.randn(size, *shape, generator=g).to(device),
                     torch.randint(0, 10, (size,), generator=g).to(device))

    return DeviceData(info, split(n), split(BATCH), split(BATCH), augment=False)


def _block_mask(shape, g: torch.Generator) -> torch.Tensor:
    """Whole BLOCK x BLOCK tiles kept with probability BLOCK_LIVE (the first always), pruned otherwise."""
    n, k = shape
    tiles = torch.rand(-(-n // BLOCK), -(-k // BLOCK), generator=g) < BLOCK_LIVE
    tiles[0, 0] = True
    return tiles.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:n, :k]


def _arm(config: SearchConfig, data: DeviceData, seed: int, device: torch.device,
         block: bool = False) -> Tuple[ArmJob, ArmState]:
    model = build_masked_model(config, data.info, seed, device)
    g = torch.Generator().manual_seed(1000 + seed)
    for _, layer in masked_modules(model):
        shape = layer.weight.shape
        # Block masks for the hidden layers (the output layer has one tile-row: kept dense).
        mask = (_block_mask(shape, g) if block and shape[0] > BLOCK and len(shape) == 2
                else torch.rand(shape, generator=g) < DENSITY)
        layer.set_mask_(mask.to(device))
    return (ArmJob(ArmSpec(0, "ticket", seed, 0), model, None, seed),  # type: ignore[arg-type]
            ArmState(model, make_optimizer(config, model), 0))


def _seconds(runs: Sequence[Callable[[int], None]], steps: int, device: torch.device,
             repeats: int) -> Tuple[List[float], float]:
    """Median seconds per step of each `run(iteration)` over `steps` steps, after a warm-up, and the median
    over repeats of runs[0]'s time / runs[1]'s time. The runs alternate repeat by repeat, so a change in the
    machine's load hits both sides of a comparison alike; the ratio is taken within each repeat (the two
    sides' times measured back to back) before the median, which a load burst moves less than it moves
    the ratio of two medians."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    its = [0] * len(runs)
    for r, run in enumerate(runs):
        for _ in range(3):
            run(its[r])
            its[r] += 1
    samples: List[List[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for r, run in enumerate(runs):
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                run(its[r])
                its[r] += 1
            sync()
            samples[r].append((time.perf_counter() - t0) / steps)
    ratio = statistics.median(a / b for a, b in zip(samples[0], samples[1]))
    return [statistics.median(s) for s in samples], ratio


def _one_arm(model_name: str, data: DeviceData, device: torch.device, steps: int, repeats: int) -> BenchRow:
    from fastticket.lottery.models import build_model
    config = SearchConfig(model=model_name, batch_size=BATCH)
    job, state = _arm(config, data, 0, device)
    engine = Engine(config, [job], [state], data, stacked=False)
    acc = torch.zeros(1, dtype=torch.float64, device=device)

    def ours(it: int) -> None:
        acc.add_(engine.step(it))

    torch.manual_seed(0)
    plain = build_model(model_name, data.info).to(device)
    with torch.no_grad():  # the same weights as the masked arm (pruned ones zero), trained without masks
        for p, q in zip(plain.parameters(), job.model.parameters()):
            p.copy_(q)
    opt = torch.optim.Adam(plain.parameters(), lr=config.lr)

    def reference(it: int) -> None:
        x, y = data.batch(it, BATCH, job.seed)
        loss = F.cross_entropy(plain(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.no_grad():
        x, y = data.batch(0, BATCH, job.seed)
        parity = abs(float(F.cross_entropy(job.model(x), y)) - float(F.cross_entropy(plain(x), y)))
    (t_plain, t_ours), speed = _seconds([reference, ours], steps, device, repeats)
    return BenchRow(suite="search", case=f"one arm {model_name}", op="train step", shape=f"B={BATCH}",
                    dtype="fp32", mask=f"element {DENSITY:.0%}", density=DENSITY,
                    times_ms={"plain PyTorch": t_plain * 1e3, "fastticket": t_ours * 1e3},
                    ratio_vs_dense={"fastticket": speed}, parity=parity,
                    extra={"iters_per_s": {"plain PyTorch": 1 / t_plain, "fastticket": 1 / t_ours},
                           "summary": f"search: one {model_name} arm runs {speed:.2f}x the "
                                      f"iterations/s of a plain PyTorch loop ({1 / t_ours:.0f} vs "
                                      f"{1 / t_plain:.0f} it/s, {device.type})"})


def _k_arms(model_name: str, data: DeviceData, device: torch.device, steps: int, repeats: int,
            block: bool = False) -> BenchRow:
    config = SearchConfig(model=model_name, batch_size=BATCH)
    pairs = [_arm(config, data, seed, device, block) for seed in range(ARMS)]
    singles = [Engine(config, [j], [s], data, stacked=False) for j, s in pairs]
    # The stacked group gets its own copies (the same starting weights and masks).
    stacked_pairs = [_arm(config, data, seed, device, block) for seed in range(ARMS)]
    stacked = Engine(config, [j for j, _ in stacked_pairs], [s for _, s in stacked_pairs], data, stacked=True)
    first_single = torch.cat([e.step(0) for e in singles])
    first_stacked = stacked.step(0)
    parity = rel_error(first_stacked.double(), first_single.double())
    acc = torch.zeros(ARMS, dtype=torch.float64, device=device)

    def one_at_a_time(it: int) -> None:
        for a, e in enumerate(singles):
            acc[a:a + 1].add_(e.step(it))

    def batched(it: int) -> None:
        acc.add_(stacked.step(it))

    (t_single, t_batched), speedup = _seconds([one_at_a_time, batched], steps, device, repeats)
    mask = f"block {BLOCK}x{BLOCK}, {BLOCK_LIVE:.0%} of tiles live" if block else f"element {DENSITY:.0%}"
    return BenchRow(suite="search", case=f"{ARMS} arms {model_name}" + (" block" if block else ""),
                    op="train step (all arms)", shape=f"K={ARMS} B={BATCH}", dtype="fp32", mask=mask,
                    density=BLOCK_LIVE if block else DENSITY,
                    times_ms={"one at a time": t_single * 1e3, "batched": t_batched * 1e3},
                    ratio_vs_dense={"batched": speedup}, parity=parity,
                    extra={"model_iters_per_s": {"one at a time": ARMS / t_single, "batched": ARMS / t_batched},
                           "summary": f"search: {ARMS} {model_name} arms batched run {speedup:.2f}x the arms "
                                      f"one at a time ({ARMS / t_batched:.0f} vs {ARMS / t_single:.0f} "
                                      f"model-iterations/s, {device.type})"})


@suite("search")
def search_suite(options: BenchOptions) -> List[BenchRow]:
    device = options.torch_device
    steps, repeats = (20, 3) if options.quick else (30, 15)  # many short repeats: paired ratios (_seconds)
    conv_steps = 2 if options.quick else 3
    mnist = _synthetic((1, 28, 28), 3500, device)
    cifar = _synthetic((3, 32, 32), 2000, device)
    rows = [_one_arm("lenet300", mnist, device, steps, repeats),
            _k_arms("lenet300", mnist, device, steps, repeats),
            _k_arms("conv2", cifar, device, conv_steps, repeats)]
    if device.type == "cuda":  # (d): the grouped tile-skipping launch; a CPU would time (b) again
        rows.append(_k_arms("lenet300", mnist, device, steps, repeats, block=True))
    return rows
