"""Masks on weights of any module (issue 20): MultiheadAttention fully masked, the other layer types, subclasses
kept, torch.nn.utils.prune refused, the rewind warning and loaded masks checked."""
from __future__ import annotations

import copy
import io
import pickle
import pathlib
import warnings

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

import fastticket
from fastticket.errors import MaskError
from fastticket.sparse.masked_weight import MaskedWeight, mask_weight_
from fastticket.sparse.nn import MaskedLinear, unmasked_weights
from fastticket.sparse.optim import MaskedSGD
from fastticket.lottery.prune import prune


def _random_masks_(model: nn.Module, keep: float = 0.8, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, layer in fastticket.masked_modules(model):
        layer.set_mask_(torch.rand(layer.weight.shape, generator=g) < keep)


def _revived(model: nn.Module) -> int:
    return sum(int((layer.weight.detach()[~layer.weight_mask] != 0).sum())
               for _, layer in fastticket.masked_modules(model))


def _sgd_steps(model: nn.Module, x, steps: int = 3, opt=None) -> None:
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        out = model(*x) if isinstance(x, tuple) else model(x)
        (out[0] if isinstance(out, tuple) else out).float().pow(2).sum().backward()
        opt.step()


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4)

    def forward(self, x):
        return self.attn(x, x, x)[0]


def test_multihead_attention_is_fully_masked_and_plain_sgd_revives_nothing():
    torch.manual_seed(0)
    model = fastticket.sparsify(_Attention())
    names = dict(fastticket.masked_modules(model))
    assert set(names) == {"attn.in_proj_weight", "attn.out_proj"}
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear  # class kept
    report = fastticket.density(model)
    assert report["size"] == 16 * 48 + 16 * 16 and report["dense"] == {}
    _random_masks_(model)
    assert report["size"] - fastticket.density(model)["alive"] > 150
    _sgd_steps(model, torch.randn(5, 2, 16))
    assert _revived(model) == 0
    grad = model.attn.in_proj_weight.grad
    assert grad.abs().sum() > 0 and not grad[~model.attn.in_proj_weight_mask].any()
    assert "attn.in_proj_weight_mask" in model.state_dict()


@pytest.mark.parametrize("layer, x", [
    (nn.Conv1d(3, 4, 3), torch.randn(2, 3, 8)),
    (nn.Conv3d(2, 3, 2), torch.randn(1, 2, 4, 4, 4)),
    (nn.ConvTranspose2d(3, 4, 3), torch.randn(2, 3, 5, 5)),
    (nn.ConvTranspose1d(3, 4, 3), torch.randn(2, 3, 5)),
    (nn.Embedding(10, 6), torch.arange(10).view(2, 5)),
    (nn.Bilinear(3, 4, 5), (torch.randn(2, 3), torch.randn(2, 4))),
    (nn.LSTM(4, 5), torch.randn(3, 2, 4)),
], ids=["Conv1d", "Conv3d", "ConvTranspose2d", "ConvTranspose1d", "Embedding", "Bilinear", "LSTM"])
def test_other_layer_types_are_masked_counted_and_stay_pruned(layer, x):
    torch.manual_seed(0)
    model = fastticket.sparsify(nn.ModuleList([layer]))
    masks = dict(fastticket.masked_modules(model))
    assert masks and all(isinstance(m, MaskedWeight) for m in masks.values())
    assert type(model[0]) is type(layer)
    model.forward = layer.forward
    expected = sum(p.numel() for n, p in layer.named_parameters() if p.dim() >= 2)
    assert fastticket.density(model)["size"] == expected
    _random_masks_(model, 0.5)
    _sgd_steps(model, x)
    assert _revived(model) == 0
    assert fastticket.density(model)["density"] < 0.7


class _UserLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_weight = nn.Parameter(torch.randn(6, 4))
        self.scale = nn.Parameter(torch.randn(4, 4))  # not named like a weight: listed, stays dense

    def forward(self, x):
        return x @ self.scale @ self.proj_weight.t()


