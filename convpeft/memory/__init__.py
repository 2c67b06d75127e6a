"""Memory techniques for one update, each exact (outputs and gradients are the plain model's)
and reversible:

* :mod:`.lean`: frozen layers save only what their backward needs (:func:`lean_activations`);
* :mod:`.checkpoint`: block-level activation checkpointing (:func:`checkpoint_blocks`);
* :mod:`.sparse`: only the last K blocks train, the frozen prefix runs without a graph and in
  micro-batches (:func:`sparse_update`).

They compose (lean inside checkpointed blocks, a sparse update's trainable suffix lean or
checkpointed); the kernels they run are in :mod:`convpeft.ops`.
"""

from .checkpoint import CheckpointReport, checkpoint_blocks, restore_checkpointing
from .lean import LeanReport, lean_activations, restore_activations
from .sparse import SparseReport, restore_sparse, sparse_update

__all__ = [
    "CheckpointReport",
    "LeanReport",
    "SparseReport",
    "checkpoint_blocks",
    "lean_activations",
    "restore_activations",
    "restore_checkpointing",
    "restore_sparse",
    "sparse_update",
]
