"""Adapter layers: exactness of both computations, merging, gradients, state, errors, and the
cases peft gets wrong (depthwise at any rank, grouped merging, dilation/padding mode, DoRA norm
on grouped weights)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convpeft
from convpeft.adapters import (
    DoRAConvFunction,
    adapter_layers,
    is_adapter,
    make_adapter,
    unmerge_adapters,
)
from convpeft.core.flops import conv2d_flops

KINDS = {
    "standard": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "pointwise": lambda: nn.Conv2d(4, 6, 1, bias=False),
    "grouped": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
    "depthwise_mult": lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4),
    "dilated": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2),
    "reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "same_nonsquare": lambda: nn.Conv2d(4, 6, (2, 3), padding="same", padding_mode="circular"),
    "strided_replicate": lambda: nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0),
                                           padding_mode="replicate"),
    "linear": lambda: nn.Linear(5, 7),
}
METHODS = ("lora", "dora")
RANKS = (1, 3, 16)
MODES = ("activation", "weight")


def _layer(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return KINDS[kind]()


def _input(kind: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (3, 5) if kind == "linear" else (2, 4, 7, 9)
    return torch.randn(shape, generator=g)


def _randomise(adapter: nn.Module, seed: int = 2) -> None:
    """Move the adapter away from its identity init (B = 0, m = ||W0||)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g))
        if hasattr(adapter, "magnitude"):
            adapter.magnitude.mul_(0.5 + torch.rand(adapter.magnitude.shape, generator=g))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("mode", MODES + ("auto",))
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init(kind, method, rank, mode):
    base = _layer(kind)
    x = _input(kind)
    ref = base(x)
    adapter = make_adapter(method, copy.deepcopy(base), rank, mode=mode)
    torch.testing.assert_close(adapter(x), ref, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(adapter.lora_B) == 0


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_activation_space_equals_weight_space(kind, method, rank):
    act = make_adapter(method, _layer(kind), rank, alpha=2.0 * rank + 1, mode="activation")
    _randomise(act)
    wgt = make_adapter(method, _layer(kind), rank, alpha=2.0 * rank + 1, mode="weight")
    wgt.load_state_dict(act.state_dict())
    xa = _input(kind).requires_grad_()
    xw = _input(kind).requires_grad_()
    ya, yw = act(xa), wgt(xw)
    assert act.last_mode == "activation" and wgt.last_mode == "weight"
    assert _rel(ya, yw) < 1e-5
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(3))
    (ya * g).sum().backward()
    (yw * g).sum().backward()
    assert _rel(xa.grad, xw.grad) < 1e-5
    for pa, pw in zip(act.adapter_parameters(), wgt.adapter_parameters(), strict=True):
        assert _rel(pa.grad, pw.grad) < 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_merged_equals_unmerged(kind, method, rank, mode):
    adapter = make_adapter(method, _layer(kind), rank, mode=mode, rslora=True)
    _randomise(adapter)
    x = _input(kind)
    with torch.no_grad():
        y = adapter(x)
        w0 = adapter.base_layer.weight.clone()
        model = nn.Sequential(adapter)
        convpeft.merge_adapters(model, unload=False)  # in place, wrapper kept
        assert adapter.merged and _rel(model(x), y) < 1e-5
        unmerge_adapters(model)
        assert torch.equal(adapter.base_layer.weight, w0)
        convpeft.merge_adapters(model)
        plain = model[0]
    assert type(plain) is (nn.Linear if kind == "linear" else nn.Conv2d)
    assert not adapter_layers(model)
    assert _rel(plain(x), y) < 1e-5


@pytest.mark.parametrize("mode", MODES + ("auto",))
@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_only_adapter_params(method, mode):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    report = convpeft.apply_adapters(model, method, 3, target="all", mode=mode)
    assert len(report.layers) == 4
    for _, m in adapter_layers(model):
        _randomise(m)  # with B = 0 the gradient of A would be zero
    x = torch.randn(2, 3, 6, 6)
    F.cross_entropy(model(x), torch.tensor([1, 4])).backward()
    adapter_ids = {id(p) for _, m in adapter_layers(model) for p in m.adapter_parameters()}
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert p.requires_grad and p.grad is not None, name
            assert torch.count_nonzero(p.grad) > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert report.trainable_params == report.adapter_params


