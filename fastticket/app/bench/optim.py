"""Optimizer suite: the masked optimizer step and the dW+update fusion against torch.optim, same run.

Parameter sets: the parameters of VGG-19 (CIFAR-10, with BatchNorm: 20.0M) and a synthetic set of 1B
parameters (60 x [4096, 4096] weights + biases). Masks on weights (biases / BatchNorm unmasked): `element`
(random, Bernoulli at the density) and `block:64x64` (random whole 64x64 tiles of the weight viewed as
[rows, cols]; conv filters as [C_out, C_in*kh*kw]), at densities 100 / 50 / 10 / 2 %.

Implementations of one step (SGD momentum 0.9, weight decay 1e-4; Adam lr 1e-3), all in fp32 (master weights
and optimizer state are fp32 in mixed-precision training too):

    fastticket          MaskedSGD / MaskedAdam, triton backend: one fused multi-tensor launch per group;
                        block masks stepped over live tiles only
    torch-fused         torch.optim (fused=True) with no mask at all: the dense baseline of ratio_vs_dense
    torch-fused+mask    the same after `torch._foreach_mul_(grads, masks)` (the cheapest correct torch path)
    torch-foreach+mask  foreach=True after the same mask multiply
    copy                a device-to-device copy of a buffer the size of the parameters: its bandwidth is the
                        reference for `extra["bw_fraction"]` (fastticket's bytes moved / time / copy bandwidth)

dW+update fusion rows (op "dw+step", MaskedLinear shapes): `fastticket-fused` (kernels/linear_dw_sgd.py, dW
never written) vs `dw-kernel+step` (fastticket's masked dW kernel, then the fused step) vs `cublas-dw+torch-fused`
(cuBLAS dW, mask multiply, torch fused SGD).

Without a GPU tiny sets run in the Triton interpreter and only parity is reported; quick=True on a GPU runs
VGG-19 and one fusion shape (`step_grid`, `dw_grid`).
Parity: fastticket's updated parameters (and for the fusion, the weight) against a float64 reference of the
same step, on a subset of tensors for the large sets (the float64 copy of 1B parameters would not fit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from fastticket.app.bench import BenchOptions, BenchRow, make_mask, suite, time_ms
from fastticket.sparse.testing import rel_error
from fastticket.kernels._common import tf32_enabled

DENSITIES = (1.0, 0.5, 0.1, 0.02)
MASKS = ("element", "block:64x64")
SGD_HP = dict(lr=0.01, momentum=0.9, weight_decay=1e-4)
ADAM_HP = dict(lr=1e-3)
PARITY_TENSORS = 6  # tensors of a set checked against float64 (the largest sets do not fit twice in float64)
STEP_IMPLS = ("fastticket", "torch-fused", "torch-fused+mask", "torch-foreach+mask")
DW_IMPLS = ("fastticket-fused", "dw-kernel+step", "cublas-dw+torch-fused")
DW_HP = dict(lr=0.01, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-4, maximize=False)


@dataclass(frozen=True)
class ParamSet:
    name: str
    shapes: Tuple[Tuple[int, ...], ...]
    masked: Tuple[bool, ...]  # weights are masked; biases / BatchNorm are not

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def shape(self) -> str:
        return f"{self.numel / 1e6:.1f}M params in {len(self.shapes)} tensors"


def vgg19_set() -> ParamSet:
    cfg = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]
    shapes, masked, c_in = [], [], 3
    for c in cfg:
        shapes += [(c, c_in, 3, 3), (c,), (c,)]  # conv (no bias: BatchNorm follows), BN weight and bias
        masked += [True, False, False]
        c_in = c
    shapes += [(10, 512), (10,)]
    masked += [True, False]
    return ParamSet("vgg19", tuple(shapes), tuple(masked))


def synthetic_set(total: int = 1_000_000_000, width: int = 4096) -> ParamSet:
    n = max(1, round(total / (width * width)))
    shapes, masked = [], []
    for _ in range(n):
        shapes += [(width, width), (width,)]
        masked += [True, False]
    return ParamSet("synthetic-1b", tuple(shapes), tuple(masked))


def quick_set() -> ParamSet:
    return ParamSet("tiny", ((40, 30), (30,), (17, 13), (9, 4, 3, 3)), (True, False, True, True))


def mask_densities(masks: Sequence[str], densities: Sequence[float]) -> List[Tuple[str, float]]:
    """(mask kind, density) pairs; 100 % is the same case for every mask kind, so it comes once."""
    return [(m, d) for m in masks for d in densities if d < 1.0 or m == masks[0]]


def step_grid(opts: BenchOptions) -> Tuple[List[ParamSet], List[Tuple[str, float]]]:
    """(parameter sets, (mask, density) pairs) of the step rows: tiny and parity only without timing (CPU,
    interpreter), VGG-19 for a quick GPU run, VGG-19 and the 1B set otherwise. `fastticket bench` and
    bench/test_bench_optim.py both take their cases from here."""
    if not opts.timing:
        return [quick_set()], mask_densities(("element", "block:8x8"), (1.0, 0.1))
    if opts.quick:
        return [vgg19_set()], mask_densities(MASKS, (1.0, 0.1))
    return [vgg19_set(), synthetic_set()], mask_densities(MASKS, DENSITIES)


def dw_grid(opts: BenchOptions) -> Tuple[List[Tuple[str, int, int, int]], List[Tuple[str, float]]]:
    """((name, M, N, K) MaskedLinear shapes, (mask, density) pairs) of the dW+update fusion rows."""
    if not opts.timing:
        return [("tiny", 24, 37, 45)], mask_densities(("element", "block:16x16"), (1.0, 0.1))
    if opts.quick:
        return [("fc4096", 1024, 4096, 4096)], mask_densities(MASKS, (1.0, 0.1))
    return ([("vgg19.fc", 64, 10, 512), ("fc4096.b4k", 4096, 4096, 4096), ("fc8192.b8k", 8192, 8192, 8192)],
            mask_densities(MASKS, DENSITIES))


class StepBench:
    """Parameters, gradients and masks of one (set, mask kind, density), shared by every implementation."""

    def __init__(self, pset: ParamSet, mask_kind: str, density: float, device: torch.device, seed: int = 0) -> None:
        # Generated on the device: a CPU generator would spend minutes on the 1B-parameter set.
        g = torch.Generator(device=device).manual_seed(seed)
        self.device = device
        self.masks: List[Optional[torch.Tensor]] = []
        self.params: List[torch.Tensor] = []
        for shape, masked in zip(pset.shapes, pset.masked):
            m = make_mask(shape, mask_kind, density, g) if masked and density < 1.0 else None
            if masked and density >= 1.0:
                m = torch.ones(shape, dtype=torch.bool, device=device)  # all-live mask: still read by the step
            p = torch.randn(shape, generator=g, device=device) * 0.05
            if m is not None:
                p.mul_(m)
            self.params.append(p.requires_grad_())
            self.masks.append(m)
        for p in self.params:
            p.grad = torch.randn(p.shape, generator=g, device=device) * 0.01
        self.float_masks = [m.to(torch.float32) if m is not None else torch.ones((), device=device)
                            for m in self.masks]

    # -- implementations: each returns a zero-argument callable doing one step
    def fastticket(self, kind: str):
        from fastticket.sparse.optim import MaskedAdam, MaskedSGD

        opt = (MaskedSGD(self.params, masks=self.masks, **SGD_HP) if kind == "sgd"
               else MaskedAdam(self.params, masks=self.masks, **ADAM_HP))
        return opt.step, opt

    def torch_step(self, kind: str, mode: str, mask: bool):
        flag = {"fused": dict(fused=True), "foreach": dict(foreach=True)}[mode]
        opt = (torch.optim.SGD(self.params, **SGD_HP, **flag) if kind == "sgd"
               else torch.optim.Adam(self.params, **ADAM_HP, **flag))
        if not mask:
            return opt.step, opt
        grads = [p.grad for p in self.params]

        def step() -> None:
            torch._foreach_mul_(grads, self.float_masks)
            opt.step()

        return step, opt

    def implementation(self, kind: str, name: str):
        """(step, optimizer) of implementation `name` (one of STEP_IMPLS) for "sgd" or "adam"."""
        if name == "fastticket":
            return self.fastticket(kind)
        if name not in STEP_IMPLS:
            raise ValueError(f"unknown step implementation {name!r}; known: {STEP_IMPLS}")
        return self.torch_step(kind, "fused" if name.startswith("torch-fused") else "foreach",
                               mask=name.endswith("+mask"))

    def bytes_moved(self, kind: str, block: Tuple[int, int] = (64, 64)) -> int:
        """Bytes the fused step must move: per stepped element read p, g, state and the mask byte, write p
        and state (SGD: 1 state tensor, Adam: 2); block masks count live tiles only."""
        from fastticket.kernels.masked_optim import tile_map_for

        states = 1 if kind == "sgd" else 2
        total = 0
        for p, m in zip(self.params, self.masks):
            elem = p.element_size()
            per = elem * (2 + states) + elem * (1 + states) + (1 if m is not None else 0)
            tm = tile_map_for(m, block)
            if tm is None:
                total += p.numel() * per
            else:
                live = tm.live.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
                total += int(live[: tm.shape[0], : tm.shape[1]].sum()) * per
        return total

    def parity(self, kind: str) -> float:
        """One fastticket step against the float64 reference on the first PARITY_TENSORS tensors."""
        from fastticket.kernels import masked_optim as K
        from fastticket.sparse.optim import MaskedAdam, MaskedSGD

        n = min(PARITY_TENSORS, len(self.params))
        ps = [p.detach().clone().requires_grad_() for p in self.params[:n]]
        for p, src in zip(ps, self.params[:n]):
            p.grad = src.grad.clone()
        ref = [p.detach().double() for p in ps]
        grads = [p.grad.double() for p in ps]
        masks = self.masks[:n]
        if kind == "sgd":
            opt = MaskedSGD(ps, masks=masks, **SGD_HP)
            for r, g, m in zip(ref, grads, masks):
                K.sgd_reference_(r, g, m, None, dampening=0.0, nesterov=False, maximize=False, **SGD_HP)
        else:
            opt = MaskedAdam(ps, masks=masks, **ADAM_HP)
            for r, g, m in zip(ref, grads, masks):
                K.adam_reference_(r, g, m, torch.zeros_like(r), torch.zeros_like(r), None, step=1,
                                  lr=ADAM_HP["lr"], beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                  amsgrad=False, maximize=False, decoupled=False)
        opt.step()
        out = torch.cat([p.detach().reshape(-1) for p in ps])
        return rel_error(out, torch.cat([r.reshape(-1) for r in ref]))


def copy_bandwidth_gbs(numel: int, device: torch.device) -> Tuple[float, float]:
    """(ms, GB/s) of a device-to-device copy of `numel` fp32 elements (read + write counted)."""
    numel = max(numel, 1 << 20)
    src = torch.empty(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    del src, dst
    return ms, 2 * numel * 4 / (ms * 1e-3) / 1e9


def _step_rows(opts: BenchOptions) -> List[BenchRow]:
    from fastticket.sparse.backend import use_backend

    rows: List[BenchRow] = []
    device = opts.torch_device
    psets, pairs = step_grid(opts)
    for pset in psets:
        copy_ms = copy_gbs = None
        if opts.timing:
            copy_ms, copy_gbs = copy_bandwidth_gbs(pset.numel, device)
        for kind in ("sgd", "adam"):
            for mask_kind, density in pairs:
                bench = StepBench(pset, mask_kind, density, device)
                with use_backend("triton"):
                    parity = bench.parity(kind)
                    row = BenchRow(suite="optim", case=f"{pset.name}.{kind}", op="step", shape=pset.shape,
                                   dtype="fp32", mask=mask_kind if density < 1.0 else "none", density=density,
                                   parity=parity)
                    row.extra["bytes_fastticket"] = bench.bytes_moved(kind)
                    if opts.timing:
                        for name in STEP_IMPLS:
                            fn, opt = bench.implementation(kind, name)
                            fn()  # state allocation outside the timed region
                            row.times_ms[name] = time_ms(fn)
                            del fn, opt
                            torch.cuda.empty_cache()
                        row.times_ms["copy"] = copy_ms
                        dense = row.times_ms["torch-fused"]
                        row.ratio_vs_dense = {k: dense / v for k, v in row.times_ms.items() if k != "copy"}
                        gbs = row.extra["bytes_fastticket"] / (row.times_ms["fastticket"] * 1e-3) / 1e9
                        row.extra.update(bw_gbs=gbs, copy_gbs=copy_gbs, bw_fraction=gbs / copy_gbs,
                                         speedup_vs_foreach_mask=row.times_ms["torch-foreach+mask"]
                                         / row.times_ms["fastticket"])
                rows.append(row)
                del bench
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


class DwUpdateBench:
    """One MaskedLinear weight, mask, dY and X for the dW+SGD fusion, shared by its implementations (DW_IMPLS):

    fastticket-fused        kernels/linear_dw_sgd.py: the SGD update in the dW kernel's epilogue, dW never written
    dw-kernel+step          fastticket's masked dW kernel, then the fused optimizer step
    cublas-dw+torch-fused   cuBLAS dW, mask multiply, torch fused SGD: the dense baseline
    """

    def __init__(self, m: int, n: int, k: int, mask_kind: str, density: float, device: torch.device) -> None:
        from fastticket.kernels.masked_linear import linear_tile_sizes
        from fastticket.kernels.tile_map import build_tile_map

        g = torch.Generator(device=device).manual_seed(1)
        self.mask = (make_mask((n, k), mask_kind, density, g) if density < 1.0
                     else torch.ones(n, k, dtype=torch.bool, device=device))
        self.w = (torch.randn(n, k, generator=g, device=device) * 0.05) * self.mask
        self.dy = torch.randn(m, n, generator=g, device=device)
        self.x = torch.randn(m, k, generator=g, device=device)
        bn, bk = linear_tile_sizes(device, torch.float32)
        self.tile_map = build_tile_map(self.mask, bn, bk)

    @property
    def precision(self) -> str:
        return "tf32" if tf32_enabled("matmul") else "fp32"

    def parity(self) -> float:
        """Two fused steps against the float64 reference (first-step and later-step paths), on copies."""
        from fastticket.kernels import linear_dw_sgd as F

        w_f, buf_f = self.w.clone(), None
        w_r, buf_r = self.w.double(), None
        for _ in range(2):
            buf_f = F.linear_dw_sgd_(self.dy, self.x, w_f, self.mask, self.tile_map, buf_f, **DW_HP)
            buf_r = F.linear_dw_sgd_reference_(self.dy.double(), self.x.double(), w_r, self.mask, buf_r, **DW_HP)
        return rel_error(w_f, w_r)

    def implementation(self, name: str) -> Callable[[], None]:
        """A zero-argument step of implementation `name` (one of DW_IMPLS), updating the bench's weight."""
        from fastticket.kernels import linear_dw_sgd as F
        from fastticket.kernels import masked_optim as K
        from fastticket.kernels.masked_linear_dw import linear_grad_weight

        dy, x, w, mask, tile_map = self.dy, self.x, self.w, self.mask, self.tile_map
        buf = torch.zeros_like(w)
        if name == "fastticket-fused":
            return lambda: F.linear_dw_sgd_(dy, x, w, mask, tile_map, buf, **DW_HP)
        if name == "dw-kernel+step":
            step_tiles = [K.tile_map_for(mask, K.DEFAULT_TILE)]

            def unfused() -> None:
                dw = linear_grad_weight(dy, x, mask, tile_map)
                K.sgd_step_([w], [dw], [mask], [buf], tile_maps=step_tiles, **DW_HP)

            return unfused
        if name == "cublas-dw+torch-fused":
            fmask = mask.float()
            wp = torch.nn.Parameter(w.clone())
            topt = torch.optim.SGD([wp], lr=DW_HP["lr"], momentum=DW_HP["momentum"],
                                   weight_decay=DW_HP["weight_decay"], fused=True)

            def cublas_torch() -> None:
                wp.grad = (dy.t() @ x).mul_(fmask)
                topt.step()

            return cublas_torch
        raise ValueError(f"unknown dW+update implementation {name!r}; known: {DW_IMPLS}")


