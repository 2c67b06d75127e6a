"""One configuration of the rank sweep: its source model (pretrained once, cached), its task,
fine-tuning over one seed and the profile of one update (once per configuration, shared by the
seeds). :mod:`benchmarks.sweep.runner` drives these over the grid and writes the results.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.sweep.cost import CostCache
from benchmarks.sweep.grid import Config, SweepSettings, method_config
from benchmarks.sweep.results import flatten


def _cap_per_class(ds, n: int, seed: int):
    """At most ``n`` images per class of ``ds`` (stratified, deterministic for ``seed``)."""
    from convpeft.data import stratified_indices

    counts = ds.labels.bincount()
    k = min(n, int(counts[counts > 0].min()))
    if k >= int(counts.max()):
        return ds
    idx, _ = stratified_indices(ds.labels, per_class=k, seed=seed)
    return ds.subset(idx)


class SourceCache:
    """Per (dataset, task, seed): the task data; per (model, dataset, task, seed) — a *group*,
    :meth:`group_key` — the source model: each built once and shared by all methods/ranks of
    that group. A group whose construction failed remembers the error, so its configurations
    fail fast with it. A group built in another process (a Ray task,
    :mod:`benchmarks.sweep.executor`) is handed in with :meth:`adopt`."""

    def __init__(self, settings: SweepSettings):
        self.s = settings
        self._tasks: dict[tuple, object] = {}
        self._sources: dict[tuple, object] = {}
        # (model, dataset, task, seed) -> zero-shot (target, source) accuracy of the source model
        self.zero_shot: dict[tuple, tuple[float, float]] = {}
        # (model, dataset, task, method, rank) -> the profile columns of that configuration,
        # measured at one seed and copied into the rows of the others (see profile_columns)
        self.profiles: dict[tuple, dict] = {}
        # the cost_* columns at the deployment size, once per configuration and head size
        self.costs = CostCache(settings)
        # (model, dataset, task, method, update_blocks) -> its tuned learning rate (LrChoice)
        self.lr_choices: dict[tuple, object] = {}

    def profile_key(self, cfg: Config) -> tuple:
        """What one update's cost depends on within a sweep: everything but the seed."""
        return (cfg.model, self.s.dataset_for(cfg.task), cfg.task, cfg.method, cfg.rank,
                cfg.update_blocks)

    def reuse_profiles(self, rows: Sequence[dict], keys: set[str]) -> int:
        """Remember the profile columns of the ``ok`` rows whose key is in ``keys`` (this
        sweep's grid, so the same settings), so a resumed sweep profiles no configuration
        twice. Returns how many configurations that covers."""
        for r in rows:
            if r.get("status") == "ok" and r.get("key") in keys:
                k = r.get("update_blocks")
                pk = (r["model"], r["dataset"], r["task"], r["method"], r.get("rank"),
                      None if k in (None, "") else int(k))
                self.profiles.setdefault(pk, profile_columns(r))
        return len(self.profiles)

    def task(self, cfg: Config):
        from convpeft.data import build_task

        key = (self.s.dataset_for(cfg.task), cfg.task, cfg.seed)
        if key not in self._tasks:
            try:
                shared = self.s.source_seed is not None
                self._tasks[key] = build_task(
                    cfg.task,
                    self.s.dataset_for(cfg.task),
                    corruption=self.s.corruption if cfg.task == "shift" else None,
                    severity=self.s.severity if cfg.task == "shift" else None,
                    data_root=self.s.data_root,
                    # one source model and split for every seed, or each seed its own
                    seed=self.s.source_seed if shared else cfg.seed,
                    few_shot_seed=cfg.seed if shared else None,
                    resolution=self.s.resolution,
                    few_shot=self.s.few_shot,
                    val_per_class=self.s.val_per_class,
                    **({"replay_per_class": self.s.replay_per_class,
                        "test_unused": self.s.test_unused}
                       if cfg.task == "new_classes" else {}),
                )
                if self.s.test_per_class is not None:
                    t = self._tasks[key]
                    t.target_test = _cap_per_class(t.target_test, self.s.test_per_class, cfg.seed)
                    t.source_test = _cap_per_class(t.source_test, self.s.test_per_class, cfg.seed)
            except Exception as e:  # remembered: every config of the group fails with it
                self._tasks[key] = e
        t = self._tasks[key]
        if isinstance(t, Exception):
            raise t
        return t

    def cost(self, cfg: Config) -> dict:
        """The ``cost_*`` columns of ``cfg`` at the deployment size (:mod:`benchmarks.sweep.cost`;
        the head as large as the task's after adaptation)."""
        return self.costs.columns(cfg, self.task(cfg).num_classes)

    def group_key(self, cfg: Config) -> tuple:
        """What the source model depends on: (model, dataset, task, seed), the seed being
        ``source_seed`` when every seed shares one source model."""
        seed = cfg.seed if self.s.source_seed is None else self.s.source_seed
        return (cfg.model, self.s.dataset_for(cfg.task), cfg.task, seed)

    def lr_choice(self, cfg: Config):
        """The tuned learning rate of ``cfg``'s method (:mod:`benchmarks.sweep.lr_choice`):
        searched by the first configuration that asks, then shared."""
        from benchmarks.sweep.lr_choice import choose_lr, lr_key, tuning_config

        key = lr_key(cfg, self.s)
        if key not in self.lr_choices:
            tuned = tuning_config(cfg, self.s)
            try:
                source, _ = self.source(tuned)
                zs = self.zero_shot.get((self.group_key(tuned), tuned.seed))
                self.lr_choices[key] = choose_lr(cfg, self.s, source, self.task(tuned), zs)
                res = self.lr_choices[key].result
                self.zero_shot[(self.group_key(tuned), tuned.seed)] = (
                    res.zero_shot_acc, res.zero_shot_source_acc)
            except Exception as e:  # remembered: the method's other rows fail with it
                self.lr_choices[key] = e
        choice = self.lr_choices[key]
        if isinstance(choice, Exception):
            raise choice
        return choice

    def reuse_lr_choices(self, rows: Sequence[dict], keys: set[str] | None) -> int:
        """Remember the tuned rates of the ``ok`` rows whose key is in ``keys`` (a resumed
        sweep tunes no method twice; None: every row, another run's whose rates are to be
        reused). Returns how many methods that covers."""
        from benchmarks.sweep.lr_choice import LrChoice, lr_key, tuning_config

        for r in rows:
            if (r.get("status") == "ok" and (keys is None or r.get("key") in keys)
                    and r.get("lr_source") == "tuned"):
                k = r.get("update_blocks")
                cfg = Config(r["model"], r["task"], r["method"],
                             None if r.get("rank") in (None, "") else int(r["rank"]),
                             int(r["seed"]), None if k in (None, "") else int(k))
                self.lr_choices.setdefault(lr_key(cfg, self.s), LrChoice(
                    float(r["lr"]), r.get("lr_grid_val") or "", tuning_config(cfg, self.s)))
        return len(self.lr_choices)

    def has_source(self, cfg: Config) -> bool:
        return self.group_key(cfg) in self._sources

    def adopt(self, cfg: Config, entry) -> None:
        """Use ``entry`` — what :meth:`source` returns, or the exception that building it
        raised — as the source of ``cfg``'s group (built elsewhere, e.g. by a Ray task)."""
        self._sources[self.group_key(cfg)] = entry

    def forget_sources(self) -> None:
        """Drop the source models and task data held so far (a long-lived worker's memory)."""
        self._sources.clear()
        self._tasks.clear()
        self.zero_shot.clear()
        self.lr_choices.clear()

    def source(self, cfg: Config):
        """(source model on the CPU, extra row fields) for ``cfg``'s group."""
        key = self.group_key(cfg)
        if key not in self._sources:
            try:
                self._sources[key] = self._build_source(cfg)
            except Exception as e:
                self._sources[key] = e
        src = self._sources[key]
        if isinstance(src, Exception):
            raise src
        return src

    def _build_source(self, cfg: Config):
        from convpeft.core.layer_kinds import layer_kind
        from convpeft.models import build_model

        task = self.task(cfg)
        seed = self.group_key(cfg)[-1]  # the source seed: every seed's group builds the same
        t0, c0 = time.perf_counter(), time.process_time()
        if self.s.profile_only:
            torch.manual_seed(seed)
            model = build_model(cfg.model, task.source_num_classes, small_input=self.s.small_input)
        else:
            from convpeft.train import pretrain

            kw = {}
            if self.s.pretrain_epochs is not None:
                kw["epochs"] = self.s.pretrain_epochs
            if self.s.pretrain_batch_size is not None:
                kw["batch_size"] = self.s.pretrain_batch_size
            model = pretrain(cfg.model, task.dataset, task=task, seed=seed,
                             small_input=self.s.small_input, resolution=self.s.resolution,
                             data_root=self.s.data_root, device=self.s.device, progress=False,
                             **kw)
        kinds = [layer_kind(m) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        pinfo = getattr(model, "pretrain_info", {}) or {}
        info = {
            "source_time_s": time.perf_counter() - t0,
            "source_cpu_time_s": time.process_time() - c0,
            "source_cached": pinfo.get("cached"),
            "source_test_acc": pinfo.get("source_test_acc"),
            # equal across machines exactly when the source weights are bit-identical
            "source_weights_sha256": pinfo.get("weights_sha256"),
            "n_convs": len(kinds),
            "n_depthwise_convs": sum(k == "depthwise" for k in kinds),
        }
        return model.cpu(), info

    def profile(self, cfg: Config) -> dict:
        """The profile columns of ``cfg``'s configuration: measured by the first seed that asks
        (:func:`_profile`), then the same dict for the other seeds. A stored exception (a
        failure measured elsewhere for this very configuration) is raised."""
        pkey = self.profile_key(cfg)
        if pkey not in self.profiles:
            source, _ = self.source(cfg)
            self.profiles[pkey] = _profile(cfg, self.s, source, self.task(cfg),
                                           method_config(cfg, self.s), torch.device(self.s.device))
        prof = self.profiles[pkey]
        if isinstance(prof, BaseException):
            raise prof
        return prof


_PROFILE_EXTRA = ("profile_time_s", "profile_seed", "trainable_params", "total_params",
                  "adapter_bytes", "bn_stats_bytes", "galore_projected_weights",
                  "galore_fallback_weights", "galore_plain_adamw")


def profile_columns(row: dict) -> dict:
    """The columns of ``row`` that one profiled update determines (FLOPs, memory, step time,
    parameter counts, adapter size on disk; the flattened :class:`UpdateProfile` fields and
    their nested ``memory_by_category_*``-style children): the same for every seed of a
    configuration. ``profile_seed`` defaults to the row's seed for rows written before it
    existed."""
    from convpeft.profiler import UpdateProfile

    names = [f.name for f in dataclasses.fields(UpdateProfile)]
    out = {k: v for k, v in row.items()
           if k in _PROFILE_EXTRA or any(k == f or k.startswith(f + "_") for f in names)}
    out.setdefault("profile_seed", row.get("seed"))
    return out


def _trainable_bytes(model: torch.nn.Module, bn_policy: str | None) -> tuple[int, int]:
    """(bytes of a safetensors file of the trainable tensors, bytes of the BN running stats file
    when the BN policy changes them). The first is what a device must receive to apply the
    update besides the unchanged base model."""
    from safetensors.torch import save_file

    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                 if p.requires_grad}
    stats = {}
    if bn_policy in ("train", "stats"):
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                for bn in ("running_mean", "running_var"):
                    t = getattr(m, bn)
                    if t is not None:
                        stats[f"{n}.{bn}"] = t.detach().cpu().contiguous()
    sizes = []
    with tempfile.TemporaryDirectory() as d:
        for name, tensors in (("adapter", trainable), ("bn", stats)):
            if not tensors:
                sizes.append(0)
                continue
            path = Path(d) / f"{name}.safetensors"
            save_file(tensors, str(path))
            sizes.append(path.stat().st_size)
    return sizes[0], sizes[1]


