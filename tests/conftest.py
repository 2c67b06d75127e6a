"""Shared test helpers: the tiny networks several files build, and a thread pin.

Import the builders with ``from conftest import every_kind_cnn`` (pytest puts ``tests/`` on the
path); use ``one_thread`` as a fixture where a figure depends on the thread count.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn


def every_kind_cnn(seed: int = 0, width: int = 16) -> nn.Sequential:
    """Every conv kind on a (N, 3, H, W) input: 3x3 standard (w x 27), depthwise (w x 9),
    pointwise (2w x w), grouped g=4 (2w x w/2*9), and a linear head (10 x 2w)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=width),
        nn.Conv2d(width, 2 * width, 1),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )


def separable_cnn(seed: int = 0) -> nn.Sequential:
    """A depthwise-separable block on a (N, 3, H, W) input, BN and ReLU, a 4-class head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread (kernel scratch grows with threads), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_one_line_error(capsys, *needles: str) -> None:
    """A command line refused its input the way every CLI here must: one line on stderr naming
    the problem (each of ``needles``), no traceback."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err

