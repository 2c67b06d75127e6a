"""Block checkpointing: exact outputs, gradients and BN statistics; profiler and analytic mode."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2
from torchvision.models.resnet import BasicBlock, ResNet

from convpeft import apply_adapters, checkpoint_blocks, lean_activations, restore_checkpointing
from convpeft.memory.checkpoint import detect_blocks, recomputing
from convpeft.profiler import analytic_profile, profile_update


class _Block(nn.Module):
    """conv-BN-ReLU-dropout with a residual, so RNG replay and BN matter."""

    def __init__(self, c: int, p: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.act(self.bn(self.conv(x))))


def _tiny(p: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(_Block(8, p), _Block(8, p), _Block(8, p)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def _resnet() -> nn.Module:
    """ResNet18's layout (stem, max pool, 4 stages, downsampling) with one block per stage."""
    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)


def _run(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(123)
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    return out.detach(), grads, bufs


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.double(), b.double()
    return bool((a - b).abs().max() <= 1e-6 * b.abs().max().clamp_min(1e-30))


def _assert_same(ref, got) -> None:
    assert _close(got[0], ref[0])
    assert ref[1].keys() == got[1].keys() and ref[1]
    for n in ref[1]:
        assert _close(got[1][n], ref[1][n]), n
    for n in ref[2]:  # BN running stats and num_batches_tracked: updated once, not twice
        assert torch.equal(got[2][n], ref[2][n]), n


def _prepared(factory, method: str, bn_train: bool, lean: bool) -> nn.Module:
    model = factory()
    if method != "full":
        apply_adapters(model, method.removesuffix("-fa"), rank=2, target="conv",
                       freeze_a=method.endswith("-fa"))
        [m for m in model.modules() if isinstance(m, nn.Linear)][-1].requires_grad_(True)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train(bn_train)
            m.requires_grad_(bn_train)
    if lean:
        lean_activations(model)
    return model


@pytest.mark.parametrize("method,bn_train,lean", [
    ("full", True, False), ("lora", True, True), ("lora-fa", False, True), ("dora", True, False),
    ("lora", False, True)])
def test_exact_on_tiny_net(method: str, bn_train: bool, lean: bool) -> None:
    plain = _prepared(lambda: _tiny(0.3), method, bn_train, lean)
    ckpt = copy.deepcopy(plain)
    report = checkpoint_blocks(ckpt)
    assert report.blocks == ["3.0", "3.1", "3.2"]
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    _assert_same(_run(plain, x, y), _run(ckpt, x, y))


def test_detected_blocks_of_torchvision_models() -> None:
    names, how = detect_blocks(mobilenet_v2(num_classes=5))
    assert names == [f"features.{i}" for i in range(19)] and how == "children of features"
    names, how = detect_blocks(_resnet())
    assert names == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert how == "children of layer1, layer2, layer3, layer4"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # GoogLeNet's init notice
def test_inception_nets_split_at_their_top_level_chain() -> None:
    """GoogLeNet's largest Sequential of blocks is one branch of inception5b (its branches run
    side by side), so the blocks were that branch's two convs and a sparse update fed the
    prefix's output (branch1's 384 channels) into branch2 ("Invalid channel dimensions");
    Inception-v3 had no blocks at all. Both now split at the model's own chain of children,
    and a sparse update of the last 2 is exact in eval and trains."""
    from torchvision.models import googlenet, inception_v3

    from convpeft.methods import MethodConfig, prepare

    for build, first, last, size in [
            (lambda: googlenet(num_classes=5, aux_logits=False, init_weights=False), "conv1",
             "inception5b", 96),
            (lambda: inception_v3(num_classes=5, aux_logits=False, init_weights=False),
             "Conv2d_1a_3x3", "Mixed_7c", 80)]:
        torch.manual_seed(0)
        model = build().eval()
        names, how = detect_blocks(model)
        assert (names[0], names[-1], how) == (first, last, "children of the model")
        x = torch.rand(2, 3, size, size)
        with torch.no_grad():
            ref = model(x)
        p = prepare(model, MethodConfig("lora", rank=2, update_blocks=2, lean=True))
        with torch.no_grad():
            assert torch.equal(p.model.eval()(x), ref)
        p.train_mode()
        p.model(x).sum().backward()
        assert all(q.grad is not None for q in p.model.parameters() if q.requires_grad)


def test_resnet_exact_with_lora_and_lean() -> None:
    torch.manual_seed(0)
    plain = _prepared(_resnet, "lora", True, True)
    ckpt = copy.deepcopy(plain)
    assert checkpoint_blocks(ckpt).blocks == detect_blocks(plain)[0]
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 4])
    _assert_same(_run(plain, x, y), _run(ckpt, x, y))


def test_undo_state_dict_and_no_grad() -> None:
    model = _tiny()
    keys = list(model.state_dict())
    report = checkpoint_blocks(model)
    assert list(model.state_dict()) == keys
    assert all("forward" in model[3][i].__dict__ for i in range(3))
    seen = []
    orig = torch.utils.checkpoint.checkpoint
    try:  # under no_grad (evaluation) a block runs its plain forward: no checkpoint call
        torch.utils.checkpoint.checkpoint = lambda *a, **k: seen.append(1) or orig(*a, **k)
        with torch.no_grad():
            model(torch.randn(1, 3, 8, 8))
    finally:
        torch.utils.checkpoint.checkpoint = orig
    assert not seen
    report.undo()
    assert not any("forward" in m.__dict__ for m in model.modules())
    checkpoint_blocks(model, blocks=["3.1"])
    assert restore_checkpointing(model) == 1
    assert restore_checkpointing(model) == 0