def run_config(cfg: Config, settings: SweepSettings, sources: SourceCache) -> dict:
    """Run one configuration; returns its result fields (raises on failure).

    The profiled update runs on its own freshly prepared copy of the source model: what one
    update costs does not depend on the weights' values, and this way the profiler's extra
    optimizer steps can never leak into the fine-tuned model whose accuracy is reported. For
    the same reason it runs once per configuration: a later seed copies the profile columns
    from ``sources.profiles`` (``profile_seed`` names the seed that measured them).
    """
    dev = torch.device(settings.device)
    task = sources.task(cfg)
    source, info = sources.source(cfg)
    row: dict = dict(info)
    row.update(n_target_train=len(task.target_train), n_target_test=len(task.target_test),
               n_source_test=len(task.source_test),
               n_target_val=0 if task.target_val is None else len(task.target_val),
               corruption=task.corruption,
               severity=task.severity)
    mcfg = method_config(cfg, settings)
    choice = None
    if settings.lr_grid and settings.lr is None and not settings.profile_only:
        choice = sources.lr_choice(cfg)
        mcfg.lr = choice.lr
        t = choice.tuned
        row.update(lr_grid_val=choice.grid_text, lr_tuned_on=f"seed {t.seed}" + (
            "" if t.rank is None else f", rank {t.rank}"))
    row["bn"], row["lr"] = mcfg.bn, mcfg.resolved_lr
    row["lr_source"] = ("tuned" if choice is not None else "flag" if settings.lr is not None
                        else "default")
    row["schedule"] = settings.schedule

    # --- cost of one update at the training batch size, on real target images: once per
    # configuration (the first seed that gets here), copied into the rows of the other seeds
    row.update(sources.profile(cfg))
    # --- cost of one update at the deployment size (--cost-at), on the device: what the
    # figures and findings report (the proxy-size profile above stays for comparisons)
    row.update(sources.cost(cfg))

    # --- accuracy: fine-tune a fresh copy of the source model (finetune copies it)
    if not settings.profile_only:
        from convpeft.train import finetune

        # Same global RNG state for every method of a group: the new-class head rows and the
        # adapters are drawn from it, so zero-shot accuracy is identical across the group.
        torch.manual_seed(cfg.seed)
        # The zero-shot baseline depends on (source model, task, seed) only: evaluate it once
        # per group and hand it to the group's other methods.
        # (with one shared source model the test split may still differ per seed)
        zs_key = (sources.group_key(cfg), cfg.seed)
        if choice is not None and choice.result is not None and choice.tuned == cfg:
            res = choice.result  # the tuning run with the chosen rate is this very run
        else:
            res = finetune(source, mcfg, task, epochs=settings.epochs,
                           steps=settings.steps_for(cfg.task),
                           batch_size=settings.batch_size, seed=cfg.seed, device=dev,
                           progress=False, copy_model=True, eval_every_epoch=False,
                           keep_model=True, zero_shot=sources.zero_shot.get(zs_key),
                           amp=settings.amp, precise_bn=settings.precise_bn,
                           schedule=settings.schedule, warmup=settings.warmup,
                           memory_format=settings.memory_format)
        sources.zero_shot[zs_key] = (res.zero_shot_acc, res.zero_shot_source_acc)
        for k in ("zero_shot_acc", "zero_shot_source_acc", "target_acc", "source_acc",
                  "forgetting", "recovered_fraction", "train_time_s", "val_acc", "steps",
                  "memory_format"):
            row[k] = getattr(res, k, None)
        if res.history:
            row["final_train_loss"] = res.history[-1].get("loss")
        if res.model is not None:
            row["adapter_bytes"], row["bn_stats_bytes"] = _trainable_bytes(res.model, mcfg.bn)
    return row


