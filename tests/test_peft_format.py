"""peft's LoRA format: what save_adapters(format="peft") writes loads in peft itself with equal
outputs, load_adapters reads peft's own directories, and what peft cannot represent is refused
with the layers named and no file touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from convpeft import apply_adapters, load_adapters, save_adapters
from convpeft.adapters import adapter_layers

X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    """Standard, depthwise and pointwise convs, BN, a hidden linear layer and a head."""

    def __init__(self, dilation: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=dilation, dilation=dilation), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 6, 1), nn.ReLU())
        self.fc1 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc1(self.features(x).mean((2, 3)))))


def train_step(model: nn.Module) -> None:
    """One SGD step in train mode: B leaves zero, the head and the BN statistics move."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = F.cross_entropy(model(X), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    model.eval()


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


CASES = {
    "lora": dict(method="lora"),
    "dora-alpha16": dict(method="dora", alpha=16),
    "lora-rslora-ranks": dict(method="lora", rslora=True, alpha=4, rank_pattern={"fc1": 3}),
    "dora-ranks": dict(method="dora", rank_pattern={r"features\.4": 1}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_what_we_write(tmp_path: Path, case: str) -> None:
    model = Net()
    kw = dict(CASES[case])
    apply_adapters(model, kw.pop("method"), rank=2, target=["standard", "linear"],
                   exclude=["^head$"], trainable=[r"^head\."], **kw)
    train_step(model)
    ours = out(model)
    assert (ours - out(Net())).abs().max() > 1e-3  # the adapters do something
    save_adapters(model, tmp_path, format="peft")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == case.startswith("dora")
    assert config["modules_to_save"] == ["features.1", "head"]  # BN statistics and the head
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    r0 = 1 if case == "dora-ranks" else 2
    assert keys["base_model.model.features.4.lora_A.weight"].shape == (r0, 8, 1, 1)
    assert keys["base_model.model.features.0.lora_B.weight"].shape == (8, 2, 1, 1)
    assert keys["base_model.model.fc1.lora_A.weight"].shape[0] == (3 if "rslora" in case else 2)

    peft_model = PeftModel.from_pretrained(Net(), str(tmp_path))
    assert (out(peft_model) - ours).abs().max() <= 1e-5

    again = Net()
    load_adapters(again, tmp_path)
    assert (out(again) - ours).abs().max() <= 1e-5
    assert {n: m.method for n, m in adapter_layers(again)} == {
        n: m.method for n, m in adapter_layers(model)}


@pytest.mark.parametrize("use_dora", [False, True])
def test_we_load_what_peft_writes(tmp_path: Path, use_dora: bool) -> None:
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["features.0", "features.4", "fc1"],
                     rank_pattern={"fc1": 2}, alpha_pattern={"4": 3}, use_dora=use_dora,
                     modules_to_save=["head"])
    peft_model = get_peft_model(Net(), cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "magnitude" in name or "modules_to_save" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(tmp_path))
    model = Net()
    load_adapters(model, tmp_path)
    layers = dict(adapter_layers(model))
    assert {n: (m.rank, m.alpha) for n, m in layers.items()} == {
        "features.0": (4, 8), "features.4": (4, 3), "fc1": (2, 8)}
    assert model.head.weight.requires_grad
    assert (out(model) - out(peft_model)).abs().max() <= 1e-5


def _adapt(target, **kw) -> Net:
    model = Net(dilation=kw.pop("dilation", 1))
    apply_adapters(model, "lora", rank=2, target=target, **kw)
    return model


def _mixed() -> Net:
    model = _adapt("standard")
    apply_adapters(model, "dora", rank=2, target="linear")
    return model


def _dropouts() -> Net:
    model = _adapt("standard", dropout=0.1)
    apply_adapters(model, "lora", rank=2, target="linear")
    return model


def _extra(module: nn.Module, *trainable: str) -> Net:
    """Net with an unused extra submodule (not in forward), the head trainable too."""
    model = Net()
    model.extra = module
    apply_adapters(model, "lora", rank=2, target="standard", trainable=[r"^head\.", *trainable])
    return model


def _with_head() -> nn.Module:
    m = nn.Module()
    m.head = nn.Linear(2, 2)
    return m


def _nested() -> nn.Module:
    m = nn.Module()
    m.p = nn.Parameter(torch.ones(2))
    m.bn = nn.BatchNorm1d(2)
    return m


def _root_buffer() -> Net:
    model = _adapt("standard")
    model.register_buffer("scale", torch.ones(1))
    return model


@pytest.mark.parametrize("build, match", [
    (lambda: _adapt("conv"), r"features\.3: depthwise conv \(groups=8\)"),
    (lambda: _adapt("standard", dilation=2), r"features\.0: dilation=\(2, 2\)"),
    (_mixed, "LoRA and DoRA mixed"),
    (_dropouts, "dropout differs between layers"),
    (lambda: _adapt("standard", trainable=[r"features\.0\.base_layer\.bias"]),
     "inside an adapted layer"),
    (lambda: _extra(_with_head()),
     r"modules_to_save entry 'head' would also select \['extra.head'\] in peft"),
    (_root_buffer, "the model itself owns buffers"),
    (lambda: _extra(_nested(), r"^extra\.p$"), "'extra' contains another entry"),
], ids=["depthwise", "dilation", "mixed", "dropout", "bias-inside", "suffix", "root-buffer",
        "nested"])
def test_unrepresentable_models_are_refused(tmp_path: Path, build, match: str) -> None:
    model = build()
    fresh = tmp_path / "new"
    with pytest.raises(ValueError, match=match):
        save_adapters(model, fresh, format="peft")
    assert not fresh.exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "adapter_config.json").write_text("previous")
    with pytest.raises(ValueError, match="nothing was written"):
        save_adapters(model, old, format="peft")
    assert [p.name for p in old.iterdir()] == ["adapter_config.json"]
    assert (old / "adapter_config.json").read_text() == "previous"


