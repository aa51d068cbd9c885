"""One rank of the DDP + masked layer + masked optimizer check (tests/test_distributed.py starts two).

Usage: python ddp_masked_worker.py BACKEND OUT_DIR, with torchrun's environment variables set. Trains a block-
and element-masked MaskedLinear wrapped in DistributedDataParallel for a few MaskedAdam steps, each rank on its
half of every batch, and saves its final weight to OUT_DIR/rank{R}.pt.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastticket.sparse.backend import use_backend
from fastticket.sparse.nn import MaskedLinear
from fastticket.sparse.optim import MaskedAdam

STEPS, BATCH, IN, OUT = 3, 8, 37, 29


def problem():
    """The layer (same init and mask on every rank), its batches and targets: fresh random values, a mask
    with a whole dead 16x16 tile and scattered dead elements."""
    g = torch.Generator().manual_seed(7)
    layer = MaskedLinear(IN, OUT)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(OUT, IN, generator=g))
        layer.bias.copy_(torch.randn(OUT, generator=g))
    mask = torch.rand(OUT, IN, generator=g) > 0.3
    mask[:16, :16] = False
    layer.set_mask_(mask)
    xs = torch.randn(STEPS, BATCH, IN, generator=g)
    targets = torch.randn(STEPS, BATCH, OUT, generator=g)
    return layer, mask, xs, targets


def main() -> None:
    backend, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layer, mask, xs, targets = problem()
    model = DistributedDataParallel(layer, broadcast_buffers=False)
    optimizer = MaskedAdam(layer.parameters(), lr=0.05)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    with use_backend(backend):
        for step in range(STEPS):
            loss = ((model(xs[step, rows]) - targets[step, rows]) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.save({"weight": layer.weight.detach().clone(), "mask": mask}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
