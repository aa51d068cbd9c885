"""Every registered model builds, runs, sparsifies; output-layer naming; init; torchvision by name."""
import pytest
import torch
from torch import nn

from fastticket import masked_modules, sparsify
from fastticket.lottery.data import DatasetInfo
from fastticket.lottery.models import MODELS, build_model, layer_kind, list_models, output_layer_name
from fastticket.sparse.nn import MaskedConv2d, MaskedLinear

MNIST = DatasetInfo("mnist", (1, 28, 28), 10)
CIFAR = DatasetInfo("cifar10", (3, 32, 32), 10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_builds_runs_and_sparsifies(name):
    torch.manual_seed(0)
    info = MNIST if name == "lenet300" else CIFAR
    model = build_model(name, info)
    assert not list(masked_modules(model)), "build_model must return a dense model"
    x = torch.randn(2, *info.in_shape)
    model.eval()
    with torch.no_grad():
        dense_out = model(x)
    assert dense_out.shape == (2, 10)
    out_name = output_layer_name(model)
    assert out_name == "output" and model.get_submodule(out_name).out_features == 10

    n_dense = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    sparsify(model)
    masked = dict(masked_modules(model))
    assert len(masked) == n_dense
    assert output_layer_name(model) == out_name  # still found once it is a MaskedLinear
    assert isinstance(masked[out_name], MaskedLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense_out)  # all-ones masks change nothing
        for _, layer in masked.items():
            layer.weight_mask[..., 0] = False
            layer.mask_changed_()
        assert model(x).shape == (2, 10)


def test_paper_architectures():
    lenet = build_model("lenet300", MNIST)
    assert [m.weight.shape for m in lenet.modules() if isinstance(m, nn.Linear)] == [
        (300, 784), (100, 300), (10, 100)]
    conv6 = build_model("conv6", CIFAR)
    convs = [m.out_channels for m in conv6.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [64, 64, 128, 128, 256, 256]
    assert [m.weight.shape for m in conv6.modules() if isinstance(m, nn.Linear)] == [
        (256, 4096), (256, 256), (10, 256)]
    assert [m.in_features for m in build_model("conv2", CIFAR).modules() if isinstance(m, nn.Linear)][0] == 16384
    vgg_convs = [m.out_channels for m in build_model("vgg19", CIFAR).modules() if isinstance(m, nn.Conv2d)]
    assert vgg_convs == [64] * 2 + [128] * 2 + [256] * 4 + [512] * 8
    resnet = build_model("resnet20", CIFAR)
    convs = [(n, m) for n, m in resnet.named_modules() if isinstance(m, nn.Conv2d)]
    shortcuts = [n for n, _ in convs if "shortcut" in n]
    assert len(convs) - len(shortcuts) + 1 == 20  # 19 convs + the fc: ResNet-20
    assert len(shortcuts) == 2 and all(m.kernel_size == (1, 1) for n, m in convs if "shortcut" in n)
    assert sum(p.numel() for p in resnet.parameters()) == pytest.approx(272_000, rel=0.02)


def test_glorot_normal_init_and_zero_biases():
    torch.manual_seed(0)
    fc1 = build_model("lenet300", MNIST).fc[0]
    expected_std = (2.0 / (784 + 300)) ** 0.5
    assert float(fc1.weight.detach().std()) == pytest.approx(expected_std, rel=0.02)
    assert float(fc1.weight.detach().mean()) == pytest.approx(0.0, abs=1e-3)
    assert torch.count_nonzero(fc1.bias) == 0


def test_layer_kind():
    assert layer_kind(nn.Linear(2, 3)) == "fc" and layer_kind(MaskedLinear(2, 3)) == "fc"
    assert layer_kind(nn.Conv2d(1, 2, 3)) == "conv" and layer_kind(MaskedConv2d(1, 2, 3)) == "conv"
    with pytest.raises(ValueError, match="BatchNorm2d"):
        layer_kind(nn.BatchNorm2d(3))


def test_torchvision_model_by_name():
    model = build_model("torchvision:resnet18", DatasetInfo("cifar10", (3, 32, 32), 7))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert output_layer_name(model) == "fc"
    sparsify(model)
    assert len(list(masked_modules(model))) == 21  # 17 convs + 3 downsample 1x1 + fc


def test_unknown_models():
    with pytest.raises(ValueError, match="lenet300"):
        build_model("lenet5", MNIST)
    with pytest.raises(ValueError, match="torchvision"):
        build_model("torchvision:notanet", CIFAR)
    assert "torchvision:<name>" in list_models()
    with pytest.raises(ValueError, match="no Linear"):
        output_layer_name(nn.Sequential(nn.Conv2d(1, 1, 1)))