@pytest.mark.parametrize("kind", ["grouped", "depthwise", "depthwise_mult"])
def test_dora_norm_on_grouped_weights_matches_hand_computation(kind):
    layer = _layer(kind)
    adapter = make_adapter("dora", copy.deepcopy(layer), 3, alpha=5.0)
    _randomise(adapter)
    x = _input(kind)
    s = 5.0 / 3
    w0 = layer.weight.detach()
    dw = torch.einsum("or,rk->ok", adapter.lora_B, adapter.lora_A.flatten(1)).reshape(w0.shape)
    v = w0 + s * dw
    norms = torch.stack([v[o].pow(2).sum().sqrt() for o in range(v.shape[0])])
    w = adapter.magnitude.detach()[:, None, None, None] * v / norms[:, None, None, None]
    ref = F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    for mode in MODES:
        adapter.mode = mode
        assert _rel(adapter(x).detach(), ref.detach()) < 1e-5


def test_dora_norm_is_detached():
    """m's gradient is sum(grad_y * z) / ||V||: no term from differentiating the norm."""
    adapter = make_adapter("dora", _layer("standard"), 2, mode="weight")
    _randomise(adapter)
    x = _input("standard")
    adapter(x).sum().backward()
    with torch.no_grad():
        v = adapter.base_layer.weight + adapter.scaling * adapter.delta_weight()
        norm = v.flatten(1).norm(dim=1)
        z = F.conv2d(x, v, None, 1, 1)
    torch.testing.assert_close(adapter.magnitude.grad, z.sum((0, 2, 3)) / norm)


def test_dora_function_gradcheck():
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.double).requires_grad_()

    # grouped conv, groups=2, r=2: a_w is A repeated per group, b_w (C_out, r, 1, 1)
    args = (t(2, 4, 5, 5), None, t(6, 2, 3, 3), t(6), t(4, 2, 3, 3), t(6, 2, 1, 1), t(6),
            0.7, (1, 1), (1, 1), (1, 1), 2)
    assert torch.autograd.gradcheck(DoRAConvFunction.apply, args)
    args = (t(2, 4, 5, 5), t(2, 4, 5, 5), t(6, 2, 3, 3), None, t(4, 2, 3, 3), t(6, 2, 1, 1),
            t(6), 1.3, (2, 1), (0, 1), (1, 2), 2)
    assert torch.autograd.gradcheck(DoRAConvFunction.apply, args)


# ---- what peft cannot do ---------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 3, 5, 16])
def test_depthwise_any_rank_has_expected_params(rank):
    adapter = make_adapter("lora", nn.Conv2d(8, 16, (3, 5), groups=8), rank)
    assert adapter.num_adapter_params() == rank * (16 + 3 * 5)
    assert adapter.delta_weight().shape == (16, 1, 3, 5)
    grouped = make_adapter("lora", nn.Conv2d(6, 9, 3, groups=3), rank)
    assert grouped.num_adapter_params() == rank * (9 + 2 * 3 * 3)


@pytest.mark.parametrize("kind", ["dilated", "reflect", "same_nonsquare", "strided_replicate",
                                  "grouped", "depthwise_mult"])
def test_adapter_branch_honours_geometry(kind):
    """Activation space must equal a hand-built conv with W0 + s B A and the base's geometry
    (peft's conv_A drops dilation and padding_mode, and cannot merge grouped convs)."""
    layer = _layer(kind)
    adapter = make_adapter("lora", copy.deepcopy(layer), 3, alpha=6.0, mode="activation")
    _randomise(adapter)
    ref_layer = copy.deepcopy(layer)
    with torch.no_grad():
        dw = torch.einsum("or,rk->ok", adapter.lora_B, adapter.lora_A.flatten(1))
        ref_layer.weight.add_(2.0 * dw.reshape(layer.weight.shape))
    x = _input(kind)
    assert _rel(adapter(x).detach(), ref_layer(x).detach()) < 1e-5


