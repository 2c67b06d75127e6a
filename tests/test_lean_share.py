"""Lean activations whose output the next layer saves anyway keep that output, not a mask
(convpeft.memory.lean.probe): exact gradients, hand-computed bytes, the probe's fallbacks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet18

from convpeft import apply_adapters
from convpeft.memory.lean import lean_activations, saved_bytes_by_layer
from convpeft.memory.lean.probe import example_shape, outputs_saved_downstream

CLAMPS = {"relu": nn.ReLU, "relu_inplace": lambda: nn.ReLU(True), "relu6": nn.ReLU6,
          "relu6_inplace": lambda: nn.ReLU6(True), "hardtanh": lambda: nn.Hardtanh(-0.5, 0.5)}
SHARED = "its output, which the next layer saves anyway (no mask)"


def _net(act: str, *, trainable_second: bool) -> nn.Sequential:
    """conv (frozen) -> BN (eval) -> act -> conv (trainable or frozen) -> act -> pool -> fc."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), CLAMPS[act](),
                        nn.Conv2d(8, 8, 3, padding=1), CLAMPS[act](),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    net.requires_grad_(False)
    net[3].requires_grad_(trainable_second)
    net[7].requires_grad_(True)
    return net


def _grads(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = net(x)
    (y * torch.arange(1.0, 5.0)).sum().backward()
    return x.grad, {n: p.grad for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("act", list(CLAMPS))
def test_a_shared_activation_is_exact(act):
    """Outputs and every gradient equal the plain net's (the kinks and NaN: test_lean.py)."""
    plain = _net(act, trainable_second=True)
    lean = copy.deepcopy(plain)
    report = lean_activations(lean)
    rows = {r.name: r for r in report.rows}
    assert rows["2"].saves == SHARED  # feeds the trainable conv
    assert rows["4"].saves == "1-bit mask"  # feeds a pool, which saves nothing
    x = torch.randn(2, 3, 6, 6)
    gx0, g0 = _grads(plain, x)
    gx1, g1 = _grads(lean, x)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() == {"3.weight", "3.bias", "7.weight", "7.bias"}
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6)


def test_shared_saves_the_bytes_worked_out_by_hand():
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    n_y, f32 = 2 * 8 * 5 * 5, 4
    net = _net("relu6_inplace", trainable_second=True)
    plain = saved_bytes_by_layer(net, x)
    # plain: the frozen conv its input x; BN (eval) its input; in-place ReLU6 a copy of its
    # input; the trainable conv its input (the ReLU6 output); the second ReLU6 a copy of its
    # input; the fc its input
    assert plain == {"0": 2 * 3 * 5 * 5 * f32, "1": n_y * f32, "2": n_y * f32,
                     "3": n_y * f32, "4": n_y * f32, "7": 2 * 8 * f32}
    report = lean_activations(net, example_input=x)
    # lean: BN only its scale; the first ReLU6 its output, which is the conv's input (counted
    # once, for the first saver); the second a 1-bit mask
    assert report.lean_bytes == {"1": 8 * f32, "2": n_y * f32, "4": math.ceil(n_y / 8),
                                 "7": 2 * 8 * f32}
    report.undo()
    masked = lean_activations(net, example_input=x, share_outputs=False)
    # masks everywhere: the conv still keeps its input, so the first mask is extra
    assert masked.totals()[1] == report.totals()[1] + math.ceil(n_y / 8)
    assert all(r.saves != SHARED for r in masked.rows)


def test_a_frozen_consumer_keeps_the_mask():
    net = _net("relu", trainable_second=False)
    report = lean_activations(net)
    assert {r.name: r.saves for r in report.rows if r.action == "act"} == {
        "2": "1-bit mask", "4": "1-bit mask"}
    assert report.probe_error is None


def test_probe_failure_keeps_masks_and_says_why():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 2)).requires_grad_(False)
    net[3].requires_grad_(True)
    report = lean_activations(net)  # the probe's default 64x64 input does not fit the Linear
    assert report.probe_error.startswith("RuntimeError") and "example_input=" in report.probe_error
    assert report.rows[1].saves == "1-bit mask"
    report.undo()
    report = lean_activations(net, example_input=torch.randn(2, 3, 8, 8))
    assert report.probe_error is None and report.rows[1].saves == SHARED  # Linear saves it
    x = torch.randn(2, 3, 8, 8)
    gx1, g1 = _grads_any(net, x)
    report.undo()
    gx0, g0 = _grads_any(net, x)
    torch.testing.assert_close(gx1, gx0)
    torch.testing.assert_close(g1["3.weight"], g0["3.weight"])


