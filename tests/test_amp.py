"""Mixed precision: every adapter path, the lean Functions and 1-bit masks under
``torch.autocast`` (bf16 on the CPU; bf16 and fp16 on CUDA, skipped without a GPU), and
``torch.compile`` of adapted models.

Tolerance: per adapted layer, the relative error ``||g_amp - g_fp32|| / ||g_fp32||`` of every
gradient (input included) and of the output against the fp32 reference is below 2e-2 for bf16
(8-bit mantissa, unit roundoff 3.9e-3) and 5e-3 for fp16 (11-bit mantissa). Through a 5-layer
net, parameter gradients within 5e-2, and the lean paths equal plain autocast.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convpeft
from convpeft.adapters import make_adapter
from convpeft.core.amp import autocast, check_amp, grad_scaler
from convpeft.memory.lean import saved_bytes_by_layer

KINDS = {
    "standard": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "pointwise": lambda: nn.Conv2d(4, 6, 1, bias=False),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
    "depthwise_mult": lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4),
    "grouped": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "dilated": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2),
    "strided": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    "reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "replicate": lambda: nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0),
                                   padding_mode="replicate"),
    "circular_same_even": lambda: nn.Conv2d(4, 6, (2, 3), padding="same",
                                            padding_mode="circular"),
    "linear": lambda: nn.Linear(5, 7),
}
METHODS = ("lora", "dora", "lora-fa")
MODES = ("activation", "weight")

_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
PRECISIONS = [
    pytest.param("cpu", "bf16", id="cpu-bf16"),
    pytest.param("cuda", "bf16", id="cuda-bf16", marks=_CUDA),
    pytest.param("cuda", "fp16", id="cuda-fp16", marks=_CUDA),
]
DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: CPU bf16 kernels oversubscribe a busy 2-core machine badly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _adapter(kind: str, method: str, mode: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    base = KINDS[kind]()
    name = "lora" if method == "lora-fa" else method
    layer = make_adapter(name, base, 3, mode=mode, freeze_a=method == "lora-fa").to(device)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # away from the identity init, so that every gradient is non-zero
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        if hasattr(layer, "magnitude"):
            layer.magnitude.mul_(0.5 + torch.rand(layer.magnitude.shape, generator=g))
        if base.bias is not None:
            base.bias.requires_grad_(True)  # a trainable bias too (its gradient is checked)
    return layer


def _grads(model: nn.Module, x: torch.Tensor, probe_seed: int, ctx) -> tuple[torch.Tensor, dict]:
    """Output and gradients (input included, as ``"<input>"``) of ``sum(y * probe)``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with ctx:
        y = model(x)
    g = torch.Generator().manual_seed(probe_seed)
    probe = torch.randn(y.shape, generator=g).to(y.device)
    (y.float() * probe).sum().backward()
    out = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()
           if p.requires_grad}
    out["<input>"] = x.grad
    return y, out


def _check_close(y, grads, y_ref, grads_ref, dtype: torch.dtype, tol: float | None = None,
                 skip: tuple[str, ...] = ()) -> None:
    tol = TOL[dtype] if tol is None else tol
    assert _rel(y, y_ref) < tol
    assert grads.keys() == grads_ref.keys()
    for n, g in grads.items():
        if n in skip:
            continue
        ref = grads_ref[n]
        assert g is not None, n
        assert g.dtype == ref.dtype, f"{n}: gradient in {g.dtype}, its tensor is {ref.dtype}"
        assert torch.isfinite(g).all(), n
        assert ref.norm() > 0, f"{n}: the reference gradient is zero, the check would be void"
        assert _rel(g, ref) < tol, f"{n}: rel error {_rel(g, ref):.2e} >= {tol}"


