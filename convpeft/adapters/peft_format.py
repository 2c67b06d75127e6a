"""peft's on-disk LoRA format: write convpeft adapters so ``peft.PeftModel.from_pretrained``
loads them, and read such directories (peft's own included) back into convpeft adapters.

A peft LoRA directory holds ``adapter_config.json`` (a ``peft.LoraConfig``, ``peft_type:
"LORA"``) and ``adapter_model.safetensors`` with keys ``base_model.model.<layer>.<tensor>``.
convpeft's layout maps onto peft's exactly for the layers peft can represent:

=======================================  ==============================================
convpeft (``<layer>.``)                  peft (``base_model.model.<layer>.``)
=======================================  ==============================================
``lora_A`` ``(r, C_in, k_h, k_w)``       ``lora_A.weight``: a Conv2d with the base kernel,
                                         stride and padding (``(r, in)`` for Linear)
``lora_B`` ``(C_out, r)``                ``lora_B.weight`` ``(C_out, r, 1, 1)``: a 1x1 conv
                                         (``(out, r)`` for Linear)
``magnitude`` ``(C_out,)`` (DoRA)        ``lora_magnitude_vector``: ``(1, C_out, 1, 1)``
                                         for a conv, ``(out,)`` for Linear
scaling ``alpha/r`` or ``alpha/sqrt(r)``  ``lora_alpha / r`` or ``/ sqrt(r)`` (``use_rslora``)
trainable parameters (e.g. a head),      ``modules_to_save``: whole modules, their
buffers (batch-norm statistics)          ``state_dict`` stored under ``<module>.``
=======================================  ==============================================

DoRA: peft computes ``(c - 1) * base(x) + c * s * B(A(x))`` on top of ``base(x)`` with
``c = m / ||W0 + s dW||_c`` (norm detached), which is convpeft's ``c * (conv(x, W0) + s B(A(x)))
+ bias`` for ``groups == 1``; the tests compare outputs through peft itself.

**What peft cannot represent**, refused with one error naming every such layer (and nothing is
written): grouped and depthwise convs (peft's ``lora_B`` is then a grouped conv, a different
factorisation, and peft cannot merge it), convs with ``dilation != 1`` or a non-zero padding
mode (peft's ``lora_A`` drops both), ``nn.Conv2d`` subclasses (peft rebuilds ``lora_A`` with the
subclass's constructor), LoRA and DoRA in one model (``use_dora`` is global), different dropout
per layer (``lora_dropout`` is global), trainable parameters inside an adapted layer (e.g. its
bias) or on the model itself, and ``modules_to_save`` names that peft's suffix matching would
apply to other modules too. Ranks and alphas per layer are expressed with ``rank_pattern`` /
``alpha_pattern`` (one anchored, escaped entry per differing layer; peft matches them with
``re.match(r"(.*\\.)?(<key>)$", name)``), and rsLoRA on only some layers through their alpha
(``alpha' = s * r``). ``target_modules`` is a regex (peft ``re.fullmatch``-es a string) of the
escaped layer names, so it matches exactly those layers.

**Trainable parameters and buffers.** peft keeps non-adapter state only through
``modules_to_save`` (the module is copied and its whole ``state_dict`` saved), so every module
owning a trainable parameter goes there, and with ``include_buffers`` every module owning a
buffer (batch norm: fine-tuning in train mode moves its running statistics). In peft such
modules are trainable as a whole when training resumes.

**Not carried** (training-time choices that do not change outputs): ``mode`` (loads as
``"auto"``) and ``freeze_a`` (LoRA-FA; loads as ``False``).

Reading: the layers and ranks come from the tensor names and shapes, alpha from
``alpha_pattern``/``lora_alpha`` with peft's matching rule; a tensor outside the adapters and
outside ``modules_to_save`` is refused like any frozen weight in a convpeft file.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import write_files
from .layer import AdapterLayer
from .model import adapter_layers
from .model import module_names as _module_places

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# LoraConfig fields whose non-default values change outputs in ways convpeft does not model.
_UNSUPPORTED = {"bias": "none", "lora_bias": False, "fan_in_fan_out": False,
                "target_parameters": None, "trainable_token_indices": None,
                "layer_replication": None}


def is_peft_config(config: Any) -> bool:
    """Whether a parsed ``adapter_config.json`` was written in peft's format."""
    return isinstance(config, dict) and "peft_type" in config


