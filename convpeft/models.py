"""Backbones: torchvision classification models, optionally adapted to 32x32 inputs.

:func:`build_model` builds any torchvision classification model by name (``list_models()``);
``mobilenet_v2``, ``mobilenet_v3_small``, ``mobilenet_v3_large``, ``resnet18``, ``resnet34`` and
``resnet50`` are the ones the project tests. GoogLeNet and Inception-v3 come without their
auxiliary classifiers (in training mode those return a tuple of logits, which no loss takes;
torchvision drops them the same way when it loads their ImageNet weights).

``small_input=True`` is the usual CIFAR change, so that a 32x32 image is not reduced to 1x1 by
the ImageNet stem (total stride 32):

* ResNet (any model with ``conv1`` + ``maxpool``): ``conv1`` becomes a 3x3, stride-1, padding-1
  conv without bias (same output channels) and ``maxpool`` becomes ``nn.Identity``: total stride
  8, a 4x4 final feature map at 32x32. The 7x7 ImageNet stem weights cannot be kept, so with
  pretrained weights ``conv1`` is freshly initialised (Kaiming normal, fan-out, like torchvision).
* every other model (MobileNetV2/V3, EfficientNet, ...): the first ``Conv2d`` in
  ``named_modules()`` order gets stride 1 (kernel, padding and weights unchanged): total stride 16,
  a 2x2 final feature map at 32x32.

Inputs are images in ``[0, 1]`` (no ImageNet normalisation inside the model; the first BN
absorbs the scale when training from scratch).

``weights`` may be ``None`` (random init), ``"DEFAULT"`` or a weights enum name
(``"IMAGENET1K_V1"`` or ``"MobileNet_V2_Weights.IMAGENET1K_V1"``), or a path to a state-dict file
(``.pth``/``.pt`` via ``torch.load``, ``.safetensors``). Named weights are read from torchvision's
hub cache (``$TORCH_HOME/hub/checkpoints/<file name of the weights URL>``) and never downloaded:
if the file is missing the error says where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from convpeft.core.layer_kinds import set_submodule

__all__ = [
    "TESTED_MODELS",
    "build_model",
    "expand_head",
    "get_head",
    "list_models",
    "replace_head",
    "weights_path",
]

TESTED_MODELS = (
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "resnet18",
    "resnet34",
    "resnet50",
)


def list_models() -> list[str]:
    """Names of every torchvision classification model :func:`build_model` accepts."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


# Auxiliary classifiers (GoogLeNet's aux1/aux2, Inception-v3's AuxLogits) and their weights.
_AUX_HEADS = ("aux1", "aux2", "AuxLogits")


def _get_model(name: str, num_classes: int) -> nn.Module:
    """``torchvision.models.get_model`` without auxiliary classifiers: with them GoogLeNet and
    Inception-v3 return a tuple of logits in training mode, which no loss takes; torchvision
    drops them the same way when it loads ImageNet weights without ``aux_logits=True``."""
    model = torchvision.models.get_model(name, num_classes=num_classes)
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for attr in _AUX_HEADS:
            if hasattr(model, attr):
                setattr(model, attr, None)
    return model


def _check_name(name: str) -> None:
    names = list_models()
    if name not in names:
        raise ValueError(
            f"unknown model {name!r}; use a torchvision classification model, e.g. "
            f"{', '.join(TESTED_MODELS)} (all: convpeft.models.list_models())"
        )