def _dw_rows(opts: BenchOptions) -> List[BenchRow]:
    rows: List[BenchRow] = []
    device = opts.torch_device
    cases, pairs = dw_grid(opts)
    for name, m, n, k in cases:
        for mask_kind, density in pairs:
            bench = DwUpdateBench(m, n, k, mask_kind, density, device)
            row = BenchRow(suite="optim", case=f"dw+sgd.{name}", op="dw+step", shape=f"{m}x{k}->{n}",
                           dtype=bench.precision, mask=mask_kind if density < 1.0 else "none", density=density,
                           parity=bench.parity(), extra={"live_fraction": bench.tile_map.live_fraction})
            if opts.timing:
                for impl in DW_IMPLS:
                    fn = bench.implementation(impl)
                    fn()  # state allocation outside the timed region
                    row.times_ms[impl] = time_ms(fn)
                dense = row.times_ms["cublas-dw+torch-fused"]
                row.ratio_vs_dense = {kk: dense / v for kk, v in row.times_ms.items()}
                row.extra["bytes_saved"] = (2 * int(bench.mask.numel() * bench.tile_map.live_fraction)
                                            * bench.w.element_size())
            rows.append(row)
    return rows


@suite("optim")
def run(opts: BenchOptions) -> List[BenchRow]:
    """Step rows, then dW+update fusion rows, over `step_grid(opts)` and `dw_grid(opts)`."""
    return _step_rows(opts) + _dw_rows(opts)