def _pattern_lookup(patterns: dict[str, Any], name: str) -> Any | None:
    """peft's rule: the first key (dict order) with ``re.match(r"(.*\\.)?(key)$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _anchored(name: str) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that matches the layer ``name`` only."""
    return "^" + re.escape(name)


def _why_not(layer: AdapterLayer) -> str | None:
    """Why peft cannot represent this adapted layer, or None if it can."""
    base = layer.base_layer
    if isinstance(base, nn.Linear):
        return None
    if type(base) is not nn.Conv2d:
        return f"{type(base).__name__} is an nn.Conv2d subclass"
    if base.groups != 1:
        return f"{layer.kind} conv (groups={base.groups})"
    if tuple(base.dilation) != (1, 1):
        return f"dilation={tuple(base.dilation)}"
    if base.padding_mode != "zeros":
        return f"padding_mode={base.padding_mode!r}"
    return None


def _inside(name: str, parents: set[str]) -> bool:
    return any(name.startswith(p + ".") for p in parents)


def _alpha_out(a: float) -> float | int:
    return int(a) if float(a).is_integer() else float(a)


def peft_state(model: nn.Module, *, include_buffers: bool = True
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(peft LoraConfig as a dict, {peft key: tensor})`` for ``model``'s adapters.

    Raises ``ValueError`` listing every layer/parameter peft cannot represent (see the module
    docstring); nothing is computed half-way."""
    from peft import LoraConfig  # a dependency, imported here because it loads slowly

    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapters to save; call apply_adapters first")
    problems = [f"{name or '<model>'}: {why}" for name, m in layers
                if (why := _why_not(m)) is not None]
    places = _module_places(model)
    problems += [f"{name}: one module used at several places (also at "
                 f"{', '.join(places[id(m)][1:])}); peft adapts only one of them"
                 for name, m in layers if len(places[id(m)]) > 1]
    methods = Counter(m.method for _, m in layers)
    if len(methods) > 1:
        problems.append(f"LoRA and DoRA mixed ({dict(methods)}); peft's use_dora is one flag for "
                        "all layers: save them as two adapters or use one method")
    dropouts = Counter(m.dropout_p for _, m in layers)
    if len(dropouts) > 1:
        problems.append(f"dropout differs between layers ({dict(dropouts)}); peft's "
                        "lora_dropout is one value for all layers")
    wrappers = {name for name, _ in layers}
    module_names = [n for n, _ in model.named_modules()]
    base_keys = [n for n in module_names if not _inside(n, wrappers)]  # the fresh base's names
    adapter_ids = {id(p) for _, m in layers for p in m.adapter_parameters()}
    save: list[str] = []
    for mname, mod in model.named_modules():
        owns_trainable = [n for n, p in mod.named_parameters(recurse=False)
                          if p.requires_grad and id(p) not in adapter_ids]
        owns_buffer = include_buffers and any(True for _ in mod.named_buffers(recurse=False))
        if not (owns_trainable or owns_buffer):
            continue
        full = [f"{mname}.{n}" if mname else n for n in owns_trainable]
        if mname == "" or mname in wrappers or _inside(mname, wrappers):
            if owns_trainable:
                problems.append(f"trainable {full} sit(s) inside an adapted layer or on the model "
                                "itself; peft's modules_to_save cannot hold them: freeze them or "
                                "leave that layer unadapted")
            elif mname == "":
                problems.append("the model itself owns buffers, which peft's modules_to_save "
                                "cannot hold; pass include_buffers=False if they do not change")
            continue
        save.append(mname)
    for m in save:
        hits = [k for k in base_keys if k.endswith(m)]
        try:
            clashes = [t for t in wrappers if re.match(rf"(^|.*\.){m}($|\..*)", t)]
        except re.error:
            clashes = ["<not a valid regex>"]
        if hits != [m] or clashes:
            others = sorted(set(hits) - {m}) + clashes
            problems.append(f"modules_to_save entry {m!r} would also select {others} in peft "
                            "(it matches module names by suffix)")
    for m in save:
        if any(o != m and o.startswith(m + ".") for o in save):
            problems.append(f"modules_to_save {m!r} contains another entry; peft cannot nest them")
    if problems:
        raise ValueError(
            "peft's LoRA format cannot represent this model (nothing was written):\n  "
            + "\n  ".join(problems)
            + "\nsave these layers with format='convpeft', or re-apply adapters with "
              "target='standard' / 'linear' (groups == 1 convs and linear layers)")

    use_rslora = all(m.rslora for _, m in layers)

    def peft_alpha(m: AdapterLayer) -> float:  # peft's scaling: alpha/r, alpha/sqrt(r) (rslora)
        return m.alpha if m.rslora == use_rslora else m.scaling * m.rank

    ranks = Counter(m.rank for _, m in layers)
    alphas = Counter(peft_alpha(m) for _, m in layers)
    r = ranks.most_common(1)[0][0]
    alpha = alphas.most_common(1)[0][0]
    config = LoraConfig(
        r=r,
        lora_alpha=_alpha_out(alpha),
        target_modules="^(?:" + "|".join(re.escape(n) for n, _ in layers) + ")$",
        rank_pattern={_anchored(n): m.rank for n, m in layers if m.rank != r},
        alpha_pattern={_anchored(n): _alpha_out(peft_alpha(m)) for n, m in layers
                       if peft_alpha(m) != alpha},
        use_rslora=use_rslora,
        use_dora=layers[0][1].method == "dora",
        lora_dropout=layers[0][1].dropout_p,
        modules_to_save=save or None,
        bias="none",
        init_lora_weights=True,
    ).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config["inference_mode"] = True
    state: dict[str, torch.Tensor] = {}
    for name, m in layers:
        p = PREFIX + name + "."
        conv = isinstance(m.base_layer, nn.Conv2d)
        state[p + "lora_A.weight"] = m.lora_A.detach()
        b = m.lora_B.detach()
        state[p + "lora_B.weight"] = b.reshape(*b.shape, 1, 1) if conv else b
        if m.method == "dora":
            mag = m.magnitude.detach()
            state[p + "lora_magnitude_vector"] = mag.reshape(1, -1, 1, 1) if conv else mag
    for mname in save:
        for k, v in model.get_submodule(mname).state_dict().items():
            state[f"{PREFIX}{mname}.{k}"] = v.detach()
    return config, {k: v.contiguous().clone() for k, v in state.items()}


def save_peft(model: nn.Module, directory: str | os.PathLike, *,
              include_buffers: bool = True) -> Path:
    """Write ``model``'s adapters to ``directory`` in peft's format (see the module docstring).

    Everything is checked and serialised before the directory is touched; the two files are
    written to a temporary folder beside them and moved in together
    (:func:`convpeft.adapters.files.write_files`: a symlink at either name is replaced, never
    written through), so a failed call leaves the files as they were."""
    from safetensors.torch import save as st_save

    config, state = peft_state(model, include_buffers=include_buffers)
    blob = st_save(state, metadata={"format": "pt"})
    text = json.dumps(config, indent=2, sort_keys=True)
    return write_files(directory, {WEIGHTS_NAME: blob, CONFIG_NAME: text.encode()})


def read_peft(model: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor],
              where: Path) -> tuple[dict[str, dict[str, Any]], list[str], dict[str, torch.Tensor]]:
    """Translate a peft LoRA directory's parsed config and tensors for ``model`` (not changed):
    ``(layer specs for wrap_layers, trainable parameter names, state in convpeft names)``.

    ``where`` (the config's path) only names the file in errors."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type is {config.get('peft_type')!r}; only peft LoRA "
                         "adapters ('LORA', DoRA included) can be loaded")
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, [], {}):
            raise ValueError(f"{where}: field {key!r} is {config[key]!r}; convpeft loads only "
                             f"{key}={default!r}")

    def number(key: str, default: Any, kinds: tuple[type, ...]) -> Any:
        v = config.get(key, default)
        if isinstance(v, bool) or not isinstance(v, kinds):
            raise ValueError(f"{where}: field {key!r} has the wrong type ({v!r})")
        return v

    lora_alpha = number("lora_alpha", 8, (int, float))
    default_r = number("r", 8, (int,))
    dropout = number("lora_dropout", 0.0, (int, float))
    rslora = config.get("use_rslora", False)
    dora = config.get("use_dora", False)
    if not isinstance(rslora, bool) or not isinstance(dora, bool):
        raise ValueError(f"{where}: fields 'use_rslora' and 'use_dora' must be true/false")
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        v = config.get(key) or {}
        if not isinstance(v, dict):
            raise ValueError(f"{where}: field {key!r} must be an object {{regex: value}}")
        patterns[key] = v
    to_save = config.get("modules_to_save") or []
    if not isinstance(to_save, list) or not all(isinstance(m, str) for m in to_save):
        raise ValueError(f"{where}: field 'modules_to_save' must be a list of module names")

    outside = [k for k in state if not k.startswith(PREFIX)]
    if outside:
        raise ValueError(f"{where.parent}: tensor names {outside[:3]!r} lack peft's "
                         f"{PREFIX!r} prefix; was this saved by PeftModel.save_pretrained?")
    names = {k[len(PREFIX):-len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")}
    if not names:
        raise ValueError(f"{where.parent}: no '<layer>.lora_A.weight' tensors; not a LoRA adapter")
    modules = dict(model.named_modules())
    places = _module_places(model)
    specs: dict[str, dict[str, Any]] = {}
    out: dict[str, torch.Tensor] = {}
    problems = []
    for name in sorted(names):
        p = PREFIX + name + "."
        a, b = state[p + "lora_A.weight"], state.get(p + "lora_B.weight")
        mag = state.get(p + "lora_magnitude_vector")
        layer = modules.get(name)
        if isinstance(layer, AdapterLayer):
            problems.append(f"{name}: already has an adapter; call merge_adapters(model) first")
            continue
        if layer is None or not isinstance(layer, (nn.Conv2d, nn.Linear)):
            problems.append(f"{name}: the model has no nn.Conv2d/nn.Linear of that name")
            continue
        if isinstance(layer, nn.Conv2d) and (type(layer) is not nn.Conv2d or layer.groups != 1
                                             or tuple(layer.dilation) != (1, 1)
                                             or layer.padding_mode != "zeros"):
            problems.append(f"{name}: peft's LoRA on this conv (groups={layer.groups}, dilation="
                            f"{tuple(layer.dilation)}, padding_mode={layer.padding_mode!r}) "
                            "differs from convpeft's")
            continue
        if len(places[id(layer)]) > 1:
            problems.append(f"{name}: this model uses that module at several places "
                            f"({', '.join(places[id(layer)])}); peft adapted one of them, "
                            "convpeft would adapt all (one adapter per module)")
            continue
        if b is None:
            problems.append(f"{name}: lora_B.weight is missing")
            continue
        if (mag is not None) != dora:
            problems.append(f"{name}: use_dora={dora} but lora_magnitude_vector is "
                            f"{'present' if mag is not None else 'missing'}")
            continue
        rank = int(a.shape[0])
        want_r = _pattern_lookup(patterns["rank_pattern"], name)
        if (default_r if want_r is None else want_r) != rank:
            problems.append(f"{name}: lora_A has rank {rank} but the config says "
                            f"{default_r if want_r is None else want_r}")
            continue
        alpha = _pattern_lookup(patterns["alpha_pattern"], name)
        alpha = lora_alpha if alpha is None else alpha
        specs[name] = {"method": "dora" if dora else "lora", "rank": rank, "alpha": float(alpha),
                       "rslora": rslora, "dropout": float(dropout)}
        out[name + ".lora_A"] = a
        out[name + ".lora_B"] = b.reshape(b.shape[0], -1)
        if mag is not None:
            out[name + ".magnitude"] = mag.reshape(-1)
    if problems:
        raise ValueError(f"{where.parent} does not fit this model:\n  " + "\n  ".join(problems))
    adapter_keys = {PREFIX + n + s for n in names
                    for s in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")}
    params = dict(model.named_parameters())
    trainable = []
    stray = []
    for k, v in state.items():
        if k in adapter_keys:
            continue
        key = k[len(PREFIX):]
        owner = key.rpartition(".")[0]
        if not any(owner.endswith(m) for m in to_save):  # peft's own modules_to_save rule
            stray.append(key)
            continue
        out[key] = v
        if key in params:
            trainable.append(key)
    if stray:
        raise KeyError(f"{where.parent}: tensors {stray[:5]!r} are neither adapter tensors nor in "
                       "modules_to_save; a peft adapter file may not overwrite frozen weights")
    return specs, trainable, out