# ---- interoperability with peft (groups=1, its supported case) -------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["standard", "pointwise", "linear"])
def test_matches_peft_with_identical_weights(kind, method):
    from peft import LoraConfig, get_peft_model

    base = _layer(kind)
    config = LoraConfig(r=3, lora_alpha=7, target_modules=["0"], use_dora=method == "dora")
    theirs = get_peft_model(nn.Sequential(copy.deepcopy(base)), config).base_model.model[0]
    ours = make_adapter(method, copy.deepcopy(base), 3, alpha=7, mode="activation")
    _randomise(ours)
    with torch.no_grad():
        a, b = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
        a.copy_(ours.lora_A.reshape_as(a))
        b.copy_(ours.lora_B.reshape_as(b))
        if method == "dora":
            m = theirs.lora_magnitude_vector["default"].weight  # (1, C_out, 1, 1) for convs
            m.copy_(ours.magnitude.reshape_as(m))
    x = _input(kind)
    expected = theirs(x)
    for mode in MODES:
        ours.mode = mode
        assert _rel(ours(x), expected) < 1e-5


# ---- model-level API ---------------------------------------------------------------------------
def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 12, 1), nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1, groups=3, padding_mode="reflect"),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4),
    )


def test_target_exclude_rank_pattern_trainable_and_report():
    model = _net()
    report = convpeft.apply_adapters(
        model, "lora", 4, target=["depthwise", "pointwise", "grouped"], exclude=[r"^6$"],
        rank_pattern={r"^4$": 2, r"^3$": 5}, trainable=[r"^9\."],
    )
    assert [r.name for r in report.layers] == ["3", "4"]
    assert [r.kind for r in report.layers] == ["depthwise", "pointwise"]
    assert [r.rank for r in report.layers] == [5, 2]
    assert report.layers[0].adapter_params == 5 * (8 + 9)  # 85 > 72 weights: flagged
    assert report.layers[0].outgrows_layer and not report.layers[1].outgrows_layer
    head = 12 * 4 + 4
    assert report.trainable_params == report.adapter_params + head
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert model[9].weight.requires_grad and not model[0].weight.requires_grad
    text = str(report)
    assert "depthwise" in text and "trainable" in text and "lower the rank" in text
    d = report.to_dict()
    assert d["layers"][1]["shape"] == [12, 8, 1, 1] and d["adapter_params"] == report.adapter_params


def test_callable_target_and_scaling():
    model = _net()
    rep = convpeft.apply_adapters(model, "dora", 3, alpha=6, rslora=True,
                                  target=lambda name, m: name == "0")
    assert [r.name for r in rep.layers] == ["0"]
    assert rep.layers[0].scaling == pytest.approx(6 / 3**0.5)
    assert is_adapter(model[0]) and isinstance(model[0].base_layer, nn.Conv2d)
    assert make_adapter("lora", nn.Conv2d(2, 2, 1), 4).scaling == 1.0  # alpha=None -> alpha=rank


def test_auto_mode_picks_fewer_flops():
    dense = make_adapter("lora", nn.Conv2d(64, 64, 3, padding=1), 4)
    dw = make_adapter("lora", nn.Conv2d(64, 64, 3, padding=1, groups=64), 4)
    shape = (8, 64, 32, 32)
    assert dense.resolve_mode(shape, training=True) == "activation"
    assert dw.resolve_mode(shape, training=True) == "weight"
    # forward-only: forming B @ A is cheaper than running two convs over the feature map
    assert dense.resolve_mode(shape, training=False) == "weight"
    fa = conv2d_flops(batch=8, in_channels=64, out_channels=64 * 4, kernel_size=3,
                      out_hw=(32, 32), groups=64).forward
    fb = conv2d_flops(batch=8, in_channels=256, out_channels=64, kernel_size=1,
                      out_hw=(32, 32), groups=64).forward
    assert dw.adapter_flops(shape, mode="activation") == fa + fb
    assert dw.adapter_flops(shape, mode="weight") == 2 * 64 * 4 * 9
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    dw(x)
    assert dw.last_mode == "weight"


