"""In-memory image datasets: digits (offline default), CIFAR-10/100, CIFAR-10-C, image folders.

Every loader returns an :class:`ImageDataset`: images held as one ``uint8`` tensor
``(N, 3, H, W)`` (a quarter of the memory of float32; CIFAR and CIFAR-10-C are stored as uint8
anyway) and labels ``(N,)`` int64. Indexing and :meth:`ImageDataset.batches` give float32 images
in ``[0, 1]``. Keeping everything as tensors (no per-item PIL decode, no DataLoader workers)
makes small-image training on a CPU several times faster.

The CIFAR python release is a set of pickles, and ``pickle.load`` runs whatever code a file
asks for. They are read with a restricted unpickler that admits only what the release contains
(dicts, lists, strings, numbers, numpy arrays): a crafted file under ``--data-root`` is refused
with an error naming it, never executed.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from convpeft.core.registry import Registry

__all__ = [
    "ImageDataset",
    "get_dataset",
    "list_datasets",
    "load_dataset",
    "register_dataset",
    "stratified_indices",
]

SPLITS = ("train", "test")


@dataclass
class ImageDataset(torch.utils.data.Dataset):
    """Images ``(N, 3, H, W)`` uint8 and labels ``(N,)`` int64, with class names.

    ``ds[i]`` -> ``(image float32 (3, H, W) in [0, 1], label int)``, so it also works with a
    ``torch.utils.data.DataLoader``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 (N, 3, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be (N,) matching images")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float().div_(255.0), int(self.labels[i])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def resolution(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def float_images(self) -> torch.Tensor:
        """All images as float32 ``(N, 3, H, W)`` in ``[0, 1]``."""
        return self.images.float().div_(255.0)

    def subset(
        self, indices: Sequence[int] | torch.Tensor, name: str | None = None
    ) -> ImageDataset:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageDataset(
            self.images[idx], self.labels[idx], list(self.classes), name or self.name,
            dict(self.info),
        )

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x float32 (B, 3, H, W) in [0, 1], y int64 (B,))`` on ``device``."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for s in range(0, stop, batch_size):
            idx = order[s : s + batch_size]
            x = self.images[idx].to(device, non_blocking=True).float().div_(255.0)
            yield x, self.labels[idx].to(device, non_blocking=True)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float ``[0, 1]`` -> uint8 ``[0, 255]`` (rounded)."""
    return images.clamp(0, 1).mul(255.0).round_().to(torch.uint8)


def _resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, r, r); antialiased bilinear, batched to bound memory."""
    if images.shape[-2:] == (resolution, resolution):
        return images
    out = []
    for s in range(0, images.shape[0], 2048):
        x = images[s : s + 2048].float().div_(255.0)
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear",
                          align_corners=False, antialias=True)
        out.append(to_uint8(x))
    return torch.cat(out)


