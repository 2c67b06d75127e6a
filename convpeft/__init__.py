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
from .checkpoint import CheckpointReport, checkpoint_blocks, restore_checkpointing
from .lean import LeanReport, lean_activations, restore_activations

__version__ = "0.1.0"

__all__ = [
    "AdapterReport",
    "CheckpointReport",
    "LeanReport",
    "adapter_state_dict",
    "apply_adapters",
    "checkpoint_blocks",
    "load_adapter_state_dict",
    "lean_activations",
    "load_adapters",
    "merge_adapters",
    "restore_activations",
    "restore_checkpointing",
    "save_adapters",
]