@pytest.mark.parametrize(("device", "amp"), PRECISIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_under_autocast_matches_fp32(kind, method, mode, device, amp):
    dtype = DTYPE[amp]
    layer = _adapter(kind, method, mode, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((3, 5) if kind == "linear" else (2, 4, 9, 11), generator=g).to(device)
    y_ref, ref = _grads(layer, x, 3, torch.autocast(device, enabled=False))
    y, got = _grads(layer, x, 3, autocast(device, amp))
    assert layer.last_mode == mode
    assert y.dtype == dtype  # the layer runs in the compute dtype, as a plain conv would
    assert all(p.dtype == torch.float32 for p in layer.parameters())  # fp32 master weights
    _check_close(y, got, y_ref, ref, dtype)


def _lean_net() -> nn.Sequential:
    """Every lean path: frozen plain convs (zero and reflect padding), frozen BN, the 1-bit
    ReLU / ReLU6 / LeakyReLU masks (one in place), a LoRA-FA conv, a DoRA conv and a linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"), nn.BatchNorm2d(8),
        nn.LeakyReLU(0.1),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def _adapt_lean_net(method: str, mode: str) -> nn.Sequential:
    net = _lean_net()
    for p in net.parameters():
        p.requires_grad_(False)
    # the 1x1 conv (index 6) and the last 3x3 conv (index 9) get adapters
    for i in (6, 9):
        net[i] = make_adapter("lora" if method == "lora-fa" else method, net[i], 2, mode=mode,
                              freeze_a=method == "lora-fa")
        with torch.no_grad():
            net[i].lora_B.normal_()
    net[13].requires_grad_(True)
    net.eval()  # frozen BN: running statistics, so BN goes lean too
    return net


@pytest.mark.parametrize(("device", "amp"), PRECISIONS)
@pytest.mark.parametrize(("method", "mode"), [("lora", "activation"), ("lora-fa", "activation"),
                                              ("dora", "activation"), ("dora", "weight")])
def test_lean_net_under_autocast(method, mode, device, amp):
    dtype = DTYPE[amp]
    net = _adapt_lean_net(method, mode).to(device)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1)).to(device)
    y_ref, ref = _grads(net, x, 4, torch.autocast(device, enabled=False))
    y_plain, plain = _grads(net, x, 4, autocast(device, amp))
    plain_saved = _saved(net, x, device, amp)
    report = convpeft.lean_activations(net)
    assert report.counts() == {"conv": 2, "norm": 3, "act": 4, "plain": 2}
    y, got = _grads(net, x, 4, autocast(device, amp))
    assert y.dtype == dtype
    # lean changes nothing autocast computes: same output, same parameter gradients (the input
    # gradient goes through conv2d_input instead of convolution_backward: rounding apart)
    _check_close(y, got, y_plain, plain, dtype, tol=1e-2)
    for n, g in got.items():
        if n != "<input>":
            assert torch.equal(g, plain[n]), n
    # against fp32, five layers deep: parameter gradients within 5e-2 (per layer, 2e-2: the
    # test above); the input gradient of a 5-layer random net, a sum of cancelling terms gated
    # by ReLUs whose sign flips in bf16, is 10-15% off in plain autocast too and is not checked
    _check_close(y, got, y_ref, ref, dtype, tol=5e-2, skip=("<input>",))
    lean_saved = _saved(net, x, device, amp)
    # the frozen reflect-padded depthwise conv keeps nothing under autocast either (its stored
    # fp32 weight is saved, resident anyway, and cast again in backward)
    assert lean_saved.get("3", 0) == 0 < plain_saved["3"]
    assert sum(lean_saved.values()) < sum(plain_saved.values())
    # the in-place ReLU (8) feeds the adapted conv, which keeps its (already low-precision)
    # input: the ReLU saves that same output, as plain torch does, and no mask besides; under
    # LoRA-FA the conv keeps only A x (2 of 16 channels), so the ReLU keeps a mask
    shared = method != "lora-fa"
    masked = ("2", "5", "10") if shared else ("2", "5", "8", "10")
    for i in masked:  # 1-bit masks: 1/16 of a bf16 tensor, padded to a byte
        assert 0 < lean_saved[i] * 8 <= plain_saved[i] // 2 + 8
    assert {r.name: r.saves for r in report.rows}["8"].startswith("its output") == shared
    if shared:
        assert lean_saved["8"] == plain_saved["8"] > 0


def _saved(net: nn.Module, x: torch.Tensor, device: str, amp: str) -> dict[str, int]:
    with autocast(device, amp):
        return saved_bytes_by_layer(net, x.detach().requires_grad_(True))


def test_dora_activation_space_saves_half_under_bf16():
    """DoRA's Function saves x, the LoRA intermediate and z in bf16: half of fp32 (plus the
    bf16 copies of the small factors; the base weight is saved as stored, resident anyway)."""
    torch.manual_seed(0)
    layer = make_adapter("dora", nn.Conv2d(16, 16, 3, padding=1), 4, mode="activation")
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    fp32 = saved_bytes_by_layer(layer, x)[""]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = saved_bytes_by_layer(layer, x)[""]
    assert 0.5 * fp32 <= bf16 < 0.51 * fp32


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_resnet_block_trains_under_bf16(method):
    """The issue's case at block scale: adapters on every conv, BN in train mode, activation
    mode, a real optimizer step under CPU bf16 autocast."""
    torch.manual_seed(0)
    from torchvision.models.resnet import BasicBlock

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BasicBlock(8, 8),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    convpeft.apply_adapters(net, method, rank=4, target="conv", mode="activation",
                            trainable=["4"])
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    with autocast("cpu", "bf16"):
        loss = nn.functional.cross_entropy(net(torch.randn(4, 3, 8, 8)), torch.arange(4))
    loss.backward()
    opt.step()
    for n, p in net.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and torch.isfinite(p).all(), n
    assert any(not torch.equal(before[n], p) for n, p in net.named_parameters()
               if "lora_A" in n)


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_compiled_adapted_model_matches_eager(amp):
    """``torch.compile`` (dynamo + AOT autograd; the ``aot_eager`` backend keeps it fast) of a
    model with DoRA's custom Function and LoRA weight space, in fp32 and under bf16."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    net[0] = make_adapter("dora", net[0], 2, mode="activation")
    net[2] = make_adapter("lora", net[2], 2, mode="weight")
    with torch.no_grad():
        net[0].lora_B.normal_()
        net[2].lora_B.normal_()
    x = torch.randn(2, 3, 8, 8)
    y_ref, ref = _grads(net, x, 5, autocast("cpu", amp))
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(net), backend="aot_eager", fullgraph=True)
    y, got = _grads(compiled, x, 5, autocast("cpu", amp))
    assert y.dtype == y_ref.dtype
    tol = 1e-5 if amp == "off" else 2e-2
    assert _rel(y, y_ref) < tol
    assert got.keys() == ref.keys()
    for n, g in ref.items():
        assert _rel(got[n], g) < tol, n


