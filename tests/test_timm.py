"""timm CNNs: conv subclasses whose forward does more than ``nn.Conv2d``'s (TF-"SAME"
``Conv2dSame``, weight-standardised ``StdConv2d``/``ScaledStdConv2d`` and their "Same" forms)
are adapted exactly (identity at init, both computations agree, merge equal), unknown ones are
refused; lean activations and the profiler's FLOP counts respect them. Skipped without timm."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm")
from timm.layers import (  # noqa: E402
    Conv2dSame,
    ScaledStdConv2d,
    ScaledStdConv2dSame,
    StdConv2d,
    StdConv2dSame,
    conv2d_same,
)
from timm.layers.conv2d_same import Conv2dSameExport  # noqa: E402

from convpeft import apply_adapters, lean_activations, merge_adapters  # noqa: E402
from convpeft.adapters import adapter_layers, make_adapter  # noqa: E402
from convpeft.core.conv_variants import (  # noqa: E402
    ConvVariant,
    UnsupportedLayerError,
    register_conv_variant,
    registered_conv_variant,
    same_padding,
)
from convpeft.profiler import analytic_profile, profile_update  # noqa: E402


def _gain(layer: nn.Module) -> nn.Module:
    """Random gain on a scaled-WS conv (timm inits it to a constant), so it matters."""
    with torch.no_grad():
        layer.gain.uniform_(0.5, 1.5)
    return layer


# name -> (factory, dynamic TF "SAME" padding?)
LAYERS = {
    "Conv2dSame_k5s2": (lambda: Conv2dSame(6, 8, 5, stride=2), True),
    "Conv2dSame_dw_dil2": (lambda: Conv2dSame(6, 6, 3, stride=2, dilation=2, groups=6,
                                              bias=False), True),
    "StdConv2d_grouped": (lambda: StdConv2d(6, 8, 3, padding=1, groups=2, eps=1e-8), False),
    "StdConv2dSame_dynamic": (lambda: StdConv2dSame(6, 8, 3, stride=2, bias=True), True),
    "StdConv2dSame_static": (lambda: StdConv2dSame(6, 8, 3, stride=1), False),
    "ScaledStdConv2d": (lambda: _gain(ScaledStdConv2d(6, 8, 3)), False),
    "ScaledStdConv2dSame_k4s2": (lambda: _gain(ScaledStdConv2dSame(6, 8, 4, stride=2)), True),
}
METHODS = ("lora", "dora")
MODES = ("activation", "weight")


def _x(requires_grad: bool = False) -> torch.Tensor:
    # odd, non-square: TF "SAME" padding is asymmetric here
    return torch.randn(2, 6, 11, 10, requires_grad=requires_grad)


def _randomise(wrapper: nn.Module) -> None:
    with torch.no_grad():
        wrapper.lora_B.normal_(0, 0.3)
        if hasattr(wrapper, "magnitude"):
            wrapper.magnitude.mul_(torch.empty_like(wrapper.magnitude).uniform_(0.5, 1.5))


def _delta_reference(layer: nn.Module, dynamic: bool, dw: torch.Tensor,
                     x: torch.Tensor) -> torch.Tensor:
    """``conv(x, dW)`` padded as timm pads ``layer``, with timm's own functions."""
    if dynamic:
        return conv2d_same(x, dw, None, layer.stride, (0, 0), layer.dilation, layer.groups)
    return F.conv2d(x, dw, None, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_timm_layer_exact(name, method):
    torch.manual_seed(0)
    factory, dynamic = LAYERS[name]
    layer = factory()
    x = _x()
    ref0 = layer(x)  # timm's own forward
    act = make_adapter(method, copy.deepcopy(layer), rank=3, mode="activation")
    wgt = copy.deepcopy(act)
    wgt.mode = "weight"
    for wrapper in (act, wgt):  # identity at init, in both computations
        if method == "lora":
            assert torch.equal(wrapper(x), ref0)  # the same kernels: bit for bit
        else:
            torch.testing.assert_close(wrapper(x), ref0, atol=1e-6, rtol=1e-5)
    _randomise(act)
    wgt.load_state_dict(act.state_dict())
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = act(xa), wgt(xb)
    assert (ya - ref0).abs().max() > 1e-2  # the adapter now does something
    if method == "lora":  # LoRA adds s * conv(x, dW) to timm's own output
        dw = act.delta_weight().detach()
        ref = ref0 + act.scaling * _delta_reference(layer, dynamic, dw, x)
        torch.testing.assert_close(ya, ref, atol=1e-5, rtol=1e-5)
    # both computations give the same output and gradients
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)
    for pa, pb in zip(act.adapter_parameters(), wgt.adapter_parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-4)
    # merge: Conv2dSame folds in place (stays a Conv2dSame); a standardised conv is replaced
    with torch.no_grad():
        y = act(x)
        plain = act.unload()
        torch.testing.assert_close(plain(x), y, atol=1e-5, rtol=1e-5)
    if isinstance(layer, Conv2dSame):
        assert plain is act.base_layer
    else:
        assert type(plain) is (Conv2dSame if dynamic else nn.Conv2d)
        # trainability as before wrapping (a fresh layer trains); no gain left
        assert plain.weight.requires_grad and not hasattr(plain, "gain")


