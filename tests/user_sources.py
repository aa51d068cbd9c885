"""A researcher's own model and data, as `fastticket search --model user_sources:small_resnet --data
user_sources:learnable_data` finds them (tests/ on PYTHONPATH) and as tests hand them to fastticket.search."""
import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


def small_resnet(channels: int = 1) -> nn.Module:
    """A small CNN with BatchNorm and a residual connection, for `channels`x8x8 inputs and 2 classes."""
    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Residual(8),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 2))


def learnable_data(n: int = 600, seed: int = 0):
    """(train, val, test) tensors: 1x8x8 noise images whose label says whether the top half is brighter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
    a, b = n * 2 // 3, n * 5 // 6
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


class _Branchy(nn.Module):
    """Python control flow on a tensor's value: vmap cannot trace it, so its arms cannot be stacked."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 16)
        self.output = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x.flatten(1))
        if h.sum() > 0:  # data-dependent: needs the value, which vmap does not have
            h = torch.relu(h)
        return self.output(h)


def branchy() -> nn.Module:
    return _Branchy()


class NoisySGD(torch.optim.SGD):
    """SGD plus Gaussian noise on every parameter (Langevin-style): left alone it would revive every pruned
    weight, so it proves that fastticket keeps them zero for any torch optimizer."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.randn_like(p), alpha=1e-3)
        return loss


def noisy_sgd(params) -> torch.optim.Optimizer:
    return NoisySGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)


def step_lr(optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=8, gamma=0.5)


def one_hot_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A regression loss on float targets (accuracy means nothing there)."""
    return torch.nn.functional.mse_loss(outputs, targets)


def one_hot_data():
    """learnable_data with float one-hot targets [N, 2] instead of class ids."""
    return tuple((x, torch.nn.functional.one_hot(y, 2).float()) for x, y in learnable_data())
