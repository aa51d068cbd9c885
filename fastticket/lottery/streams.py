"""A user's training set streamed through a DataLoader (its transforms, e.g. augmentation, run per batch),
with batches still a pure function of (seed, iteration): the same as fastticket.lottery.data.DeviceData.

Which examples form batch i is DeviceData's rule (one permutation per epoch, from the seed); each example's
transform runs under its own torch seed, drawn from (seed, stream position), so the batches do not depend on
the number of workers, on where a resumed arm starts, or on other streams. Validation and test splits are
held on the device as usual (fastticket.lottery.sources).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterator, List, Tuple

import torch
from torch import Tensor

from fastticket.lottery.data import DeviceData, Split, _seed_of

_ITEM_STREAM = 4  # after data.py's permutation (1), augmentation (2) and hold-out (3) streams


@dataclasses.dataclass
class Head(Split):
    """The first examples of a streamed training set (what preflight and the engine's probes run on), with
    the length of the whole set."""

    n: int = 0

    def __len__(self) -> int:
        return self.n


def seeded_item(dataset: Any, index: int, seed: int) -> Tuple[Tensor, int]:
    """dataset[index] with torch's RNG seeded by `seed` for it (its random transforms), restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x, y = dataset[index]
    return torch.as_tensor(x), int(y)


class _Seeded(torch.utils.data.Dataset):
    """The items of `dataset`, asked for as (index, seed): `seeded_item`."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[Tensor, int]:
        return seeded_item(self.dataset, *key)


class _Batches:
    """The batch sampler of one stream: batch i's (index, example seed) pairs, from `start` on."""

    def __init__(self, data: "StreamData", seed: int, start: int, batch_size: int) -> None:
        self.data, self.seed, self.start, self.batch_size = data, seed, start, batch_size

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        it = self.start
        while True:
            idx = self.data._indices(it, self.batch_size, self.seed).tolist()
            yield [(i, _seed_of(self.seed, _ITEM_STREAM, it * self.batch_size + p)) for p, i in enumerate(idx)]
            it += 1


@dataclasses.dataclass
class StreamData(DeviceData):
    """DeviceData whose training batches come from `dataset` through a DataLoader (`workers` processes,
    pinned memory on CUDA); one open stream per seed, reopened where a caller jumps (a new arm, a resume)."""

    dataset: Any = None
    workers: int = 0
    _streams: Dict[int, List[Any]] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def batch(self, iteration: int, batch_size: int, seed: int) -> Tuple[Tensor, Tensor]:
        stream = self._streams.get(seed)
        if stream is None or stream[0] != iteration or stream[1] != batch_size:
            # Its own generator: the loader's worker seeds are not drawn from (and do not move) the global RNG.
            loader = torch.utils.data.DataLoader(_Seeded(self.dataset), batch_sampler=_Batches(self, seed, iteration,
                                                                                                batch_size),
                                                 num_workers=self.workers, pin_memory=self.device.type == "cuda",
                                                 generator=torch.Generator().manual_seed(seed))
            stream = self._streams[seed] = [iteration, batch_size, iter(loader)]
        x, y = next(stream[2])
        stream[0] += 1
        return x.to(self.device, non_blocking=True).float(), y.to(self.device, non_blocking=True)

    def batches(self, iteration: int, batch_size: int, seeds: Any) -> Tuple[Tensor, Tensor]:
        drawn = {s: self.batch(iteration, batch_size, s) for s in dict.fromkeys(seeds)}
        return torch.stack([drawn[s][0] for s in seeds]), torch.stack([drawn[s][1] for s in seeds])
