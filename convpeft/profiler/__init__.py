"""Per-update cost profiler: FLOPs by pass, true peak memory by category, time.

``profile_update(model, optimizer, inputs, targets)`` measures one real update;
``analytic_profile(model, optimizer, input_shape)`` predicts the same from shapes alone.
"""

from convpeft.profiler.analytic import analytic_profile
from convpeft.profiler.flop_counter import CountFlops, FlopCounter, FlopTally
from convpeft.profiler.fvcore_flops import fvcore_forward_flops
from convpeft.profiler.memory import CATEGORIES, MemoryReport, MemoryTracker
from convpeft.profiler.profile import UpdateProfile, format_profile, profile_update

__all__ = [
    "CATEGORIES",
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
