"""Tiny CIFAR-10, CIFAR-100 and CIFAR-10-C copies written in the real release formats.

``write_cifar10`` / ``write_cifar100``: the python-pickle folders (``cifar-10-batches-py``,
``cifar-100-python``: protocol-2 pickles of byte-keyed dicts, images as uint8 rows of
R(1024) G(1024) B(1024)). ``write_cifar10c``: ``<corruption>.npy`` (the 5 severities stacked,
each the same n test images, uint8 NHWC) + ``labels.npy``, in a ``CIFAR-10-C`` folder. Import
with ``from cifar_files import write_cifar10`` (pytest puts ``tests/`` on the path).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog",
                 b"horse", b"ship", b"truck"]


def write_pickle(path: Path, obj: object, protocol: int = 2) -> None:
    """Protocol 2, as the official (Python 2) release was written."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def cifar_arrays(n: int, seed: int, n_classes: int,
                 balanced: bool = False) -> tuple[np.ndarray, list[int]]:
    """``n`` random uint8 image rows (n, 3072) and labels (every class in turn if
    ``balanced``, else random)."""
    rng = np.random.default_rng(seed)
    labels = ([i % n_classes for i in range(n)] if balanced
              else rng.integers(0, n_classes, size=n).tolist())
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), labels


def write_cifar10(root: Path, n_per_batch: int = 4, protocol: int = 2, n_test: int = 10,
                  balanced: bool = False) -> dict[str, tuple[np.ndarray, list[int]]]:
    """``root/cifar-10-batches-py``: 5 training batches of ``n_per_batch`` images, a test batch
    of ``n_test``, the metadata. Returns what each file holds."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    written = {}
    for i in range(1, 6):
        data, labels = cifar_arrays(n_per_batch, i, 10, balanced)
        written[f"data_batch_{i}"] = (data, labels)
        batch = {b"batch_label": b"x", b"labels": labels, b"data": data,
                 b"filenames": [b"f"] * len(labels)}
        write_pickle(base / f"data_batch_{i}", batch, protocol)
    data, labels = cifar_arrays(n_test, 99, 10, balanced)
    written["test_batch"] = (data, labels)
    write_pickle(base / "test_batch", {b"labels": labels, b"data": data}, protocol)
    write_pickle(base / "batches.meta", {b"label_names": CIFAR10_NAMES, b"num_vis": 3072},
                 protocol)
    return written


def write_cifar100(root: Path, n_train: int = 12, n_test: int = 6,
                   balanced: bool = False) -> Path:
    """``root/cifar-100-python``: train, test (fine and coarse labels) and meta."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        data, fine = cifar_arrays(n, n, 100, balanced)
        write_pickle(base / split, {b"data": data, b"fine_labels": fine,
                                    b"coarse_labels": [0] * n})
    write_pickle(base / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                 b"coarse_label_names": [b"x"] * 20})
    return base


def write_cifar10c(root: Path, corruption: str, images: np.ndarray,
                   labels: np.ndarray) -> Path:
    """``root/CIFAR-10-C/<corruption>.npy`` with ``images`` (5*n, 32, 32, 3) uint8, severity 1
    first, and ``labels.npy`` (5*n,)."""
    folder = root / "CIFAR-10-C"
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{corruption}.npy", images.astype(np.uint8))
    np.save(folder / "labels.npy", labels.astype(np.uint8))
    return folder