def test_user_layer_weight_is_masked_and_other_params_listed_dense():
    model = fastticket.sparsify(nn.Sequential(_UserLayer()))
    assert [n for n, _ in fastticket.masked_modules(model)] == ["0.proj_weight"]
    assert list(unmasked_weights(model)) == ["0.scale"]
    report = fastticket.density(model)
    assert report["dense"] == {"0.scale": 16} and report["size"] == 24
    _random_masks_(model, 0.5)
    _sgd_steps(model, torch.randn(3, 4))
    assert _revived(model) == 0


class LoRALinear(nn.Linear):
    def __init__(self, n_in: int, n_out: int, rank: int = 2) -> None:
        super().__init__(n_in, n_out)
        self.A = nn.Parameter(torch.randn(rank, n_in) * 0.1)
        self.B = nn.Parameter(torch.randn(n_out, rank) * 0.1)

    def forward(self, x):
        return super().forward(x) + x @ self.A.t() @ self.B.t()


def test_subclasses_keep_class_params_and_forward():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(8, 6), torch.ao.nn.qat.Linear(6, 4, qconfig=torch.ao.quantization.
                                                                       get_default_qat_qconfig("x86")),
                          nn.LazyLinear(3))
    x = torch.randn(2, 8)
    expected = model[1](model[0](x))
    fastticket.sparsify(model)
    assert type(model[0]) is LoRALinear and type(model[1]) is torch.ao.nn.qat.Linear
    assert isinstance(model[2], nn.LazyLinear)
    torch.testing.assert_close(model[1](model[0](x)), expected, rtol=0, atol=0)
    assert set(dict(fastticket.masked_modules(model))) == {"0", "1"}
    dense = unmasked_weights(model)
    assert set(dense) == {"0.A", "0.B", "2.weight"} and "LazyLinear" in dense["2.weight"]
    report = fastticket.density(model)
    assert report["dense"] == {"0.A": 16, "0.B": 12, "2.weight": None} and report["size"] == 48 + 24
    with pytest.raises(MaskError, match=r"strict=True\): '0.A' \(LoRALinear: .*\) would stay dense \(and 2 more\)"):
        fastticket.sparsify(copy.deepcopy(model), strict=True)
    model(x)  # the lazy layer materializes (and becomes an nn.Linear): sparsify again masks it
    fastticket.sparsify(model, exclude=["0.A", "0.B"], strict=True)
    assert isinstance(model[2], MaskedLinear) and fastticket.density(model)["dense"] == {"0.A": 16, "0.B": 12}


@pytest.mark.parametrize("layer", [MaskedLinear(6, 4), nn.Conv1d(2, 4, 3)], ids=["MaskedLinear", "Conv1d"])
def test_torch_prune_is_refused_in_one_line_and_leaves_the_layer_working(layer):
    mask = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    (layer if isinstance(layer, MaskedLinear) else mask_weight_(layer)).set_mask_(mask)
    with pytest.raises(MaskError, match="weight_mask.*torch.nn.utils.prune uses the same name"):
        torch_prune.l1_unstructured(layer, "weight", amount=2)
    assert isinstance(layer.weight, nn.Parameter) and "weight_orig" not in dict(layer.named_parameters())
    assert torch.equal(layer.weight_mask, mask) and not layer.weight[~mask].any()
    x = torch.randn(2, 6) if isinstance(layer, nn.Linear) else torch.randn(2, 2, 5)
    layer(x).sum().backward()
    assert not layer.weight.grad[~mask].any()


