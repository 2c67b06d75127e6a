"""Memory-lean activations: exact outputs and gradients, what each layer saves, reversibility."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2, mobilenet_v3_small, resnet18

from convpeft import apply_adapters
from convpeft.memory.lean import (
    lean_activations,
    pack_mask,
    restore_activations,
    saved_bytes_by_layer,
    unpack_mask,
)
from convpeft.ops.masks import CHUNK

GEOMETRIES = {
    "standard": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1),
    "pointwise": dict(in_channels=8, out_channels=12, kernel_size=1),
    "depthwise": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),
    "grouped": dict(in_channels=8, out_channels=12, kernel_size=3, padding=2, groups=4,
                    dilation=2),
    "strided": dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=1,
                    bias=True),
    "reflect": dict(in_channels=8, out_channels=8, kernel_size=3, padding=(1, 2),
                    padding_mode="reflect"),
    "replicate": dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=1,
                      padding_mode="replicate", bias=False),
    "circular": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8,
                     padding_mode="circular"),
    "same_even": dict(in_channels=8, out_channels=8, kernel_size=4, padding="same"),
    "valid": dict(in_channels=8, out_channels=8, kernel_size=3, padding="valid", dilation=2),
}
ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "leaky": lambda: nn.LeakyReLU(0.1),
        "hardtanh": lambda: nn.Hardtanh(-0.5, 0.5), "relu_inplace": lambda: nn.ReLU(True),
        "relu6_inplace": lambda: nn.ReLU6(True), "leaky_inplace": lambda: nn.LeakyReLU(0.2, True)}
# BN of the layer under test: eval/frozen and eval with only the bias trainable (BitFit) are
# lean; a trainable scale, or train mode, runs the plain forward
BN_MODES = {"eval": (False, False, "norm"), "eval_bias": (False, True, "norm"),
            "eval_affine": (True, True, None), "train": (False, False, "norm")}


def _net(geometry: str, act: str) -> nn.Sequential:
    torch.manual_seed(0)
    g = GEOMETRIES[geometry]
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), ACTS[act](),
        nn.Conv2d(**g), nn.BatchNorm2d(g["out_channels"]), ACTS[act](),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(g["out_channels"], 5),
    )


def _step(model: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.arange(1, y.shape[1] + 1, dtype=y.dtype)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad.clone(), grads


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """rel 1e-5, elementwise and against the tensor's scale: a gradient that is a sum over
    N x H x W (a BN bias, BitFit) cancels to near zero in some channels, where summing in
    another order (BN's backward kernel vs ``sum``) moves the last bits of a float32."""
    atol = max(1e-6, 1e-5 * b.abs().max().item())
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=what)


def _assert_exact(plain: nn.Module, lean: nn.Module, x: torch.Tensor) -> None:
    y0, gx0, g0 = _step(plain, x)
    y1, gx1, g1 = _step(lean, x)
    _close(y1, y0, "output")
    _close(gx1, gx0, "input gradient")
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        _close(g1[k], g0[k], k)


@pytest.mark.parametrize("shape", [(3,), (8,), (2, 3, 5, 7), (1, 16, 4, 4)])
def test_mask_round_trip(shape):
    m = torch.rand(shape) > 0.5
    packed = pack_mask(m)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(m.numel() / 8)
    assert torch.equal(unpack_mask(packed, m.shape), m)


