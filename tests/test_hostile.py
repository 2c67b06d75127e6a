"""Hostile and careless input to the adapter API: a failed call leaves the model exactly as it
was (modules, values, trainability), adapter files cannot touch frozen weights, a string is one
pattern, and malformed files get errors that name the file and the field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from convpeft import apply_adapters, load_adapters, save_adapters
from convpeft.adapters import adapter_layers, load_adapter_state_dict

from conftest import separable_cnn as tiny


def snapshot(model: nn.Module) -> tuple:
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(n, p.requires_grad) for n, p in model.named_parameters()],
    )


def assert_same(model: nn.Module, snap: tuple) -> None:
    mods, state, flags = snapshot(model)
    assert mods == snap[0]
    assert flags == snap[2]
    assert state.keys() == snap[1].keys()
    for k in state:
        assert torch.equal(state[k], snap[1][k]), k


# ----------------------------------------------------------------------------- patterns


def test_a_string_is_one_pattern_not_letters():
    m = resnet18(num_classes=10)
    apply_adapters(m, "lora", 4, trainable="fc")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora" not in n} == {"fc.weight", "fc.bias"}
    assert not m.conv1.base_layer.weight.requires_grad
    a, b = resnet18(num_classes=10), resnet18(num_classes=10)
    n_str = len(apply_adapters(a, "lora", 4, exclude="layer4").layers)
    n_list = len(apply_adapters(b, "lora", 4, exclude=["layer4"]).layers)
    assert n_str == n_list == 15


def test_pattern_lists_of_non_strings_are_refused():
    with pytest.raises(TypeError, match="exclude must be a regex string or a list"):
        apply_adapters(tiny(), "lora", 2, exclude=[3])


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), -1.0])
def test_non_finite_alpha_is_refused(alpha):
    m = tiny()
    snap = snapshot(m)
    with pytest.raises(ValueError, match="alpha must be a number > 0 and finite"):
        apply_adapters(m, "lora", 2, alpha=alpha)
    assert_same(m, snap)


# ----------------------------------------------------------------------------- atomic apply


def test_apply_that_hits_an_unsupported_module_changes_nothing():
    m = tiny()
    snap = snapshot(m)
    # selects conv 0 (fine) and then the BatchNorm (no adapter for it) - after conv 0 wrapped
    pick = lambda name, mod: name in ("0", "1")  # noqa: E731
    with pytest.raises((ValueError, TypeError)):
        apply_adapters(m, "lora", 2, target=pick)
    assert_same(m, snap)
    assert not adapter_layers(m)
    apply_adapters(m, "lora", 2)  # a retry with good input works
    assert len(adapter_layers(m)) == 3  # the three convs


def test_apply_whose_trainable_matches_nothing_changes_nothing():
    m = tiny()
    snap = snapshot(m)
    with pytest.raises(ValueError, match="matched no parameter name"):
        apply_adapters(m, "dora", 2, trainable=["^no_such_param$"])
    assert_same(m, snap)


# ----------------------------------------------------------------------------- atomic load


@pytest.fixture()
def saved(tmp_path):
    src = tiny()
    apply_adapters(src, "lora", 2, trainable=[r"^8\."])
    with torch.no_grad():
        for _, layer in adapter_layers(src):
            layer.lora_B.normal_()
    d = save_adapters(src, tmp_path / "good")
    x = torch.randn(2, 3, 8, 8)
    src.eval()
    return d, src(x).detach(), x


def _copy(saved_dir, tmp_path, name):
    d = tmp_path / name
    shutil.copytree(saved_dir, d)
    return d


def _retry_works(m, saved_dir, expected, x):
    load_adapters(m, saved_dir)
    m.eval()
    torch.testing.assert_close(m(x), expected)


def test_adapter_file_cannot_overwrite_a_base_weight(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    good, expected, x = saved
    bad = _copy(good, tmp_path, "bad")
    state = load_file(str(bad / "adapter_model.safetensors"))
    state["0.base_layer.weight"] = torch.full((8, 3, 3, 3), 1e6)
    save_file(state, str(bad / "adapter_model.safetensors"))
    m = tiny()
    snap = snapshot(m)
    with pytest.raises(KeyError, match=r"overwrite frozen weights.*0\.base_layer\.weight"):
        load_adapters(m, bad)
    assert_same(m, snap)
    _retry_works(m, good, expected, x)


def test_load_adapter_state_dict_refuses_frozen_keys():
    m = tiny()
    apply_adapters(m, "lora", 2)
    before = m[3].base_layer.weight.detach().clone()
    with pytest.raises(KeyError, match="overwrite frozen weights"):
        load_adapter_state_dict(m, {"3.base_layer.weight": torch.zeros_like(before)},
                                strict=False)
    assert torch.equal(m[3].base_layer.weight, before)


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete"])
def test_broken_weights_file_changes_nothing(saved, tmp_path, damage):
    good, expected, x = saved
    bad = _copy(good, tmp_path, "bad")
    f = bad / "adapter_model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:50])
    elif damage == "garble":
        f.write_bytes(b"\x00" * 40 + f.read_bytes()[40:])
    else:
        f.unlink()
    m = tiny()
    snap = snapshot(m)
    with pytest.raises((ValueError, FileNotFoundError), match="adapter_model|no adapter_model"):
        load_adapters(m, bad)
    assert_same(m, snap)
    _retry_works(m, good, expected, x)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda c: "not json {", "not valid JSON"),
    (lambda c: json.dumps([1, 2]), "expected a JSON object"),
    (lambda c: json.dumps({**c, "layers": "0"}), "field 'layers'"),
    (lambda c: json.dumps({**c, "layers": {"0": {"method": "lora"}}}), "layers.0.rank"),
    (lambda c: json.dumps({**c, "layers": {"0": {**c["layers"]["0"], "rank": "2"}}}),
     "layers.0.rank' has the wrong type"),
    (lambda c: json.dumps({**c, "trainable": "8.weight"}), "field 'trainable'"),
    (lambda c: json.dumps({**c, "layers": {**c["layers"], "6": c["layers"]["0"]}}),
     "field 'layers' does not fit this model"),
    (lambda c: json.dumps({**c, "layers": {**c["layers"], "0": {**c["layers"]["0"],
                                                                "rank": 3}}}), "shape"),
])
def test_malformed_config_names_file_and_field(saved, tmp_path, edit, field):
    good, expected, x = saved
    bad = _copy(good, tmp_path, "bad")
    cfg = bad / "adapter_config.json"
    cfg.write_text(edit(json.loads(cfg.read_text())))
    m = tiny()
    snap = snapshot(m)
    with pytest.raises((ValueError, KeyError), match=field) as e:
        load_adapters(m, bad)
    if field != "shape":
        assert "adapter_config.json" in str(e.value)
    assert_same(m, snap)
    _retry_works(m, good, expected, x)


def test_a_huge_rank_is_refused_before_allocating():
    m = tiny()
    snap = snapshot(m)
    with pytest.raises(ValueError, match=r"layer '0': a rank-100000000 adapter needs .* MiB"):
        apply_adapters(m, "lora", 100_000_000)
    assert_same(m, snap)
