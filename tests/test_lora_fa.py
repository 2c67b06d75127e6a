"""LoRA-FA's frozen A set from data (convpeft.adapters.lora_fa): the top-r principal directions
of each layer's input patches on every layer kind, found without forming X^T X, more of the
gradient reachable than with the random draw, nothing else in the model changed."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convpeft.adapters import (
    adapter_layers,
    apply_adapters,
    calibrate_frozen_a,
)
from convpeft.adapters.lora_fa import FROZEN_A_ROW_NORM
from convpeft.methods import MethodConfig

KINDS = {
    "standard": dict(in_channels=6, out_channels=8, kernel_size=3, padding=1),
    "pointwise": dict(in_channels=6, out_channels=8, kernel_size=1),
    "grouped": dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=3),
    "depthwise": dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),
    "dilated-reflect-strided": dict(in_channels=6, out_channels=8, kernel_size=3, padding=2,
                                    dilation=2, stride=2, padding_mode="reflect"),
    "linear": None,
}


class Net(nn.Module):
    """stem conv -> BN -> ReLU -> the layer under test -> pool -> linear head."""

    def __init__(self, kind: str):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        if kind == "linear":
            self.layer = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, 8))
        else:
            self.layer = nn.Sequential(nn.Conv2d(**KINDS[kind]), nn.Flatten())
        self.drop = nn.Dropout(0.5)
        self.head = nn.LazyLinear(4)

    def forward(self, x):
        return self.head(self.drop(self.layer(torch.relu(self.bn(self.stem(x))))))


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated channels, so the patches have a dominant low-dimensional structure
    base = torch.randn(n, 2, 8, 8, generator=g)
    mix = torch.randn(3, 2, generator=g)
    return torch.einsum("nchw,kc->nkhw", base, mix) + 0.05 * torch.randn(n, 3, 8, 8, generator=g)


def _patch_rows(model: Net, layer_name: str, batches: list[torch.Tensor]) -> torch.Tensor:
    """The layer's input patches, computed here independently: (M, K). BN normalises with
    each batch's statistics, so the batches are those calibration saw."""
    return torch.cat([_batch_patch_rows(model, layer_name, x) for x in batches])


def _batch_patch_rows(model: Net, layer_name: str, x: torch.Tensor) -> torch.Tensor:
    seen = []
    target = dict(model.named_modules())[layer_name]
    h = target.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    model.train()
    for mod in model.modules():
        if not isinstance(mod, nn.BatchNorm2d):
            mod.training = False
    with torch.no_grad():
        model(x)
    h.remove()
    inp = seen[0]
    base = target.base_layer
    if isinstance(base, nn.Linear):
        return inp.reshape(-1, inp.shape[-1])
    if base.padding_mode != "zeros":
        p = base.padding
        inp = F.pad(inp, (p[1], p[1], p[0], p[0]), mode=base.padding_mode)
        pad = 0
    else:
        pad = base.padding
    cols = F.unfold(inp, base.kernel_size, dilation=base.dilation, padding=pad, stride=base.stride)
    g = base.groups
    k = base.weight[0].numel()
    return cols.view(cols.shape[0], g, k, -1).permute(0, 1, 3, 2).reshape(-1, k)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("kind", list(KINDS))
def test_frozen_a_spans_the_top_principal_directions_of_the_inputs(kind, rank):
    torch.manual_seed(0)
    model = Net(kind)
    x = _data()
    model(x)  # materialise the lazy head
    target = "layer.1" if kind == "linear" else "layer.0"
    apply_adapters(model, rank=rank, freeze_a=True, target=lambda n, m: n == target)
    layer = dict(model.named_modules())[target]
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.eval()
        out_before = model(x)
    rng = torch.get_rng_state()

    rep = calibrate_frozen_a(model, [x[:10], (x[10:], None)], iters=12)

    assert rep.layers == 1 and rep.images == 24 and rep.passes == 12
    # nothing else moved: B still zero (so the outputs are the base model's), BN statistics,
    # modes, the global RNG and A's frozen flag as they were
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_A" not in n)
    assert not layer.lora_A.requires_grad and not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    with torch.no_grad():
        assert torch.equal(model(x), out_before)
    # the reference: eigenvectors of X^T X from patches unfolded independently
    rows = _patch_rows(model, target, [x[:10], x[10:]])
    lam, vec = torch.linalg.eigh((rows.T @ rows).double())
    k = min(rank, rows.shape[1])
    best = float(lam.flip(0)[:k].sum() / lam.sum())
    a = layer.lora_A.detach().reshape(rank, -1)[:k].double()
    q = torch.linalg.qr(a.T).Q
    got = float(((rows.double() @ q) ** 2).sum() / (rows.double() ** 2).sum())
    assert got == pytest.approx(best, rel=1e-3)
    assert rep.captured[target] == pytest.approx(got, rel=1e-3)
    # rows orthogonal, each of the random draw's expected norm
    gram = a @ a.T
    assert torch.allclose(gram, torch.eye(k, dtype=gram.dtype) * FROZEN_A_ROW_NORM ** 2,
                          atol=1e-5)


