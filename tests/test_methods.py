"""Methods registry: each method trains exactly the parameters it should; BN policies."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convpeft.methods import (
    MethodConfig,
    bn_modules,
    get_method,
    list_methods,
    prepare,
    set_bn_mode,
)
from convpeft.models import build_model
from convpeft.optim import GaLoreSettings


def _model(name: str = "mobilenet_v3_small") -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, 4, small_input=True)


def _step(prepared, steps: int = 1) -> dict[str, torch.Tensor]:
    """Snapshot params, take optimizer steps on a random batch, return the snapshot."""
    before = {n: p.detach().clone() for n, p in prepared.model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 3, 16, 16, generator=g), torch.randint(0, 4, (6,), generator=g)
    for _ in range(steps):
        prepared.train_mode()
        loss = F.cross_entropy(prepared.model(x), y)
        prepared.optimizer.zero_grad()
        loss.backward()
        prepared.optimizer.step()
    return before


def _changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _bn_names(model: nn.Module, kind: str | None = None) -> set[str]:
    return {f"{n}.{pn}" for n, m in bn_modules(model) for pn, _ in m.named_parameters()
            if kind is None or pn == kind}


def test_registry():
    assert list_methods()[:6] == ["full", "head", "bitfit", "lora", "dora", "galore"]
    with pytest.raises(ValueError, match="unknown method 'adapterfusion'; use one of full"):
        get_method("adapterfusion")
    with pytest.raises(ValueError, match="bn must be one of train, freeze, stats"):
        MethodConfig("full", bn="eval")
    assert MethodConfig("lora").bn == "train" and MethodConfig("head").resolved_lr > 0


def test_full_trains_everything():
    p = prepare(_model(), "full")
    names = {n for n, _ in p.model.named_parameters()}
    assert _trainable(p.model) == names
    before = _step(p)
    assert _changed(p.model, before) == names
    assert p.trainable_params == p.total_params


def test_head_is_a_linear_probe():
    p = prepare(_model(), MethodConfig("head"))
    assert _trainable(p.model) == {"classifier.3.weight", "classifier.3.bias"}
    before = _step(p)
    assert _changed(p.model, before) == {"classifier.3.weight", "classifier.3.bias"}
    assert p.trainable_params == 4 * 1024 + 4


def test_bitfit_trains_biases_and_head():
    p = prepare(_model(), "bitfit")
    biases = {n for n, _ in p.model.named_parameters() if n.endswith(".bias")}
    expected = biases | {"classifier.3.weight"}
    # convs followed by BN have no bias, so BN shifts are most of the backbone's biases
    # (MobileNetV3's squeeze-excitation 1x1 convs and hidden Linear have their own)
    assert _bn_names(p.model, "bias") <= biases and "classifier.0.bias" in biases
    assert {n for n in biases if "fc1" in n or "fc2" in n}
    assert _trainable(p.model) == expected
    before = _step(p)
    assert _changed(p.model, before) <= expected
    assert len(_changed(p.model, before)) > 0.9 * len(expected)


def test_bn_freeze_policy():
    model = _model()
    p = prepare(model, MethodConfig("full", bn="freeze"))
    assert not (_trainable(model) & _bn_names(model))
    stats = {n: m.running_mean.clone() for n, m in bn_modules(model)}
    before = _step(p)
    assert all(not m.training for _, m in bn_modules(model)) and model.training
    assert all(torch.equal(m.running_mean, stats[n]) for n, m in bn_modules(model))
    assert not (_changed(model, before) & _bn_names(model))
    # bitfit under freeze: BN shifts frozen too, only the classifier's biases/weights left
    pb = prepare(_model(), MethodConfig("bitfit", bn="freeze"))
    trained = _trainable(pb.model)
    assert not (trained & _bn_names(pb.model)) and {"classifier.3.weight"} < trained
    assert all(n.endswith(".bias") or n == "classifier.3.weight" for n in trained)


def test_bn_stats_policy_is_adabn():
    model = _model("resnet18")
    p = prepare(model, MethodConfig("head", bn="stats"))
    bn = model.bn1
    assert bn.momentum is None and torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not (_trainable(model) & _bn_names(model))
    p.train_mode()
    assert bn.training
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        model(x)
        # cumulative average after one batch = that batch's statistics
        expected = model.conv1(x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-4, atol=1e-5)


def test_set_bn_mode_only_in_training_and_validates():
    model = _model().eval()
    set_bn_mode(model, "train")
    assert all(not m.training for _, m in bn_modules(model))
    model.train()
    set_bn_mode(model, "freeze")
    assert all(not m.training for _, m in bn_modules(model))
    with pytest.raises(ValueError, match="bn must be one of"):
        set_bn_mode(model, "off")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapters_train_adapters_head_and_bn(method):
    from convpeft.adapters import is_adapter

    model = _model()
    p = prepare(model, MethodConfig(method, rank=2))
    adapter_params = {f"{n}.{pn}" for n, m in model.named_modules() if is_adapter(m)
                      for pn, _ in m.named_parameters() if "base_layer" not in pn}
    head = {"classifier.3.weight", "classifier.3.bias"}
    assert adapter_params
    assert _trainable(model) == adapter_params | head | _bn_names(model)
    assert not any("base_layer" in n for n in _trainable(model))
    assert p.report.adapter_params == sum(
        pp.numel() for n, pp in model.named_parameters() if n in adapter_params)
    before = _step(p, steps=2)  # LoRA's B starts at 0: A moves only from the 2nd step
    changed = _changed(model, before)
    assert changed <= _trainable(model) and head <= changed
    assert len(changed & adapter_params) > 0.9 * len(adapter_params)
    # bn="freeze": no BN affine, and head off when asked
    m2 = _model()
    prepare(m2, MethodConfig(method, rank=2, bn="freeze", train_head=False))
    assert not (_trainable(m2) & (_bn_names(m2) | head))


def test_galore_projects_convs_and_trains_everything():
    model = _model()
    p = prepare(model, MethodConfig("galore", rank=2, galore=GaLoreSettings(update_proj_gap=5)))
    names = {n for n, _ in model.named_parameters()}
    assert _trainable(model) == names
    assert hasattr(p.optimizer, "summary") and p.report is not None
    in_opt = {id(q) for g in p.optimizer.param_groups for q in g["params"]}
    assert in_opt == {id(q) for q in model.parameters()}
    before = _step(p, steps=2)
    assert len(_changed(model, before)) > 0.9 * len(names)
    # bn="freeze": BN affine frozen and left out of the optimizer
    m2 = _model()
    p2 = prepare(m2, MethodConfig("galore", rank=2, bn="freeze"))
    in_opt2 = {id(q) for g in p2.optimizer.param_groups for q in g["params"]}
    bn_ids = {id(q) for _, m in bn_modules(m2) for q in m.parameters()}
    assert in_opt2 and not (in_opt2 & bn_ids)


def test_method_settings_live_in_their_own_configs():
    from convpeft.adapters import AdapterConfig

    cfg = MethodConfig("lora-fa", rank=4, adapter=AdapterConfig(alpha=8.0, mode="weight"))
    a = cfg.adapter_config()
    assert (a.method, a.rank, a.alpha, a.mode, a.freeze_a) == ("lora", 4, 8.0, "weight", True)
    assert MethodConfig("galore", rank=3).galore_settings().rank == 3
    # one place validates each setting: a bad rank is refused by the method's own config
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        MethodConfig("lora", rank=0)
    with pytest.raises(ValueError, match="update_proj_gap"):
        MethodConfig("galore", galore=GaLoreSettings(update_proj_gap=0))
    with pytest.raises(ValueError, match="set rank on MethodConfig"):
        MethodConfig("dora", rank=4, adapter=AdapterConfig(rank=16))
    with pytest.raises(TypeError, match="must be a AdapterConfig"):
        MethodConfig("lora", adapter={"alpha": 2})
