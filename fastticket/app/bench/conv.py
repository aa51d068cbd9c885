"""Conv suite: fastticket's masked Conv2d against dense cuDNN and the prune-style path.

Implementations timed in the same run (GPU only):

    fastticket        the layer as users get it: per-layer dispatch between tile skipping and dense cuDNN
    fastticket-skip   the tile-skipping implicit-GEMM kernels forced on (FASTTICKET_DENSE_THRESHOLD_CONV2D=1.01):
                      the data from which the conv2d dispatch threshold is measured
    dense             F.conv2d(x, w, b) on the stored weight (cuDNN), no mask at all: the baseline
    prune             F.conv2d(x, w * mask, b): torch.nn.utils.prune / OpenLTH style, mask applied each call

Cases: the conv layers of Conv-6 (batch 60), VGG-19 (batch 64) and ResNet-20 (batch 128 and 512) on
CIFAR-10 inputs, and an ImageNet-sized layer (256->256, 3x3, 56x56, batch 64); fwd, bwd and fwd+bwd at
densities 100/50/20/10/5/2 % for element and block masks. Every row has a parity column: the largest
relative error of fastticket's outputs (forced tile skipping and the dispatched path) against float64.

Crossover: a summary row reports, per case family and pooled over the large layers, the live-tile fraction
below which tile skipping beats cuDNN on fwd+bwd (`extra["crossover_live_fraction"]`,
`extra["suggested_threshold"]`): kernels/dispatch.py's DENSE_THRESHOLDS["conv2d"] should be set from it.

Without a GPU the suite runs the parity part only, in the Triton interpreter on tiny shapes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Tuple, Union

import torch
import torch.nn.functional as F

# Shared with the linear suite (the harness): the mask generator (block masks in the filter's
# [C_out, C_in*kh*kw] view), the env-override helper, the row builder (timing) and the crossover analysis.
from fastticket.app.bench.cases import grid_layers, skip_and_dispatch_parity
from fastticket.app.bench import BenchOptions, BenchRow, crossover_row, env_override, layer_op_row, make_mask, suite
from fastticket.kernels._common import tf32_set

DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02)
OPS = ("fwd", "bwd", "fwd+bwd")
N_INPUT_SETS = 3  # rotated during timing so consecutive calls do not hit a warm L2


@dataclass(frozen=True)
class ConvCase:
    name: str
    batch: int
    c_in: int
    c_out: int
    hw: int
    kernel: int = 3
    stride: int = 1
    padding: Union[int, str] = 1

    @property
    def shape(self) -> str:
        s = f"{self.batch}x{self.c_in}x{self.hw}x{self.hw}->{self.c_out} k{self.kernel}"
        return s + (f" s{self.stride}" if self.stride != 1 else "")


def full_cases() -> List[ConvCase]:
    return [
        # Conv-6 on CIFAR-10 (Frankle & Carbin 2019): 64,64,pool,128,128,pool,256,256,pool; batch 60
        ConvCase("conv6.conv1", 60, 3, 64, 32),
        ConvCase("conv6.conv2", 60, 64, 64, 32),
        ConvCase("conv6.conv3", 60, 64, 128, 16),
        ConvCase("conv6.conv4", 60, 128, 128, 16),
        ConvCase("conv6.conv5", 60, 128, 256, 8),
        ConvCase("conv6.conv6", 60, 256, 256, 8),
        # VGG-19 on CIFAR-10, batch 64: one layer per stage width (the repeated ones have the same shape)
        ConvCase("vgg19.64", 64, 64, 64, 32),
        ConvCase("vgg19.128", 64, 128, 128, 16),
        ConvCase("vgg19.256", 64, 256, 256, 8),
        ConvCase("vgg19.512@4", 64, 512, 512, 4),
        ConvCase("vgg19.512@2", 64, 512, 512, 2),
        # ResNet-20 on CIFAR-10, batch 128 (paper) and 512: the three stage widths plus a strided downsample
        ConvCase("resnet20.16", 128, 16, 16, 32),
        ConvCase("resnet20.32", 128, 32, 32, 16),
        ConvCase("resnet20.64", 128, 64, 64, 8),
        ConvCase("resnet20.down32", 128, 16, 32, 32, stride=2),
        ConvCase("resnet20.64-b512", 512, 64, 64, 8),
        # ImageNet-sized layer: where tile skipping must beat cuDNN by the targets
        ConvCase("imagenet.256x56", 64, 256, 256, 56),
    ]


def quick_gpu_cases() -> List[ConvCase]:
    return [ConvCase("conv6.conv4", 60, 128, 128, 16), ConvCase("imagenet.256x56", 64, 256, 256, 56)]


def cpu_cases() -> List[ConvCase]:
    # Interpreter-sized stand-ins that keep the geometry kinds: 3x3 same-size, strided, 1x1, odd sizes.
    return [
        ConvCase("conv6-tiny", 2, 8, 16, 9),
        ConvCase("resnet20.down-tiny", 2, 8, 16, 9, stride=2),
        ConvCase("1x1-tiny", 3, 16, 12, 7, kernel=1, padding=0),
    ]


def _tile(case: ConvCase, dtype: torch.dtype, device: torch.device) -> Tuple[int, int]:
    from fastticket.kernels.masked_conv2d import conv2d_tile_sizes

    return conv2d_tile_sizes(case.c_out, case.c_in * case.kernel ** 2, dtype, device)


def grid(options: BenchOptions) -> Tuple[List[ConvCase], Tuple[str, ...], Tuple[float, ...]]:
    """(cases, mask kinds, densities) the suite runs for `options`: the full or quick GPU grid, or on a CPU the
    interpreter-sized one (block masks of the kernels' own tile size there, so tiles really are skipped).
    `fastticket bench` and bench/test_bench_conv.py both take their cases from here."""
    if options.torch_device.type != "cuda":
        bn, bk = _tile(cpu_cases()[0], options.torch_dtype, options.torch_device)
        return cpu_cases(), ("element", f"block:{bn}x{bk}"), (1.0, 0.2, 0.05)
    masks = ("element", "block:64x64")
    if options.quick:
        return quick_gpu_cases(), masks, (1.0, 0.5, 0.1)
    return full_cases(), masks, DENSITIES


def forced_skip() -> contextlib.AbstractContextManager:
    return env_override("FASTTICKET_DENSE_THRESHOLD_CONV2D", "1.01")


def tf32(enabled: bool) -> contextlib.AbstractContextManager:
    """TF32 convolutions on or off inside the block. The kernels follow cuDNN's flag for fp32, so one switch
    sets both sides of the comparison."""
    return tf32_set("cudnn", enabled)


class BenchLayer:
    """One masked filter with its inputs, grad-outputs and tile-map cache."""

    def __init__(self, case: ConvCase, mask_kind: str, density: float, dtype: torch.dtype,
                 device: torch.device, seed: int) -> None:
        from fastticket.kernels.tile_map import TileMapCache

        gen = torch.Generator().manual_seed(seed)
        k = case.c_in * case.kernel ** 2
        shape4 = (case.c_out, case.c_in, case.kernel, case.kernel)
        self.mask = make_mask(shape4, mask_kind, density, gen, keep_one_block=True).to(device)
        w = torch.randn(shape4, generator=gen) / k ** 0.5
        self.weight = (w.to(device) * self.mask).to(dtype).requires_grad_(True)  # zero invariant
        self.bias = (torch.randn(case.c_out, generator=gen) * 0.1).to(device=device, dtype=dtype).requires_grad_(True)
        self.conv = (case.stride, case.padding, 1)
        self.xs = [torch.randn(case.batch, case.c_in, case.hw, case.hw, generator=gen)
                   .to(device=device, dtype=dtype).requires_grad_(True) for _ in range(N_INPUT_SETS)]
        with torch.no_grad():
            out_shape = F.conv2d(self.xs[0][:1].float(), self.weight.float(), None, *self.conv).shape[1:]
        self.gs = [torch.randn(case.batch, *out_shape, generator=gen).to(device=device, dtype=dtype)
                   for _ in range(N_INPUT_SETS)]
        self.cache = TileMapCache()
        self.tile = _tile(case, dtype, device)

    def tile_map(self, bn: int, bk: int, k_order: str = "mask"):
        return self.cache.get(self.mask, bn, bk, k_order=k_order)

    def grads(self, y: torch.Tensor, x: torch.Tensor, g: torch.Tensor, retain: bool):
        """(dX, dW, db) of `y` for grad-output `g`."""
        return torch.autograd.grad(y, [x, self.weight, self.bias], g, retain_graph=retain)

    def fastticket(self, x: torch.Tensor) -> torch.Tensor:
        from fastticket.sparse.conv import masked_conv2d

        return masked_conv2d(x, self.weight, self.bias, self.mask, self.tile_map, *self.conv)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, *self.conv)

    def prune(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, *self.conv)


def live_fraction(layer: BenchLayer) -> float:
    """Live-tile fraction of the layer's mask at the kernels' tile size: what the dispatch decides on."""
    return layer.tile_map(*layer.tile).live_fraction


def parity(layer: BenchLayer) -> Dict[str, Dict[str, float]]:
    """Relative errors of fastticket (forced tile skipping and dispatched) vs float64, per op."""
    from fastticket.kernels.masked_conv2d import reference_masked_conv2d_grads

    x, g = layer.xs[0], layer.gs[0]
    ref_y, ref_dx, ref_dw, ref_db = reference_masked_conv2d_grads(x, layer.weight, layer.bias, layer.mask, g,
                                                                  *layer.conv)
    return skip_and_dispatch_parity(layer, forced_skip, (ref_y, ref_dx, ref_dw, ref_db))


@suite("conv")
def conv_suite(options: BenchOptions) -> List[BenchRow]:
    from fastticket.kernels.dispatch import use_tile_skipping

    timing = options.timing and options.torch_device.type == "cuda"
    rows: List[BenchRow] = []
    with tf32(options.dtype.lower() == "tf32"):
        for case, mask_kind, density, layer in grid_layers(options, grid, BenchLayer):
            tile = layer.tile
            live = live_fraction(layer)
            path = "skip" if use_tile_skipping(live, "conv2d") else "dense"
            errors = parity(layer)
            for op in OPS:
                extra = {"live_fraction": live, "dispatch": path, "tile": f"{tile[0]}x{tile[1]}",
                         "actual_density": float(layer.mask.float().mean()),
                         "parity_skip": errors["skip"][op], "parity_dispatch": errors["dispatch"][op]}
                rows.append(layer_op_row(
                    "conv", case.name, op, case.shape, mask_kind, density, options.dtype, layer, errors,
                    extra, timing, forced_skip))
            del layer  # freed before the next case's layer is built
    # From the ImageNet-sized layer: the CIFAR layers are small enough to be launch-bound.
    rows.append(crossover_row("conv", rows, options.dtype, timing, "imagenet.", "the ImageNet-sized layer"))
    return rows
