"""Where convpeft keeps what it caches: one folder for the pretrained source weights
(:mod:`convpeft.train.cache`) and the device models fitted on this machine
(:mod:`convpeft.profiler.scratch`), so one environment variable moves both."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["resolve_cache_dir"]


def resolve_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$CONVPEFT_CACHE``, else ``$XDG_CACHE_HOME/convpeft`` (``~/.cache``)."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("CONVPEFT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "convpeft"