def _profile(cfg: Config, settings: SweepSettings, source: torch.nn.Module, task, mcfg,
             dev: torch.device) -> dict:
    """Profile one update of ``cfg`` on a prepared copy of ``source``: the row's profile
    columns (:func:`profile_columns`), the adapter size on disk included."""
    from convpeft.methods import prepare
    from convpeft.models import expand_head
    from convpeft.profiler import profile_update

    model = copy.deepcopy(source)
    if task.num_new_classes:
        expand_head(model, task.num_new_classes)
    model.to(dev)
    torch.manual_seed(cfg.seed)
    prepared = prepare(model, mcfg)
    x, y = next(task.target_train.batches(settings.batch_size, shuffle=False, device=dev))
    prepared.train_mode()  # the BN policy decides what the update saves/updates
    t0 = time.perf_counter()
    # memory_peak in the rows is tensor-level on the CPU: exact and the same on every CPU
    # model, so runs on two machines compare (benchmarks.compare_runs); what a device holds
    # beyond it (oneDNN scratch) is benchmarks.device_truth's and the planner's subject
    prof = profile_update(prepared.model, prepared.optimizer, x, y,
                          warmup=1, repeat=settings.profile_repeat, amp=settings.amp,
                          allocator_peak=None if dev.type == "cuda" else False)
    out: dict = {"profile_time_s": time.perf_counter() - t0, "profile_seed": cfg.seed}
    out.update(flatten(prof.to_dict()))
    out["trainable_params"] = int(prepared.trainable_params)
    out["total_params"] = int(sum(p.numel() for p in prepared.model.parameters()))
    if hasattr(prepared.report, "fallback"):  # GaLore: weights whose rank made it plain AdamW
        n_proj, n_fb = len(prepared.report.projected), len(prepared.report.fallback)
        out["galore_projected_weights"], out["galore_fallback_weights"] = n_proj, n_fb
        # rank >= the smaller side of every targeted weight: this row is plain AdamW
        out["galore_plain_adamw"] = n_proj == 0 and n_fb > 0
    # the size of what a device must receive: shapes only, like the rest of the profile
    out["adapter_bytes"], out["bn_stats_bytes"] = _trainable_bytes(prepared.model, mcfg.bn)
    del model, prepared
    return out


