"""Readers of the datasets' real on-disk formats, which believe nothing before checking it: MNIST idx files (the
header's sizes against the file's size before anything is allocated; a .gz expands to at most what its header
declares) and CIFAR-10 python pickle batches (only arrays and lists are built; image rows, label counts and
label ranges checked). Every refusal is one ValueError line naming the file and what is wrong.
"""
from __future__ import annotations

import gzip
import os
import pickle
from typing import Callable, Tuple

import numpy as np

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)
NUM_CLASSES = 10
_CIFAR10_ROW = 3 * 32 * 32
# Far above MNIST's 47 MB: a header declaring more is not an MNIST file, whatever the file's size.
_MAX_IDX_BYTES = 2**30


def _read_header(f, path: str) -> Tuple[int, ...]:
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    dims = f.read(4 * head[3])
    if len(dims) < 4 * head[3]:
        raise ValueError(f"{path} is truncated inside its idx header")
    return tuple(int.from_bytes(dims[4 * i:4 * i + 4], "big") for i in range(head[3]))


def read_idx(path: str) -> np.ndarray:
    """An idx (ubyte) file as written by LeCun's MNIST distribution; '.gz' next to it is also accepted. The
    body is read only after the header's declared size is checked (against the file's size, or for a .gz
    bounded by it: a small .gz that expands to more is refused without holding the expansion)."""
    opener: Callable = open
    if not os.path.exists(path) and os.path.exists(path + ".gz"):
        path, opener = path + ".gz", gzip.open
    with opener(path, "rb") as f:
        shape = _read_header(f, path)
        size = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if size > _MAX_IDX_BYTES:
            raise ValueError(f"{path}: header declares shape {shape} ({size} bytes), more than an MNIST file holds")
        if opener is open:
            body = os.path.getsize(path) - 4 - 4 * len(shape)
            if body != size:
                raise ValueError(f"{path}: header says shape {shape} ({size} bytes) but the file holds {body}")
        data = bytearray(f.read(size + 1))  # writable: torch shares it; one byte more tells a longer file
    if len(data) != size:
        raise ValueError(f"{path}: header says shape {shape} ({size} bytes) but the file holds "
                         f"{'more' if len(data) > size else len(data)}")
    return np.frombuffer(data, dtype=np.uint8, count=size).reshape(shape)


def mnist_present(root: str) -> bool:
    raw = os.path.join(root, "MNIST", "raw")
    return all(os.path.exists(os.path.join(raw, f)) or os.path.exists(os.path.join(raw, f + ".gz"))
               for files in MNIST_FILES.values() for f in files)


def check_labels(labels: np.ndarray, path: str) -> None:
    """Labels must be class numbers in [0, NUM_CLASSES)."""
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = labels[(labels < 0) | (labels >= NUM_CLASSES)][0]
        raise ValueError(f"{path}: label {int(bad)} is out of range (classes are 0..{NUM_CLASSES - 1})")


def read_mnist(root: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    raw = os.path.join(root, "MNIST", "raw")
    images, labels = (read_idx(os.path.join(raw, f)) for f in MNIST_FILES[split])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"MNIST files under {raw} are inconsistent: images {images.shape}, labels {labels.shape} "
                         f"(expected N x 28 x 28 images and N labels)")
    check_labels(labels, os.path.join(raw, MNIST_FILES[split][1]))
    return images[:, None], labels.astype(np.int64)


def cifar10_present(root: str) -> bool:
    folder = os.path.join(root, CIFAR10_FOLDER)
    return all(os.path.exists(os.path.join(folder, f)) for f in CIFAR10_TRAIN + CIFAR10_TEST)


# What a CIFAR-10 python batch holds: a dict of a uint8 array, lists, strings and ints. The arrays are the
# only objects a pickle must build through a global; nothing else is allowed to run while loading.
_CIFAR_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds numpy arrays and plain containers, and refuses every other global (a
    crafted file could otherwise run any code: pickle calls whatever a file names)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _CIFAR_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}: a CIFAR-10 batch holds only arrays and lists")


def _load_cifar_pickle(f, path: str) -> dict:
    try:
        entry = _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - truncated, garbled or crafted: all mean "not a CIFAR-10 batch"
        raise ValueError(f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it (it is re-downloaded) or "
                         f"point --data-dir elsewhere") from None
    if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
        raise ValueError(f"{path} is not a CIFAR-10 batch (expected a dict with 'data' and 'labels')")
    return entry


def _cifar_batch(entry: dict, path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(images [N, 3, 32, 32] uint8, labels [N] int64) of one batch, or a ValueError naming `path`."""
    try:
        data = np.asarray(entry["data"])
        labels = np.asarray(entry["labels"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: 'data' or 'labels' is not an array ({exc})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR10_ROW:
        raise ValueError(f"{path}: 'data' must be N rows of {_CIFAR10_ROW} bytes (3x32x32 uint8), got "
                         f"{data.dtype} {data.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: 'labels' must be a list of integers, got {labels.dtype} {labels.shape}")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels (every image needs its label)")
    check_labels(labels, path)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar10(root: str, files: Tuple[str, ...]) -> Tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in files:
        path = os.path.join(root, CIFAR10_FOLDER, name)
        with open(path, "rb") as f:
            x, y = _cifar_batch(_load_cifar_pickle(f, path), path)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)