def test_calibrated_a_reaches_more_of_the_gradient_than_the_random_draw():
    """What B can learn is the share of the weight gradient inside A's row space."""
    torch.manual_seed(0)
    model = Net("standard")
    x, y = _data(), torch.randint(0, 4, (24,))
    model(x)
    apply_adapters(model, rank=2, freeze_a=True, target=lambda n, m: n == "layer.0")
    layer = model.layer[0]

    def share() -> float:
        m = copy.deepcopy(model)
        w = m.layer[0].base_layer.weight
        w.requires_grad_(True)
        m.train()
        F.cross_entropy(m(x), y).backward()
        g = w.grad.reshape(w.shape[0], -1)
        q = torch.linalg.qr(m.layer[0].lora_A.detach().reshape(2, -1).T).Q
        return float((g @ q).square().sum() / g.square().sum())

    random_share = share()
    calibrate_frozen_a(model, [x], iters=6)
    assert layer.lora_A.shape == (2, 6, 3, 3)
    assert share() > 2 * random_share


def test_without_frozen_a_nothing_happens_and_bad_arguments_are_named():
    torch.manual_seed(0)
    model = Net("standard")
    x = _data()
    model(x)
    apply_adapters(model, rank=2)  # plain LoRA: A trains, nothing to calibrate
    before = copy.deepcopy(model.state_dict())
    assert calibrate_frozen_a(model, [x]).layers == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    fa = Net("standard")
    fa(x)
    apply_adapters(fa, rank=2, freeze_a=True)
    with pytest.raises(ValueError, match="iters must be >= 1"):
        calibrate_frozen_a(fa, [x], iters=0)
    with pytest.raises(ValueError, match="no images"):
        calibrate_frozen_a(fa, [])
    with pytest.raises(TypeError, match="expected input tensors"):
        calibrate_frozen_a(fa, ["not a tensor"])
    with pytest.raises(ValueError, match="fa_init must be one of data, random"):
        MethodConfig("lora-fa", fa_init="svd")


def test_finetune_sets_a_from_the_data_unless_told_to_keep_the_random_draw():
    from convpeft.data import build_task
    from convpeft.models import build_model
    from convpeft.train import finetune

    task = build_task("shift", resolution=12, corruption="contrast", severity=5, few_shot=4)
    task.target_test = task.target_test.subset(range(20))
    task.source_test = task.source_test.subset(range(20))
    torch.manual_seed(0)
    model = build_model("resnet18", 10, small_input=True)
    kw = dict(epochs=0, batch_size=8, seed=0, device="cpu", progress=False,
              eval_every_epoch=False)
    data = finetune(model, MethodConfig("lora-fa", rank=2), task, **kw).model
    rand = finetune(model, MethodConfig("lora-fa", rank=2, fa_init="random"), task, **kw).model
    a_data = [m.lora_A.detach().reshape(2, -1) for _, m in adapter_layers(data)]
    a_rand = [m.lora_A.detach().reshape(2, -1) for _, m in adapter_layers(rand)]
    assert len(a_data) == len(a_rand) == 20
    # the random draw is the one the seed gives; the data init replaces it, rows orthogonal
    for ad, ar in zip(a_data, a_rand, strict=True):
        assert not torch.allclose(ad, ar)
        assert torch.allclose(ad @ ad.T, torch.eye(2) * FROZEN_A_ROW_NORM ** 2, atol=1e-5)


def test_a_large_dataset_is_sampled_evenly_not_by_its_first_images():
    """A class-sorted dataset larger than ``max_images``: the images used cover every class."""
    from convpeft.adapters.lora_fa import _batches
    from convpeft.data import ImageDataset

    labels = torch.arange(10).repeat_interleave(30)  # 300 images, sorted by class
    images = (labels.view(-1, 1, 1, 1).expand(300, 3, 4, 4) * 20).to(torch.uint8)
    ds = ImageDataset(images, labels, [str(i) for i in range(10)], "sorted")
    got = torch.cat(_batches(ds, 8, torch.device("cpu"), 30))
    assert got.shape[0] == 30
    classes = (got[:, 0, 0, 0] * 255 / 20).round().long()  # each image's class, from its value
    assert set(classes.tolist()) == set(range(10))