def test_dora_norm_is_of_the_standardised_weight():
    torch.manual_seed(0)
    layer = _gain(ScaledStdConv2d(6, 8, 3, groups=2))
    w = layer.weight.detach().reshape(8, -1)
    mean, var = w.mean(1, keepdim=True), w.var(1, unbiased=False, keepdim=True)
    w_eff = (w - mean) / torch.sqrt(var + layer.eps) * layer.gain.detach().reshape(8, 1) \
        * layer.scale
    dora = make_adapter("dora", layer, rank=2)
    torch.testing.assert_close(dora.magnitude.detach(), w_eff.norm(dim=1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dora.magnitude.detach(), w.norm(dim=1), rtol=1e-2)


@pytest.mark.parametrize("name", ["StdConv2d_grouped", "ScaledStdConv2dSame_k4s2"])
def test_lora_fa_lean_path_on_standardised_conv(name):
    """LoRA-FA's frozen-conv path convolves with the effective weight too."""
    torch.manual_seed(0)
    layer = LAYERS[name][0]()
    fa = make_adapter("lora", layer, rank=1, mode="activation", freeze_a=True)
    plain = copy.deepcopy(fa)
    plain.config = dataclasses.replace(plain.config, freeze_a=False)  # same tensors, plain path
    _randomise(fa)
    plain.lora_B.data.copy_(fa.lora_B.data)
    assert fa.fa_saves_less((2, 6, 11, 10))
    xa = _x(True)
    xb = xa.detach().clone().requires_grad_(True)
    ya, yb = fa(xa), plain(xb)
    torch.testing.assert_close(ya, yb, atol=1e-6, rtol=1e-5)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(fa.lora_B.grad, plain.lora_B.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)


def test_same_padding_matches_timm():
    from timm.layers.padding import pad_same_arg

    for hw, k, s, d in [((11, 10), (5, 5), (2, 2), (1, 1)), ((7, 8), (3, 4), (2, 1), (2, 1)),
                        ((1, 1), (5, 5), (2, 2), (1, 1)), ((16, 16), (1, 1), (2, 2), (1, 1))]:
        assert same_padding(hw, k, s, d) == pad_same_arg(list(hw), list(k), list(s), list(d))


# ------------------------------------------------------------------------------ whole models


# Tiny members of each family, built with timm's own model classes (seconds, not minutes, on
# 2 CPU cores); CONVPEFT_TIMM_FULL=1 also runs the registered models themselves (minutes).


def _tiny_resnetv2(conv_layer: type) -> nn.Module:
    """A tiny BiT-style ResNetV2 (pre-activation, GroupNorm) on a weight-standardised conv."""
    from functools import partial

    from timm.layers import GroupNormAct
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=[1, 1], channels=(32, 64), stem_chs=16, num_classes=10,
                    conv_layer=partial(conv_layer, eps=1e-8),
                    norm_layer=partial(GroupNormAct, num_groups=8))


def _tiny_nfnet(**cfg_kw) -> nn.Module:
    """A tiny normalisation-free net: ScaledStdConv2d (ScaledStdConv2dSame with
    same_padding=True), grouped 3x3 convs."""
    from timm.models.nfnet import NfCfg, NormFreeNet

    cfg = NfCfg(depths=(1, 1, 1, 1), channels=(16, 32, 32, 48), stem_chs=16, group_size=8,
                num_features=64, **cfg_kw)
    return NormFreeNet(cfg, num_classes=10)


def _tiny_resnext() -> nn.Module:
    from timm.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], cardinality=4, base_width=4, num_classes=10)


def _tiny_mixnet() -> nn.Module:
    """Mixed-kernel depthwise convs as MixNet builds them (timm's MixedConv2d, TF "SAME"
    padding: Conv2dSame where the padding depends on the input size)."""
    from timm.layers import MixedConv2d

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        MixedConv2d(16, 16, kernel_size=[3, 5, 7], stride=2, padding="same", depthwise=True),
        MixedConv2d(16, 24, kernel_size=[1, 3], padding="same"),
        MixedConv2d(24, 24, kernel_size=[3, 5], stride=2, padding="same", depthwise=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))


