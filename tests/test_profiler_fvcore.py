"""Our forward FLOPs agree with fvcore's (an independent, jit-trace-based counter)."""

import pytest
import torch
import torchvision
from torch import nn

from convpeft.profiler import profile_update
from convpeft.profiler.fvcore_flops import fvcore_forward_flops


def _depthwise_stack() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=2, dilation=2, groups=24), nn.ReLU(),
        nn.Conv2d(24, 48, (1, 3), padding=(0, 1), groups=24),   # depthwise, multiplier 2
        nn.Conv2d(48, 32, 1),
        nn.Conv2d(32, 32, 3, stride=2, groups=4),               # grouped
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


@pytest.mark.parametrize("build", [
    _depthwise_stack,
    lambda: torchvision.models.mobilenet_v2(num_classes=10),
    lambda: torchvision.models.resnet18(num_classes=10),
], ids=["depthwise_stack", "mobilenet_v2", "resnet18"])
def test_forward_flops_match_fvcore(build):
    torch.manual_seed(0)
    model = build()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    ref = fvcore_forward_flops(model.eval(), x)
    assert ref["total"] > 0 and "conv" in ref
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    prof = profile_update(model, opt, x, y, warmup=0, repeat=0, compare_torch=False)
    # Same convention (2 FLOPs per MAC), same ops, same grouped-conv formula: exact agreement.
    assert prof.flops_forward == ref["total"]
