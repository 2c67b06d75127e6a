"""The one registry behaviour (convpeft.core.registry) behind methods, datasets and corruptions:
names in registration order, a taken name refused (never silently replaced), unknown names
answered with the choices."""

from __future__ import annotations

import pytest
import torch

from convpeft.core.registry import Registry
from convpeft.data import (
    corruptions,
    datasets,
    get_corruption,
    get_dataset,
    list_datasets,
    load_dataset,
)
from convpeft.methods import MethodSpec, get_method, list_methods, register_method


def test_registry_keeps_order_and_refuses_a_taken_name():
    reg: Registry[int] = Registry("widget")
    assert reg.register("b", 1) == 1
    reg.register("a", 2)
    assert reg.names() == ["b", "a"] and reg.get("a") == 2 and "a" in reg and [] not in reg
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a", 3)
    assert reg.get("a") == 2  # the first entry stands
    with pytest.raises(ValueError, match="unknown widget 'c'; use one of b, a"):
        reg.get("c")
    with pytest.raises(ValueError, match="unknown widget"):
        reg.get(["unhashable"])
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", 4)


def test_methods_registry():
    assert list_methods(ranked=True) == ["lora", "dora", "galore", "lora-fa"]
    assert list_methods(ranked=False) == ["full", "head", "bitfit"]
    assert list_methods() == list_methods(ranked=False)[:3] + list_methods(ranked=True)
    assert [get_method(m).label for m in ("full", "lora", "lora-fa", "galore")] == [
        "full FT", "LoRA", "LoRA-FA", "GaLore"]
    lora = get_method("lora")
    impostor = MethodSpec("lora", label="mine", description="", default_lr=1.0, ranked=False,
                          setup=lora.setup)
    with pytest.raises(ValueError, match="method 'lora' is already registered"):
        register_method(impostor)
    assert get_method("lora") is lora


def test_corruptions_registry_refuses_a_taken_name():
    def gaussian_noise(x, severity, g):
        return x

    with pytest.raises(ValueError, match="corruption 'gaussian_noise' is already registered"):
        corruptions.register_corruption(gaussian_noise)
    assert get_corruption("gaussian_noise") is corruptions.gaussian_noise


def test_datasets_registry(monkeypatch):
    assert list_datasets() == ["digits", "cifar10", "cifar100", "cifar10c", "imagefolder"]
    with pytest.raises(ValueError, match="dataset 'digits' is already registered"):
        datasets.register_dataset("digits", get_dataset("cifar10"))
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; use one of digits"):
        load_dataset("mnist", split="train")
    # a registered loader is what load_dataset calls, with every option by keyword
    monkeypatch.setattr(datasets, "_DATASETS", Registry("dataset"))
    seen = {}

    def tiny(**kw):
        seen.update(kw)
        return datasets.ImageDataset(torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
                                     torch.tensor([0, 1]), ["a", "b"], kw["name"])

    datasets.register_dataset("tiny", tiny)
    ds = load_dataset("tiny", split="test", resolution=8, seed=3)
    assert ds.name == "tiny" and len(ds) == 2
    assert seen == {"name": "tiny", "split": "test", "data_root": None, "resolution": 8,
                    "seed": 3, "download": False, "corruption": None, "severity": None}
