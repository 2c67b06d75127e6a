"""``mode="auto"`` by device: FLOPs on the CPU, weight space on CUDA (a cost model from published
H100 figures), DoRA never saving more for backward than its weight path; the choice and its
reason per layer in the adapter report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convpeft
from convpeft.adapters import adapter_report, make_adapter
from convpeft.memory.lean import saved_bytes_by_layer

DENSE = (8, 64, 16, 16)  # a dense 3x3 conv on a large map: activation space has fewer FLOPs


def _dense(method: str, mode: str = "auto") -> nn.Module:
    torch.manual_seed(0)
    return make_adapter(method, nn.Conv2d(64, 64, 3, padding=1), 4, mode=mode)


def test_cpu_uses_flops_cuda_uses_weight_space():
    lora = _dense("lora")
    assert lora.resolve_mode(DENSE, training=True, device="cpu") == "activation"
    assert lora.resolve_mode(DENSE, training=True, device="cuda") == "weight"
    assert lora.resolve_mode(DENSE, training=True) == "activation"  # the weight's device: cpu
    lora(torch.randn(DENSE))
    assert (lora.last_mode, lora.last_reason) == ("activation", "flops")
    # the rules that need activation space hold on CUDA too
    drop = make_adapter("lora", nn.Conv2d(64, 64, 3, padding=1), 4, dropout=0.1)
    assert drop.resolve_mode(DENSE, training=True, device="cuda") == "activation"


def test_dora_auto_takes_weight_space_where_activation_space_saves_more():
    lora, dora = _dense("lora"), _dense("dora")
    x = torch.randn(DENSE, requires_grad=True)
    lora(x)
    dora(x)
    assert lora.last_mode == "activation"
    assert (dora.last_mode, dora.last_reason) == ("weight", "memory")
    # a 1x1 output map under a wide kernel: activation space saves less and is cheaper
    torch.manual_seed(0)
    small = make_adapter("dora", nn.Conv2d(64, 64, 3), 4)
    small(torch.randn(1, 64, 3, 3, requires_grad=True))
    assert (small.last_mode, small.last_reason) == ("activation", "flops")


KINDS = {
    "standard": lambda: nn.Conv2d(16, 24, 3, padding=1),
    "pointwise": lambda: nn.Conv2d(16, 24, 1),
    "depthwise": lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16),
    "grouped": lambda: nn.Conv2d(16, 24, 3, stride=2, padding=1, groups=4),
    "wide_kernel_small_map": lambda: nn.Conv2d(64, 64, 3),
    "linear": lambda: nn.Linear(64, 48),
}


@pytest.mark.parametrize("hw", [3, 12])
@pytest.mark.parametrize("kind", KINDS)
def test_dora_auto_never_saves_more_than_weight_space(kind, hw):
    shape = (4, 64) if kind == "linear" else (2, 64 if "wide" in kind else 16, hw, hw)
    saved = {}
    for mode in ("auto", "weight", "activation"):
        torch.manual_seed(0)
        layer = make_adapter("dora", KINDS[kind](), 2, mode=mode)
        saved[mode] = sum(saved_bytes_by_layer(layer, torch.randn(shape,
                                                                   requires_grad=True)).values())
    assert saved["auto"] <= saved["weight"]
    assert saved["auto"] in (saved["weight"], saved["activation"])


def test_report_shows_the_choice_per_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1),
                        nn.Conv2d(64, 64, 3, padding=1, groups=64))
    convpeft.apply_adapters(net, "dora", rank=4, target="conv")
    before = adapter_report(net)
    assert all(r.last_mode is None for r in before.layers) and "auto:" not in str(before)
    net(torch.randn(4, 3, 16, 16))
    report = adapter_report(net)
    layers = [m for m in net.modules() if hasattr(m, "last_reason")]
    assert [(r.last_mode, r.mode_reason) for r in report.layers] == [
        (m.last_mode, m.last_reason) for m in layers]
    # the stem (dense, 16x16) would take activation space by FLOPs; DoRA's guard says weight
    assert (report.layers[0].last_mode, report.layers[0].mode_reason) == ("weight", "memory")
    assert report.layers[2].mode_reason == "flops"  # depthwise: weight space by FLOPs anyway
    assert "auto: weight (memory)" in str(report)
    assert report.to_dict()["layers"][2]["mode_reason"] == "flops"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_cuda_forward_takes_weight_space(method):
    layer = _dense(method).cuda()
    layer(torch.randn(DENSE, device="cuda", requires_grad=True))
    assert (layer.last_mode, layer.last_reason) == ("weight", "cuda")
