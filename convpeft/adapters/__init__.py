"""LoRA and DoRA adapters for every Conv2d geometry (standard, pointwise, grouped, depthwise)
and for nn.Linear; see :mod:`convpeft.adapters.lora` for the factorisation and the two
computation modes, :mod:`convpeft.adapters.dora` for DoRA, :mod:`convpeft.adapters.state` for
saving/loading and :mod:`convpeft.adapters.peft_format` for peft's directory format."""

from .config import AdapterConfig, scaling
from .dora import DoRAConv2d, DoRAConvFunction, DoRALinear
from .lora import AdapterLayer, LoRAConv2d, LoRALinear
from .model import (
    AdapterReport,
    AdapterRow,
    adapter_layers,
    adapter_report,
    apply_adapters,
    is_adapter,
    make_adapter,
    merge_adapters,
    unmerge_adapters,
)
from .state import adapter_state_dict, load_adapter_state_dict, load_adapters, save_adapters

__all__ = [
    "AdapterConfig", "AdapterLayer", "AdapterReport", "AdapterRow", "DoRAConv2d",
    "DoRAConvFunction", "DoRALinear", "LoRAConv2d", "LoRALinear", "adapter_layers",
    "adapter_report", "adapter_state_dict", "apply_adapters", "is_adapter",
    "load_adapter_state_dict", "load_adapters", "make_adapter", "merge_adapters", "save_adapters",
    "scaling", "unmerge_adapters",
]
