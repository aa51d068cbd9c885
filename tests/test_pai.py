"""Pruning at initialization (fastticket.lottery.pai): SNIP, GraSP and SynFlow scores against finite-difference and
hand-computed float64 references on a tiny network, and pruning to an exact count."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastticket.errors import ConfigError
from fastticket.sparse.nn import masked_modules, sparsify
from fastticket.lottery.pai import GRASP_TEMPERATURE, grasp_saliency, prune_at_init, snip_saliency, synflow_saliency
from fastticket.lottery.prune import alive_count, prune, prune_to_count
from fastticket.sparse.testing import rel_error

LAYERS = ("1", "3")


def tiny_net(seed=0, act=nn.Tanh):
    torch.manual_seed(seed)
    return sparsify(nn.Sequential(nn.Flatten(), nn.Linear(5, 4), act(), nn.Linear(4, 3))).double()


def batches(seed=1, n=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
            for _ in range(n)]


def weights(net):
    return {name: m.weight for name, m in masked_modules(net)}


def loss_at(net, data, temperature=1.0):
    with torch.no_grad():
        return sum(float(F.cross_entropy(net(x) / temperature, y)) for x, y in data)


def fd_gradient(net, data, temperature=1.0, h=1e-6):
    """dL/dw of every masked weight by central differences of the loss alone."""
    grads = {}
    for name, w in weights(net).items():
        g = torch.zeros_like(w)
        for i in range(w.numel()):
            with torch.no_grad():
                old = w.view(-1)[i].item()
                w.view(-1)[i] = old + h
                up = loss_at(net, data, temperature)
                w.view(-1)[i] = old - h
                down = loss_at(net, data, temperature)
                w.view(-1)[i] = old
            g.view(-1)[i] = (up - down) / (2 * h)
        grads[name] = g
    return grads


def test_snip_scores_match_finite_differences():
    net, data = tiny_net(), batches()
    scores = snip_saliency(net, data)
    ref = fd_gradient(net, data)
    for name, w in weights(net).items():
        assert scores[name].dtype == torch.float64
        assert rel_error(scores[name], (ref[name] * w).abs()) < 1e-7, name


def test_grasp_scores_match_finite_differences():
    net, data = tiny_net(), batches()
    t = GRASP_TEMPERATURE / 100  # a milder temperature keeps the second differences well above round-off
    scores = grasp_saliency(net, data, temperature=t)
    g = fd_gradient(net, data, t)
    ws = weights(net)
    delta, h = 1e-4, 1e-4

    def shifted_loss(sign_g):
        with torch.no_grad():
            for name, w in ws.items():
                w += sign_g * delta * g[name]
            value = loss_at(net, data, t)
            for name, w in ws.items():
                w -= sign_g * delta * g[name]
        return value

    for name, w in ws.items():
        hg = torch.zeros_like(w)
        for i in range(w.numel()):
            old = w.view(-1)[i].item()
            parts = []
            for sign_e in (1, -1):
                with torch.no_grad():
                    w.view(-1)[i] = old + sign_e * h
                parts.append(shifted_loss(1) - shifted_loss(-1))
            with torch.no_grad():
                w.view(-1)[i] = old
            hg.view(-1)[i] = (parts[0] - parts[1]) / (4 * h * delta)  # d/dw_i of the directional derivative g.dL
        assert rel_error(scores[name], w.detach() * hg) < 1e-4, name


def test_synflow_scores_by_hand_relu_net_with_biases():
    net = tiny_net(act=nn.ReLU)
    w1, b1 = net[1].weight.detach().abs(), net[1].bias.detach().abs()
    w2 = net[3].weight.detach().abs()
    scores = synflow_saliency(net, (5,))
    # R = 1^T (|W2| (|W1| 1 + |b1|) + |b2|): dR/dW1_ij = sum_k |W2_ki| * x_j (x = 1); dR/dW2_ki = (|W1| 1 + |b1|)_i
    ref1 = w1 * w2.sum(dim=0)[:, None]
    ref2 = w2 * (w1.sum(dim=1) + b1)[None, :]
    assert rel_error(scores["1"], ref1) < 1e-12
    assert rel_error(scores["3"], ref2) < 1e-12


def test_scoring_leaves_the_model_untouched():
    net, data = tiny_net(), batches()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    snip_saliency(net, data), grasp_saliency(net, data), synflow_saliency(net, (5,))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
def test_prune_at_init_keeps_exactly_the_requested_count(method):
    net, data = tiny_net(), batches()
    masks = prune_at_init(net, method, 13, LAYERS, batches=data, rounds=5)
    assert alive_count(masks, LAYERS) == 13
    for name, m in masked_modules(net):
        assert torch.equal(m.weight_mask, masks[name])
        assert bool((m.weight[~m.weight_mask] == 0).all())


def test_snip_keeps_the_highest_scores_globally():
    net, data = tiny_net(), batches()
    scores = snip_saliency(net, data)
    masks = prune_to_count(net, 10, prunable=LAYERS, criterion="snip", batches=data)
    flat = torch.cat([scores[n].reshape(-1) for n in LAYERS])
    kept = torch.cat([masks[n].reshape(-1) for n in LAYERS])
    assert flat[kept].min() >= flat[~kept].max()


def test_synflow_is_iterative_each_round_rescoring_the_pruned_net():
    net = tiny_net(act=nn.ReLU)
    reference = tiny_net(act=nn.ReLU)
    total, keep, rounds = 12 + 20, 8, 2
    masks = prune_at_init(net, "synflow", keep, LAYERS, batches=batches(), rounds=rounds)
    # By hand: round 1 keeps round(32 * (8/32)^(1/2)) = 16 by the scores of the dense net, round 2 keeps 8 by the
    # scores of that 16-weight net.
    for target in (round(total * (keep / total) ** 0.5), keep):
        prune_to_count(reference, target, prunable=LAYERS, criterion="synflow", batches=batches())
    for name, m in masked_modules(reference):
        assert torch.equal(masks[name], m.weight_mask), name
    one_shot = tiny_net(act=nn.ReLU)
    prune_at_init(one_shot, "synflow", keep, LAYERS, batches=batches(), rounds=1)
    assert alive_count({n: m.weight_mask for n, m in masked_modules(one_shot)}, LAYERS) == keep


def test_block_granularity_scores_tiles_by_summed_saliency():
    net, data = tiny_net(), batches()
    scores = snip_saliency(net, data)
    masks = prune_to_count(net, 3, prunable=LAYERS, criterion="snip", granularity="block:2x2", batches=data)
    # every 2x2 tile is all kept or all dropped, and the kept tiles carry the largest summed scores
    tile_scores, kept = [], []
    for name in LAYERS:
        s, m = scores[name], masks[name]
        for r in range(0, s.shape[0], 2):
            for c in range(0, s.shape[1], 2):
                tile = m[r:r + 2, c:c + 2]
                assert bool(tile.all()) or not bool(tile.any())
                tile_scores.append(float(s[r:r + 2, c:c + 2].sum()))
                kept.append(bool(tile.all()))
    assert sum(kept) == 3
    assert min(t for t, k in zip(tile_scores, kept) if k) >= max(t for t, k in zip(tile_scores, kept) if not k)


def test_data_criteria_without_batches_are_a_clear_error():
    with pytest.raises(ConfigError, match="needs training batches"):
        prune(tiny_net(), 0.5, criterion="snip")
