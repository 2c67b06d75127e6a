"""LoRA and DoRA adapters for every Conv2d geometry (standard, pointwise, grouped, depthwise)
and for nn.Linear; see :mod:`convpeft.adapters.lora` for the factorisation and the two
computation modes, :mod:`convpeft.adapters.layer` for what every wrapper shares (the choice of
mode, merging), :mod:`convpeft.adapters.dora` for DoRA, :mod:`convpeft.adapters.lora_fa` for
LoRA-FA's frozen ``A`` set from data, :mod:`convpeft.adapters.state` for saving/loading and
:mod:`convpeft.adapters.peft_format` for peft's directory format."""

from convpeft.ops.adapter_conv import DoRAConvFunction as DoRAConvFunction

from .config import AdapterConfig
from .config import scaling as scaling
from .dora import DoRAConv2d, DoRALinear
from .layer import AdapterLayer
from .lora import LoRAConv2d, LoRALinear
from .lora_fa import FrozenACalibration, calibrate_frozen_a
from .model import adapter_for, apply_adapters, merge_adapters, unmerge_adapters
from .model import (
    make_adapter as make_adapter,
)
from .report import AdapterReport, AdapterRow, adapter_layers, adapter_report, is_adapter
from .state import adapter_state_dict, load_adapter_state_dict, load_adapters, save_adapters

# The public surface. DoRAConvFunction, scaling and make_adapter stay importable from here
# (tests and power users use them) but are implementation details, not API.
__all__ = [
    "AdapterConfig", "AdapterLayer", "AdapterReport", "AdapterRow", "DoRAConv2d", "DoRALinear",
    "FrozenACalibration", "LoRAConv2d", "LoRALinear", "adapter_for", "adapter_layers",
    "adapter_report", "adapter_state_dict", "apply_adapters", "calibrate_frozen_a", "is_adapter",
    "load_adapter_state_dict", "load_adapters", "merge_adapters", "save_adapters",
    "unmerge_adapters",
]