@pytest.mark.parametrize("act,saves", [(a, s) for a in ACTS for s in ("mask16", "mask", "output")
                                       if not (s == "output" and a.startswith("leaky"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_activation_gradient_at_the_kinks(act, dtype, saves, monkeypatch):
    """The mask must say exactly where torch's backward passes the gradient, kinks included
    (0, -0, the clamp bounds, and their nearest floats on either side, NaN of either sign);
    ``mask16`` packs and unpacks 91 elements in 6 passes of 16, the last one partial.
    ``output``: a clamp whose consumer saves its output (convpeft.memory.lean.probe) reads the flags
    off that output instead, exactly as well (LeakyReLU always keeps a mask)."""
    monkeypatch.setattr("convpeft.ops.masks.CHUNK", 16 if saves == "mask16" else CHUNK)
    module = ACTS[act]()
    lo, hi = {"relu6": (0.0, 6.0), "hardtanh": (-0.5, 0.5)}.get(act.split("_")[0], (0.0, None))
    points = [lo, -0.0, 0.0] + ([hi] if hi is not None else [])
    t = torch.tensor(points, dtype=dtype)
    kinks = torch.cat([t, torch.nextafter(t, t + 1), torch.nextafter(t, t - 1),
                       torch.tensor([-3.0, 3.0, 7.0, 1e-40, -1e-40], dtype=dtype),
                       torch.tensor([math.nan, -math.nan], dtype=dtype)])
    x0 = torch.cat([kinks, torch.randn(37, dtype=dtype)])  # 54 + 37: not a multiple of 8
    gy = torch.rand_like(x0) + 0.5
    grads = []
    for lean in (False, True):
        m = copy.deepcopy(module)
        if lean:
            lean_activations(nn.Sequential(m))
            assert m._convpeft_lean == "act"
            m._convpeft_lean_shared = saves == "output"  # what the probe sets
        x = x0.clone().requires_grad_(True)
        y = m(x * 1)  # not a leaf, so in-place variants may write into it
        y.backward(gy)
        grads.append((y.detach(), x.grad))
    # bit-exact, NaN where torch has NaN
    assert torch.allclose(grads[0][0], grads[1][0], rtol=0, atol=0, equal_nan=True)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bn", list(BN_MODES))
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_exact_on_tiny_nets(geometry, act, bn):
    plain = _net(geometry, act)
    with torch.no_grad():  # non-trivial BN statistics and affine
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    plain.train(bn == "train")
    for p in plain[3].parameters():
        p.requires_grad_(False)  # the frozen conv under test
    weight_grad, bias_grad, action = BN_MODES[bn]
    plain[4].weight.requires_grad_(weight_grad)
    plain[4].bias.requires_grad_(bias_grad)
    lean = copy.deepcopy(plain)
    report = lean_activations(lean)
    assert lean[3]._convpeft_lean == "conv"
    # in train mode the lean BN forward runs the plain one (checked per call)
    assert getattr(lean[4], "_convpeft_lean", None) == action
    assert getattr(lean[1], "_convpeft_lean", None) is None  # trainable affine stays plain
    assert {r.action for r in report.lean} >= {"conv", "act"}
    _assert_exact(plain, lean, torch.randn(2, 3, 9, 9))


ARCHS = {"resnet18": (resnet18, "fc"), "mobilenet_v2": (mobilenet_v2, "classifier"),
         "mobilenet_v3_small": (mobilenet_v3_small, "classifier")}


@pytest.mark.parametrize("method", ["full-partial", "head", "bitfit", "lora-activation",
                                    "lora-weight", "dora"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_exact_on_torchvision_models(arch, method):
    torch.manual_seed(0)
    build, head = ARCHS[arch]
    plain = build(num_classes=10).eval()
    with torch.no_grad():  # non-trivial running statistics
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    if method == "full-partial":  # the first half of the parameters frozen, the rest trained
        params = list(plain.parameters())
        for p in params[: len(params) // 2]:
            p.requires_grad_(False)
    elif method == "head":
        for n, p in plain.named_parameters():
            p.requires_grad_(n.startswith(head))
    elif method == "bitfit":
        for n, p in plain.named_parameters():
            p.requires_grad_(n.startswith(head) or n.endswith("bias"))
    else:
        name, _, mode = method.partition("-")
        apply_adapters(plain, name, 4, target="conv", trainable=[f"^{head}\\."],
                       mode=mode or "auto")
        with torch.no_grad():
            for n, p in plain.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    lean = copy.deepcopy(plain)
    report = lean_activations(lean)
    assert report.counts().get("act", 0) > 0
    if method in ("head", "bitfit", "full-partial"):
        assert report.counts().get("conv", 0) > 0
        assert report.counts().get("norm", 0) > 0  # BitFit: bias-only BNs are lean too
    else:  # adapted convs keep their input for A; say why
        assert any("adapter base layer" in r.reason for r in report.rows)
    _assert_exact(plain, lean, torch.randn(2, 3, 32, 32))


def test_saved_bytes_match_hand_computed_figures():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8))
    net.eval().requires_grad_(False)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    plain = saved_bytes_by_layer(net, x)
    # plain: the conv saves its input (2*3*5*5 fp32), ReLU its output (2*8*5*5 fp32); BN in
    # eval mode saves its input too (the ReLU output, already counted once)
    assert plain == {"0": 2 * 3 * 5 * 5 * 4, "1": 2 * 8 * 5 * 5 * 4}
    report = lean_activations(net)
    lean = saved_bytes_by_layer(net, x)
    # lean: the conv keeps only its (resident) weight, ReLU 1 bit per element, BN only scale
    assert lean == {"1": math.ceil(2 * 8 * 5 * 5 / 8), "2": 8 * 4}
    report.undo()
    assert saved_bytes_by_layer(net, x) == plain


def test_report_measures_bytes_per_layer_plain_and_lean():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
                        nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.LeakyReLU(0.1))
    net.eval().requires_grad_(False)
    net[1].bias.requires_grad_(True)  # BitFit on the BN: its gradient is a sum of grad_y
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    report = lean_activations(net, example_input=x)
    f32, n_x, n_y = 4, 2 * 3 * 6 * 6, 2 * 8 * 6 * 6
    # plain: reflect pad saves x and the conv its padded input; BN (eval, frozen scale) saves
    # its input; torch's in-place hardtanh_ saves a *copy* of its input (its backward formula
    # reads the original), so the depthwise conv's input is one more tensor; LeakyReLU saves
    # its input
    assert report.plain_bytes == {"0": n_x * f32 + 2 * 3 * 8 * 8 * f32, "1": n_y * f32,
                                  "2": n_y * f32, "3": n_y * f32, "4": n_y * f32}
    bits = math.ceil(n_y / 8)
    assert report.lean_bytes == {"1": 8 * f32, "2": bits, "4": bits}
    rows = {r.name: r for r in report.rows}
    assert (rows["0"].action, rows["0"].kind, rows["0"].lean_bytes) == ("conv", "standard", 0)
    assert (rows["3"].kind, rows["3"].plain_bytes, rows["3"].lean_bytes) == (
        "depthwise", n_y * f32, 0)
    assert report.totals() == (sum(report.plain_bytes.values()), 8 * f32 + 2 * bits)
    assert torch.equal(net[1].running_mean, torch.zeros(8))  # measuring changed nothing


def test_saved_bytes_by_layer_leaves_bn_statistics_alone():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    saved_bytes_by_layer(net, torch.randn(2, 3, 5, 5))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="real example input"):
        saved_bytes_by_layer(net, torch.empty(2, 3, 5, 5, device="meta"))


def test_undo_and_state_dict_are_unchanged():
    net = _net("depthwise", "relu6").eval().requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = lean_activations(net)
    assert len(report.lean) == 6  # 2 convs, 2 BNs (eval, frozen), 2 activations
    assert net.state_dict().keys() == before.keys()
    assert restore_activations(net) == len(report.lean)
    assert "forward" not in net[3].__dict__
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_a_lean_layer_unfrozen_later_gets_the_right_gradient():
    plain = _net("standard", "relu").eval()
    plain[3].requires_grad_(False)
    lean = copy.deepcopy(plain)
    lean_activations(lean)
    for m in (plain, lean):
        m[3].requires_grad_(True)  # unfrozen after lean_activations
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="layer '3' was made lean while frozen"):
        _assert_exact(plain, lean, x)
    assert plain[3].weight.grad is not None
    lean_activations(lean)  # re-decided: the unfrozen conv stays plain, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_exact(plain, lean, x)


@pytest.mark.parametrize("geometry,act", [("grouped", "leaky"), ("reflect", "relu6_inplace"),
                                          ("replicate", "leaky_inplace"), ("same_even", "relu")])
def test_lean_model_runs_on_meta_tensors(geometry, act):
    net = _net(geometry, act).eval().requires_grad_(False)
    net[-1].requires_grad_(True)
    net[4].bias.requires_grad_(True)
    lean_activations(net)
    meta = copy.deepcopy(net).to("meta")
    x = torch.empty(2, 3, 8, 8, device="meta", requires_grad=True)
    meta(x).sum().backward()
    assert meta[-1].weight.grad.device.type == "meta" and x.grad.shape == x.shape
    assert meta[4].bias.grad.shape == meta[4].bias.shape


# ----------------------------------------------------------------------------- LoRA-FA


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("rank", [1, 3])
def test_lora_fa_is_exact_and_trains_only_b(geometry, rank):
    torch.manual_seed(0)
    base = _net(geometry, "relu").eval()
    fa = copy.deepcopy(base)
    ref = copy.deepcopy(base)
    apply_adapters(fa, "lora", rank, mode="activation", freeze_a=True, trainable=[r"^8\."])
    apply_adapters(ref, "lora", rank, mode="activation", trainable=[r"^8\."])
    ref.load_state_dict(fa.state_dict())
    for name, p in ref.named_parameters():  # the plain path with A frozen by hand
        if "lora_A" in name:
            p.requires_grad_(False)
    with torch.no_grad():
        for m in (fa, ref):
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.linspace(-0.3, 0.3, p.numel()).view_as(p))
    assert not any(p.requires_grad for n, p in fa.named_parameters() if "lora_A" in n)
    assert all(p.requires_grad for n, p in fa.named_parameters() if "lora_B" in n)
    _assert_exact(ref, fa, torch.randn(2, 3, 9, 9))


def test_lora_fa_saves_the_projection_not_the_input():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    for kind, conv in (("standard", nn.Conv2d(16, 16, 3, padding=1)),
                       ("depthwise", nn.Conv2d(16, 16, 3, padding=1, groups=16))):
        plain, fa = nn.Sequential(copy.deepcopy(conv)), nn.Sequential(copy.deepcopy(conv))
        apply_adapters(plain, "lora", 2, mode="activation")
        apply_adapters(fa, "lora", 2, mode="activation", freeze_a=True)
        saved_plain = saved_bytes_by_layer(plain, x)["0"]
        saved_fa = saved_bytes_by_layer(fa, x)["0"]
        g = conv.groups
        h_bytes = 2 * g * 2 * 8 * 8 * 4  # h = A x: g r channels, kept for B's gradient
        if kind == "standard":
            # plain: x (once, shared by the base conv and A) and h; LoRA-FA: h alone
            assert saved_plain == x.numel() * 4 + h_bytes
            assert saved_fa == h_bytes
        else:  # g r = 32 channels > 16: keeping x is smaller, so LoRA-FA keeps x and
            # recomputes h in backward (plain LoRA: x, h, and A repeated per group)
            a_rep = 16 * 2 * 9 * 4
            assert saved_plain == x.numel() * 4 + h_bytes + a_rep
            assert saved_fa == x.numel() * 4 + a_rep < saved_plain


def test_lora_fa_round_trips_and_is_a_method(tmp_path):
    from convpeft import load_adapters, save_adapters
    from convpeft.methods import MethodConfig, prepare

    net = _net("standard", "relu")
    apply_adapters(net, "lora", 2, freeze_a=True)
    save_adapters(net, tmp_path)
    fresh = _net("standard", "relu")
    load_adapters(fresh, tmp_path)
    assert all(m.freeze_a for n, m in fresh.named_modules() if hasattr(m, "freeze_a"))
    p = prepare(_net("standard", "relu"), MethodConfig("lora-fa", rank=2))
    names = {n for n, q in p.model.named_parameters() if q.requires_grad}
    assert any("lora_B" in n for n in names) and not any("lora_A" in n for n in names)


def test_lean_memory_benchmark_orders_the_configurations():
    from benchmarks.lean_memory import run

    rows = {r["config"]: r for r in run(["mobilenet_v2"], 4, 64, 4, measure=False)}
    assert rows["full FT, BN train (baseline)"]["ratio"] == 1.0
    assert rows["LoRA, lean"]["peak_mib"] < rows["LoRA"]["peak_mib"]
    assert rows["LoRA-FA, lean"]["peak_mib"] < rows["LoRA, lean"]["peak_mib"]
    assert rows["DoRA, lean"]["peak_mib"] < rows["DoRA"]["peak_mib"]
