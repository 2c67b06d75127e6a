"""Results of a sweep on disk: CSV + JSONL, written row by row, resumable, with environment data.

Layout under ``--out``::

    results.jsonl   one JSON object per finished configuration, appended and flushed per row
                    (the source of truth; a torn last line from a hard kill is ignored on load)
    results.csv     the same rows as a table, always REBUILT from the JSONL (never appended):
                    atomically (tmp file + rename) after each row and when a store is opened,
                    so a truncated, garbage-appended or deleted CSV is repaired by any rerun
    results_summary.csv
                    one row per configuration group (the key without the seed): accuracies as
                    mean, standard deviation and 95% t-interval over seeds, and the cost columns
                    (:mod:`benchmarks.sweep.stats`); rebuilt from the JSONL with results.csv
    findings.md     the markdown summary (benchmarks.sweep.findings), also rebuilt from the JSONL
    .results.lock   an advisory ``flock`` lock: appends and rebuilds hold it, so two sweeps
                    writing into one folder at once interleave whole rows and lose none

A rerun reads ``results.jsonl``; rows whose ``status`` is ``"ok"`` are skipped (resume). A
failed row is retried and the newer row for the same key replaces the older one. A JSONL line
that is not valid UTF-8, not JSON, or not a row (an object whose known columns have their
types: ``key``/``model``/``method`` strings, ``rank``/``seed`` integers, accuracies, FLOPs and
bytes numbers; see :func:`row_problem`) is skipped with a warning naming the line and why, line
by line; it never stops a rerun, and the CSV and findings rebuilt from the JSONL leave it out.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import math
import os
import platform
import subprocess
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from benchmarks.sweep.stats import SUMMARY_NAME, write_csv_atomic, write_summary_csv

JSONL_NAME = "results.jsonl"
CSV_NAME = "results.csv"
LOCK_NAME = ".results.lock"

# Columns first in the CSV, in this order; any other keys follow alphabetically.
LEADING_COLUMNS: tuple[str, ...] = (
    "key",
    "model",
    "dataset",
    "task",
    "method",
    "rank",
    "seed",
    "status",
    "error",
    "zero_shot_acc",
    "target_acc",
    "source_acc",
    "trainable_params",
    "total_params",
    "adapter_bytes",
    "bn_stats_bytes",
    "flops_forward",
    "flops_backward",
    "flops_backward_input",
    "flops_backward_weight",
    "flops_optimizer",
    "flops_elementwise",
    "flops_total",
    "flops_torch",
    "memory_peak",
    "step_time_s",
    "step_time_iqr_s",
    "wall_time_s",
)


def flatten(d: Mapping, prefix: str = "") -> dict:
    """Flatten nested dicts with ``_`` (``{"memory_by_category": {"params": 1}}`` ->
    ``{"memory_by_category_params": 1}``); lists are dropped (per-layer tables do not fit a row).
    """
    out: dict = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix=f"{name}_"))
        elif isinstance(v, (list, tuple)):
            continue
        else:
            out[name] = v
    return out


def git_commit(repo: Path | None = None) -> str:
    """The repository's HEAD commit (with ``+dirty`` if the tree has changes), or ``""``."""
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha + ("+dirty" if dirty else "")


def cpu_name() -> str:
    """CPU model name from /proc/cpuinfo (Linux), falling back to ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_metadata(device: str = "cpu") -> dict:
    """Versions, commit and hardware a row was measured on (``env_*`` columns)."""
    import torch

    import convpeft

    gpu = ""
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        tv = ""
    return {
        "env_convpeft_version": convpeft.__version__,
        "env_torch_version": torch.__version__,
        "env_torchvision_version": tv,
        "env_python_version": platform.python_version(),
        "env_git_commit": git_commit(),
        "env_cpu": cpu_name(),
        "env_cpu_count": os.cpu_count() or 0,
        "env_gpu": gpu,
        "env_threads": torch.get_num_threads(),
        "env_device": device,
        "env_platform": platform.platform(),
    }


def _jsonable(v):
    """Plain JSON value: NaN/inf become None (strict JSON), tensors/numpy scalars become numbers."""
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


# Columns whose type the tables, plots and findings rely on. A row carrying one of them with
# another type (a hand-edited or foreign JSONL: ``"rank": "abc"``) is not a row of ours.
_STR_COLUMNS = ("key", "model", "dataset", "task", "method", "status", "error", "mode",
                "prefix_stats")
_INT_COLUMNS = ("rank", "seed", "epochs", "batch_size", "resolution", "update_blocks",
                "prefix_chunks")
# accuracies, sizes, FLOPs, memory, times: the leading columns from zero_shot_acc on
_NUMBER_COLUMNS = LEADING_COLUMNS[LEADING_COLUMNS.index("zero_shot_acc"):]


def row_problem(row) -> str | None:
    """Why ``row`` is not a results row (``None`` when it is): a JSON object whose known
    columns, when present and not null, have their type (str / int / number)."""
    if not isinstance(row, dict):
        return f"a {type(row).__name__}, not an object"
    for cols, types, what in ((_STR_COLUMNS, (str,), "a string"),
                              (_INT_COLUMNS, (int,), "an integer"),
                              (_NUMBER_COLUMNS, (int, float), "a number")):
        for c in cols:
            v = row.get(c)
            if v is not None and (isinstance(v, bool) or not isinstance(v, types)):
                return f"{c!r} is {v!r}, expected {what}"
    return None


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file. A line that is torn (hard kill mid-write), not valid UTF-8, not
    JSON, or not a row (see :func:`row_problem`: an object whose known columns have their
    types, e.g. ``rank`` an integer) is skipped with a warning naming the file and line; the
    rest are read, so one bad line never stops a rerun."""
    rows: list[dict] = []
    if not path.exists():
        return rows
    bad: list[tuple[int, str]] = []  # (line number, why)
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                bad.append((i, "not UTF-8"))
                continue
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad.append((i, "not JSON"))
                continue
            why = row_problem(row)
            if why is not None:
                bad.append((i, why))
                continue
            rows.append(row)
    _warn_skipped(path, bad)
    return rows


