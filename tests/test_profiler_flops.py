"""FLOP counting of the profiler: pinned hand-derived counts for depthwise stacks, the gradients
autograd skips for frozen layers, agreement with torch where torch is right."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from convpeft.core.flops import conv2d_flops, linear_flops
from convpeft.profiler import CountFlops, profile_update


def _run_counted(model: nn.Module, x: torch.Tensor):
    """Forward + backward of ``model(x).sum()`` under our counter and torch's; returns both."""
    with FlopCounterMode(display=False) as torch_mode:
        with CountFlops(model) as c:
            out = model(x).sum()
            c.phase = "backward"
            out.backward()
    return c.tally, torch_mode.get_total_flops()


def test_single_depthwise_conv_pinned():
    # Conv2d(96, 96, 3, groups=96) on 8x96x16x16 (padding 1): 2 * 8*96*16*16 * 9 FLOPs per pass
    conv = nn.Conv2d(96, 96, 3, padding=1, groups=96, bias=False)
    x = torch.randn(8, 96, 16, 16, requires_grad=True)
    tally, torch_flops = _run_counted(conv, x)
    assert tally.forward == 3_538_944
    assert tally.backward_input == 3_538_944
    assert tally.backward_weight == 3_538_944
    assert tally.forward + tally.backward == 10_616_832
    # torch charges the weight gradient as a dense 96x96 conv: ~346.8 MFLOP
    assert torch_flops == 2 * 3_538_944 + 96 * 3_538_944
    assert torch_flops / (tally.forward + tally.backward) > 30


def _dw_stack() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),  # 0 standard
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),  # 1 depthwise
        nn.Conv2d(16, 32, 1, bias=False),  # 2 pointwise
        nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False),  # 3 depthwise, stride 2
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10, bias=False),  # 5 linear
    )


def _expected(batch: int, flags: list[tuple[bool, bool]]) -> tuple[int, int, int]:
    """Hand-stated (input_grad, weight_grad) per layer -> (forward, bwd_input, bwd_weight)."""
    convs = [  # (cin, cout, k, out_hw, groups) of _dw_stack on 8x8 input
        (3, 16, 3, (8, 8), 1), (16, 16, 3, (8, 8), 16), (16, 32, 1, (8, 8), 1),
        (32, 32, 3, (4, 4), 32),
    ]
    fw = bi = bw = 0
    for (cin, cout, k, hw, g), (ig, wg) in zip(convs, flags[:4], strict=True):
        f = conv2d_flops(batch=batch, in_channels=cin, out_channels=cout, kernel_size=k,
                         out_hw=hw, groups=g, input_grad=ig, weight_grad=wg)
        fw, bi, bw = fw + f.forward, bi + f.backward_input, bw + f.backward_weight
    lin = linear_flops(tokens=batch, in_features=512, out_features=10)
    ig, wg = flags[4]
    return fw + lin, bi + (lin if ig else 0), bw + (lin if wg else 0)


@pytest.mark.parametrize(
    "frozen,flags",
    [
        # all trainable, input batch needs no grad: the first conv computes no input gradient
        ((), [(False, True), (True, True), (True, True), (True, True), (True, True)]),
        # frozen prefix 0-1: nothing before layer 2 needs a gradient, so no input grad up to
        # and including layer 2, no weight grads for 0-1
        ((0, 1), [(False, False), (False, False), (False, True), (True, True), (True, True)]),
        # frozen middle layer 2: it still passes the input gradient back, only its weight grad
        # is skipped
        ((2,), [(False, True), (True, True), (True, False), (True, True), (True, True)]),
        # only the head trains (linear probe): one weight gradient, nothing else
        ((0, 1, 2, 3), [(False, False)] * 4 + [(False, True)]),
    ],
)
def test_depthwise_stack_skipped_gradients(frozen, flags):
    torch.manual_seed(0)
    model = _dw_stack()
    for i in frozen:
        model[i].weight.requires_grad_(False)
    x = torch.randn(4, 3, 8, 8)
    tally, _ = _run_counted(model, x)
    fw, bi, bw = _expected(4, flags)
    assert (tally.forward, tally.backward_input, tally.backward_weight) == (fw, bi, bw)


