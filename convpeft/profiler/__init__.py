"""Per-update cost profiler: FLOPs by pass, true peak memory by category, time.

``profile_update(model, optimizer, inputs, targets)`` measures one real update;
``analytic_profile(model, optimizer, input_shape)`` predicts the same from shapes alone. Peak
memory is the device's (allocator trace on the CPU, the caching allocator on CUDA; predicted
per op from shapes by :mod:`.scratch`); the tensor-level peak is kept beside it.
"""

from convpeft.profiler.engine import AllocatorProbe, RefreshingOptimizer
from convpeft.profiler.flop_counter import CountFlops, FlopCounter, FlopTally
from convpeft.profiler.fvcore_flops import fvcore_forward_flops
from convpeft.profiler.memory import (
    CATEGORIES,
    SCRATCH,
    MemoryReport,
    MemoryTracker,
)
from convpeft.profiler.profile import (
    UpdateProfile,
    analytic_profile,
    format_profile,
    profile_update,
)
from convpeft.profiler.scratch import ScratchModel, scratch_model

__all__ = [
    "CATEGORIES",
    "SCRATCH",
    "ScratchModel",
    "scratch_model",
    "AllocatorProbe",
    "RefreshingOptimizer",
    "CountFlops",
    "FlopCounter",
    "FlopTally",
    "MemoryReport",
    "MemoryTracker",
    "UpdateProfile",
    "analytic_profile",
    "format_profile",
    "fvcore_forward_flops",
    "profile_update",
]
