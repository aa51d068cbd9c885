"""The kernels at the sizes they are built for, against float64 references: a pytest module inside the
package, so an installed fastticket can run it (`python -m pytest --pyargs fastticket.app.bench.real_sizes`,
which `fastticket bench --gpu-session` does) and tests/test_gpu_real_sizes.py imports its tests.

At `real` scale (the default; CUDA only, skipped without it) these run what no CPU can: an 8192-token batch
through a 4096 x 4096 layer, a 262k-vocabulary head whose dX offsets pass 2^31, VGG-19 and ResNet-20 conv
layers, and optimizer steps over 16M-element tensors, in bf16, fp16, fp32 (IEEE) and tf32. At `tiny` scale
(FASTTICKET_REAL_SIZES=tiny, what `--gpu-session --rehearse` sets) the same checks run interpreter-sized
shapes in fp32 on whatever device there is. The tile-skipping kernels are forced on (dispatch thresholds
1.01) so they, not cuBLAS / cuDNN, are what is checked; masks are block masks with dead and live tiles plus
element-pruned entries inside live tiles. Tolerances: fastticket.sparse.testing.PARITY_TOLERANCES.
"""
from __future__ import annotations

import os

import pytest
import torch

from fastticket.kernels._common import tf32_set
from fastticket.sparse.testing import parity_tolerance, rel_error

__all__ = ["SCALE_ENV", "SCALE", "forced_tile_skipping", "test_linear_square", "test_linear_dx_of_a_wide_head",
           "test_conv_vgg19_and_resnet20_layers", "test_optimizer_steps", "test_fused_dw_sgd"]

SCALE_ENV = "FASTTICKET_REAL_SIZES"  # real (default) | tiny
SCALE = os.environ.get(SCALE_ENV, "real").strip().lower() or "real"
if SCALE not in ("real", "tiny"):
    raise ValueError(f"{SCALE_ENV}={SCALE!r}: use real or tiny")
TINY = SCALE == "tiny"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(not TINY and DEVICE != "cuda", reason="real-size kernel checks need a CUDA GPU")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
# The interpreter has no bf16 / fp16 arithmetic worth checking: tiny runs fp32 only.
PRECISIONS = ["fp32"] if TINY else list(DTYPES)
# The activations of the fused dW + SGD (an fp32 master weight under autocast on a GPU).
FUSED_ACT = torch.float32 if TINY else torch.bfloat16

LINEAR = (64, 48, 80) if TINY else (8192, 4096, 4096)            # tokens M, out N, in K
# N * K = 2^31 at real scale: the last tiles' weight offsets pass int32 (a bf16 weight of 4 GiB).
HEAD = (4, 512, 384) if TINY else (64, 262144, 8192)
OPTIM = (64, 64) if TINY else (4096, 4096)

# (name, batch, C_in, C_out, H, W, kernel, stride): VGG-19 (batch 64) and ResNet-20 (batch 128) on CIFAR-10.
CONV_LAYERS = [("tiny.conv", 2, 3, 8, 6, 6, 3, 1), ("tiny.down", 2, 4, 8, 7, 7, 3, 2)] if TINY else [
    ("vgg19.conv1_2", 64, 64, 64, 32, 32, 3, 1),
    ("vgg19.conv3_1", 64, 128, 256, 8, 8, 3, 1),
    ("vgg19.conv5_4", 64, 512, 512, 2, 2, 3, 1),
    ("resnet20.layer1", 128, 16, 16, 32, 32, 3, 1),
    ("resnet20.layer2.down", 128, 16, 32, 32, 32, 3, 2),
    ("resnet20.layer3", 128, 64, 64, 8, 8, 3, 1),
]


@pytest.fixture
def forced_tile_skipping(monkeypatch):
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_LINEAR", "1.01")
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_CONV2D", "1.01")


