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


def _set_in_file(saved_dir, key: str, value: torch.Tensor) -> dict:
    """Write ``value`` under ``key`` into the saved adapter file (a tampered file); returns
    the file's state as it was before."""
    from safetensors.torch import load_file, save_file

    path = str(saved_dir / "adapter_model.safetensors")
    state = load_file(path)
    before = dict(state)
    state[key] = value
    save_file(state, path)
    return before


def _load_refused(saved_dir, exc: type[Exception], match: str) -> nn.Module:
    """Loading ``saved_dir`` into a fresh model raises ``exc`` and changes nothing."""
    m = tiny()
    snap = snapshot(m)
    with pytest.raises(exc, match=match):
        load_adapters(m, saved_dir)
    assert_same(m, snap)
    return m


def test_adapter_file_cannot_overwrite_a_base_weight(saved, tmp_path):
    good, expected, x = saved
    bad = _copy(good, tmp_path, "bad")
    _set_in_file(bad, "0.base_layer.weight", torch.full((8, 3, 3, 3), 1e6))
    m = _load_refused(bad, KeyError, r"overwrite frozen weights.*0\.base_layer\.weight")
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


# ----------------------------------------------------------------------------- issue 24


def _shared_model(seed: int = 0) -> nn.Sequential:
    """One conv used at two places (``0`` and ``2``): named_modules() yields it once."""
    torch.manual_seed(seed)
    c = nn.Conv2d(4, 4, 3, padding=1)
    return nn.Sequential(c, nn.ReLU(), c)


def test_a_shared_conv_gets_one_adapter_at_every_use(tmp_path):
    import torch.nn.functional as F

    from convpeft import merge_adapters

    m = _shared_model()
    report = apply_adapters(m, "lora", 2)
    assert m[0] is m[2] and adapter_layers(m)[0][1] is m[0]
    assert report.layers[0].shared_with == ["2"]
    assert "also at 2" in str(report)
    with torch.no_grad():
        m[0].lora_B.normal_()
    x = torch.randn(2, 4, 6, 6)
    out = m(x)
    # reference: the adapted weight W0 + s dW used at both places; gradients reach it from both
    w, b = m[0].merged_weight(), m[0].base_layer.bias
    ref = F.conv2d(F.relu(F.conv2d(x, w, b, padding=1)), w, b, padding=1)
    torch.testing.assert_close(out, ref)
    g_out, = torch.autograd.grad(out.square().sum(), m[0].lora_B)
    g_ref, = torch.autograd.grad(ref.square().sum(), m[0].lora_B)
    torch.testing.assert_close(g_out, g_ref)
    # save / load: the config says so, and a freshly built shared model gets the same outputs
    d = save_adapters(m, tmp_path / "shared")
    assert json.loads((d / "adapter_config.json").read_text())["layers"]["0"]["shared_with"] \
        == ["2"]
    fresh = _shared_model()
    load_adapters(fresh, d)
    assert fresh[0] is fresh[2]
    torch.testing.assert_close(fresh(x), out.detach())
    # merge is exact for both uses and leaves one plain conv, still shared
    merge_adapters(m)
    assert type(m[0]) is nn.Conv2d and m[0] is m[2]
    torch.testing.assert_close(m(x), out.detach())


def test_a_shared_save_refused_where_the_model_shares_differently(tmp_path):
    m = _shared_model()
    apply_adapters(m, "lora", 2)
    d = save_adapters(m, tmp_path / "shared")
    torch.manual_seed(0)
    unshared = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, padding=1))
    snap = snapshot(unshared)
    with pytest.raises(ValueError, match=r"layers\.0.*shared.*'2'"):
        load_adapters(unshared, d)
    assert_same(unshared, snap)


def test_peft_format_refuses_a_shared_conv(tmp_path):
    m = _shared_model()
    apply_adapters(m, "lora", 2)
    with pytest.raises(ValueError, match=r"0: .*also at 2"):
        save_adapters(m, tmp_path / "p", format="peft")
    assert not (tmp_path / "p" / "adapter_config.json").exists()
    # and a peft save of one use does not load onto a model that shares the module
    torch.manual_seed(0)
    one = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    apply_adapters(one, "lora", 2, target=lambda name, mod: name == "0")
    d = save_adapters(one, tmp_path / "one", format="peft")
    shared = _shared_model()
    snap = snapshot(shared)
    with pytest.raises(ValueError, match=r"0: this model uses that module at several places"):
        load_adapters(shared, d)
    assert_same(shared, snap)


def test_failed_save_leaves_the_previous_save_intact(saved, tmp_path):
    good, expected, x = saved
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    with torch.device("meta"):
        meta = tiny()
    apply_adapters(meta, "lora", 8, trainable=[r"^8\."])  # another rank: a mixed dir won't load
    with pytest.raises(ValueError, match=r"meta device.*nothing was written"):
        save_adapters(meta, good)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    _retry_works(tiny(), good, expected, x)