def test_unknown_format_and_file_as_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format='onnx' is unknown; use one of convpeft, peft"):
        save_adapters(_adapt("standard"), tmp_path, format="onnx")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file; save_adapters needs a directory"):
        save_adapters(_adapt("standard"), tmp_path / "f", format="peft")
    assert (tmp_path / "f").read_text() == "x"


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _add_tensor(d: Path, key: str, value: torch.Tensor) -> None:
    state = load_file(str(d / "adapter_model.safetensors"))
    state[key] = value
    save_file(state, str(d / "adapter_model.safetensors"))


def _drop(d: Path, part: str) -> None:
    state = load_file(str(d / "adapter_model.safetensors"))
    save_file({k: v for k, v in state.items() if part not in k},
              str(d / "adapter_model.safetensors"))


def _depthwise_entry(d: Path) -> None:
    _add_tensor(d, "base_model.model.features.3.lora_A.weight", torch.zeros(2, 1, 3, 3))
    _add_tensor(d, "base_model.model.features.3.lora_B.weight", torch.zeros(8, 2, 1, 1))


@pytest.mark.parametrize("tamper, exc, match", [
    (lambda d: _edit_config(d, peft_type="IA3"), ValueError, "peft_type is 'IA3'"),
    (lambda d: _edit_config(d, bias="all"), ValueError, "field 'bias' is 'all'"),
    (lambda d: _edit_config(d, r=5), ValueError, "lora_A has rank 2 but the config says 5"),
    (lambda d: _edit_config(d, use_dora=True), ValueError, "lora_magnitude_vector is missing"),
    (lambda d: _add_tensor(d, "base_model.model.features.3.weight", torch.zeros(8, 1, 3, 3)),
     KeyError, r"features\.3\.weight'\] are neither adapter tensors nor in modules_to_save"),
    (lambda d: _add_tensor(d, "features.0.lora_A.weight", torch.zeros(2, 3, 3, 3)),
     ValueError, "lack peft's 'base_model.model.' prefix"),
    (lambda d: _edit_config(d, lora_alpha="x"), ValueError, "'lora_alpha' has the wrong type"),
    (lambda d: _edit_config(d, use_rslora="yes"), ValueError, "must be true/false"),
    (lambda d: _edit_config(d, rank_pattern=[1]), ValueError, "'rank_pattern' must be an object"),
    (lambda d: _edit_config(d, modules_to_save="head"), ValueError,
     "'modules_to_save' must be a list"),
    (lambda d: _drop(d, "features.0.lora_B"), ValueError, r"features\.0: lora_B.weight is missing"),
    (lambda d: _drop(d, "lora_"), ValueError, "not a LoRA adapter"),
    (lambda d: _add_tensor(d, "base_model.model.nope.lora_A.weight", torch.zeros(2, 3)),
     ValueError, "nope: the model has no nn.Conv2d/nn.Linear"),
    (_depthwise_entry, ValueError, r"features\.3: peft's LoRA on this conv \(groups=8"),
], ids=["ia3", "bias", "rank", "dora-flag", "frozen-weight", "prefix", "alpha-type",
        "rslora-type", "rank-pattern", "modules-to-save", "no-lora-b", "no-lora", "no-layer",
        "depthwise"])
def test_bad_peft_directories_leave_the_model_alone(tmp_path: Path, tamper, exc, match) -> None:
    save_adapters(_adapt("standard", trainable=[r"^head\."]), tmp_path, format="peft")
    tamper(tmp_path)
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        load_adapters(model, tmp_path)
    assert not adapter_layers(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.state_dict().keys() == before.keys()


def test_buffers_are_why_batch_norm_goes_to_modules_to_save(tmp_path: Path) -> None:
    model = _adapt("standard", trainable=[r"^head\."])
    train_step(model)  # moves features.1's running statistics
    save_adapters(model, tmp_path / "with", format="peft")
    save_adapters(model, tmp_path / "without", format="peft", include_buffers=False)
    cfg = json.loads((tmp_path / "without" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["head"]
    with_bn = PeftModel.from_pretrained(Net(), str(tmp_path / "with"))
    without = PeftModel.from_pretrained(Net(), str(tmp_path / "without"))
    assert (out(with_bn) - out(model)).abs().max() <= 1e-5
    assert (out(without) - out(model)).abs().max() > 1e-3  # base statistics: other outputs


def test_loading_onto_adapted_layers_is_refused(tmp_path: Path) -> None:
    save_adapters(_adapt("standard"), tmp_path, format="peft")
    model = _adapt("standard")
    with pytest.raises(ValueError, match=r"features\.0: already has an adapter; call merge"):
        load_adapters(model, tmp_path)