def _block_mask(rows: int, cols: int, block, live: float, gen: torch.Generator) -> torch.Tensor:
    tiles = torch.rand(-(-rows // block[0]), -(-cols // block[1]), generator=gen, device=DEVICE) < live
    tiles[0, 0] = True
    coarse = tiles.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return coarse & (torch.rand(rows, cols, generator=gen, device=DEVICE) < 0.7)


def _check(got: torch.Tensor, ref: torch.Tensor, precision: str, what: str) -> None:
    err = rel_error(got, ref)
    assert err < parity_tolerance(precision), f"{what} ({precision}): relative error {err}"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_linear_square(precision, forced_tile_skipping) -> None:
    from fastticket.kernels import masked_linear as ml
    from fastticket.kernels import masked_linear_dw as mld
    from fastticket.kernels.tile_map import build_tile_map

    dtype = DTYPES[precision]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    m, n, k = LINEAR
    tile = ml.linear_tile_sizes(torch.device(DEVICE), dtype)
    mask = _block_mask(n, k, tile, 0.3, gen)
    x = torch.randn(m, k, generator=gen, device=DEVICE)
    w = torch.randn(n, k, generator=gen, device=DEVICE) / k ** 0.5 * mask
    b = torch.randn(n, generator=gen, device=DEVICE)
    g = torch.randn(m, n, generator=gen, device=DEVICE)
    tile_map = build_tile_map(mask, *tile)
    xd, wd, bd, gd = (t.to(dtype) for t in (x, w, b, g))
    with tf32_set("matmul", precision == "tf32"):
        y = ml.linear_forward(xd, wd, bd, tile_map)
        dx = ml.linear_grad_input(gd, wd, tile_map)
        dw = mld.linear_grad_weight(gd, xd, mask, tile_map, tiles_per_program=1)
        dw_quads = mld.linear_grad_weight(gd, xd, mask, tile_map, tiles_per_program=2)
    x64, w64, g64 = xd.double(), wd.double(), gd.double()
    _check(y, x64 @ w64.t() + bd.double(), precision, "forward")
    _check(dx, g64 @ w64, precision, "dX")
    for what, got in (("dW", dw), ("dW (quads)", dw_quads)):
        _check(got, (g64.t() @ x64) * mask, precision, what)
        assert torch.all(got[~mask] == 0), what


def test_linear_dx_of_a_wide_head(forced_tile_skipping) -> None:
    """Live tiles only at the far end of the weight (at real scale, past 2^31 elements)."""
    from fastticket.kernels import masked_linear as ml
    from fastticket.kernels.tile_map import build_tile_map

    m, n, k = HEAD
    dtype = FUSED_ACT
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    mask = torch.zeros(n, k, dtype=torch.bool, device=DEVICE)
    mask[-128:, -256:] = True
    w = torch.zeros(n, k, dtype=dtype, device=DEVICE)
    w[-128:, -256:] = torch.randn(128, 256, generator=gen, device=DEVICE).to(dtype)
    g = torch.randn(m, n, generator=gen, device=DEVICE).to(dtype)
    tile_map = build_tile_map(mask, *ml.linear_tile_sizes(w.device, w.dtype))
    dx = ml.linear_grad_input(g, w, tile_map)
    ref = g[:, -128:].double() @ w[-128:, -256:].double()  # the far tiles only
    _check(dx[:, -256:], ref, "bf16" if dtype == torch.bfloat16 else "fp32", "dX of the far tiles")
    assert torch.all(dx[:, :-256] == 0)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layer", CONV_LAYERS, ids=[c[0] for c in CONV_LAYERS])
def test_conv_vgg19_and_resnet20_layers(layer, precision, forced_tile_skipping) -> None:
    from fastticket.kernels import masked_conv2d as mc
    from fastticket.sparse.conv import masked_conv2d
    from fastticket.kernels.tile_map import TileMapCache

    _, batch, c_in, c_out, h, w_, kernel, stride = layer
    dtype = DTYPES[precision]
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    k = c_in * kernel * kernel
    block = mc.conv2d_tile_sizes(c_out, k, dtype, torch.device(DEVICE))
    mask = _block_mask(c_out, k, block, 0.3, gen).reshape(c_out, c_in, kernel, kernel)
    x = torch.randn(batch, c_in, h, w_, generator=gen, device=DEVICE).to(dtype)
    weight = (torch.randn(c_out, c_in, kernel, kernel, generator=gen, device=DEVICE) / k ** 0.5 * mask).to(dtype)
    bias = torch.randn(c_out, generator=gen, device=DEVICE).to(dtype)
    cache = TileMapCache()
    with tf32_set("cudnn", precision == "tf32"):
        xr, wr, br = (t.clone().requires_grad_(True) for t in (x, weight, bias))
        maps = lambda bn, bk, k_order="mask": cache.get(mask, bn, bk, 0, k_order)  # noqa: E731
        y = masked_conv2d(xr, wr, br, mask, maps, stride, 1, 1)
        assert "MaskedConv2dFunction" in type(y.grad_fn).__name__  # the kernels ran, not cuDNN
        g = torch.randn(y.shape, generator=gen, device=DEVICE).to(dtype)
        y.backward(g)
    ref_y, ref_dx, ref_dw, ref_db = mc.reference_masked_conv2d_grads(x, weight, bias, mask, g, stride, 1, 1)
    _check(y, ref_y, precision, "forward")
    _check(xr.grad, ref_dx, precision, "dX")
    _check(wr.grad, ref_dw, precision, "dW")
    _check(br.grad, ref_db, precision, "dbias")


@pytest.mark.parametrize("precision", [p for p in ("bf16", "fp32") if p in PRECISIONS])
def test_optimizer_steps(precision) -> None:
    from fastticket.kernels import masked_optim as mo
    from fastticket.kernels.tile_map import build_tile_map

    dtype = DTYPES[precision]
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    rows, cols = OPTIM
    mask = _block_mask(rows, cols, mo.DEFAULT_TILE, 0.3, gen)
    p = (torch.randn(rows, cols, generator=gen, device=DEVICE) * mask).to(dtype)
    grad = torch.randn(rows, cols, generator=gen, device=DEVICE).to(dtype)
    tile_map = build_tile_map(mask, *mo.DEFAULT_TILE)
    hp = dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-3, maximize=False)
    p64, bufs, bufs64 = p.double(), [None], [None]
    for _ in range(2):
        mo.sgd_step_([p], [grad], [mask], bufs, tile_maps=[tile_map], **hp)
        bufs64[0] = mo.sgd_reference_(p64, grad.double(), mask, bufs64[0], **hp)
    _check(p, p64, precision, "SGD")
    ea, eas = torch.zeros_like(p), torch.zeros_like(p)
    p64 = p.double()
    ea64, eas64 = torch.zeros_like(p64), torch.zeros_like(p64)
    ahp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False,
               decoupled=True)
    for step in (1, 2):
        mo.adam_step_([p], [grad], [mask], [ea], [eas], [None], [step], tile_maps=[tile_map], **ahp)
        mo.adam_reference_(p64, grad.double(), mask, ea64, eas64, None, step=step, **ahp)
    _check(p, p64, precision, "AdamW")
    assert torch.all(p[~mask] == 0)


