"""Reproducible runs: deterministic torch for a block, and a hash that proves two weights equal.

Seeded generators make a CPU run repeat for a seed; :func:`deterministic_torch` goes further
for pretraining, whose weights are cached and shared: deterministic algorithms where torch has
them and a fixed intra-op thread count (a reduction split over another number of threads sums
in another order). The same torch, thread count and CPU kind
(``torch.backends.cpu.get_cpu_capability()``) then give bit-identical weights, which
:func:`state_dict_sha256` lets two machines compare; another CPU model may round differently in
its vectorised kernels, and training amplifies that, so accuracies agree across machines only
within their seed intervals while FLOPs and memory agree exactly.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn


@contextlib.contextmanager
def deterministic_torch(threads: int | None = None):
    """Run the block as reproducibly as torch allows; yields the intra-op thread count used.

    Sets ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op without a
    deterministic implementation warns instead of failing), cuDNN deterministic without
    autotuning, and ``torch.set_num_threads(threads)`` when ``threads`` is given. Everything is
    restored on exit, exceptions included. What it cannot fix: another torch version, or a CPU
    whose vectorised kernels (AVX2 vs AVX-512, ...) round differently.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None to keep {torch.get_num_threads()}), "
                         f"got {threads}")
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.get_num_threads(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        if threads is not None:
            torch.set_num_threads(threads)
        yield torch.get_num_threads()
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.set_num_threads(prev[2])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[3], prev[4]


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes, in order): equal on two
    machines exactly when their weights are bit-identical."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