def test_copies_keep_masking_gradients_and_optimizers_find_masks():
    model = fastticket.sparsify(_Attention())
    _random_masks_(model)
    for make_copy in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        twin = make_copy(model)
        opt = MaskedSGD(twin.parameters(), lr=0.5, momentum=0.9)
        _sgd_steps(twin, torch.randn(5, 2, 16), opt=opt)
        twin.attn.in_proj_weight_mask[:, 0] = False  # a mask change mid-training
        twin.attn.in_proj_weight.data[:, 0] = 1.0
        dict(fastticket.masked_modules(twin))["attn.in_proj_weight"].mask_changed_()
        _sgd_steps(twin, torch.randn(5, 2, 16), opt=opt)
        assert _revived(twin) == 0
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it cannot save a hook; ours are re-registered
        torch.save(model, buf)
    buf.seek(0)
    assert _revived(torch.load(buf, weights_only=False)) == 0


def test_rewind_to_keeps_masks_and_load_state_dict_warns_once_with_the_count():
    torch.manual_seed(0)
    model = fastticket.sparsify(nn.Sequential(nn.Linear(8, 8), nn.Conv1d(1, 2, 3), _Attention()))
    init = copy.deepcopy(model.state_dict())
    _random_masks_(model, 0.7)
    pruned = sum(int((~layer.weight_mask).sum()) for _, layer in fastticket.masked_modules(model))
    masks = {n: layer.weight_mask.clone() for n, layer in fastticket.masked_modules(model)}
    fastticket.rewind_to(model, init)
    assert all(torch.equal(layer.weight_mask, masks[n]) for n, layer in fastticket.masked_modules(model))
    layer = model[2].attn
    torch.testing.assert_close(layer.in_proj_weight, init["2.attn.in_proj_weight"] * masks["2.attn.in_proj_weight"])
    with pytest.warns(UserWarning, match=f"revived {pruned} pruned weight.*fastticket.rewind_to") as record:
        model.load_state_dict(init)
    assert len([w for w in record if "revived" in str(w.message)]) == 1
    assert fastticket.density(model)["density"] == 1.0


@pytest.mark.parametrize("bad", [0.5, -1.0, 2.0, float("nan")])
def test_loaded_masks_are_checked_like_set_mask(bad):
    for model in (nn.Sequential(MaskedLinear(4, 4)), fastticket.sparsify(nn.Sequential(nn.Embedding(4, 4)))):
        state = model.state_dict()
        state["0.weight_mask"] = torch.ones(4, 4)
        state["0.weight_mask"][1, 2] = bad
        with pytest.raises(MaskError, match="must hold only 0 and 1.*the loaded state's '0.weight_mask'"):
            model.load_state_dict(state)
        assert model[0].weight_mask.all()


def test_state_dicts_of_masked_layers_still_load_and_the_search_helpers_see_every_mask():
    from fastticket.sparse.nn import masks_in_state, model_masks

    model = fastticket.sparsify(nn.Sequential(nn.Linear(8, 16), _Attention()))
    _random_masks_(model)
    state = model.state_dict()
    landed = {k: v for k, v in state.items() if k.startswith("0.")}  # what the landed version wrote
    fresh = nn.Sequential(MaskedLinear(8, 16))
    fresh.load_state_dict(landed)
    assert torch.equal(fresh[0].weight_mask, model[0].weight_mask)
    assert masks_in_state(model, state).keys() == model_masks(model).keys() == {"0", "1.attn.in_proj_weight",
                                                                                 "1.attn.out_proj"}
    before = fastticket.density(model)["alive"]
    prune(model, 0.5)
    assert fastticket.density(model)["alive"] < 0.6 * before and _revived(model) == 0


def test_densify_removes_every_mask_and_keeps_zeros():
    model = fastticket.sparsify(nn.Sequential(nn.Linear(4, 4), nn.Embedding(5, 4), _Attention()))
    _random_masks_(model, 0.5)
    plain = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_mask")}
    fastticket.densify(model)
    assert not list(fastticket.masked_modules(model)) and model.state_dict().keys() == plain.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.items())
    assert mask_weight_(model[1]).density() == 1.0  # a densified module can be masked again


def test_readme_own_model_imp_loop_runs_and_prints_the_densities(capsys):
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = readme.split("### Your own model: an IMP loop\n\n```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out.split() == ["0", "0.8", "1", "0.64", "2", "0.51"]