def test_depthwise_stack_absolute_numbers():
    # spelled out once: forward = 2*4*(16*64*27 + 16*64*9 + 32*64*16 + 32*16*9 + 512*10)
    model = _dw_stack()
    tally, _ = _run_counted(model, torch.randn(4, 3, 8, 8))
    assert tally.forward == 2 * 4 * (16 * 64 * 27 + 16 * 64 * 9 + 32 * 64 * 16 + 32 * 16 * 9
                                     + 512 * 10)
    assert tally.forward == 634_880


def test_standard_conv_linear_stack_equals_torch():
    # no grouped convs: torch's counter is right, and so must we be (bias adds are elementwise
    # for us and ignored by torch, so the totals agree)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.Flatten(),
                          nn.Linear(16 * 6 * 6, 20), nn.ReLU(), nn.Linear(20, 5))
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    tally, torch_flops = _run_counted(model, x)
    assert tally.forward + tally.backward == torch_flops
    assert tally.elementwise["forward"] > 0  # bias adds + ReLU counted apart


def test_profile_update_splits_and_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    p = profile_update(model, opt, x, y, repeat=2, per_layer=True)
    f0 = conv2d_flops(batch=4, in_channels=3, out_channels=8, kernel_size=3, out_hw=(8, 8),
                      input_grad=False)
    f3 = conv2d_flops(batch=4, in_channels=8, out_channels=8, kernel_size=3, out_hw=(8, 8),
                      groups=8)
    lin = linear_flops(tokens=4, in_features=8, out_features=4)
    assert p.flops_forward == f0.forward + f3.forward + lin
    assert p.flops_backward_input == f3.backward_input + lin
    assert p.flops_backward_weight == f0.backward_weight + f3.backward_weight + lin
    assert p.flops_backward == p.flops_backward_input + p.flops_backward_weight
    assert p.flops_optimizer == 0
    assert p.flops_total == p.flops_forward + p.flops_backward
    # BN, ReLU, pooling, loss and SGD arithmetic are in their own figure
    assert p.flops_elementwise_forward > 0 and p.flops_elementwise_backward > 0
    assert p.flops_elementwise_optimizer > 0
    rows = {r["name"]: r for r in p.per_layer}
    assert rows["0"]["kind"] == "standard" and rows["3"]["kind"] == "depthwise"
    assert rows["0"]["backward_input"] == 0
    assert rows["3"]["forward"] == f3.forward and rows["3"]["backward_weight"] == f3.forward
    assert sum(r["forward"] for r in p.per_layer) == p.flops_forward
    assert sum(r["backward_input"] + r["backward_weight"] for r in p.per_layer) == p.flops_backward
    json.dumps(p.to_dict())


def test_mobilenet_v2_forward_matches_module_formulas():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.mobilenet_v2(num_classes=10, width_mult=0.5)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    expected = []

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            expected.append(conv2d_flops(batch=out.shape[0], in_channels=mod.in_channels,
                                         out_channels=mod.out_channels,
                                         kernel_size=mod.kernel_size, out_hw=out.shape[-2:],
                                         groups=mod.groups).forward)
        elif isinstance(mod, nn.Linear):
            expected.append(linear_flops(tokens=out.shape[0], in_features=mod.in_features,
                                         out_features=mod.out_features))

    hs = [m.register_forward_hook(hook) for m in model.modules()]
    model(x)
    for h in hs:
        h.remove()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    p = profile_update(model, opt, x, y, warmup=0, repeat=1)
    assert p.flops_forward == sum(expected)
    # everything trains and only the stem skips its input grad: backward = 2 x forward - stem
    stem = expected[0]
    assert p.flops_backward == 2 * p.flops_forward - stem
    assert p.flops_torch > 5 * p.flops_total  # torch's dense depthwise weight gradients
    # flops_torch is exactly what FlopCounterMode itself says for the same update
    with FlopCounterMode(display=False) as mode:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert p.flops_torch == mode.get_total_flops()
