"""convpeft: parameter-efficient fine-tuning for edge CNNs, and what each update really costs."""

from .adapters import (
    AdapterReport,
    adapter_state_dict,
    apply_adapters,
    load_adapter_state_dict,
    load_adapters,
    merge_adapters,
    save_adapters,
)
from .export import check_onnx, export_executorch, export_onnx, onnx_op_counts
from .lean import LeanReport, lean_activations, restore_activations

__version__ = "0.1.0"

__all__ = [
    "AdapterReport",
    "LeanReport",
    "adapter_state_dict",
    "apply_adapters",
    "check_onnx",
    "export_executorch",
    "export_onnx",
    "load_adapter_state_dict",
    "lean_activations",
    "load_adapters",
    "merge_adapters",
    "onnx_op_counts",
    "restore_activations",
    "save_adapters",
]
