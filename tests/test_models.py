"""Backbones: tested torchvision models, the 32x32 stem change, weights loading, head helpers."""

import pytest
import torch
from torch import nn

from convpeft.models import (
    TESTED_MODELS,
    build_model,
    expand_head,
    get_head,
    list_models,
    replace_head,
    weights_path,
)

HEADS = {"mobilenet_v2": "classifier.1", "mobilenet_v3_small": "classifier.3",
         "mobilenet_v3_large": "classifier.3", "resnet18": "fc", "resnet34": "fc",
         "resnet50": "fc"}


@pytest.mark.parametrize("name", TESTED_MODELS)
def test_tested_models_build_and_run(name):
    torch.manual_seed(0)
    for small in (False, True):
        m = build_model(name, 7, small_input=small).eval()
        with torch.no_grad():
            assert m(torch.rand(2, 3, 32, 32)).shape == (2, 7)
        head_name, head = get_head(m)
        assert head_name == HEADS[name] and head.out_features == 7


def _feature_hw(model: nn.Module, size: int = 32) -> tuple[int, int]:
    """Spatial size entering the classifier (the last 4-D activation of the backbone)."""
    seen = []
    hooks = [mod.register_forward_hook(lambda _m, _i, o: seen.append(o.shape))
             for mod in model.modules() if isinstance(mod, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, size, size))
    for h in hooks:
        h.remove()
    return tuple(seen[-1][-2:])


def test_small_input_stems():
    r = build_model("resnet18", 10, small_input=True)
    assert r.conv1.kernel_size == (3, 3) and r.conv1.stride == (1, 1)
    assert isinstance(r.maxpool, nn.Identity)
    assert _feature_hw(r) == (4, 4)  # total stride 8
    assert _feature_hw(build_model("resnet18", 10)) == (1, 1)
    mb = build_model("mobilenet_v2", 10, small_input=True)
    assert mb.features[0][0].stride == (1, 1)
    assert _feature_hw(mb) == (2, 2)  # total stride 16
    v3 = build_model("mobilenet_v3_small", 10, small_input=True)
    assert v3.features[0][0].stride == (1, 1)


def test_any_torchvision_model_by_name():
    assert "shufflenet_v2_x0_5" in list_models() and set(TESTED_MODELS) <= set(list_models())
    m = build_model("shufflenet_v2_x0_5", 3, small_input=True).eval()
    with torch.no_grad():
        assert m(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_unknown_model_and_bad_classes():
    with pytest.raises(ValueError, match="unknown model 'mobilenet_v9'.*mobilenet_v2"):
        build_model("mobilenet_v9", 10)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        build_model("resnet18", 0)


def test_named_weights_from_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the torch hub cache"):
        build_model("mobilenet_v3_small", 10, weights="DEFAULT")
    # Stand-in for the ImageNet file: a 1000-class state dict at the exact cached file name
    torch.manual_seed(1)
    imagenet = build_model("mobilenet_v3_small", 1000)
    path = weights_path("mobilenet_v3_small", "DEFAULT")
    assert path.parent == tmp_path / "hub" / "checkpoints"
    assert path.name.startswith("mobilenet_v3_small") and path.suffix == ".pth"
    path.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), path)
    for w in ("DEFAULT", "IMAGENET1K_V1", "MobileNet_V3_Small_Weights.IMAGENET1K_V1"):
        m = build_model("mobilenet_v3_small", 10, weights=w, small_input=True)
        assert torch.equal(m.features[1].block[0][0].weight,
                           imagenet.features[1].block[0][0].weight)
        assert torch.equal(m.features[0][0].weight, imagenet.features[0][0].weight)
        assert m.features[0][0].stride == (1, 1) and get_head(m)[1].out_features == 10
        # hidden classifier layer comes from the file too, only the last Linear is new
        assert torch.equal(m.classifier[0].weight, imagenet.classifier[0].weight)
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET9K'"):
        build_model("mobilenet_v3_small", 10, weights="IMAGENET9K")


def test_weights_from_path(tmp_path):
    torch.manual_seed(2)
    src = build_model("resnet18", 4, small_input=True)
    p = tmp_path / "final.pth"
    torch.save(src.state_dict(), p)
    m = build_model("resnet18", 4, weights=str(p), small_input=True)
    for (k, a), b in zip(src.state_dict().items(), m.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # a plain-architecture file with another head: backbone loaded, head replaced
    plain = build_model("resnet18", 6)
    p2 = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(p2))
    m2 = build_model("resnet18", 3, weights=p2)
    assert torch.equal(m2.layer1[0].conv1.weight, plain.layer1[0].conv1.weight)
    assert m2.fc.out_features == 3
    with pytest.raises(FileNotFoundError, match="not found"):
        build_model("resnet18", 3, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="fits neither"):
        build_model("mobilenet_v2", 4, weights=str(p))


def test_replace_and_expand_head_keep_old_logits():
    torch.manual_seed(0)
    for name in ("mobilenet_v2", "resnet18"):
        m = build_model(name, 5, small_input=True).eval()
        x = torch.rand(3, 3, 32, 32)
        with torch.no_grad():
            old = m(x)
        _, head_before = get_head(m)
        expand_head(m, 4)
        _, head = get_head(m)
        assert head.out_features == 9
        assert torch.equal(head.weight[:5], head_before.weight)
        assert torch.equal(head.bias[:5], head_before.bias)
        with torch.no_grad():
            new = m(x)
        assert new.shape == (3, 9)
        torch.testing.assert_close(new[:, :5], old, rtol=0, atol=1e-6)
        replace_head(m, 2)
        assert get_head(m)[1].out_features == 2
    with pytest.raises(ValueError, match="num_new must be >= 1"):
        expand_head(m, 0)
    with pytest.raises(ValueError, match="no nn.Linear classifier head"):
        get_head(build_model("squeezenet1_1", 3))