def test_recompute_flag_and_bn_restored() -> None:
    model = _tiny()
    checkpoint_blocks(model)
    flags = []
    model[3][1].conv.register_forward_hook(lambda *a: flags.append(recomputing()))
    out = model(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    assert flags == [False, True]  # the forward, then its recomputation in backward
    assert not recomputing()
    bn = model[3][1].bn
    assert bn.track_running_stats and int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("blocks,match", [
    (["3.7"], "no submodule named '3.7'"),
    (["3.0.conv"], "bare Conv2d"),
    (["3", "3.1"], "nested"),
    (["3.1", "3.1"], "more than once"),
    ([], "empty"),
])
def test_bad_blocks_refused_and_model_unchanged(blocks, match) -> None:
    model = _tiny()
    checkpoint_blocks(model, blocks=["3.0"])
    with pytest.raises(ValueError, match=match):
        checkpoint_blocks(model, blocks=blocks)
    # the earlier choice is still in place, nothing else was wrapped
    assert [n for n, m in model.named_modules() if "forward" in m.__dict__] == ["3.0"]


def test_string_and_undetectable_refused() -> None:
    with pytest.raises(TypeError, match="list of module names"):
        checkpoint_blocks(_tiny(), blocks="3.0")
    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="pass blocks="):
        checkpoint_blocks(flat)
    with pytest.raises(ValueError, match="undo that first"):
        m = _tiny()
        m[3][0].forward = m[3][0].forward
        checkpoint_blocks(m, blocks=["3.0"])


def _profiles(model: nn.Module, x: torch.Tensor, y: torch.Tensor, per_layer: bool = False):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    measured = profile_update(model, opt, x, y, repeat=0, per_layer=per_layer,
                              compare_torch=False)
    analytic = analytic_profile(model, opt, tuple(x.shape), compare_torch=False)
    return measured, analytic


@pytest.mark.parametrize("method,bn_train,lean", [("full", True, False),
                                                  ("lora-fa", False, True)])
def test_profiler_counts_recompute_and_analytic_matches(method, bn_train, lean) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    plain = _prepared(_resnet, method, bn_train, lean)
    ckpt = copy.deepcopy(plain)
    blocks = checkpoint_blocks(ckpt).blocks
    p_meas, p_an = _profiles(plain, x, y, per_layer=True)
    p_fwd = {r["name"]: r["forward"] for r in p_meas.per_layer}
    c_meas, c_an = _profiles(ckpt, x, y, per_layer=True)
    in_blocks = {r["name"]: r["forward"] for r in p_meas.per_layer
                 if any(r["name"] == b or r["name"].startswith(b + ".") for b in blocks)}
    block_fwd = sum(in_blocks.values())
    assert block_fwd > 0
    for r in c_meas.per_layer:  # the recomputed forward is booked to the layer that ran it
        assert r["forward"] == in_blocks.get(r["name"], 0) + p_fwd.get(r["name"], 0), r["name"]
    assert c_meas.flops_forward == p_meas.flops_forward + block_fwd
    assert c_meas.flops_backward_input == p_meas.flops_backward_input
    assert c_meas.flops_backward_weight == p_meas.flops_backward_weight
    for meas, an in ((p_meas, p_an), (c_meas, c_an)):
        assert an.flops_forward == meas.flops_forward
        assert an.flops_backward == meas.flops_backward
        assert abs(an.memory_peak / meas.memory_peak - 1) < 0.05


def test_method_config_checkpoint_and_bad_names_leave_model_untouched() -> None:
    from convpeft.methods import MethodConfig, prepare

    prep = prepare(_resnet(), MethodConfig("lora", rank=2, checkpoint=True, lean=True))
    assert prep.extra["checkpoint"].blocks == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    prep = prepare(_resnet(), MethodConfig("lora", rank=2, checkpoint=["layer2.0"]))
    assert prep.extra["checkpoint"].blocks == ["layer2.0"]
    model = _resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no submodule named 'layer9'"):
        prepare(model, MethodConfig("lora", rank=2, checkpoint=["layer9"]))
    assert not any(hasattr(m, "base_layer") for m in model.modules())  # no adapter applied
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="list of module names"):
        MethodConfig("lora", checkpoint="layer1")


def test_profile_cli_checkpoint_flag(capsys) -> None:
    import json

    from convpeft.profiler.cli import main

    argv = ["--model", "resnet18", "--method", "lora-fa", "--bn", "freeze", "--lean",
            "--batch", "2", "--resolution", "32", "--analytic", "--no-torch", "--json"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*argv, "--checkpoint"]) == 0
    ckpt = json.loads(capsys.readouterr().out)
    assert ckpt["flops_forward"] > plain["flops_forward"]  # the blocks' forward, again
    assert ckpt["flops_backward"] == plain["flops_backward"]