_TINY = {
    "tiny_resnetv2_std": lambda: _tiny_resnetv2(StdConv2d),
    "tiny_resnetv2_std_same": lambda: _tiny_resnetv2(StdConv2dSame),
    "tiny_nf_regnet": lambda: _tiny_nfnet(stem_type="3x3", reg=True, attn_layer="se",
                                          attn_kwargs={"rd_ratio": 0.25}),
    "tiny_nfnet_same": lambda: _tiny_nfnet(stem_type="3x3", same_padding=True, extra_conv=True),
    "tiny_resnext": _tiny_resnext,
    "tiny_mixnet_same": _tiny_mixnet,
}
MODELS = [  # (model, method, mode): families x methods x modes spread over the list
    ("tf_mobilenetv3_small_minimal_100", "dora", "activation"),  # TF port: Conv2dSame, depthwise
    ("tiny_mixnet_same", "lora", "activation"),  # mixed kernels, Conv2dSame
    ("tiny_resnext", "dora", "weight"),  # grouped
    ("tiny_resnetv2_std", "dora", "auto"),  # StdConv2d (BiT)
    ("tiny_resnetv2_std_same", "lora", "auto"),  # StdConv2dSame (ViT-hybrid stems)
    ("tiny_nf_regnet", "lora", "weight"),  # ScaledStdConv2d (NF-RegNet), SE
    ("tiny_nfnet_same", "dora", "weight"),  # ScaledStdConv2dSame (NFNet), grouped
]
FULL_MODELS = [  # registered timm models, CONVPEFT_TIMM_FULL=1 (float64: exact to 1e-9)
    ("mobilenetv3_small_050", "lora", "auto"),
    ("regnetx_002", "dora", "weight"),
    ("resnext26ts", "lora", "activation"),
    ("tf_mixnet_s", "lora", "activation"),
    ("tf_efficientnet_b0", "dora", "auto"),
    ("nf_regnet_b0", "lora", "weight"),
    ("resnetv2_50x1_bit", "dora", "activation"),
    ("eca_nfnet_l0", "dora", "auto"),
]
_WS = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)


def _count(model: nn.Module, cls: type | tuple) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def _identity_train_merge(name: str, method: str, mode: str, dtype: torch.dtype,
                          tol: float, size: int) -> None:
    """Identity at init, a training step changes the outputs, merge reproduces them; ``tol``
    is relative to ``max(1, max |y|)``."""
    torch.manual_seed(0)
    if name in _TINY:
        model = _TINY[name]()
    else:
        model = timm.create_model(name, pretrained=False, num_classes=10)
    model = model.to(dtype).eval()
    n_same = _count(model, Conv2dSame)
    n_dyn_ws = sum(isinstance(m, _WS) and getattr(m, "same_pad", False) for m in model.modules())
    n_conv = _count(model, nn.Conv2d)
    x, labels = torch.randn(2, 3, size, size, dtype=dtype), torch.tensor([1, 7])
    with torch.no_grad():
        y0 = model(x)
    scale = max(1.0, float(y0.abs().max()))
    report = apply_adapters(model, method, rank=4, mode=mode, target="conv")
    assert len(report.layers) == n_conv  # every conv adapted, none refused
    with torch.no_grad():
        y1 = model(x)
    assert (y1 - y0).abs().max() <= tol * scale  # identity at init
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    F.cross_entropy(model(x), labels).backward()
    opt.step()
    with torch.no_grad():
        y2 = model(x)
    assert (y2 - y1).abs().max() > 1e-3 * float(y1.abs().max())  # the step changed the model
    merge_adapters(model)
    assert not adapter_layers(model)
    with torch.no_grad():
        y3 = model(x)
    assert (y3 - y2).abs().max() <= tol * max(scale, float(y2.abs().max()))
    # Conv2dSame folded in place; standardised convs became plain (dynamic SAME: Conv2dSame)
    assert _count(model, _WS) == 0
    assert _count(model, Conv2dSame) == n_same + n_dyn_ws


@pytest.mark.parametrize("name,method,mode", MODELS)
def test_timm_model_identity_train_merge(name, method, mode):
    _identity_train_merge(name, method, mode, torch.float32, 1e-5, size=32)


@pytest.mark.skipif(os.environ.get("CONVPEFT_TIMM_FULL") != "1",
                    reason="full-size timm models take minutes: set CONVPEFT_TIMM_FULL=1")