def _warn_skipped(path: Path, bad: list[tuple[int, str]]) -> None:
    if bad:
        shown = "; ".join(f"line {n}: {why}" for n, why in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s) ({shown}{more})",
                      stacklevel=3)


def _parse_cell(s: str):
    """CSV cell back to a Python value: '' -> None, numbers -> int/float, else the string."""
    if s == "":
        return None
    if s in ("True", "False"):
        return s == "True"
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def read_csv(path: Path) -> list[dict]:
    """Rows of a results CSV, with numbers parsed back. A line that is not a row (a cell of a
    known column with the wrong type, e.g. ``rank`` ``abc``; see :func:`row_problem`) is
    skipped with a warning naming the file and line, as in the JSONL."""
    rows: list[dict] = []
    bad: list[tuple[int, str]] = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            parsed = {k: (v if k in _STR_COLUMNS and v != "" else _parse_cell(v))
                      for k, v in row.items() if k is not None and v is not None}
            why = row_problem(parsed)
            if why is None:
                rows.append(parsed)
            else:
                bad.append((reader.line_num, why))
    _warn_skipped(path, bad)
    return rows


def dedupe(rows: Iterable[dict]) -> list[dict]:
    """Keep the last row per ``key`` (a retried config replaces its failed row), in first-seen
    order of keys. Rows without a key are kept as they are."""
    by_key: dict[str, dict] = {}
    loose: list[dict] = []
    for r in rows:
        k = r.get("key")
        if k is None:
            loose.append(r)
        else:
            by_key[k] = r  # dict keeps the first-seen position, the value is the latest row
    return list(by_key.values()) + loose


def load_results(path: str | os.PathLike) -> list[dict]:
    """Rows from a results file (``.jsonl`` or ``.csv``) or a results folder (its JSONL, else
    its CSV), deduplicated by key."""
    p = Path(path)
    if p.is_dir():
        cand = [p / JSONL_NAME, p / CSV_NAME]
        found = [c for c in cand if c.exists()]
        if not found:
            raise FileNotFoundError(f"no {JSONL_NAME} or {CSV_NAME} in {p}")
        p = found[0]
    if not p.exists():
        raise FileNotFoundError(f"results file not found: {p}")
    rows = read_csv(p) if p.suffix == ".csv" else read_jsonl(p)
    return dedupe(rows)


def column_order(rows: Iterable[dict]) -> list[str]:
    """Leading columns (when present) then every other key, alphabetically."""
    keys: set[str] = set()
    for r in rows:
        keys.update(r)
    lead = [c for c in LEADING_COLUMNS if c in keys]
    return lead + sorted(keys - set(lead))


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write all rows atomically: a tmp file renamed over ``path`` (never a half-written CSV)."""
    write_csv_atomic(path, rows, column_order(rows))


@contextlib.contextmanager
def locked(out_dir: Path):
    """Hold the folder's advisory write lock (``fcntl.flock``, exclusive) for the block."""
    with (out_dir / LOCK_NAME).open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class ResultsStore:
    """Append-only results of one output folder, with resume support.

    ``done_keys`` are the keys with an ``ok`` row already on disk. ``add(row)`` appends the
    row to the JSONL (flushed + fsynced) and rebuilds the CSV from the whole JSONL, under the
    folder's lock, so either file is valid after any interrupt between rows and concurrent
    writers (another sweep into the same ``--out``) lose no rows. Opening a store rebuilds the
    CSV too, so a rerun with nothing left to run still repairs it.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out_dir / JSONL_NAME
        self.csv_path = self.out_dir / CSV_NAME
        self.summary_path = self.out_dir / SUMMARY_NAME
        with locked(self.out_dir):
            self._repair_jsonl()
            self._reload()

    def _reload(self) -> None:
        """Re-read the JSONL (rows other writers appended included) and rebuild the CSV.
        Call with the lock held."""
        self._rows: list[dict] = dedupe(read_jsonl(self.jsonl_path))
        if self._rows or self.csv_path.exists():
            write_csv(self.csv_path, self._rows)
            write_summary_csv(self.summary_path, self._rows)

    def _repair_jsonl(self) -> None:
        # A hard kill can leave a torn last line without newline; the next append would glue
        # onto it. Terminate it so every later row stays on its own line.
        if self.jsonl_path.exists() and self.jsonl_path.stat().st_size:
            with self.jsonl_path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
            if last != b"\n":
                with self.jsonl_path.open("a") as f:
                    f.write("\n")

    @property
    def rows(self) -> list[dict]:
        return list(self._rows)

    def refresh(self) -> list[dict]:
        """Every row now on disk (concurrent writers' included); rebuilds the CSV."""
        with locked(self.out_dir):
            self._reload()
        return self.rows

    def done_keys(self) -> set[str]:
        return {r["key"] for r in self._rows if r.get("status") == "ok" and "key" in r}

    def add(self, row: dict) -> None:
        row = {k: _jsonable(v) for k, v in row.items()}
        with locked(self.out_dir):
            self._repair_jsonl()
            with self.jsonl_path.open("a") as f:
                f.write(json.dumps(row, sort_keys=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._reload()