def test_dropout_uses_activation_space_in_training_only():
    adapter = make_adapter("dora", nn.Conv2d(4, 4, 3, padding=1, groups=4), 2, dropout=0.5)
    _randomise(adapter)
    x = torch.randn(2, 4, 6, 6)
    adapter.train()
    adapter(x)
    assert adapter.last_mode == "activation"
    adapter.eval()
    with torch.no_grad():
        y = adapter(x)
        ref = F.conv2d(x, adapter.merged_weight(), adapter.base_layer.bias, 1, 1, 1, 4)
    assert adapter.last_mode == "weight" and _rel(y, ref) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_state_round_trip_into_fresh_model(method, tmp_path):
    model = _net()
    convpeft.apply_adapters(model, method, 3, target="conv", rank_pattern={"^3$": 5},
                            trainable=[r"^9\."], mode="auto")
    for _, m in adapter_layers(model):
        _randomise(m)
    with torch.no_grad():
        model[9].weight.add_(1.0)
    model.train()
    model(torch.randn(4, 3, 6, 6))  # moves batch-norm statistics
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    y = model(x)
    convpeft.save_adapters(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    fresh = _net()
    report = convpeft.load_adapters(fresh, tmp_path)
    fresh.eval()
    assert torch.equal(fresh(x), y)
    assert [r.rank for r in report.layers] == [3, 5, 3, 3]
    assert fresh[9].weight.requires_grad and not fresh[0].base_layer.weight.requires_grad
    # in-memory round trip
    other = _net()
    convpeft.apply_adapters(other, method, 3, target="conv", rank_pattern={"^3$": 5},
                            trainable=[r"^9\."])
    convpeft.load_adapter_state_dict(other, convpeft.adapter_state_dict(model))
    other.eval()
    assert torch.equal(other(x), y)


# ---- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"rank": 2.5}, "rank must be an integer >= 1"),
        ({"alpha": 0}, "alpha must be a number > 0"),
        ({"alpha": -1.0}, "alpha must be a number > 0"),
        ({"method": "vera"}, "unknown adapter method 'vera'; use one of lora, dora"),
        ({"target": "depthwise_conv"}, "unknown target"),
        ({"mode": "fast"}, "unknown mode 'fast'"),
        ({"rank_pattern": {"0": 0}}, r"rank_pattern\['0'\]"),
        ({"target": "linear", "exclude": [".*"]}, "matched no layer; this model has"),
        ({"mode": "weight", "dropout": 0.1}, "cannot be expressed in weight space"),
        ({"trainable": ["nothing_like_this"]}, "matched no parameter name"),
    ],
)
def test_errors_name_the_fix(kwargs, match):
    args = {"method": "lora", "rank": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        convpeft.apply_adapters(_net(), args.pop("method"), args.pop("rank"), **args)


def test_target_matching_nothing_lists_kinds():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(ValueError, match="standard x1"):
        convpeft.apply_adapters(model, target="depthwise")


def test_applying_twice_is_refused():
    model = _net()
    convpeft.apply_adapters(model, "lora", 2, target="pointwise")
    with pytest.raises(ValueError, match="already has an adapter; call merge_adapters"):
        convpeft.apply_adapters(model, "dora", 2, target="conv")
    convpeft.apply_adapters(model, "dora", 2, target="depthwise")  # other layers are fine
    assert len(adapter_layers(model)) == 2


def test_loading_mismatched_state_is_refused(tmp_path):
    model = _net()
    convpeft.apply_adapters(model, "lora", 4, target="conv")
    state = convpeft.adapter_state_dict(model)
    other = _net()
    convpeft.apply_adapters(other, "lora", 2, target="conv")
    with pytest.raises(ValueError, match="has shape .* saved with another rank"):
        convpeft.load_adapter_state_dict(other, state)
    bare = _net()
    with pytest.raises(KeyError, match="use load_adapters"):
        convpeft.load_adapter_state_dict(bare, state)
    convpeft.save_adapters(model, tmp_path)
    with pytest.raises(ValueError, match="already has an adapter"):
        convpeft.load_adapters(other, tmp_path)
