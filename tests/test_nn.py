"""Masked layers as a user meets them: constructors, the zero invariant, state dicts, sparsify/densify."""
import pytest
import torch
import torchvision
from torch import nn

import fastticket
from fastticket import MaskedConv2d, MaskedLinear, densify, density, sparsify
from fastticket.sparse.backend import resolve_backend, use_backend


def random_mask(shape, keep: float, seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < keep


def test_constructor_arguments_match_torch():
    torch.manual_seed(0)
    dense = nn.Linear(7, 5, bias=False, dtype=torch.float64)
    torch.manual_seed(0)
    masked = MaskedLinear(7, 5, bias=False, dtype=torch.float64)
    assert masked.bias is None and masked.weight.dtype == torch.float64
    assert torch.equal(dense.weight, masked.weight)
    conv = MaskedConv2d(3, 4, kernel_size=(3, 5), stride=2, padding="valid", dilation=(1, 2), bias=True,
                        padding_mode="reflect")
    assert conv.kernel_size == (3, 5) and conv.dilation == (1, 2) and conv.padding_mode == "reflect"
    assert conv.weight_mask.dtype == torch.bool and conv.weight_mask.shape == conv.weight.shape
    assert isinstance(conv.weight, nn.Parameter)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_masked_conv_matches_dense_conv_on_masked_weight(padding_mode):
    torch.manual_seed(1)
    conv = MaskedConv2d(3, 4, 3, padding=1, padding_mode=padding_mode)
    conv.set_mask_(random_mask(conv.weight.shape, 0.4, seed=2))
    reference = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)
    reference.load_state_dict({"weight": conv.weight.detach().clone(), "bias": conv.bias.detach().clone()})
    x = torch.randn(2, 3, 9, 7)
    with use_backend("torch"):
        torch.testing.assert_close(conv(x), reference(x), rtol=0, atol=0)


def test_set_mask_zeroes_pruned_weights_and_masks_gradients():
    torch.manual_seed(0)
    layer = MaskedLinear(20, 10)
    mask = random_mask(layer.weight.shape, 0.3, seed=3)
    layer.set_mask_(mask)
    assert torch.all(layer.weight[~mask] == 0) and torch.all(layer.weight[mask] != 0)
    with use_backend("torch"):
        layer(torch.randn(8, 20)).pow(2).sum().backward()
    assert torch.all(layer.weight.grad[~mask] == 0)
    assert torch.all(layer.weight.grad[mask] != 0)
    with pytest.raises(ValueError, match="does not match weight shape"):
        layer.set_mask_(torch.ones(10, 21, dtype=torch.bool))


def test_apply_mask_after_manual_edit_and_nan():
    layer = MaskedLinear(6, 4)
    mask = random_mask(layer.weight.shape, 0.5, seed=4)
    layer.set_mask_(mask)
    with torch.no_grad():
        layer.weight.fill_(float("nan"))
    layer.apply_mask_()
    assert torch.all(layer.weight[~mask] == 0)
    assert not torch.signbit(layer.weight[~mask]).any()  # exact +0.0, not -0.0


def test_load_state_dict_reapplies_mask_and_invalidates_tile_maps():
    source = MaskedLinear(40, 30)
    mask = random_mask(source.weight.shape, 0.2, seed=5)
    mask[:16] = False  # the first 16x16 tile-row is dead
    source.set_mask_(mask)
    state = source.state_dict()
    assert set(state) == {"weight", "bias", "weight_mask"}
    state["weight"] = torch.randn(30, 40)  # a foreign, unmasked weight: loading must re-apply the mask
    target = MaskedLinear(40, 30)
    before = target.tile_map(16, 16)
    assert before.n_live == before.n_tiles
    target.load_state_dict(state)
    assert torch.equal(target.weight_mask, source.weight_mask)
    assert torch.all(target.weight[~target.weight_mask] == 0)
    after = target.tile_map(16, 16)
    assert not after.live[0].any() and after.live[1:].all() and after.n_live == after.n_tiles - 3
    with pytest.raises(RuntimeError, match="size mismatch"):
        MaskedLinear(41, 30).load_state_dict(state)


def test_sparsify_densify_round_trip_with_torchvision_model():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    sparsify(model, exclude=["fc"])
    assert isinstance(model.conv1, MaskedConv2d) and isinstance(model.layer1[0].conv2, MaskedConv2d)
    assert isinstance(model.fc, nn.Linear) and not isinstance(model.fc, MaskedLinear)
    with use_backend("torch"):
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # an all-ones mask changes nothing
        for _, layer in fastticket.masked_modules(model):
            layer.set_mask_(random_mask(layer.weight.shape, 0.3, seed=layer.weight.numel()))
        pruned_out = model(x)
    masks = {name: layer.weight_mask.clone() for name, layer in fastticket.masked_modules(model)}
    report = density(model)
    assert 0.25 < report["density"] < 0.35 and "layer1.0.conv1" in report["layers"]

    densify(model)
    assert not list(fastticket.masked_modules(model))
    fresh = torchvision.models.resnet18(num_classes=10).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), pruned_out, rtol=1e-6, atol=1e-6)

    sparsify(fresh, exclude=["fc"], masks_from_zeros=True)
    assert {name: layer.weight_mask for name, layer in fastticket.masked_modules(fresh)}.keys() == masks.keys()
    for name, layer in fastticket.masked_modules(fresh):
        assert torch.equal(layer.weight_mask, masks[name]), name


def test_sparsify_include_patterns_and_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Conv2d(1, 1, 1)))
    sparsify(model, include=["2.*"])
    assert not isinstance(model[0], MaskedLinear)
    assert isinstance(model[2][0], MaskedLinear) and isinstance(model[2][1], MaskedConv2d)
    with pytest.raises(ValueError, match="matched no Linear/Conv2d"):
        sparsify(nn.Sequential(nn.Linear(2, 2)), include=["missing"])


def test_sparsify_keeps_parameter_objects_for_optimizers():
    model = nn.Sequential(nn.Linear(3, 3))
    weight = model[0].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsify(model)
    assert model[0].weight is weight and optimizer.param_groups[0]["params"][0] is weight


def test_backend_switch(monkeypatch):
    monkeypatch.setenv("FASTTICKET_BACKEND", "torch")
    assert resolve_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("FASTTICKET_BACKEND", "auto")
    assert resolve_backend(torch.device("cpu")) == "torch"  # auto never picks the interpreter
    monkeypatch.setenv("FASTTICKET_BACKEND", "bogus")
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(RuntimeError, match="cannot run on cpu"):
        resolve_backend(torch.device("cpu"))


def test_density_of_a_zero_size_layer_and_a_meta_mask():
    from fastticket.sparse.nn import MaskedLinear, density
    empty = MaskedLinear(0, 3)
    assert empty.density() == 1.0 and density(empty)["layers"][""]["density"] == 1.0
    with torch.device("meta"):
        meta = MaskedLinear(4, 3)
    with pytest.raises(ValueError, match="meta device"):
        meta.density()
