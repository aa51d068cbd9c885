"""A dense-dispatched masked linear layer masks its weight gradient exactly once (fastticket/sparse/linear.py:
the weight's MaskGradient hook does it, the backward does not repeat it), and the invariant still holds."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastticket.sparse.backend import use_backend
from fastticket.sparse.functional import masked_linear
from fastticket.sparse.nn import MaskedLinear
from fastticket.kernels.tile_map import build_tile_map

pytestmark = pytest.mark.launches_triton


class CountMaskFills(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.masked_fill, torch.ops.aten.masked_fill_):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _layer(seed: int):
    torch.manual_seed(seed)
    layer = MaskedLinear(45, 37)
    layer.set_mask_(torch.rand(37, 45) < 0.6)  # element mask: every tile live, so the dispatch goes dense
    return layer


@pytest.mark.parametrize("threshold", ["0.5", "1.01"], ids=["dense", "skip"])
def test_masked_linear_layer_masks_dw_once_and_plain_sgd_keeps_pruned_at_zero(monkeypatch, threshold):
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_LINEAR", threshold)
    layer = _layer(3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)  # a plain torch optimizer
    g = torch.Generator().manual_seed(4)
    with use_backend("triton"):
        for _ in range(2):
            x, dy = torch.randn(13, 45, generator=g), torch.randn(13, 37, generator=g)
            loss = (layer(x) * dy).sum()
            counter = CountMaskFills()
            with counter:
                loss.backward()
            # dense: the hook's masked_fill only; skip: the kernel masks in its epilogue, and the hook sees the
            # very tensor it returned (fastticket.sparse._premasked), so no masked_fill at all
            expected = 1 if threshold == "0.5" else 0
            assert counter.n == expected, f"{counter.n} masked_fill launches in the backward"
            pruned = ~layer.weight_mask
            assert bool((layer.weight.grad[pruned] == 0).all()), "pruned entries got a gradient"
            ref = (dy.double().t() @ x.double()) * layer.weight_mask
            assert torch.allclose(layer.weight.grad.double(), ref, rtol=1e-4, atol=1e-4)
            opt.step()
            opt.zero_grad()
            assert bool((layer.weight[pruned] == 0).all()), "a pruned weight moved"


def test_plain_weight_without_hook_is_still_masked_by_the_backward(monkeypatch):
    """The functional call on a weight with no MaskGradient hook: the backward's masking is the only one."""
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_LINEAR", "0.5")
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(37, 45, generator=g) < 0.6
    w = (torch.randn(37, 45, generator=g) * mask).requires_grad_(True)
    x, dy = torch.randn(13, 45, generator=g), torch.randn(13, 37, generator=g)
    with use_backend("triton"):
        y = masked_linear(x, w, None, mask, lambda bn, bk: build_tile_map(mask, bn, bk))
    counter = CountMaskFills()
    with counter:
        y.backward(dy)
    assert counter.n == 1
    ref = (dy.double().t() @ x.double()) * mask
    assert torch.allclose(w.grad.double(), ref, rtol=1e-5, atol=1e-5)
    assert bool((w.grad[~mask] == 0).all())
