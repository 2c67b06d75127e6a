"""Data: in-memory image datasets, CIFAR-10-C style corruptions and adaptation tasks.

``load_dataset`` (digits, cifar10, cifar100, cifar10c, imagefolder), ``corrupt`` /
``list_corruptions`` and ``build_task`` ("shift", "new_classes").
"""

from .corruptions import corrupt, get_corruption, list_corruptions, register_corruption
from .datasets import (
    ImageDataset,
    get_dataset,
    list_datasets,
    load_dataset,
    register_dataset,
    stratified_indices,
)
from .tasks import DEFAULT_SHIFT, TASKS, Task, build_task

__all__ = [
    "DEFAULT_SHIFT",
    "TASKS",
    "Task",
    "build_task",
    "ImageDataset",
    "corrupt",
    "get_corruption",
    "get_dataset",
    "list_corruptions",
    "list_datasets",
    "load_dataset",
    "register_corruption",
    "register_dataset",
    "stratified_indices",
]