def test_a_save_that_fails_midway_rolls_back(saved, tmp_path):
    good, _, _ = saved
    d = _copy(good, tmp_path, "mid")
    (d / "adapter_config.json").unlink()
    (d / "adapter_config.json").mkdir()  # the second rename fails, after the weights moved in
    before = (d / "adapter_model.safetensors").read_bytes()
    m = tiny()
    apply_adapters(m, "lora", 8)
    with pytest.raises(IsADirectoryError, match="adapter_config.json"):
        save_adapters(m, d)
    assert (d / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json",
                                                    "adapter_model.safetensors"]


@pytest.mark.parametrize("fmt", ["convpeft", "peft"])
def test_save_replaces_links_and_never_writes_through_them(tmp_path, fmt):
    m = tiny()
    apply_adapters(m, "lora", 2, target="standard")
    d = tmp_path / "d"
    d.mkdir()
    victims = {}
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        victim = tmp_path / f"elsewhere-{name}"
        victim.write_text("precious")
        (d / name).symlink_to(victim)
        victims[name] = victim
    save_adapters(m, d, format=fmt)
    for name, victim in victims.items():
        assert victim.read_text() == "precious"
        assert not (d / name).is_symlink()
    m.eval()
    x = torch.randn(2, 3, 8, 8)
    fresh = tiny()
    load_adapters(fresh, d)
    fresh.eval()
    torch.testing.assert_close(fresh(x), m(x))


def test_a_peft_model_is_not_adapted_again():
    from peft import LoraConfig, get_peft_model

    net = get_peft_model(tiny(), LoraConfig(r=2, target_modules=["0", "5"]))
    snap = snapshot(net)
    with pytest.raises(ValueError, match=r"peft.*base_model\.model\.0 .*merge_and_unload"):
        apply_adapters(net, "lora", 4)
    assert_same(net, snap)


def test_a_callable_target_selecting_adapter_parts_or_non_layers_is_refused():
    m = tiny()
    apply_adapters(m, "lora", 2, dropout=0.1)
    snap = snapshot(m)
    with pytest.raises(ValueError, match=r"layer '0' already has an adapter.*0\.dropout"):
        apply_adapters(m, "lora", 2, target=lambda n, mod: n.startswith("0"))
    with pytest.raises(TypeError, match=r"cannot adapt 2 \(ReLU\), 4 \(ReLU\).*nn\.Conv2d"):
        apply_adapters(m, "lora", 2, target=lambda n, mod: isinstance(mod, nn.ReLU))
    assert_same(m, snap)


def test_an_adapter_file_may_only_set_the_buffers_its_config_lists(tmp_path):
    src = tiny()
    apply_adapters(src, "lora", 2)
    d = save_adapters(src, tmp_path / "nobuf", include_buffers=False)
    before = _set_in_file(d, "1.running_mean", torch.full((8,), 1e6))
    assert not any("running" in k for k in before)
    m = _load_refused(d, KeyError, r"1\.running_mean.*'buffers'")
    # a save with buffers lists them and loads them
    d2 = save_adapters(src, tmp_path / "buf")
    listed = json.loads((d2 / "adapter_config.json").read_text())["buffers"]
    assert "1.running_mean" in listed
    load_adapters(m, d2)


@pytest.mark.parametrize("budget", ["1e400GB", "1e999999GB"])
def test_plan_cli_refuses_an_absurd_budget_in_one_line(capsys, budget):
    from convpeft.plan import main

    with pytest.raises(SystemExit) as e:
        main(["--budget", budget, "--methods", "lora", "--ranks", "4", "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "budget" in err and "2**63" in err


def test_profiler_cli_refuses_a_seed_outside_64_bits(capsys):
    from convpeft.profiler.cli import main

    assert main(["--seed", "1180591620717411303424", "--analytic"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--seed" in err and "2**64" in err


def test_plan_ranks_none_means_the_default_ranks():
    from convpeft.planner import DEFAULT_RANKS
    from convpeft.planner.config import expand_configs

    assert expand_configs(["lora"], None) == expand_configs(["lora"], DEFAULT_RANKS)


def test_export_onnx_of_a_bfloat16_model_says_what_to_do(tmp_path):
    pytest.importorskip("onnxruntime")
    from convpeft import export_onnx

    m = tiny().to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"0\.weight.*bfloat16.*float32.*\.float\(\)"):
        export_onnx(m, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8, dtype=torch.bfloat16))
    assert not list(tmp_path.iterdir())


def _lean_marked(model: nn.Module) -> int:
    return sum("forward" in mod.__dict__ for mod in model.modules())


def test_a_stale_lean_report_undoes_only_what_it_did():
    from convpeft import lean_activations

    m = tiny()
    apply_adapters(m, "lora", 2)
    stale = lean_activations(m)
    newer = lean_activations(m)
    n = _lean_marked(m)
    assert n > 0
    stale.undo()
    assert _lean_marked(m) == n  # the newer call's forwards stay
    newer.undo()
    assert _lean_marked(m) == 0


def test_a_stale_checkpoint_report_undoes_only_what_it_did():
    from convpeft import checkpoint_blocks

    m = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
                      nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()))
    stale = checkpoint_blocks(m, blocks=["0", "1"])
    newer = checkpoint_blocks(m, blocks=["1"])
    stale.undo()
    assert "forward" in m[1].__dict__ and "forward" not in m[0].__dict__
    newer.undo()
    assert _lean_marked(m) == 0
