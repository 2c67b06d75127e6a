"""Replace a save's files all together or not at all, never writing through a link.

:func:`write_files` is how both adapter formats (:func:`convpeft.adapters.save_adapters`, its
``format="peft"``) write a directory. The new files are written in full to a temporary folder
inside the directory first, so a failure while serialising or writing (disk full, an
unwritable folder) happens before any old file is touched. Each new file is then renamed over
its old name (``os.replace``: a symlink at that name is replaced by the file, never followed, so
a link planted in the save directory cannot redirect the write elsewhere), the old file kept as
a hard link (or moved aside where hard links are not available) until every rename has worked;
if one fails, the renames done so far are rolled back, so the directory holds exactly the
previous save, which still loads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path


def _keep_old(target: Path, backup: Path) -> Path | None:
    """Keep the entry at ``target`` (file or link, not followed) reachable as ``backup``."""
    if not os.path.lexists(target):
        return None
    if target.is_dir() and not target.is_symlink():
        raise IsADirectoryError(f"{str(target)!r} is a directory; move it away or save elsewhere")
    try:
        os.link(target, backup, follow_symlinks=False)
    except OSError:  # no hard links here: move it aside instead
        os.replace(target, backup)
    return backup


def write_files(directory: str | os.PathLike, files: dict[str, bytes],
                remove: Iterable[str] = ()) -> Path:
    """Put ``files`` (``{name: content}``) into ``directory`` (created if needed) and delete the
    entries named in ``remove`` (e.g. a weights file of the other kind), all or nothing: on any
    failure the directory is left as it was (see the module docstring). Returns the directory."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"{str(d)!r} is a file; save_adapters needs a directory")
    created = not d.exists()
    d.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convpeft-save-", dir=d))
    done: list[tuple[Path, Path | None]] = []  # (target, its old entry kept aside or None)
    try:
        for i, data in enumerate(files.values()):
            with open(tmp / f"new-{i}", "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        names = list(files)
        gone = [n for n in remove if n not in files and os.path.lexists(d / n)]
        for i, name in enumerate(names + gone):
            target = d / name
            backup = _keep_old(target, tmp / f"old-{i}")
            done.append((target, backup))
            if i < len(names):
                os.replace(tmp / f"new-{i}", target)  # replaces a link, never follows it
            elif os.path.lexists(target):
                os.unlink(target)
    except BaseException:
        for target, backup in reversed(done):
            if backup is not None:
                os.replace(backup, target)
            elif os.path.lexists(target):
                os.unlink(target)
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                d.rmdir()  # only if still empty
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return d