@pytest.mark.parametrize("name,method,mode", FULL_MODELS)
def test_full_timm_model_identity_train_merge(name, method, mode):
    _identity_train_merge(name, method, mode, torch.float64, 1e-9, size=64)


# --------------------------------------------------------------------------------- refusals


class _Shifted(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1.0


class _OwnConvForward(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight * 2, bias)


class _Inherits(nn.Conv2d):
    """A subclass that keeps nn.Conv2d's forward: a plain conv."""


class _SameChild(Conv2dSame):
    """Inherits Conv2dSame's forward, so its variant."""


class _ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def _net(middle: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), middle, nn.Flatten(), nn.Linear(6, 4))


@pytest.mark.parametrize("middle", [
    _Shifted(6, 6, 3, padding=1), _OwnConvForward(6, 6, 3, padding=1),
    Conv2dSameExport(6, 6, 3, stride=2),
])
def test_unknown_conv_subclass_refused_model_unchanged(middle):
    model = _net(middle)
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedLayerError) as e:
        apply_adapters(model, "lora", rank=2, target="conv")
    msg = str(e.value)
    assert type(middle).__qualname__ in msg and "layer '1'" in msg
    assert "exclude=['^1$']" in msg and "register_conv_variant" in msg
    assert model[1] is middle and not adapter_layers(model)
    for n, p in model.named_parameters():
        assert p.requires_grad == before[n][0] and torch.equal(p, before[n][1])
    # the suggested fix works
    apply_adapters(model, "lora", rank=2, target="conv", exclude=["^1$"])
    assert len(adapter_layers(model)) == 1 and model[1] is middle


def test_linear_subclass_with_forward_refused():
    model = nn.Sequential(nn.Flatten(), _ScaledLinear(12, 4))
    with pytest.raises(UnsupportedLayerError, match="_ScaledLinear"):
        apply_adapters(model, "lora", rank=2, target="linear")
    assert not adapter_layers(model)


@pytest.mark.parametrize("method", METHODS)
def test_inheriting_subclasses_adapt_exactly(method):
    torch.manual_seed(0)
    model = nn.Sequential(_Inherits(3, 6, 3, padding=1), _SameChild(6, 6, 5, stride=2))
    x = torch.randn(2, 3, 9, 9)
    y0 = model(x)
    apply_adapters(model, method, rank=2, target="conv")
    assert model[1].variant.name == "timm Conv2dSame"
    torch.testing.assert_close(model(x), y0, atol=1e-6, rtol=1e-5)