def _grads_any(net: nn.Module, x: torch.Tensor):
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    net(x).square().sum().backward()
    return x.grad, {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


def test_probe_on_torchvision_models_with_adapters_everywhere():
    torch.manual_seed(0)
    r = resnet18(num_classes=10).eval()
    apply_adapters(r, "lora", 4, target="conv", trainable=["^fc\\."])
    relus = [n for n, m in r.named_modules() if isinstance(m, nn.ReLU)]
    shared = outputs_saved_downstream(r, relus)
    # every ReLU feeds an adapted conv, but the last block's second call feeds the pool only
    assert shared == set(relus) - {"layer4.1.relu"}
    m = mobilenet_v2(num_classes=10).eval()
    apply_adapters(m, "lora", 4, target="conv", trainable=["^classifier\\."])
    acts = [n for n, mod in m.named_modules() if isinstance(mod, nn.ReLU6)]
    shared = outputs_saved_downstream(m, acts)
    assert shared == set(acts) - {"features.18.2"}  # the last one feeds the pool
    assert example_shape(m) == (2, 3, 64, 64)
    assert example_shape(nn.Linear(3, 3)) is None
    # the model itself was not touched: still on CPU, no hooks left
    assert all(p.device.type == "cpu" for p in m.parameters())
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())


def test_a_checkpointed_block_keeps_its_masks():
    """Inside a checkpointed block only that block's masks are alive at once, and sharing
    would hold each output one layer longer: the masks stay (the same in forward and in the
    recomputation, or torch's checkpoint would refuse), outside blocks sharing stays."""
    from convpeft import checkpoint_blocks
    from convpeft.profiler import analytic_profile

    def peak(share: bool, ckpt: bool) -> int:
        torch.manual_seed(0)
        m = mobilenet_v2(num_classes=10)
        apply_adapters(m, "lora", 4, target="conv", trainable=["^classifier\\."])
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.eval()
        lean_activations(m, share_outputs=share)
        if ckpt:
            checkpoint_blocks(m)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
        return analytic_profile(m, opt, (8, 3, 64, 64), compare_torch=False).memory_peak

    assert peak(True, False) < peak(False, False)  # sharing pays without checkpointing
    assert peak(True, True) == peak(False, True)  # and is switched off inside blocks
    net = _net("relu6_inplace", trainable_second=True)
    plain = nn.Sequential(nn.Sequential(*net[:5]), *net[5:])  # block 0: conv .. ReLU6
    lean = copy.deepcopy(plain)
    rows = {r.name: r.saves for r in lean_activations(lean).rows}
    assert rows["0.2"] == SHARED  # what the probe found; the block overrides it at run time
    checkpoint_blocks(lean, blocks=["0"])
    x = torch.randn(2, 3, 6, 6)
    gx0, g0 = _grads(plain, x)
    gx1, g1 = _grads(lean, x)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6)


def test_the_probe_leaves_rng_buffers_and_modes_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                        nn.Conv2d(8, 4, 3)).train()
    net[0].requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    report = lean_activations(net)
    assert report.probe_error is None
    assert torch.equal(torch.get_rng_state(), rng)  # the meta forward drew no random numbers
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # BN stats
    assert net.training and all(m.training for m in net.modules())
