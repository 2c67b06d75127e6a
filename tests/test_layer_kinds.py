"""Layer kinds and target selection."""

import pytest
from torch import nn

from convpeft.core.layer_kinds import layer_kind, select_layers


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),                  # 0 standard
        nn.Conv2d(16, 16, 3, groups=16),      # 1 depthwise
        nn.Conv2d(16, 32, 1),                 # 2 pointwise
        nn.Conv2d(32, 64, 3, groups=4),       # 3 grouped
        nn.Conv2d(64, 128, 3, groups=64),     # 4 depthwise with channel multiplier 2
        nn.BatchNorm2d(128),
        nn.Flatten(),
        nn.Linear(128, 10),                   # 7 linear
    )


def test_layer_kind():
    net = _net()
    kinds = [layer_kind(m) for m in net]
    assert kinds == ["standard", "depthwise", "pointwise", "grouped", "depthwise", None, None,
                     "linear"]
    # A single-channel conv has groups == in_channels == 1: it is a standard conv, not depthwise.
    assert layer_kind(nn.Conv2d(1, 8, 3)) == "standard"


@pytest.mark.parametrize(
    "target, expected",
    [
        ("conv", ["0", "1", "2", "3", "4"]),
        ("standard", ["0", "2"]),
        ("pointwise", ["2"]),
        ("depthwise", ["1", "4"]),
        ("grouped", ["3"]),
        ("linear", ["7"]),
        ("all", ["0", "1", "2", "3", "4", "7"]),
        (["depthwise", "linear"], ["1", "4", "7"]),
        (lambda name, m: isinstance(m, nn.BatchNorm2d), ["5"]),
    ],
)
def test_select_layers(target, expected):
    assert [n for n, _ in select_layers(_net(), target)] == expected


def test_exclude_regex():
    assert [n for n, _ in select_layers(_net(), "conv", exclude=[r"^[01]$"])] == ["2", "3", "4"]


def test_unknown_target_names_the_choices():
    with pytest.raises(ValueError, match="use one of conv, standard"):
        select_layers(_net(), "convs")