class _Flipped(nn.Conv2d):
    """Convolves with its kernel mirrored left-right: a weight transform to register."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.flip(-1), self.bias)


def test_register_conv_variant_makes_a_subclass_exact():
    torch.manual_seed(0)
    model = _net(_Flipped(6, 6, 3, padding=1))
    x = torch.randn(2, 3, 1, 1)
    with pytest.raises(UnsupportedLayerError):
        apply_adapters(copy.deepcopy(model), "lora", rank=2)
    register_conv_variant(_Flipped, ConvVariant("flipped", weight=lambda m: m.weight.flip(-1)))
    y0 = model(x)
    apply_adapters(model, "dora", rank=2)
    torch.testing.assert_close(model(x), y0, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        model[1].lora_B.normal_()
        y = model(x)
    merge_adapters(model)
    assert type(model[1]) is nn.Conv2d
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="nn.Conv2d subclass"):
        register_conv_variant(nn.Linear, ConvVariant("x"))
    with pytest.raises(TypeError, match="ConvVariant"):
        register_conv_variant(_Flipped, {"weight": None})
    with pytest.raises(ValueError, match="plain="):
        register_conv_variant(_Flipped, ConvVariant("x", weight=lambda m: m.weight,
                                                    input_pad=lambda m, hw: [0, 1, 0, 1]))
    # registered once, as in the other registries: a second variant is refused, the first kept
    first = registered_conv_variant(_Flipped(2, 2, 1))
    register_conv_variant(_Flipped, first)  # the same variant again: a no-op
    with pytest.raises(ValueError, match="already registered as conv variant 'flipped'"):
        register_conv_variant(_Flipped, ConvVariant("other", weight=lambda m: m.weight))
    assert registered_conv_variant(_Flipped(2, 2, 1)) is first


def test_merge_without_unload_refused_for_standardised_conv():
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 6, 3, stride=2), StdConv2d(6, 6, 3, padding=1))
    apply_adapters(model, "lora", rank=2)
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        for _, m in adapter_layers(model):
            m.lora_B.normal_()
        y = model(x)
    with pytest.raises(ValueError, match=r"1 \(StdConv2d\).*merge_adapters\(model\)"):
        merge_adapters(model, unload=False)
    assert not any(m.merged for _, m in adapter_layers(model))  # nothing merged
    with pytest.raises(ValueError, match="unload=True"):
        model[1].merge()
    merge_adapters(model)
    assert type(model[0]) is Conv2dSame and type(model[1]) is nn.Conv2d
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)


def test_parametrized_conv_merges_into_a_plain_conv():
    """A parametrised weight (weight norm) is computed: merging must not write into it."""
    torch.manual_seed(0)
    conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1))
    model = nn.Sequential(conv)
    x = torch.randn(1, 3, 5, 5)
    y0 = model(x)
    apply_adapters(model, "lora", rank=2)
    torch.testing.assert_close(model(x), y0)
    with torch.no_grad():
        model[0].lora_B.normal_()
        y = model(x)
    assert not model[0].folds_in_place
    merge_adapters(model)
    assert type(model[0]) is nn.Conv2d
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ lean and profiler


def test_lean_handles_registered_variants_and_names_the_rest():
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 6, 5, stride=2), nn.ReLU(),
                          _gain(ScaledStdConv2dSame(6, 6, 3, stride=2)), nn.ReLU(),
                          StdConv2d(6, 6, 3, padding=1), _Shifted(6, 6, 1)).eval()
    model.requires_grad_(False)
    x = torch.randn(2, 3, 13, 12, requires_grad=True)
    y0 = model(x)
    (g0,) = torch.autograd.grad(y0.square().sum(), x)
    report = lean_activations(model)
    rows = {r.name: r for r in report.rows}
    assert [rows[n].action for n in "024"] == ["conv", "conv", "conv"]
    assert rows["5"].action == "plain" and "not registered" in rows["5"].reason
    y1 = model(x)
    (g1,) = torch.autograd.grad(y1.square().sum(), x)
    assert torch.equal(y1, y0) and torch.equal(g1, g0)
    report.undo()


def _profiled_net() -> nn.Sequential:
    return nn.Sequential(Conv2dSame(3, 8, 5, stride=2, bias=False),
                         StdConv2d(8, 16, 3, padding=1, groups=2),
                         ScaledStdConv2dSame(16, 16, 3, stride=2), nn.Flatten(),
                         nn.Linear(16 * 3 * 3, 10))


def test_profiler_counts_variant_convs_on_their_padded_input():
    torch.manual_seed(0)
    model = _profiled_net()
    x, y = torch.randn(2, 3, 11, 11), torch.randint(0, 10, (2,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    p = profile_update(model, opt, x, y, warmup=0, repeat=1, per_layer=True)
    rows = {r["name"]: r for r in p.per_layer}
    # Conv2dSame 5x5 s2 on 11x11: SAME pads to 15x15 -> 6x6 out; 2 * 2*8*36 * 3*25
    assert rows["0"]["forward"] == 86_400
    assert rows["0"]["backward_input"] == 0  # first layer: no input gradient
    # StdConv2d 3x3 p1, groups 2: 6x6 out; 2 * 2*16*36 * 4*9
    assert rows["1"]["forward"] == rows["1"]["backward_weight"] == 82_944
    # ScaledStdConv2dSame 3x3 s2 on 6x6: SAME pads to 7x7 -> 3x3; 2 * 2*16*9 * 16*9
    assert rows["2"]["forward"] == 82_944
    # standardisation = batch norm over the weight: 6 + 8 FLOPs per weight element
    assert rows["1"]["elementwise"] == 14 * 16 * 4 * 9
    assert p.flops_forward == 86_400 + 2 * 82_944 + 2 * 2 * 144 * 10
    a = analytic_profile(model, opt, tuple(x.shape))
    assert (a.flops_forward, a.flops_backward) == (p.flops_forward, p.flops_backward)
    assert a.memory_peak_tensors == p.memory_peak_tensors  # exact at tensor level


@pytest.mark.parametrize("mode", MODES)
def test_analytic_matches_measured_with_adapters_on_variants(mode):
    torch.manual_seed(0)
    model = _profiled_net()
    apply_adapters(model, "dora", rank=2, mode=mode)
    x, y = torch.randn(2, 3, 11, 11), torch.randint(0, 10, (2,))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    p = profile_update(model, opt, x, y, warmup=0, repeat=1)
    a = analytic_profile(model, opt, tuple(x.shape))
    assert (a.flops_forward, a.flops_backward) == (p.flops_forward, p.flops_backward)
    assert a.memory_peak_tensors == p.memory_peak_tensors  # exact at tensor level
    base = 86_400 + 2 * 82_944 + 2 * 2 * 144 * 10
    assert p.flops_forward > base  # the adapters' work comes on top of the frozen convs'
