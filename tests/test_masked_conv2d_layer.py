"""A scaled-down Conv-2 of masked layers trains to the same weights on the triton and the torch backends.

Conv-2 (Frankle & Carbin 2019) is conv 64, conv 64, pool, fc 256, fc 256, fc 10; here conv 3->8->8 on 8x8
images so the Triton interpreter keeps up. Masks mix block-pruned and element-pruned layers, so the tile
skipping kernels (forced by the dispatch threshold) see dead tiles; the torch backend is the reference.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastticket import MaskedConv2d, MaskedLinear
from fastticket.sparse.backend import use_backend
import fastticket.sparse.conv as masked_conv2d_module
from fastticket.kernels.masked_conv2d import conv2d_tile_sizes

pytestmark = pytest.mark.launches_triton  # the tests here run the triton backend


class SmallConv2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = MaskedConv2d(3, 8, 3, padding=1)
        self.conv2 = MaskedConv2d(8, 8, 3, padding="same")
        self.fc1 = MaskedLinear(8 * 4 * 4, 16)
        self.fc2 = MaskedLinear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


@pytest.fixture
def ieee_fp32():
    """IEEE fp32 products on both backends (on a GPU, cuDNN/cuBLAS TF32 would differ from the kernels' IEEE)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _block_mask(layer: MaskedConv2d, gen: torch.Generator) -> torch.Tensor:
    """Every other (BN x BK) tile of the kernels' tiling dead, the live ones element-pruned at 30%."""
    c_out = layer.weight.shape[0]
    k = layer.weight[0].numel()
    bn, bk = conv2d_tile_sizes(c_out, k, layer.weight.dtype, layer.weight.device)
    tn, tk = -(-c_out // bn), -(-k // bk)
    live = (torch.arange(tn)[:, None] + torch.arange(tk)[None, :]) % 2 == 0
    dense = live.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:c_out, :k]
    _, c_in, kh, kw = layer.weight.shape  # tiles of the kernels' tap-major K order (kh, kw, C_in)
    keep = dense & (torch.rand(c_out, k, generator=gen) < 0.7)
    return keep.reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2).contiguous()


def _train(model: nn.Module, backend: str, data, steps: int) -> list:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    losses = []
    with use_backend(backend):
        for x, y in data[:steps]:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv2_trains_identically_on_triton_and_torch(device, monkeypatch, memory_format, ieee_fp32):
    # Force the tile-skipping conv kernels regardless of the (speed) dispatch threshold.
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_CONV2D", "1.01")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = SmallConv2().to(device)
    model.conv1.set_mask_(_block_mask(model.conv1, gen).to(device))
    model.conv2.set_mask_((torch.rand(model.conv2.weight.shape, generator=gen) < 0.4).to(device))
    model.fc1.set_mask_((torch.rand(model.fc1.weight.shape, generator=gen) < 0.5).to(device))
    model = model.to(memory_format=memory_format)
    data = [(torch.randn(4, 3, 8, 8, generator=gen).to(device).contiguous(memory_format=memory_format),
             torch.randint(0, 10, (4,), generator=gen).to(device)) for _ in range(3)]

    reference = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    losses_torch = _train(reference, "torch", data, steps=3)
    kernel_calls = []
    original_apply = masked_conv2d_module.MaskedConv2dFunction.apply
    monkeypatch.setattr(masked_conv2d_module.MaskedConv2dFunction, "apply",
                        lambda *args: kernel_calls.append(1) or original_apply(*args))
    losses_triton = _train(model, "triton", data, steps=3)
    assert len(kernel_calls) == 2 * 3  # both convs, every step, went through the tile-skipping kernels

    assert losses_triton == pytest.approx(losses_torch, rel=1e-4)
    for name in before:
        got, want = model.state_dict()[name], reference.state_dict()[name]
        assert torch.isfinite(got).all(), name
        scale = want.float().norm().item() or 1.0
        assert (got.float() - want.float()).norm().item() / scale < 1e-4, name
    for layer in (model.conv1, model.conv2, model.fc1, model.fc2):
        assert torch.all(layer.weight[~layer.weight_mask] == 0.0)  # pruned weights stay exactly zero
    # The training really moved the live weights (a frozen model would match trivially).
    # (conv1.bias moves by ~1e-3 in 3 steps with this mask; a frozen parameter moves by exactly 0.)
    for name in ("conv1.weight", "conv2.weight", "conv1.bias"):
        assert (model.state_dict()[name] - before[name]).abs().max() > 1e-4, name
