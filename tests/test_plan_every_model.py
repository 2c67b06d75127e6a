"""The planner on every torchvision classification model: each builds on meta tensors and plans
one configuration, or refuses in one line that names the reason -- never a crash.

Analytic (meta tensors, no data), fixed batch 2, plain SGD (no optimizer state to copy). Every
model plans the ``head`` configuration (build, forward, loss and the planner's row); one model
per architecture family also plans full fine-tuning, whose backward runs through every op kind.
The other variants of a family are marked ``slow`` (about two CPU-minutes together).
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from convpeft.planner import build_configured, plan
from convpeft.planner.config import PlanConfig
from convpeft.planner.meta_build import on_meta

ALL = sorted(torchvision.models.list_models(module=torchvision.models))
# inputs these models need beyond the test's 64x64: ViT and MaxViT take exactly their
# image_size (224); Inception-v3 pools a 64x64 input to nothing
RESOLUTION = {"maxvit_t": 224, "inception_v3": 96} | {n: 224 for n in ALL if n.startswith("vit_")}
# configurations a model cannot take, and the reason its one-line refusal names
REFUSED_HEAD = {n: "no nn.Linear classifier head" for n in ("squeezenet1_0", "squeezenet1_1")}
# the smallest model of each architecture family (full fine-tuning: backward through all ops)
FAMILIES = ("alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s",
            "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2",
            "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18",
            "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t", "swin_v2_t",
            "vgg11_bn", "vit_b_32", "wide_resnet50_2")


def _plan(name: str, method: str) -> None:
    res = RESOLUTION.get(name, 64)
    (row,) = plan(name, "64GiB", resolution=res, methods=[method], batch=2, optimizer="sgd")
    assert row.fits and row.batch == 2 and row.resolution == res
    assert row.memory_peak >= row.memory_peak_tensors > 0 and row.flops_update > 0
    assert row.trainable_params > 0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # GoogLeNet/Inception's init notice
# ~2 CPU-minutes in all: the families' representatives (planned in full below) stay fast
@pytest.mark.parametrize("name", [n if n in FAMILIES else pytest.param(n, marks=pytest.mark.slow)
                                  for n in ALL])
def test_every_torchvision_model_plans_on_meta(name):
    if name not in REFUSED_HEAD:
        _plan(name, "head")
        return
    with pytest.raises(ValueError) as e:
        _plan(name, "head")
    assert "\n" not in str(e.value) and REFUSED_HEAD[name] in str(e.value)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_plans_full_finetuning(name):
    assert name in ALL
    _plan(name, "full")


def test_regnet_builds_on_meta_without_reading_meta_data():
    # RegNet computes its widths with torch ops and reads them back (.tolist()): under
    # ``with torch.device("meta")`` that raised "Cannot copy out of meta tensor; no data!"
    net, _ = build_configured("regnet_x_400mf", PlanConfig("full", None, False))
    tensors = [*net.parameters(), *net.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    # the architecture is the CPU build's, parameter for parameter
    cpu = torchvision.models.get_model("regnet_x_400mf", num_classes=10)
    assert [(n, p.shape) for n, p in net.named_parameters()] == \
        [(n, p.shape) for n, p in cpu.named_parameters()]


def test_on_meta_restores_registration_and_moves_late_tensors():
    before = (torch.nn.Module.register_parameter, torch.nn.Module.register_buffer)

    class Late(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.register_buffer("stat", torch.zeros(2))
            self.stat = torch.ones(2)  # replaces a buffer without register_buffer

    m = on_meta(Late)
    assert all(t.device.type == "meta" for t in [*m.parameters(), *m.buffers()])
    assert isinstance(m.lin.weight, torch.nn.Parameter) and m.lin.weight.requires_grad
    assert (torch.nn.Module.register_parameter, torch.nn.Module.register_buffer) == before

    def broken() -> torch.nn.Module:
        torch.nn.Linear(2, 2)
        raise RuntimeError("constructor failed")

    with pytest.raises(RuntimeError, match="constructor failed"):
        on_meta(broken)
    assert (torch.nn.Module.register_parameter, torch.nn.Module.register_buffer) == before


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(("name", "reason"), [
    ("vit_b_16", "Expected 224 but got 64"),  # ViT asserts its image size
    ("inception_v3", "the model failed on a batch of shape (2, 3, 64, 64)"),
])
def test_unplannable_input_is_one_clear_line(name, reason):
    with pytest.raises(ValueError) as e:
        plan(name, "64GiB", resolution=64, methods=["head"], batch=2, optimizer="sgd")
    msg = str(e.value)
    assert "\n" not in msg and reason in msg and name in msg and "resolution" in msg
