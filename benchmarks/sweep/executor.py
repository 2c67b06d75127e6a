"""Where the rank sweep's configurations run: one after another in this process, or as Ray tasks.

An *executor* takes the configurations still to run and yields ``(index, fields, traceback)``
for each as it finishes — in any order; ``fields`` are the row's result columns (what
:func:`attempt` returns: :func:`~benchmarks.sweep.config.run_config`'s columns, ``status``,
``error`` and the timing columns), ``traceback`` the text for ``errors.log`` of a failed one.
The runner (:func:`benchmarks.sweep.runner.run_sweep`) alone writes rows: it adds the common
columns, appends rows to the JSONL in the grid's order (a result that arrives early waits for
the ones before it), and keeps the progress bar, resume, failure isolation and Ctrl-C as they
are, whichever executor ran them.

* :class:`SequentialExecutor` (``--executor sequential``, the default): each configuration in
  this process, sharing one :class:`~benchmarks.sweep.config.SourceCache`.
* :class:`RayExecutor` (``--executor ray [--address ADDR]``): a DAG of Ray tasks —

  1. one *group* task per (model, dataset, task, seed) builds the task data and the source
     model (pretrained or loaded from the pretrain disk cache of the node it runs on; random
     init under ``--profile-only``); the model goes into the object store;
  2. one *profile* task per configuration not yet profiled, once for all its seeds, on the
     first seed's source model — what a sequential run measures once and copies into the
     other seeds' rows (``profile_seed``); a resumed sweep reuses the profiles on disk, like
     sequential;
  3. with ``--lr-grid``, one *rate* task per (model, task, method, K): the method's
     learning-rate search on its tuning seed's source model (:mod:`benchmarks.sweep.lr_choice`),
     once for every seed and rank that shares it; a resumed sweep reuses the rates on disk;
  4. one *configuration* task per (configuration, seed), started once its group's source model,
     its profile and its rate exist: fine-tuning and evaluation, exactly :func:`attempt` over a
     per-worker :class:`~benchmarks.sweep.config.SourceCache` into which the group's source
     model, the profile and the rate are adopted.

  Every task reserves ``--cpus-per-task`` CPUs (default 1) and, with a CUDA ``--device``,
  ``--gpus-per-task`` GPUs (default 1; Ray picks the GPU, so ``cuda:N`` becomes ``cuda``
  there). Each runs with the driver's intra-op thread count (``torch.get_num_threads()``,
  what a sequential run uses and ``env_threads`` records) and seeds exactly as the sequential
  path does, so its rows are identical to a sequential run's except the wall-clock columns
  (:data:`TIMING_COLUMNS`) and ``source_cached`` (whether the pretrain cache already held the
  source model). A task that raises gives a ``failed`` row with its error and the remote
  traceback in ``errors.log``; one Ray could not run at all (its worker died) gives a failed
  row naming Ray's error. Without ``--address`` a local Ray is started (all CPUs of this
  machine, no dashboard) and shut down afterwards; with one, ``ray.init(address=ADDR)``
  connects to that cluster, and every node needs this repository installed and the data
  under ``--data-root``. An already initialised Ray (a test's) is used as it is. Ctrl-C
  cancels the outstanding tasks; the rows finished so far are written.

  One difference from sequential remains, where sequential retries: when the profile of a
  configuration fails for its first seed, that seed's row fails with the error and each other
  seed profiles on its own (sequential lets the second seed measure and the third copy).
"""

from __future__ import annotations

import gc
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import NamedTuple

import torch

from benchmarks.sweep.config import SourceCache, run_config
from benchmarks.sweep.grid import Config, SweepSettings

EXECUTORS = ("sequential", "processes", "ray")

TIMING_COLUMNS = frozenset({
    "wall_time_s", "cpu_time_s", "finished_at", "source_time_s", "source_cpu_time_s",
    "train_time_s", "profile_time_s", "step_time_s", "step_time_iqr_s", "step_cpu_time_s",
    "instrumented_time_s", "instrumented_cpu_time_s", "cost_time_s", "cost_step_time_s",
    "cost_step_time_vs_full",
})
"""The columns that are wall-clock or CPU times (or a timestamp): they differ between any two
runs, so an executor's rows are compared with a sequential run's on every other column."""

