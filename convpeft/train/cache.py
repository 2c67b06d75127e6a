"""The pretrain cache: where it lives, what its key hashes, and failing early when it cannot be
written.

Source weights take minutes to train and are the same for every method fine-tuned from them,
so :func:`convpeft.train.pretrain` caches them under :func:`resolve_cache_dir`, keyed by a hash
of everything the weights depend on. Besides the recipe and seed that includes a fingerprint of
the source data (:func:`_data_fingerprint`) and the hardware kind whose kernels decide the
rounding (:func:`_backend`): weights from another CPU SIMD level or GPU are another entry, not
a silent mismatch. An unwritable cache is reported before training, not after.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from ..core.paths import resolve_cache_dir as resolve_cache_dir  # re-exported
from ..data import ImageDataset


def _data_fingerprint(ds: ImageDataset) -> str:
    """Short SHA-256 of a dataset's images and labels (what the source model is trained on)."""
    h = hashlib.sha256(ds.images.contiguous().numpy().tobytes())
    h.update(ds.labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _backend(device: torch.device) -> str:
    """The hardware kind whose kernels decide the rounding: the CPU's SIMD level, or the GPU."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{torch.backends.cpu.get_cpu_capability()}"


def _cache_error(path: Path, e: OSError) -> OSError:
    return OSError(f"cannot write the pretrain cache {path} ({e.strerror or e}); set "
                   f"$CONVPEFT_CACHE to a writable folder or pass use_cache=False")


def _check_cache_writable(folder: Path, path: Path) -> None:
    """Create ``folder`` and a probe file in it (removed again); raise naming ``path``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise _cache_error(path, e) from e
