"""convpeft: parameter-efficient fine-tuning for edge CNNs, and what each update really costs."""

from convpeft.memory.checkpoint import CheckpointReport, checkpoint_blocks, restore_checkpointing
from convpeft.memory.lean import LeanReport, lean_activations, restore_activations
from convpeft.memory.sparse import SparseReport, restore_sparse, sparse_update

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
from .planner import PlanRow
from .profiler.calibrate import Calibration, calibrate

__version__ = "0.1.0"


def __getattr__(name: str):
    """``convpeft.plan`` is the module convpeft/plan.py (the CLI), made callable:
    ``convpeft.plan(...)`` calls :func:`convpeft.planner.plan`. A function of that name would
    be replaced by the submodule as soon as anything imported ``convpeft.plan``, and importing
    it here eagerly would make ``python -m convpeft.plan`` warn, so it is imported on first use.
    """
    if name == "plan":
        import importlib

        return importlib.import_module(".plan", __name__)
    raise AttributeError(f"module 'convpeft' has no attribute {name!r}")


__all__ = [
    "AdapterReport",
    "Calibration",
    "CheckpointReport",
    "LeanReport",
    "PlanRow",
    "SparseReport",
    "adapter_state_dict",
    "apply_adapters",
    "calibrate",
    "check_onnx",
    "checkpoint_blocks",
    "export_executorch",
    "export_onnx",
    "load_adapter_state_dict",
    "lean_activations",
    "load_adapters",
    "merge_adapters",
    "onnx_op_counts",
    "plan",
    "restore_activations",
    "restore_checkpointing",
    "restore_sparse",
    "save_adapters",
    "sparse_update",
]