def test_amp_choice_errors_say_what_to_use():
    with pytest.raises(ValueError, match="amp='bf16' on the CPU"):
        check_amp("fp16", "cpu")
    with pytest.raises(ValueError, match="off, bf16, fp16"):
        check_amp("fp32", "cpu")
    check_amp("bf16", "cpu")
    assert grad_scaler("cpu", "bf16") is None and grad_scaler("cpu", "off") is None


@_CUDA
def test_fp16_cuda_gets_a_grad_scaler():
    assert isinstance(grad_scaler("cuda", "fp16"), torch.amp.GradScaler)


# ----------------------------------------------------------------------------- profiler


def _profiled(method: str, amp: str, lean: bool = False):
    from convpeft.profiler import profile_update

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 24, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))
    if method == "full":
        params = list(net.parameters())
    else:
        convpeft.apply_adapters(net, method, rank=2, target="conv", trainable=["10"],
                                mode="activation")
        params = [p for p in net.parameters() if p.requires_grad]
    if lean:
        net.eval()
        convpeft.lean_activations(net)
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
    return profile_update(net, opt, x, y, repeat=0, amp=amp)


@pytest.mark.parametrize("method", ["full", "dora"])
def test_profile_under_bf16_same_flops_half_activations(method):
    off, bf16 = _profiled(method, "off"), _profiled(method, "bf16")
    assert (off.amp, bf16.amp) == ("off", "bf16")
    assert "autocast bf16" in str(bf16) and "autocast" not in str(off)
    # FLOPs do not depend on the dtype, nor does their split (autocast's bf16 weight copies
    # count as the weights in the backward products)
    for f in ("flops_forward", "flops_backward_input", "flops_backward_weight",
              "flops_optimizer", "flops_total"):
        assert getattr(bf16, f) == getattr(off, f), f
    for p in (off, bf16):
        assert sum(p.memory_by_category.values()) == p.memory_peak
    # fp32 master weights, gradients and optimizer state: unchanged
    for c in ("params", "buffers", "optimizer"):
        assert bf16.memory_category_max[c] == off.memory_category_max[c], c
    assert bf16.memory_category_max["grads"] == off.memory_category_max["grads"]
    # activations saved in bf16: about half (the fp32 batch a first conv keeps and the bf16
    # weight copies take it a little over)
    ratio = bf16.memory_category_max["activations"] / off.memory_category_max["activations"]
    assert 0.45 < ratio < 0.65, ratio
    assert bf16.memory_peak_tensors < off.memory_peak_tensors


