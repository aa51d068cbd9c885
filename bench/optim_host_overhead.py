"""Host (Python) time per masked-optimizer step for a 50-tensor model (25 MaskedLinear layers, weight + bias).

Two measurements, each the best over repeats of the mean of N steps:
- "torch": the whole step on the torch backend (CPU tensors: torch's fused CPU Adam / foreach SGD).
  Tensors are tiny (16x16), so the step is mostly host work.
- "triton-prep": the triton backend's host side only (plan, tensor tables, launch arguments): the kernel
  launch is replaced by a no-op, since on a CPU the kernels run in the Triton interpreter and their time
  would say nothing about a GPU.
`--replan` throws the cached launch plan away before every step (the path without a plan), when the
optimizer has one. Run it against a checkout without the plan for the true "before":

    PYTHONPATH=<checkout> python bench/optim_host_overhead.py [--replan]

Measured (2-core CPU dev machine shared with other jobs, load ~6, no GPU, torch 2.14.1 / triton 3.8; best of
two runs each, us per step, 50 tensors), before the plan (c304cb6) -> with it: adam torch 898 -> 756,
adam triton-prep 887 -> 591, sgd torch 581 -> 472, sgd triton-prep 652 -> 349. The plan part alone
(fastticket/sparse/_optim_plan.py): a rebuild 342 us, the per-step key check 58 us.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the triton backend accept CPU tensors

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fastticket.kernels import masked_optim  # noqa: E402
from fastticket.sparse.backend import use_backend  # noqa: E402
from fastticket.sparse.nn import MaskedLinear  # noqa: E402
from fastticket.sparse.optim import MaskedAdam, MaskedSGD  # noqa: E402


class _NoLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _model(layers: int = 25, width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[MaskedLinear(width, width) for _ in range(layers)])
    g = torch.Generator().manual_seed(1)
    for layer in model:
        layer.set_mask_(torch.rand(layer.weight.shape, generator=g) > 0.5)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    return model


def _time(opt, steps: int, repeats: int, replan: bool) -> float:
    per_step = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            if replan and hasattr(opt, "_invalidate_plans"):
                opt._invalidate_plans()
            opt.step()
        per_step.append((time.perf_counter() - t0) / steps)
    return min(per_step) * 1e6  # the least disturbed repeat: the dev machine is shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--replan", action="store_true", help="rebuild the launch plan before every step")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, make in (("adam", lambda ps: MaskedAdam(ps, lr=1e-3)),
                       ("sgd", lambda ps: MaskedSGD(ps, lr=1e-2, momentum=0.9))):
        model = _model()
        n = len(list(model.parameters()))
        with use_backend("torch"):
            opt = make(model.parameters())
            opt.step()  # state allocated outside the timing
            rows.append((name, "torch", n, _time(opt, args.steps, args.repeats, args.replan)))
        saved = dict(masked_optim._kernels)
        masked_optim._kernels.update(sgd=_NoLaunch(), adam=_NoLaunch())
        try:
            with use_backend("triton"):
                opt = make(model.parameters())
                opt.step()
                rows.append((name, "triton-prep", n, _time(opt, args.steps, args.repeats, args.replan)))
        finally:
            masked_optim._kernels.clear()
            masked_optim._kernels.update(saved)
    print(f"torch {torch.__version__}, replan={args.replan}")
    print("optimizer  backend      tensors  host us/step")
    for name, backend, n, us in rows:
        print(f"{name:<10} {backend:<12} {n:>7}  {us:>11.1f}")


if __name__ == "__main__":
    main()