RAY_MISSING = ('--executor ray needs Ray, an optional extra: pip install -e ".[ray]" '
               '(or pip install "ray>=2.9")')

Result = tuple[int, dict, "str | None"]
Note = Callable[[str], object]


def attempt(cfg: Config, s: SweepSettings, sources: SourceCache) -> tuple[dict, str | None]:
    """Run one configuration, isolated: ``(fields, traceback)``. ``fields`` holds
    :func:`run_config`'s columns and ``status="ok"``, or ``status="failed"`` and the
    ``error`` (out-of-memory included); both get ``wall_time_s``, ``cpu_time_s`` (all threads
    of this process) and ``finished_at``. ``traceback`` is None unless it failed."""
    t0, c0 = time.perf_counter(), time.process_time()
    tb = None
    try:
        fields = run_config(cfg, s, sources)
        fields["status"], fields["error"] = "ok", None
    except Exception as e:  # isolate: record and go on
        fields = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:1000]}
        tb = traceback.format_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    fields["wall_time_s"] = time.perf_counter() - t0
    fields["cpu_time_s"] = time.process_time() - c0
    fields["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    gc.collect()
    return fields, tb


class SequentialExecutor:
    """Each configuration in this process, in the grid's order (the default)."""

    def __enter__(self):
        # attempt() collects cycles after every configuration; with torch, torchvision and
        # galore imported that is ~460k tracked objects, 0.16 s a collection (24 s of the
        # default sweep). Freezing what exists now (imports, the sweep's own state) keeps them
        # out of every later collection; the configurations' own objects are still collected.
        gc.freeze()
        return self

    def __exit__(self, *exc) -> None:
        gc.unfreeze()
        return None

    def run(self, todo: Sequence[Config], sources: SourceCache, note: Note) -> Iterator[Result]:
        for i, cfg in enumerate(todo):
            if sources.has_source(cfg) or sources.s.profile_only:
                note(f"{cfg.model} {cfg.task} {cfg.label}")
            else:  # the first config of a group pays for the source model (cached on disk)
                note(f"{cfg.model} {cfg.task}: source model (pretrain or cache)")
            fields, tb = attempt(cfg, sources.s, sources)
            yield i, fields, tb


# ----------------------------------------------------------------------------- processes

def _proc_init(threads: int) -> None:
    torch.set_num_threads(threads)
    gc.freeze()  # as SequentialExecutor: keep the imports out of every collection


def _proc_sources(s: SweepSettings) -> SourceCache:
    """This worker's SourceCache: the one Ray workers keep too (:func:`_worker_sources`), at
    the thread count the pool's initializer set."""
    return _worker_sources(s, torch.get_num_threads(), on_ray=False)


def _proc_lr(cfg: Config, s: SweepSettings):
    """Worker: the tuned rate of ``cfg``'s method (an LrChoice, or _Failed)."""
    return _catch(_proc_sources(s).lr_choice, cfg)


def _proc_profile(cfg: Config, s: SweepSettings):
    """Worker: the profile columns of ``cfg``'s configuration (or _Failed)."""
    sources = _proc_sources(s)
    sources.profiles.pop(sources.profile_key(cfg), None)
    return _catch(sources.profile, cfg)


def _proc_config(cfg: Config, s: SweepSettings, choice, profile) -> tuple[dict, str | None]:
    """Worker: :func:`attempt` of ``cfg`` with the rate and profile measured elsewhere."""
    from benchmarks.sweep.lr_choice import lr_key

    sources = _proc_sources(s)
    if choice is not None:
        sources.lr_choices[lr_key(cfg, s)] = _unwrap(choice)
    if profile is not None:
        sources.profiles[sources.profile_key(cfg)] = _unwrap(profile)
    fields, tb = attempt(cfg, s, sources)
    fields["env_threads"] = torch.get_num_threads()  # this worker's, not the driver's
    return fields, tb


class ProcessExecutor:
    """Configurations on a pool of worker processes on this machine (``--executor processes
    --workers N``): the small CPU models of the offline grid leave a core idle at two threads,
    so N one-thread workers finish the grid sooner. In three waves, each waiting for the last:
    every source model once (pretrained into the disk cache, so no two workers pretrain the
    same), every method's learning-rate search once (:mod:`benchmarks.sweep.lr_choice`) and
    every configuration's profile once, then the (configuration, seed) runs with those handed
    in. Source models are made here, one after another, before the pool starts (pretraining
    has its own fixed thread count; two side by side on the same cores are slower than in
    turn). The rows equal a sequential run's at the workers' thread count, except the timing
    columns. ``--measure-cost`` is refused: a second worker would disturb the timed update."""

    def __init__(self, workers: int = 2, threads: int = 1):
        if workers < 1 or threads < 1:
            raise ValueError("--workers must be >= 1")
        self.workers, self.threads = workers, threads
        self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            if exc[0] is not None:  # Ctrl-C, SIGTERM, an error: no worker outlives the run
                for proc in list(getattr(self._pool, "_processes", {}).values()):
                    proc.terminate()
            self._pool.shutdown(wait=exc[0] is None, cancel_futures=True)
            self._pool = None

    def run(self, todo: Sequence[Config], sources: SourceCache, note: Note) -> Iterator[Result]:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        from benchmarks.sweep.lr_choice import lr_key

        if not todo:
            return
        s = sources.s
        groups = {sources.group_key(c): c for c in reversed(todo)}
        if not s.profile_only:
            # here, one after another, before the pool starts: pretraining runs at its own
            # fixed thread count (PRETRAIN_DEFAULTS), and two of them side by side on the same
            # cores run slower than in turn; the workers then load them from the disk cache
            for n, cfg in enumerate(groups.values(), 1):
                note(f"source models: {n}/{len(groups)}")
                try:
                    sources.source(cfg)
                except Exception:  # remembered; its configurations fail with it in the workers
                    pass
        # spawn, not fork: a forked child inherits torch's thread pools in an unknown state
        self._pool = ProcessPoolExecutor(self.workers, multiprocessing.get_context("spawn"),
                                         initializer=_proc_init, initargs=(self.threads,))
        tune = bool(s.lr_grid) and s.lr is None and not s.profile_only
        need_lr = {lr_key(c, s): c for c in reversed(todo)} if tune else {}
        need_lr = {k: c for k, c in need_lr.items() if k not in sources.lr_choices}
        need_prof = {sources.profile_key(c): c for c in reversed(todo)
                     if sources.profile_key(c) not in sources.profiles}
        both = {("lr", k): c for k, c in need_lr.items()}
        both.update({("profile", k): c for k, c in need_prof.items()})
        done: dict = {}
        futs = {}
        for (kind, k), cfg in both.items():
            futs[self._pool.submit(_proc_lr if kind == "lr" else _proc_profile, cfg, s)] = (
                kind, k)
        for n, fut in enumerate(as_completed(futs), 1):
            note(f"learning-rate searches and profiles: {n}/{len(futs)}")
            done[futs[fut]] = fut.result()
        choices = {k: v for (kind, k), v in done.items() if kind == "lr"}
        choices.update({k: v for k, v in sources.lr_choices.items() if k not in choices})
        profiles = {k: v for (kind, k), v in done.items() if kind == "profile"}
        profiles.update({k: v for k, v in sources.profiles.items() if k not in profiles})
        futs = {self._pool.submit(_proc_config, cfg, s,
                                  choices.get(lr_key(cfg, s)) if tune else None,
                                  profiles.get(sources.profile_key(cfg))): i
                for i, cfg in enumerate(todo)}
        for fut in as_completed(futs):
            note(f"{self.workers} workers")
            yield (futs[fut], *fut.result())


# ----------------------------------------------------------------------------- Ray


class _Failed(NamedTuple):
    """An exception a Ray task caught, with its traceback text (tracebacks do not pickle)."""

    exc: BaseException
    tb: str


class _RemoteTraceback(Exception):
    """Carries a remote traceback as the ``__cause__`` of the re-raised exception, so
    ``traceback.format_exc()`` on the worker that re-raises it shows where it came from."""

    def __str__(self) -> str:
        return self.args[0]


def _catch(fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        return _Failed(e, traceback.format_exc())


def _unwrap(value):
    """A task's :class:`_Failed` as its exception (remote traceback attached), else as is."""
    if isinstance(value, _Failed):
        value.exc.__cause__ = _RemoteTraceback(f'\n"""\n{value.tb}"""')
        return value.exc
    return value


_WORKER: SourceCache | None = None  # one per worker process (Ray's or the pool's), reused
_WORKER_GROUPS = 4  # source models a worker keeps before it forgets them


def _worker_sources(s: SweepSettings, threads: int, *, on_ray: bool = True) -> SourceCache:
    """This worker process's SourceCache for ``s`` (task data and zero-shot accuracies cached
    like in a sequential run), with the driver's thread count set."""
    global _WORKER
    torch.set_num_threads(threads)
    if on_ray and s.device.startswith("cuda"):  # Ray exposes the task's GPUs only: -> cuda
        s = replace(s, device="cuda")
    if _WORKER is None or _WORKER.s != s:
        _WORKER = SourceCache(s)
    return _WORKER


def _group_task(cfg: Config, s: SweepSettings, threads: int):
    """Ray task: the source model of ``cfg``'s group (model on the CPU, info) or _Failed."""
    sources = _worker_sources(s, threads)
    return _catch(sources.source, cfg)


def _with_group(cfg: Config, s: SweepSettings, threads: int, group) -> SourceCache:
    sources = _worker_sources(s, threads)
    if not sources.has_source(cfg) and len(sources._sources) >= _WORKER_GROUPS:
        sources.forget_sources()
    sources.adopt(cfg, _unwrap(group))
    return sources


def _profile_task(cfg: Config, s: SweepSettings, threads: int, group):
    """Ray task: the profile columns of ``cfg``'s configuration (measured at ``cfg.seed``)."""
    sources = _with_group(cfg, s, threads, group)
    sources.profiles.clear()
    return _catch(sources.profile, cfg)


def _lr_task(cfg: Config, s: SweepSettings, threads: int, group):
    """Ray task: the tuned rate of ``cfg``'s method (an LrChoice, or _Failed), searched once
    for every seed and rank that shares it; ``group``: the tuning configuration's source."""
    from benchmarks.sweep.lr_choice import tuning_config

    sources = _with_group(tuning_config(cfg, s), s, threads, group)
    return _catch(sources.lr_choice, cfg)


def _config_task(cfg: Config, s: SweepSettings, threads: int, group, profile, profiler: bool,
                 choice=None):
    """Ray task: :func:`attempt` of ``cfg`` with its group's source model, its profile and its
    method's tuned rate (``choice``; None without tuning). A failed profile fails ``cfg`` only
    if ``cfg`` measured it (``profiler``, as in a sequential run); another seed then profiles
    on its own. A failed rate search fails every row of that method, as in a sequential run."""
    from benchmarks.sweep.lr_choice import lr_key

    sources = _with_group(cfg, s, threads, group)
    sources.profiles.clear()
    if choice is not None:
        sources.lr_choices[lr_key(cfg, s)] = _unwrap(choice)
    profile = _unwrap(profile)
    if profiler or not isinstance(profile, BaseException):
        sources.profiles[sources.profile_key(cfg)] = profile
    return attempt(cfg, sources.s, sources)


def _require_ray():
    try:
        import ray
    except ImportError as e:
        raise RuntimeError(RAY_MISSING) from e
    return ray


class RayExecutor:
    """Configurations as Ray tasks (see the module docstring for the task graph)."""

    def __init__(self, address: str | None = None, *, cpus_per_task: float = 1,
                 gpus_per_task: float = 1, threads: int | None = None):
        self.address = address
        self.cpus_per_task = cpus_per_task
        self.gpus_per_task = gpus_per_task
        self.threads = threads or torch.get_num_threads()
        self._ray = None
        self._started = False

    def __enter__(self):
        return self

    def _connect(self):
        """Ray, initialised: connected to ``address``, or a local Ray started here (once a
        configuration is to run: a rerun with nothing left starts none)."""
        import signal

        ray = _require_ray()
        if not ray.is_initialized():
            # ray.init installs a SIGTERM handler of its own; keep the runner's
            sigterm = signal.getsignal(signal.SIGTERM)
            if self.address is not None:
                ray.init(address=self.address)
            else:
                ray.init(include_dashboard=False)
            self._started = True
            try:
                signal.signal(signal.SIGTERM, sigterm)
            except (ValueError, TypeError):  # not the main thread / not a Python handler
                pass
        self._ray = ray
        return ray

    def __exit__(self, *exc) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def run(self, todo: Sequence[Config], sources: SourceCache, note: Note) -> Iterator[Result]:
        from benchmarks.sweep.lr_choice import lr_key, tuning_config

        if not todo:
            return
        ray = self._connect()
        s = sources.s
        opts = {"num_cpus": self.cpus_per_task, "max_retries": 0,
                "num_gpus": self.gpus_per_task if s.device.startswith("cuda") else 0}
        group_fn, profile_fn, config_fn, lr_fn = (ray.remote(f).options(**opts) for f in (
            _group_task, _profile_task, _config_task, _lr_task))
        # each method's rate searched once (a task every seed and rank of it waits for), not
        # by every worker that runs one of them
        tune = bool(s.lr_grid) and s.lr is None and not s.profile_only
        choices: dict = dict(sources.lr_choices) if tune else {}  # a resumed sweep's rates
        groups: dict = {}  # group key -> its source model's ref, while configurations need it
        left: Counter = Counter(sources.group_key(c) for c in todo)
        profiles: dict = dict(sources.profiles)  # reused from disk (a resumed sweep)
        index: dict = {}
        note(f"submitting {len(todo)} configurations to Ray")
        for i, cfg in enumerate(todo):
            gk = sources.group_key(cfg)
            if gk not in groups:
                groups[gk] = group_fn.remote(cfg, s, self.threads)
            pk, profiler = sources.profile_key(cfg), False
            if pk not in profiles:
                profiles[pk] = profile_fn.remote(cfg, s, self.threads, groups[gk])
                profiler = True
            choice = None
            if tune:
                lk = lr_key(cfg, s)
                if lk not in choices:
                    tuned = tuning_config(cfg, s)
                    tk = sources.group_key(tuned)
                    if tk not in groups:
                        groups[tk] = group_fn.remote(tuned, s, self.threads)
                    choices[lk] = lr_fn.remote(cfg, s, self.threads, groups[tk])
                choice = choices[lk]
            ref = config_fn.remote(cfg, s, self.threads, groups[gk], profiles[pk], profiler,
                                   choice)
            index[ref] = i
        pending = list(index)
        try:
            while pending:
                note(f"{len(pending)} configurations running or queued on Ray")
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    i = index.pop(ref)
                    gk = sources.group_key(todo[i])
                    left[gk] -= 1
                    if not left[gk]:  # the object store may drop this source model now
                        del groups[gk]
                    yield (i, *self._get(ref))
        finally:  # Ctrl-C (or an error in the runner): nothing left behind on the cluster
            for ref in [*pending, *(r for r in (*profiles.values(), *choices.values())
                                    if isinstance(r, ray.ObjectRef)), *groups.values()]:
                try:
                    ray.cancel(ref)
                except Exception:  # already finished, or Ray is going away
                    pass

    def _get(self, ref) -> tuple[dict, str | None]:
        try:
            return self._ray.get(ref)
        except Exception as e:  # Ray could not run the task (its worker died, ...)
            msg = f"{type(e).__name__}: {e}"
            return ({"status": "failed", "error": msg[:1000], "wall_time_s": None,
                     "cpu_time_s": None, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                    msg)


def make_executor(name: str, *, address: str | None = None, cpus_per_task: float = 1,
                  gpus_per_task: float = 1, workers: int = 2):
    """The executor called ``name`` (one of :data:`EXECUTORS`)."""
    if name == "sequential":
        return SequentialExecutor()
    if name == "processes":
        return ProcessExecutor(workers, max(1, torch.get_num_threads() // workers))
    if name == "ray":
        return RayExecutor(address, cpus_per_task=cpus_per_task, gpus_per_task=gpus_per_task)
    raise ValueError(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")