def weights_path(name: str, weights: str) -> Path:
    """Where torchvision's hub cache keeps the file of ``weights`` (``"DEFAULT"`` or enum name)."""
    enum_cls = torchvision.models.get_model_weights(name)
    key = weights.split(".")[-1]
    try:
        w = enum_cls[key] if key != "DEFAULT" else enum_cls.DEFAULT
    except KeyError:
        raise ValueError(
            f"unknown weights {weights!r} for {name}; use 'DEFAULT', one of "
            f"{[m.name for m in enum_cls]}, or a path to a state-dict file"
        ) from None
    # Same location torch.hub.load_state_dict_from_url caches to, so weights fetched once with
    # torchvision elsewhere are found here without any network access.
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # common checkpoint layout {"state_dict": ..., ...}
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def _fits(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return set(own) == set(state) and all(own[k].shape == state[k].shape for k in own)


def _adapt_small_input(model: nn.Module) -> None:
    conv1, maxpool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    if isinstance(conv1, nn.Conv2d) and maxpool is not None:
        new = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        model.conv1 = new
        model.maxpool = nn.Identity()
        return
    for _, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
            return
    raise ValueError("small_input=True: the model has no Conv2d stem to adapt")


def build_model(
    name: str,
    num_classes: int,
    *,
    weights: str | os.PathLike | None = None,
    small_input: bool = False,
) -> nn.Module:
    """A torchvision classifier ``name`` with a ``num_classes`` head; input (N, 3, H, W) in [0, 1].

    See the module docstring for ``weights`` and ``small_input``. With ImageNet weights the
    backbone is loaded at 1000 classes and the head is then replaced (fresh rows). A state-dict
    file may hold either the plain torchvision architecture (any head size; the head is replaced
    when its size differs) or exactly the final model (after ``small_input`` and head).
    """
    _check_name(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (got {num_classes})")
    if weights is None:
        model = _get_model(name, num_classes)
        if small_input:
            _adapt_small_input(model)
        return model

    w = str(weights)
    is_path = os.sep in w or w.endswith((".pth", ".pt", ".safetensors", ".bin"))
    if is_path:
        path = Path(w).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} not found")
    else:
        path = weights_path(name, w)
        if not path.is_file():
            raise FileNotFoundError(
                f"ImageNet weights {w!r} for {name} are not in the torch hub cache: expected "
                f"{path}. convpeft never downloads; fetch them once with "
                f"torchvision.models.get_model({name!r}, weights={w!r}) on a machine with "
                "network access (or copy the file there), or pass weights=None"
            )
    state = _read_state_dict(path)
    # the auxiliary classifiers' weights (GoogLeNet/Inception ImageNet files) have no place in
    # the model _get_model builds
    state = {k: v for k, v in state.items() if k.split(".", 1)[0] not in _AUX_HEADS}

    # 1) the file is the plain architecture (ImageNet or any head size): load, then adapt.
    head_rows = _head_rows_in_state(name, state)
    if head_rows is not None:
        base = _get_model(name, head_rows)
        if _fits(base, state):
            base.load_state_dict(state)
            if small_input:
                _adapt_small_input(base)
            if head_rows != num_classes:
                replace_head(base, num_classes)
            return base
    # 2) the file is exactly the final model (e.g. saved by pretrain()).
    model = _get_model(name, num_classes)
    if small_input:
        _adapt_small_input(model)
    if not _fits(model, state):
        raise ValueError(
            f"state dict in {path} fits neither {name} (torchvision layout) nor {name} with "
            f"num_classes={num_classes}, small_input={small_input}"
        )
    model.load_state_dict(state)
    return model


def _head_rows_in_state(name: str, state: dict[str, torch.Tensor]) -> int | None:
    probe = _get_model(name, 7)
    head_name, _ = get_head(probe)
    t = state.get(f"{head_name}.weight")
    return int(t.shape[0]) if t is not None and t.ndim == 2 else None


def get_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """``(qualified_name, layer)`` of the classifier: the last ``nn.Linear`` of ``model``."""
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            found = (name, m)
    if found is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear classifier head (e.g. SqueezeNet's conv "
            "head); the head helpers need one"
        )
    return found


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the head by a fresh ``nn.Linear(in_features, num_classes)``; returns ``model``."""
    name, old = get_head(model)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    set_submodule(model, name, new)
    return model


def expand_head(model: nn.Module, num_new: int) -> nn.Module:
    """Append ``num_new`` freshly initialised output rows to the head; returns ``model``.

    Rows ``0..old-1`` (weight and bias) are copied exactly, so the old classes' logits are
    unchanged; new classes get indices ``old..old+num_new-1``.
    """
    if num_new < 1:
        raise ValueError(f"num_new must be >= 1 (got {num_new})")
    name, old = get_head(model)
    new = nn.Linear(old.in_features, old.out_features + num_new, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight[: old.out_features].copy_(old.weight)
        if old.bias is not None:
            new.bias[: old.out_features].copy_(old.bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    if old.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    set_submodule(model, name, new)
    return model
