"""Profiler with the toolkit's own parts: GaLore optimizer FLOPs/state, adapters, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from convpeft.core.flops import svd_flops
from convpeft.profiler import CountFlops, analytic_profile, profile_update

tv = pytest.importorskip("torchvision")
optim = pytest.importorskip("convpeft.optim")


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return tv.models.mobilenet_v2(num_classes=10, width_mult=0.5)


def test_galore_optimizer_flops_and_state():
    model = _small_net()
    opt = optim.galore_optimizer(model, rank=4, update_proj_gap=10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    p = profile_update(model, opt, x, y, repeat=1)
    # the instrumented step was an ordinary one: its measured projection matmuls are exactly
    # what the optimizer declares, plus the SVD refresh amortised over the gap
    refresh = opt.projection_refresh_flops()
    assert p.flops_optimizer == opt.step_flops() + round(refresh / 10)
    assert p.flops_optimizer_refresh == opt.step_flops() + refresh
    assert p.flops_total == p.flops_forward + p.flops_backward + p.flops_optimizer
    # low-rank state, counted whole, is what is live as "optimizer" at the peak
    assert p.memory_by_category["optimizer"] == opt.state_bytes()
    a = analytic_profile(model, opt, (4, 3, 32, 32))
    assert a.flops_total == p.flops_total and a.flops_optimizer_refresh == p.flops_optimizer_refresh
    assert abs(a.memory_peak - p.memory_peak) / p.memory_peak < 0.05


def test_galore_refresh_svd_counted_per_matrix():
    # on a refresh step the counter sees the SVDs themselves: one thin SVD per projected matrix
    model = _small_net()
    opt = optim.galore_optimizer(model, rank=4, update_proj_gap=10)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    assert opt.refreshes_next_step()
    with CountFlops(model) as c:
        nn.functional.cross_entropy(model(x), y).backward()
        c.phase = "optimizer"
        opt.step()
    assert opt.last_step_refreshed
    projected = [q for g in opt.param_groups if g.get("role") == "galore" for q in g["params"]]
    expected = sum(svd_flops(q.shape[0], q[0].numel()) for q in projected)
    assert c.tally.optimizer_svd == expected == opt.projection_refresh_flops()
    assert c.tally.optimizer >= opt.step_flops()


def test_lora_frozen_backbone_skips_weight_grads():
    import convpeft

    model = _small_net()
    full = profile_update(model, torch.optim.SGD(model.parameters(), lr=0.01),
                          torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)), repeat=1)
    model = _small_net()
    convpeft.apply_adapters(model, "lora", rank=4, trainable=[r"^classifier\."])
    trainable = [q for q in model.parameters() if q.requires_grad]
    p = profile_update(model, torch.optim.AdamW(trainable, lr=1e-3),
                       torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)), repeat=1)
    # frozen base weights: their weight gradients vanish, only adapters + head remain
    assert p.flops_backward_weight < 0.5 * full.flops_backward_weight
    assert p.flops_forward > full.flops_forward  # adapter branches add forward work
    assert p.memory_category_max["grads"] <= sum(q.numel() * 4 for q in trainable)
    # AdamW: two moments per trainable element + a 4-byte step counter per tensor
    assert p.memory_by_category["optimizer"] == sum(2 * q.numel() * 4 + 4 for q in trainable)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_analytic_agrees_with_measured_on_adapters(method):
    import convpeft

    model = _small_net()
    convpeft.apply_adapters(model, method, rank=4, trainable=[r"^classifier\."])

    def factory(m):
        return torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3)

    a = analytic_profile(model, factory, (2, 3, 32, 32), per_layer=True)
    p = profile_update(model, factory(model), torch.randn(2, 3, 32, 32),
                       torch.randint(0, 10, (2,)), repeat=1, per_layer=True)
    assert a.flops_total == p.flops_total and a.flops_elementwise == p.flops_elementwise
    assert abs(a.memory_peak - p.memory_peak) / p.memory_peak < 0.05
    assert a.per_layer == p.per_layer
    # adapted layers keep their kind (from .base_layer) and now have weight gradients (the
    # adapter's); BN layers are frozen and have no conv/linear work at all
    rows = {r["name"]: r for r in p.per_layer}
    assert rows["features.1.conv.0.0"]["kind"] == "depthwise"
    assert rows["features.1.conv.0.0"]["backward_weight"] > 0
    assert rows["features.1.conv.1"]["kind"] == "pointwise"
    assert rows["features.0.1"]["forward"] == rows["features.0.1"]["backward_weight"] == 0
    assert sum(r["forward"] for r in p.per_layer) == p.flops_forward


def test_cli_table_and_json(capsys):
    from convpeft.profiler.cli import main

    assert main(["--model", "mobilenet_v2", "--method", "lora", "--rank", "2", "--batch", "2",
                 "--resolution", "32", "--repeat", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "lora" and out["flops_total"] > 0 and out["memory_peak"] > 0
    assert set(out["memory_by_category"]) == {"params", "buffers", "grads", "optimizer",
                                              "activations", "temporaries", "scratch"}
    assert out["memory_model"].startswith("CPU allocator trace")
    assert main(["--model", "mobilenet_v2", "--method", "lora", "--rank", "2", "--batch", "2",
                 "--resolution", "32", "--repeat", "1", "--json", "--tensor-level"]) == 0
    ten = json.loads(capsys.readouterr().out)
    assert ten["memory_model"] == "tensor-level" and "scratch" not in ten["memory_by_category"]
    assert ten["memory_peak"] == ten["memory_peak_tensors"] == out["memory_peak_tensors"]
    assert main(["--model", "mobilenet_v2", "--method", "galore", "--rank", "4", "--batch", "2",
                 "--resolution", "32", "--analytic"]) == 0
    text = capsys.readouterr().out
    assert "analytic" in text and "optimizer (refresh)" in text and "PEAK" in text


def test_cli_bad_model_is_an_error(capsys):
    from convpeft.profiler.cli import main

    assert main(["--model", "no_such_net", "--batch", "2", "--resolution", "32"]) == 2
    assert "error" in capsys.readouterr().err