def test_profile_amp_refusals():
    from convpeft.profiler import profile_update

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    x, y = torch.randn(2, 3, 6, 6), torch.tensor([0, 1])
    net(x)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="use amp='bf16' on the CPU"):
        profile_update(net, opt, x, y, amp="fp16")
    with pytest.raises(ValueError, match="meta device, which has no autocast"):
        profile_update(net, opt, x, y, amp="bf16", analytic=True)


# ----------------------------------------------------------------------------- CLIs, training


@pytest.mark.parametrize(("argv", "message"), [
    (["--amp", "fp16"], "use amp='bf16' on the CPU"),
    (["--amp", "bf16", "--analytic"], "--amp bf16 with --analytic"),
])
def test_profile_cli_refuses_amp_it_cannot_run(argv, message, capsys):
    from convpeft.profiler.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_profile_cli_records_amp(capsys):
    import json

    from convpeft.profiler.cli import main

    argv = ["--model", "resnet18", "--method", "dora", "--rank", "2", "--batch", "2",
            "--resolution", "16", "--small-input", "--repeat", "1", "--warmup", "1",
            "--no-torch", "--json", "--amp", "bf16"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["amp"] == "bf16" and out["method"] == "dora"
    assert sum(out["memory_by_category"].values()) == out["memory_peak"]


def test_finetune_under_bf16_trains_and_records_amp():
    from convpeft.data import build_task
    from convpeft.train import finetune

    task = build_task("shift", resolution=8, corruption="impulse_noise", severity=3, few_shot=4)
    task.source_test = task.source_test.subset(range(20))
    task.target_test = task.target_test.subset(range(20))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    kw = dict(lr=3e-2, batch_size=8, seed=0, device="cpu", progress=False,
              eval_every_epoch=False, keep_model=True)
    res = finetune(model, "dora", task, epochs=4, amp="bf16", **kw)
    assert res.amp == "bf16" and res.to_dict()["amp"] == "bf16"
    losses = [h["loss"] for h in res.history]
    assert all(abs(v) < 1e3 for v in losses) and losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 for p in res.model.parameters())
    with pytest.raises(ValueError, match="amp='bf16' on the CPU"):
        finetune(model, "dora", task, amp="fp16", **kw)
    assert finetune(model, "head", task, epochs=0, **kw).amp == "off"


def test_sweep_amp_column_and_keys(tmp_path, capsys):
    from dataclasses import asdict

    from benchmarks.sweep import runner as rank_sweep
    from benchmarks.sweep.grid import SweepSettings
    from benchmarks.sweep.results import load_results

    # amp off leaves the settings signature (and so every earlier result key) as it was
    s = SweepSettings(dataset={"shift": "digits"})
    assert s.signature() == SweepSettings(dataset={"shift": "digits"}, amp="off").signature()
    assert s.signature() != SweepSettings(dataset={"shift": "digits"}, amp="bf16").signature()
    assert "amp" in asdict(s)

    args = ["--models", "mobilenet_v3_small", "--tasks", "shift", "--methods", "dora",
            "--ranks", "2",
            "--resolution", "8", "--few-shot", "2", "--batch-size", "8", "--profile-repeat",
            "0", "--corruption", "impulse_noise", "--device", "cpu", "--profile-only",
            "--no-plots", "--seeds", "1"]  # one seed: one row per run
    with pytest.raises(SystemExit) as e:
        rank_sweep.main([*args, "--amp", "fp16", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "use amp='bf16' on the CPU" in err
    assert not (tmp_path / "x").exists()  # refused before anything is written
    assert rank_sweep.main([*args, "--out", str(tmp_path / "off")]) == 0
    assert rank_sweep.main([*args, "--amp", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    (off,), (bf16,) = load_results(tmp_path / "off"), load_results(tmp_path / "bf16")
    assert (off["status"], bf16["status"]) == ("ok", "ok")
    assert (off["amp"], bf16["amp"]) == ("off", "bf16")
    assert off["key"] != bf16["key"]  # a bf16 row never resumes an fp32 one
    assert off["flops_total"] == bf16["flops_total"]
    assert off["memory_by_category_params"] == bf16["memory_by_category_params"]  # fp32 master
    # (at 8x8 the bf16 copies autocast makes of the frozen conv weights, saved for backward,
    # outweigh the halved activations: the halving is checked on a larger map above)