def stratified_indices(
    labels: torch.Tensor, fraction: float | None = None, per_class: int | None = None, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices per class: ``(picked, rest)`` with ``fraction`` or ``per_class`` picked.

    Deterministic for ``seed``; picked indices are sorted.
    """
    g = torch.Generator().manual_seed(seed)
    picked, rest = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = per_class if per_class is not None else int(round(len(idx) * float(fraction)))
        if per_class is not None and k > len(idx):
            raise ValueError(f"class {c} has {len(idx)} samples, fewer than the {k} asked for")
        picked.append(idx[:k])
        rest.append(idx[k:])
    return torch.cat(picked).sort().values, torch.cat(rest).sort().values


# ----------------------------------------------------------------------------- digits
DIGITS_TEST_FRACTION = 0.25


def _load_digits(split: str, resolution: int, seed: int) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16), bilinear-upsampled to
    ``resolution`` and repeated to RGB; stratified 75/25 train/test split by ``seed``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # (N,1,8,8)
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = to_uint8(x.repeat(1, 3, 1, 1))
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    test_idx, train_idx = stratified_indices(labels, DIGITS_TEST_FRACTION, seed=seed)
    idx = train_idx if split == "train" else test_idx
    return ImageDataset(images[idx], labels[idx], [str(i) for i in range(10)], "digits",
                        {"split": split, "seed": seed})


# ----------------------------------------------------------------------------- CIFAR
_CIFAR = {
    # name: (folder, train files, test files, meta file, meta key, label key, torchvision class)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "label_names", "labels", "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names",
                 "fine_labels", "CIFAR100"),
}


# What the CIFAR python release's pickles reference: numpy arrays (reconstructed from their
# dtype and raw bytes; numpy 1 and 2 spell the module differently; a file re-saved at pickle
# protocol 5 uses ``_frombuffer`` instead of ``_reconstruct``) and, in pickles written by
# Python 3 at protocol 2, ``_codecs.encode`` for byte strings. Dicts, lists, str, bytes and ints
# need no global at all. Everything else (os.system, builtins.eval, subprocess, ...) is refused.
# None of these calls anything a file names: an object array's items go through find_class too.
_CIFAR_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
})


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that admits only the types the CIFAR release contains, so a file under
    ``--data-root`` cannot run code when it is read (a plain ``pickle.load`` would)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """One CIFAR python-release file as a dict with str keys, read with
    :class:`_CifarUnpickler`; anything else is refused with an error naming the file."""
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a CIFAR python-release file ({e}); only numpy arrays, "
                         f"lists, dicts, strings and numbers are read from it") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a CIFAR python-release file (a {type(d).__name__}, "
                         f"expected a dict)")
    # keys are bytes in the official (Python 2) pickles; accept str keys too
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_dir(name: str, data_root: str | os.PathLike | None, download: bool) -> Path:
    folder, train_files, test_files, meta, *_, tv_cls = _CIFAR[name]
    if data_root is None:
        raise ValueError(
            f"{name} needs data_root=<folder holding {folder}/> (download=True to fetch it)"
        )
    root = Path(data_root).expanduser()
    base = root if root.name == folder else root / folder
    needed = [*train_files, *test_files, meta]
    if download and not all((base / f).is_file() for f in needed):
        import torchvision

        getattr(torchvision.datasets, tv_cls)(str(base.parent), train=True, download=True)
        base = base.parent / folder
    missing = [f for f in needed if not (base / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name}: expected the python-pickle release in {base} ({', '.join(needed)}); "
            f"missing {', '.join(missing)}. Pass data_root=<folder containing {folder}/> "
            "or download=True"
        )
    return base


def _load_cifar(name: str, split: str, data_root, resolution: int, download: bool) -> ImageDataset:
    folder, train_files, test_files, meta, meta_key, label_key, _ = _CIFAR[name]
    base = _cifar_dir(name, data_root, download)
    xs, ys = [], []
    for f in train_files if split == "train" else test_files:
        d = _unpickle(base / f)
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    names = _unpickle(base / meta)[meta_key]
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
    images = _resize(torch.from_numpy(np.concatenate(xs)), resolution)
    return ImageDataset(images, torch.from_numpy(np.concatenate(ys)), classes, name,
                        {"split": split, "root": str(base)})


# ----------------------------------------------------------------------------- CIFAR-10-C
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def _find_cifar10c(data_root) -> Path | None:
    if data_root is None:
        return None
    root = Path(data_root).expanduser()
    for cand in (root, root / "CIFAR-10-C"):
        if (cand / "labels.npy").is_file():
            return cand
    return None


def _load_cifar10c(
    split: str, data_root, resolution: int, seed: int, corruption: str | None, severity: int | None,
    download: bool,
) -> ImageDataset:
    """CIFAR-10-C ``corruption`` at ``severity``: the official ``<corruption>.npy`` (5 severities
    stacked, each the 10,000 test images, uint8 NHWC) + ``labels.npy`` when present under
    ``data_root`` (or ``data_root/CIFAR-10-C``); otherwise CIFAR-10's test split corrupted here
    with :func:`convpeft.data.corruptions.corrupt` (seeded). ``split`` must be ``"test"``."""
    from .corruptions import check_severity, corrupt, get_corruption

    if split != "test":
        raise ValueError("cifar10c only has a 'test' split (it corrupts CIFAR-10's test set)")
    if corruption is None or severity is None:
        raise ValueError("cifar10c needs corruption=<name> and severity=<1..5>")
    check_severity(severity)
    folder = _find_cifar10c(data_root)
    if folder is not None and (folder / f"{corruption}.npy").is_file():
        arr = np.load(folder / f"{corruption}.npy", mmap_mode="r")
        labels = np.load(folder / "labels.npy")
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] % 5 or len(labels) != len(arr):
            raise ValueError(
                f"{folder / (corruption + '.npy')}: expected uint8 (5*n, H, W, 3) with "
                f"labels.npy of the same length, got {arr.shape} and {labels.shape}"
            )
        n = arr.shape[0] // 5
        sl = slice((severity - 1) * n, severity * n)
        images = torch.from_numpy(np.array(arr[sl])).permute(0, 3, 1, 2).contiguous()
        ys = torch.from_numpy(labels[sl].astype(np.int64))
        ds = ImageDataset(_resize(images, resolution), ys, list(CIFAR10_CLASSES), "cifar10c",
                          {"corruption": corruption, "severity": severity, "source": str(folder)})
        return ds
    get_corruption(corruption)  # clear error for unknown names before touching CIFAR-10
    try:
        clean = _load_cifar("cifar10", "test", data_root, resolution, download)
    except (FileNotFoundError, ValueError) as e:
        raise FileNotFoundError(
            f"cifar10c: no {corruption}.npy + labels.npy (official CIFAR-10-C folder) under "
            f"data_root={data_root!r}, and CIFAR-10 to generate it from is missing either: {e}"
        ) from None
    images = corrupt(clean.images, corruption, severity, seed=seed)
    return ImageDataset(images, clean.labels, clean.classes, "cifar10c",
                        {"corruption": corruption, "severity": severity, "source": "generated",
                         "seed": seed})


# ----------------------------------------------------------------------------- image folder
IMAGEFOLDER_TEST_FRACTION = 0.2


def _load_imagefolder(split: str, data_root, resolution: int, seed: int) -> ImageDataset:
    """``data_root/<split>/<class>/*.png|jpg`` if ``data_root/train`` exists, else
    ``data_root/<class>/*`` split 80/20 per class by ``seed``. Images resized to ``resolution``."""
    import torchvision

    if data_root is None or not Path(data_root).expanduser().is_dir():
        raise FileNotFoundError(
            f"imagefolder needs data_root=<folder of class sub-folders> (got {data_root!r})"
        )
    root = Path(data_root).expanduser()
    has_splits = (root / "train").is_dir() and (root / "test").is_dir()
    folder = root / split if has_splits else root
    try:
        tv = torchvision.datasets.ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as e:
        raise FileNotFoundError(
            f"imagefolder: expected {folder}/<class>/<image files>: {e}"
        ) from None
    from torchvision.transforms.functional import pil_to_tensor

    imgs = torch.cat([_resize(pil_to_tensor(tv.loader(p).convert("RGB"))[None], resolution)
                      for p, _ in tv.samples])
    labels = torch.as_tensor(tv.targets, dtype=torch.int64)
    ds = ImageDataset(imgs, labels, list(tv.classes), "imagefolder", {"root": str(folder)})
    if not has_splits:
        test_idx, train_idx = stratified_indices(labels, IMAGEFOLDER_TEST_FRACTION, seed=seed)
        ds = ds.subset(train_idx if split == "train" else test_idx)
    ds.info["split"] = split
    return ds


# ----------------------------------------------------------------------------- registry
DatasetLoader = Callable[..., ImageDataset]
"""Called with keywords ``name, split, data_root, resolution, seed, download, corruption,
severity`` (already checked by :func:`load_dataset`); takes those it needs, ignores the rest."""

_DATASETS: Registry[DatasetLoader] = Registry("dataset")
Root = str | os.PathLike | None


def register_dataset(name: str, loader: DatasetLoader) -> DatasetLoader:
    """Make ``load_dataset(name, ...)`` call ``loader``; refuses a name already registered."""
    return _DATASETS.register(name, loader)


def list_datasets() -> list[str]:
    return _DATASETS.names()


def get_dataset(name: str) -> DatasetLoader:
    """The loader registered as ``name``; ``ValueError`` naming the choices."""
    return _DATASETS.get(name)


def _digits(*, split: str, resolution: int, seed: int, **_: object) -> ImageDataset:
    return _load_digits(split, resolution, seed)


def _cifar(*, name: str, split: str, data_root: Root, resolution: int, download: bool,
           **_: object) -> ImageDataset:
    return _load_cifar(name, split, data_root, resolution, download)


def _cifar10c(*, split: str, data_root: Root, resolution: int, seed: int,
              corruption: str | None, severity: int | None, download: bool,
              **_: object) -> ImageDataset:
    return _load_cifar10c(split, data_root, resolution, seed, corruption, severity, download)


def _imagefolder(*, split: str, data_root: Root, resolution: int, seed: int,
                 **_: object) -> ImageDataset:
    return _load_imagefolder(split, data_root, resolution, seed)


register_dataset("digits", _digits)
register_dataset("cifar10", _cifar)
register_dataset("cifar100", _cifar)
register_dataset("cifar10c", _cifar10c)
register_dataset("imagefolder", _imagefolder)


# ----------------------------------------------------------------------------- entry point
def load_dataset(
    name: str,
    *,
    split: str,
    data_root: str | os.PathLike | None = None,
    resolution: int = 32,
    seed: int = 0,
    download: bool = False,
    corruption: str | None = None,
    severity: int | None = None,
) -> ImageDataset:
    """Load ``name`` (one of :func:`list_datasets`) ``split`` ("train"/"test") as an ImageDataset.

    ``resolution``: square side of the returned images. ``seed``: the train/test split of digits
    and imagefolder-without-splits, and the corruption noise when cifar10c is generated.
    ``download`` is only used for cifar10/cifar100 (torchvision's downloader); nothing is fetched
    otherwise. ``corruption``/``severity`` are for cifar10c only.
    """
    loader = get_dataset(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an int >= 8 (got {resolution!r})")
    return loader(name=name, split=split, data_root=data_root, resolution=resolution, seed=seed,
                  download=download, corruption=corruption, severity=severity)
