"""Wall time of the README's own-model search (fastticket.search) against the same search written by hand
with torch.nn.utils.prune: same model, data, levels, iterations, batch size, Adam and lr, layerwise 20 %
magnitude pruning of every Conv2d / Linear weight, rewinding to the init, a reinit control per level, an
evaluation on val and test every 100 iterations. Measured back to back, alternating, in one process.

    PYTHONPATH=. python bench/readme_example_vs_torch_prune.py [--repeats 3] [--threads N]

The hand-written search keeps everything in memory; fastticket also writes the run directory (masks, rewind
point, checkpoints, checksums, results) and the report (plots), timed here apart as well.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import fastticket

LEVELS, ITERATIONS, BATCH, LR, EVAL_EVERY, RATE = 2, 100, 32, 1.2e-3, 100, 0.2


def make_model():  # the README's model
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 2))


def make_data():  # the README's data
    torch.manual_seed(0)
    x = torch.randn(600, 1, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
    return (x[:400], y[:400]), (x[400:500], y[400:500]), (x[500:], y[500:])


@torch.no_grad()
def _accuracy(model, x, y):
    model.eval()
    out = model(x)
    model.train()
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def _train(model, data, seed):
    (xt, yt), (xv, yv), (xs, ys) = data
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    perm, evaluations = torch.randperm(len(yt), generator=g), []
    for it in range(ITERATIONS):
        start = it * BATCH % len(yt)
        if start + BATCH > len(yt):
            perm, start = torch.randperm(len(yt), generator=g), 0
        idx = perm[start:start + BATCH]
        optimizer.zero_grad()
        F.cross_entropy(model(xt[idx]), yt[idx]).backward()
        optimizer.step()
        if (it + 1) % EVAL_EVERY == 0:
            evaluations.append((_accuracy(model, xv, yv)[0], _accuracy(model, xs, ys)[1]))
    return min(evaluations)[1]  # test accuracy at the minimum validation loss


def by_hand(data):
    """IMP with a reinit control per level, written with torch.nn.utils.prune."""
    torch.manual_seed(0)
    model = make_model()
    init = copy.deepcopy(model.state_dict())
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers:
        prune.identity(m, "weight")
    rows = [(0, "ticket", _train(model, data, 0))]
    for level in range(1, LEVELS + 1):
        for m in layers:  # 20 % of the surviving weights of each layer, by magnitude of the trained weights
            prune.l1_unstructured(m, "weight", amount=RATE)
        with torch.no_grad():  # rewind: the init's weights behind the masks
            for name, m in model.named_modules():
                if m in layers:
                    m.weight_orig.copy_(init[f"{name}.weight"])
        rows.append((level, "ticket", _train(model, data, 0)))
        torch.manual_seed(10_000 + level)
        control = make_model()
        for m, c in zip(layers, [m for m in control.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]):
            prune.custom_from_mask(c, "weight", m.weight_mask)
        rows.append((level, "reinit", _train(control, data, 0)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = make_data()
    times = {"fastticket.search (incl. its report)": [], "a report alone": [], "torch.nn.utils.prune by hand": []}
    print(f"load average before: {os.getloadavg()}; torch threads: {torch.get_num_threads()}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats + 1):  # the first round warms up (imports, allocator) and is not counted
            t0 = time.perf_counter()
            out = os.path.join(tmp, f"run{r}")
            result = fastticket.search(make_model, data, out, levels=LEVELS, iterations=ITERATIONS,
                                       batch_size=BATCH, progress=False)
            t1 = time.perf_counter()
            fastticket.app.report.make_report(out)
            t2 = time.perf_counter()
            rows = by_hand(data)
            t3 = time.perf_counter()
            if r:
                times["fastticket.search (incl. its report)"].append(t1 - t0)
                times["a report alone"].append(t2 - t1)
                times["torch.nn.utils.prune by hand"].append(t3 - t2)
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    print("fastticket rows:", [(r["level"], r["arm"], round(r["weights_remaining_pct"], 1),
                                r["test_acc_at_early_stop_mean"]) for r in result.rows])
    print("by hand rows:   ", [(lv, arm, round(100 * acc, 1)) for lv, arm, acc in rows])
    for name, ts in times.items():
        print(f"{name:38s} median {statistics.median(ts):6.2f} s, min {min(ts):6.2f} s   "
              f"({', '.join(f'{t:.2f}' for t in ts)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
