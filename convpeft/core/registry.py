"""One registry behaviour for methods, datasets and corruptions: name -> object, refusing repeats.

Each registry (:mod:`convpeft.methods`, :mod:`convpeft.data.datasets`,
:mod:`convpeft.data.corruptions`) is a :class:`Registry` behind three module functions in the
torchvision ``models/_api.py`` style: ``register_*`` (returns what it registered, so it also works
as a decorator on functions), ``get_*(name)`` and ``list_*()``. Registering a name twice raises
instead of silently replacing the first entry: a plugin that reuses ``"lora"`` would otherwise
change what every later ``get_method("lora")`` means, with no trace.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one ``kind`` (``"method"``, ``"dataset"``...) in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        """Add ``obj`` under ``name``; ``ValueError`` if the name is taken or not a string."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._items:
            raise ValueError(
                f"{self.kind} {name!r} is already registered; register yours under another name"
            )
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The object registered as ``name``; ``ValueError`` listing the known names if none."""
        try:
            return self._items[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            raise ValueError(
                f"unknown {self.kind} {name!r}; use one of {', '.join(self._items)}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items
