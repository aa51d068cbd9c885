"""fastticket.lottery.streams: a user's training Dataset with a random transform streams through a DataLoader,
its batches a pure function of (seed, iteration) whatever the start or the number of workers."""
import os

import numpy as np
import pytest
import torch

import fastticket
from fastticket.lottery import sources
from fastticket.lottery.streams import StreamData
from user_sources import small_resnet

torchvision = pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")


def _image_folder(root, per_class):
    """A few generated 8x8 PNGs per class: dark and light noise (learnable)."""
    rng = np.random.default_rng(0)
    for c, base in (("dark", 70), ("light", 180)):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(base, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, c, f"{i}.png"))
    T = torchvision.transforms
    return torchvision.datasets.ImageFolder(root, T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(8, padding=2),
                                                             T.ToTensor()]))


def _served(train, test, device="cpu"):
    splits = sources.split_tensors((train, None, test))
    with sources.serving({"<test>:data": (lambda: splits, "sha256:x")}):
        return sources.to_device_data("<test>:data", torch.device(device))


def test_a_transformed_dataset_streams_and_its_batches_depend_only_on_seed_and_iteration(tmp_path):
    train = _image_folder(str(tmp_path / "train"), 12)
    test = torch.utils.data.Subset(train, range(4))  # no transform attribute: held on the device
    data = _served(train, test)
    assert isinstance(data, StreamData) and len(data.train) == 24 and data.info.num_classes == 2
    assert data.test.x.shape == (4, 3, 8, 8)
    rng_before = torch.get_rng_state()
    run = [data.batch(i, 10, seed=3) for i in range(6)]  # crosses epoch boundaries (24 examples)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the transforms' draws leave the global RNG alone
    fresh = _served(train, test)
    x5, y5 = fresh.batch(5, 10, seed=3)  # a resumed arm starts mid-stream: the same batch
    assert torch.equal(x5, run[5][0]) and torch.equal(y5, run[5][1])
    assert not torch.equal(run[0][0], fresh.batch(0, 10, seed=4)[0])  # another trial: another stream
    # The random transforms run per batch: the same example comes back transformed differently.
    flat = torch.cat([x for x, _ in run])
    assert len({tuple(v.flatten().tolist()) for v in flat}) > 24
    fresh.workers = 1
    fresh._streams.clear()
    assert torch.equal(fresh.batch(2, 10, seed=3)[0], run[2][0])  # a worker process gives the same batch
    stacked = fresh.batches(1, 10, [3, 3])
    assert torch.equal(stacked[0][1], run[1][0])


def test_search_on_an_image_folder_with_augmentation(tmp_path):
    train = _image_folder(str(tmp_path / "train"), 16)
    test = torch.utils.data.Subset(_image_folder(str(tmp_path / "test"), 4), range(8))
    out = str(tmp_path / "run")
    settings = dict(levels=1, iterations=10, eval_every=5, batch_size=8, device="cpu", controls=())
    result = fastticket.search(lambda: small_resnet(3), (train, None, test), out, **settings)
    assert [(r["level"], round(r["weights_remaining_pct"])) for r in result.rows] == [(0, 100), (1, 80)]
    again = fastticket.search(lambda: small_resnet(3), (train, None, test), out, resume=True, **settings)
    assert again.rows == result.rows