def test_fused_dw_sgd() -> None:
    """bf16 activations of an fp32 weight at real scale."""
    from fastticket.kernels import linear_dw_sgd
    from fastticket.kernels.masked_linear import linear_tile_sizes
    from fastticket.kernels.tile_map import build_tile_map

    gen = torch.Generator(device=DEVICE).manual_seed(4)
    m, n, k = LINEAR
    tile = linear_tile_sizes(torch.device(DEVICE), FUSED_ACT)
    mask = _block_mask(n, k, tile, 0.3, gen)
    w = torch.randn(n, k, generator=gen, device=DEVICE) * mask
    w64 = w.double()
    dy = torch.randn(m, n, generator=gen, device=DEVICE).to(FUSED_ACT)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(FUSED_ACT)
    tile_map = build_tile_map(mask, *tile)
    hp = dict(lr=1e-3, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-4, maximize=False)
    linear_dw_sgd.linear_dw_sgd_(dy, x, w, mask, tile_map, None, **hp)
    linear_dw_sgd.linear_dw_sgd_reference_(dy.double(), x.double(), w64, mask, None, dw_dtype=FUSED_ACT, **hp)
    _check(w, w64, "bf16" if FUSED_ACT == torch.bfloat16 else "fp32", "fused dW + SGD")
