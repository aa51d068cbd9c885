"""Presets: the paper's settings (Frankle & Carbin 2019), and every preset is a runnable config."""
import pytest

from fastticket.lottery.data import DATASETS
from fastticket.lottery.models import MODELS
from fastticket.lottery.presets import DEFAULT_PRESET, PRESETS, get_preset, list_presets


def test_every_preset_names_known_parts():
    assert DEFAULT_PRESET == "lenet-mnist5k" and DEFAULT_PRESET in list_presets()
    for name in list_presets():
        config = get_preset(name)
        assert config.model in MODELS and config.dataset in DATASETS
        assert config.eval_every == 100
        assert config.val_size == (500 if config.dataset == "mnist5k" else 5000)


def test_presets_pass_the_search_validation():
    from fastticket.lottery import search  # a broken driver module fails here, it is not skipped

    for name in list_presets():
        search.validate_config(get_preset(name))


def test_paper_hyperparameters():
    lenet = get_preset("lenet-mnist")
    assert (lenet.iterations, lenet.batch_size, lenet.optimizer, lenet.lr) == (50_000, 60, "adam", 1.2e-3)
    assert (lenet.rate, lenet.output_rate, lenet.scope) == (0.2, 0.1, "layerwise")
    assert get_preset("conv6-cifar10").conv_rate == 0.15 and get_preset("conv2-cifar10").lr == 2e-4
    resnet = get_preset("resnet20-cifar10")
    assert resnet.lr_milestones == (20_000, 25_000) and resnet.exclude == ("output", "*shortcut*")
    assert resnet.rewind_iter == 500 and resnet.augment and resnet.scope == "global"
    vgg = get_preset("vgg19-cifar10")
    assert vgg.lr_milestones == (56_250, 84_375)  # epochs 80, 120 of 45,000 images at batch 64
    assert (vgg.iterations, vgg.batch_size, vgg.rewind_iter, vgg.weight_decay) == (112_000, 64, 100, 1e-4)


def test_default_preset_and_copies():
    config = get_preset("lenet-mnist5k")
    assert (config.dataset, config.model, config.levels, config.controls) == ("mnist5k", "lenet300", 10, ("reinit",))
    config.controls += ("random",)
    config.iterations = 1
    assert PRESETS["lenet-mnist5k"].controls == ("reinit",) and PRESETS["lenet-mnist5k"].iterations > 1
    with pytest.raises(ValueError, match="lenet-mnist5k"):
        get_preset("lenet")
