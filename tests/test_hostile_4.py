"""Hostile and careless use, fourth pass (issue 34): sparse updates, precise BN, LoRA-FA
calibration, the device-model cache and the sweep's new axes.

A call that fails leaves the model exactly as it was; stale reports undo only what they did;
the techniques that swap forwards compose and undo in any order; a silent no-op is an error
or does its job; CLIs answer bad input with exit 2 and one line naming the argument; damaged
caches and result lines are skipped with a warning naming the file."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from convpeft import checkpoint_blocks, lean_activations, sparse_update
from convpeft.memory.sparse import restore_sparse
from convpeft.methods import MethodConfig, prepare

from conftest import assert_one_line_error

CPU = torch.device("cpu")


def _resnet() -> nn.Module:
    """ResNet18's layout with one block per stage (4 blocks), BN in the stem."""
    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)


def snapshot(model: nn.Module) -> tuple:
    """Modules, values, trainability, modes and every instance attribute name."""
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        [(n, m.training, sorted(k for k in m.__dict__ if not k.startswith("_")
                                 or k.startswith("_convpeft")))
         for n, m in model.named_modules()],
        [(n, "forward" in m.__dict__) for n, m in model.named_modules()],
    )


def assert_same(model: nn.Module, snap: tuple) -> None:
    now = snapshot(model)
    assert now[0] == snap[0]
    assert now[2] == snap[2]
    assert now[3] == snap[3]
    assert now[4] == snap[4]
    assert now[1].keys() == snap[1].keys()
    for k in now[1]:
        assert torch.equal(now[1][k], snap[1][k]), k


def _forwards(model: nn.Module) -> int:
    return sum("forward" in m.__dict__ for m in model.modules())


# ----------------------------------------------------------------------------- item 1


@pytest.mark.parametrize("cfg", [
    dict(name="lora", update_blocks=1, prefix_chunks=2, prefix_bn="model", lean=True),
    dict(name="galore", update_blocks=0),
])
def test_prepare_that_fails_changes_nothing(cfg):
    model = _resnet()
    snap = snapshot(model)
    with pytest.raises(ValueError):
        prepare(model, MethodConfig(**cfg))
    assert_same(model, snap)
    assert _forwards(model) == 0
    assert not any(hasattr(m, "base_layer") for m in model.modules())


def test_prepare_refuses_chunked_model_bn_before_any_setup():
    """The prefix-BN refusal comes from the plain model, before adapters exist: the message is
    the sparse one, and a retry with good input works."""
    model = _resnet()
    with pytest.raises(ValueError, match="prefix_bn='model' with prefix_chunks > 1"):
        prepare(model, MethodConfig("lora", update_blocks=1, prefix_chunks=2,
                                    prefix_bn="model"))
    prep = prepare(model, MethodConfig("lora", rank=2, update_blocks=1, prefix_chunks=2))
    assert prep.extra["sparse"].prefix_chunks == 2


def test_a_setup_interrupted_midway_is_undone():
    """The transaction covers any exception, an interrupt included: here the optimizer
    cannot be built, after adapters, flags and forwards have all been set."""
    model = _resnet()
    snap = snapshot(model)
    original = torch.optim.AdamW

    class Boom(KeyboardInterrupt):
        pass

    def broken(*a, **k):
        raise Boom

    torch.optim.AdamW = broken
    try:
        with pytest.raises(Boom):
            prepare(model, MethodConfig("lora", rank=2, lean=True, checkpoint=True))
    finally:
        torch.optim.AdamW = original
    assert_same(model, snap)


# ----------------------------------------------------------------------------- item 2


def test_a_stale_sparse_report_leaves_the_newer_split_whole():
    model = _resnet().requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    stale = sparse_update(model, 2)
    newer = sparse_update(model, 1)
    want = model(x)
    n = _forwards(model)
    assert stale.undo() == 0  # every module it wrapped is the newer call's now
    assert _forwards(model) == n
    assert torch.equal(model(x), want)  # the newer split still runs as a chain
    assert newer.undo() == len(newer.prefix)
    assert _forwards(model) == 0


@pytest.mark.parametrize("order", ["lean-sparse", "sparse-lean"])
@pytest.mark.parametrize("undo", ["lean-first", "sparse-first"])
def test_lean_and_sparse_compose_and_undo_in_any_order(order, undo):
    """Applied in either order, the stem is lean and sparse at once; undone in either order,
    what stays runs exactly and nothing is left over."""
    model = _resnet().requires_grad_(False)
    model.fc.requires_grad_(True)
    model.layer4.requires_grad_(True)
    x = torch.randn(4, 3, 32, 32)
    plain = copy.deepcopy(model)

    def grads(m):
        m.zero_grad(set_to_none=True)
        out = m(x)
        out.square().sum().backward()
        return out.detach(), m.fc.weight.grad.clone()

    if order == "lean-sparse":
        lean = lean_activations(model)
        sparse = sparse_update(model, 1, prefix_chunks=2)
    else:
        sparse = sparse_update(model, 1, prefix_chunks=2)
        lean = lean_activations(model)
    assert model.conv1.forward.__func__.__name__ == "_sparse_forward"
    assert "conv1" in [r.name for r in lean.lean]
    model.eval()  # BN frozen, so every layer of the stem is lean or passes through
    plain.eval()
    want = grads(plain)
    for got, ref in zip(grads(model), want, strict=True):
        assert torch.allclose(got, ref, atol=1e-5)
    first, second = (lean, sparse) if undo == "lean-first" else (sparse, lean)
    first.undo()
    for got, ref in zip(grads(model), want, strict=True):
        assert torch.allclose(got, ref, atol=1e-5)
    second.undo()
    assert _forwards(model) == 0
    assert not any(k.startswith("_convpeft") for m in model.modules() for k in m.__dict__)


def test_checkpoint_composes_with_sparse_in_any_order():
    model = _resnet().requires_grad_(False).eval()  # BN statistics fixed: outputs comparable
    model.layer4.requires_grad_(True)
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    sparse = sparse_update(model, 1)
    ck = checkpoint_blocks(model, blocks=["layer1", "layer4"])  # layer1: also in the prefix
    assert model.layer1.forward.__func__.__name__ == "_sparse_forward"
    out = model(x)
    out.sum().backward()
    assert torch.allclose(out, want, atol=1e-5)
    ck.undo()
    assert torch.allclose(model(x), want, atol=1e-5)
    assert model.layer1.forward.__func__.__name__ == "_sparse_forward"
    sparse.undo()
    assert _forwards(model) == 0


# ----------------------------------------------------------------------------- item 3


def test_lean_after_a_sparse_update_keeps_the_split_running():
    model = _resnet().requires_grad_(False).eval()
    model.fc.requires_grad_(True)
    x = torch.randn(4, 3, 32, 32)
    want = model(x)
    report = sparse_update(model, 1, prefix_chunks=2)
    lean_activations(model)
    assert torch.allclose(model(x), want, atol=1e-5)  # no "not a chain" error
    assert model.conv1.forward.__func__.__name__ == "_sparse_forward"
    report.undo()
    assert model.conv1.forward.__func__.__name__ == "_conv_forward"
    assert restore_sparse(model) == 0


def test_lean_leaves_a_foreign_instance_forward_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).requires_grad_(False)
    mine = lambda x: x + 1  # noqa: E731
    model[0].forward = mine
    report = lean_activations(model)
    assert model[0].forward is mine
    assert "forward replaced" in next(r.reason for r in report.rows if r.name == "0")
    report.undo()
    assert model[0].forward is mine


# ----------------------------------------------------------------------------- item 4


def _tiny_data(n: int = 8, seed: int = 0):
    from convpeft.data import ImageDataset

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    return ImageDataset(images, torch.zeros(n, dtype=torch.int64), ["a"])


def test_adapt_prefix_bn_after_prepare_still_re_estimates_the_prefix():
    """The natural order of a custom loop: prepare first, then AdaBN for the prefix."""
    from convpeft.train import adapt_prefix_bn

    data = _tiny_data()
    cfg = MethodConfig("full", update_blocks=1, prefix_chunks=2, prefix_stats="target")
    before = _resnet()
    n_before = adapt_prefix_bn(before, cfg.split(before), data, batch_size=4, device=CPU)
    model = _resnet()
    prep = prepare(model, cfg)
    source = model.bn1.running_mean.clone()
    n = adapt_prefix_bn(model, cfg.split(model), data, batch_size=4, device=CPU)
    assert n == n_before > 0
    assert not torch.equal(model.bn1.running_mean, source)
    assert torch.allclose(model.bn1.running_mean, before.bn1.running_mean, atol=1e-6)
    # afterwards the prefix is held in eval mode again
    prep.train_mode()
    after = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 16, 16))
    assert torch.equal(model.bn1.running_mean, after)


def test_adapt_prefix_bn_refuses_a_split_of_another_model():
    from convpeft.memory.sparse import sparse_split
    from convpeft.train import adapt_prefix_bn

    other = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
                          nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)),
                          nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)))
    split = sparse_split(_resnet(), 1)
    with pytest.raises(ValueError, match="does not have; pass the split of this model"):
        adapt_prefix_bn(other, split, _tiny_data(), batch_size=4, device=CPU)


# ----------------------------------------------------------------------------- item 14 (model)


def test_recalibrate_bn_refuses_batch_size_zero_before_touching_anything():
    from convpeft.train import recalibrate_bn

    model = _resnet()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        recalibrate_bn(model, _tiny_data(), batch_size=0, device=CPU)
    assert_same(model, snap)


def test_recalibrate_bn_takes_a_dataloader_as_calibrate_frozen_a_does():
    from convpeft.train import recalibrate_bn

    data = _tiny_data()
    a, b = _resnet(), _resnet()
    n = recalibrate_bn(a, data, batch_size=4, device=CPU)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    assert recalibrate_bn(b, loader, batch_size=4, device=CPU) == n > 0
    assert torch.allclose(a.bn1.running_mean, b.bn1.running_mean, atol=1e-6)


def _fa_model() -> nn.Module:
    model = _resnet()
    prepare(model, MethodConfig("lora-fa", rank=2))
    return model


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_calibrate_frozen_a_refuses_non_finite_data_naming_it(bad):
    from convpeft.adapters import calibrate_frozen_a

    model = _fa_model()
    snap = snapshot(model)
    x = torch.randn(4, 3, 16, 16)
    if bad == "nan":
        x[1, 0, 2, 3] = float("nan")
    else:
        x.fill_(float("inf"))
    with pytest.raises(ValueError, match="contains NaN or inf"):
        calibrate_frozen_a(model, [x])
    assert_same(model, snap)


def test_calibrate_frozen_a_on_wrong_channels_gets_the_conv_s_own_message():
    from convpeft.adapters import calibrate_frozen_a

    model = _fa_model()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="expected input.*to have 3 channels"):
        calibrate_frozen_a(model, [torch.randn(2, 4, 16, 16)])
    assert_same(model, snap)


# ----------------------------------------------------------------------------- items 9-10


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty calibration cache of our own; yields the CPU entry's path."""
    from convpeft.profiler.scratch import _cache_file

    monkeypatch.setenv("CONVPEFT_CACHE", str(tmp_path / "cache"))
    path = _cache_file("cpu")
    path.parent.mkdir(parents=True)
    return path


@pytest.mark.parametrize("damage", ["nan", "huge", "block0", "negative", "short", "garbage"])
def test_a_damaged_cache_entry_is_skipped_with_a_warning_naming_it(cache, damage):
    import json

    from convpeft.profiler.scratch import default_model, scratch_model

    good = json.loads(default_model("cpu").to_json())
    key = "conv_fwd/standard/s1"
    if damage == "nan":
        good["coef"][key][0] = float("nan")
    elif damage == "huge":
        good["coef"][key][0] = 1e308
    elif damage == "block0":
        good["block"] = 0
    elif damage == "negative":
        good["coef"][key][1] = -3.0
    elif damage == "short":
        good["coef"][key] = [1.0]
    text = "{not json" if damage == "garbage" else json.dumps(good)
    cache.write_text(text)
    with pytest.warns(RuntimeWarning, match="damaged device-model cache") as w:
        model = scratch_model("cpu")
    assert str(cache) in str(w[0].message) and "--calibrate" in str(w[0].message)
    assert model == default_model("cpu")


def test_a_damaged_cache_entry_does_not_break_a_plan(cache):
    """What a damaged file did: every plan on the machine failed (NaN: 'use a larger
    resolution'; 1e308: OverflowError; block 0: ZeroDivisionError)."""
    from convpeft.planner import plan

    cache.write_text('{"device": "cpu", "block": 0, "coef": {}, "source": "x"}')
    with pytest.warns(RuntimeWarning, match=str(cache.name)):
        rows = plan("resnet18", "512MiB", resolution=32, methods=["head"], batch=2)
    assert rows[0].fits


@pytest.mark.parametrize("coef", [float("nan"), float("inf"), 1e308, -1.0])
def test_a_scratch_model_that_cannot_predict_bytes_is_refused(coef):
    from convpeft.profiler.scratch import ScratchModel

    with pytest.raises(ValueError, match="coefficients are finite"):
        ScratchModel("cpu", 16, {"conv_fwd": [coef, 0.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match="block must be one of"):
        ScratchModel("cpu", 0)


def test_calibration_save_does_not_write_through_a_planted_link(cache, tmp_path):
    from convpeft.profiler.scratch import ScratchModel, save_calibration, scratch_model

    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    for name in (cache.with_suffix(".tmp"), cache):  # the old fixed temp name, the entry
        name.symlink_to(outside)
    model = ScratchModel("cpu", 8, {"conv_fwd": [1.0, 0.0, 0.0, 0.0]}, "test")
    assert save_calibration(model, "cpu") == cache
    assert outside.read_text() == "precious"
    assert cache.is_file() and not cache.is_symlink()
    assert scratch_model("cpu") == model
    assert sorted(p.name for p in cache.parent.iterdir()) == sorted(
        [cache.name, cache.with_suffix(".tmp").name])  # no temporary folder left over


# ----------------------------------------------------------------------------- items 11-12


def _row(**kw) -> dict:
    row = dict(key="k", model="resnet18", dataset="digits", task="shift", method="lora",
               rank=4, seed=0, status="ok", target_acc=0.5, flops_total=1000,
               memory_peak=4096, trainable_params=10, update_blocks=2)
    row.update(kw)
    return row


def test_a_results_line_with_a_mistyped_update_blocks_is_skipped(tmp_path):
    import json

    from benchmarks.sweep.results import ResultsStore

    lines = [_row(key="a"), _row(key="b", update_blocks="two"), _row(key="c", prefix_chunks="x")]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.warns(UserWarning, match=r"results\.jsonl: skipped 2 unreadable line.*line 2: "
                      "'update_blocks' is 'two'"):
        store = ResultsStore(tmp_path)
    assert store.done_keys() == {"a"}
    assert (tmp_path / "results_summary.csv").is_file()


def test_compare_runs_skips_a_csv_line_with_a_bad_rank(tmp_path, capsys):
    from benchmarks.sweep.compare_runs import main
    from benchmarks.sweep.results import write_csv

    good = [_row(key=f"s{s}", seed=s, target_acc=0.5 + 0.01 * s) for s in range(3)]
    write_csv(tmp_path / "a.csv", good)
    write_csv(tmp_path / "b.csv", [*good, _row(key="bad", rank="abc", seed=9)])
    with pytest.warns(UserWarning, match=r"b\.csv: skipped 1 .*'rank' is 'abc'"):
        assert main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]) == 0
    assert "Verdict: reproduced." in capsys.readouterr().out


def test_compare_runs_of_a_profile_only_run_against_itself(tmp_path, capsys):
    """No accuracy at all: the costs decide, and the count says what was compared."""
    from benchmarks.sweep.compare_runs import main
    from benchmarks.sweep.results import write_csv

    rows = [_row(key=f"m{i}", method=m, rank=None, target_acc=None, seed=0)
            for i, m in enumerate(("full", "head"))]
    write_csv(tmp_path / "a.csv", rows)
    assert main([str(tmp_path / "a.csv"), str(tmp_path / "a.csv")]) == 0
    out = capsys.readouterr().out
    assert "equal in all 2 shared configurations" in out and "Verdict: reproduced." in out
    write_csv(tmp_path / "b.csv", [_row(key="z", model="other", target_acc=None)])
    assert main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]) == 1
    assert "no configuration is in both runs" in capsys.readouterr().out


def test_readme_figures_with_a_root_without_readme(tmp_path, capsys):
    from benchmarks.readme_figures import main

    with pytest.raises(SystemExit) as e:
        main(["--check", "--root", str(tmp_path)])
    assert e.value.code == 2
    assert_one_line_error(capsys, "--root", "no README.md")


def test_plot_reference_from_outside_the_repository(tmp_path, monkeypatch, capsys):
    from benchmarks.plots.make import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--reference"])
    assert e.value.code == 2
    assert_one_line_error(capsys, "--reference", "repository's root")
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- items 5-8


def test_plan_refuses_prefix_chunks_without_blocks(capsys):
    from convpeft.plan import main

    with pytest.raises(SystemExit) as e:
        main(["--model", "resnet18", "--budget", "512MiB", "--prefix-chunks", "8"])
    assert e.value.code == 2
    assert_one_line_error(capsys, "--blocks", "--prefix-chunks")


@pytest.mark.parametrize("argv, needles", [
    (["--methods", "lora", "--update-blocks", "0"], ("lora", "no row", "head only")),
    (["--methods", "head,lora", "--update-blocks", "0"], ("lora", "no row")),
    (["--methods", "lora", "--prefix-stats", "target", "--prefix-chunks", "4"],
     ("--prefix-chunks and --prefix-stats", "--update-blocks")),
])
def test_rank_sweep_refuses_sparse_axes_that_do_nothing(argv, needles, tmp_path, capsys):
    from benchmarks import rank_sweep

    with pytest.raises(SystemExit) as e:
        rank_sweep.main([*argv, "--models", "resnet18", "--ranks", "2", "--profile-only",
                         "--out", str(tmp_path / "out"), "--dry-run"])
    assert e.value.code == 2
    assert_one_line_error(capsys, *needles)
    assert not (tmp_path / "out" / "findings.md").exists()


def test_rank_sweep_keys_of_plain_rows_ignore_a_preset_s_sparse_settings(tmp_path):
    """The budget preset's prefix settings (8 chunks, target statistics) would change the key
    of every row of a run that has no sparse row, so an identical earlier run (the same
    preset's plain rows) would no longer be resumed."""
    from benchmarks.sweep.cli import build_parser, plan_from_args

    common = ["--preset", "budget", "--models", "resnet18", "--profile-only",
              "--out", str(tmp_path)]
    plain = plan_from_args(build_parser().parse_args([*common, "--update-blocks", "all"]))
    assert (plain.settings.prefix_chunks, plain.settings.prefix_stats) == (1, "source")
    sparse = plan_from_args(build_parser().parse_args([*common, "--update-blocks", "all,2"]))
    assert (sparse.settings.prefix_chunks, sparse.settings.prefix_stats) == (8, "target")


# ----------------------------------------------------------------------------- items 13-14


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_plan_for_cuda_without_a_gpu_does_not_blame_the_resolution(capsys):
    from convpeft.plan import main

    with pytest.raises(SystemExit) as e:
        main(["--model", "resnet18", "--resolution", "32", "--budget", "512MiB", "--methods",
              "head", "--device", "cuda"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU here" in err and "larger resolution" not in err


def test_profiler_cli_on_a_model_whose_output_is_not_logits(capsys):
    """GoogLeNet returned auxiliary logits in train mode (was: TypeError traceback); it is now
    built without its auxiliary classifiers (issue 36) and profiles, and a model whose output
    is still not a tensor of logits is refused in one line naming what it returned."""
    from convpeft.profiler.cli import main
    from convpeft.profiler.engine import forward_loss

    assert main(["--model", "googlenet", "--method", "head", "--analytic", "--batch", "2",
                 "--resolution", "64", "--no-torch"]) == 0

    class Pair(nn.Module):
        def forward(self, x):
            return x.mean((2, 3)), x.amax((2, 3))

    with pytest.raises(ValueError, match=r"returned tuple, not a tensor of logits"):
        forward_loss(Pair(), torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long),
                     nn.CrossEntropyLoss())


def test_any_exception_from_a_model_is_a_clean_error():
    """ViT asserts its input size (was: AssertionError traceback)."""
    from convpeft.profiler.engine import forward_loss

    class Asserts(nn.Module):
        def forward(self, x):
            assert x.shape[-1] == 224, "Wrong image height!"
            return x

    with pytest.raises(ValueError, match=r"failed on a batch of shape \(1, 3, 64, 64\): Wrong"):
        forward_loss(Asserts(), torch.randn(1, 3, 64, 64), torch.zeros(1, dtype=torch.long),
                     nn.CrossEntropyLoss())


# ----------------------------------------------------------------------------- the one pattern


def test_model_transaction_puts_back_children_hooks_flags_and_buffers():
    from convpeft.core.atomic import model_transaction

    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.Sequential(shared))
    before = model[0].register_forward_hook(lambda *a: None)  # made outside: must still work
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="late"), model_transaction(model):
        model[0] = nn.Identity()
        model[1].register_forward_pre_hook(lambda *a: None)
        model[1].momentum = None
        model[1].running_mean.fill_(7.0)
        model[2][0].weight.requires_grad_(False)
        model.train(False)
        raise RuntimeError("late")
    assert_same(model, snap)
    assert not model[1]._forward_pre_hooks and model[1].momentum == 0.1
    assert model[2][0] is shared
    before.remove()
    assert not model[0]._forward_hooks


def test_a_foreign_forward_under_a_sparse_update_runs_and_comes_back():
    model = _resnet().requires_grad_(False).eval()
    calls = []
    plain = model.maxpool.forward

    def mine(x):
        calls.append(1)
        return plain(x)

    model.maxpool.forward = mine
    x = torch.randn(2, 3, 32, 32)
    report = sparse_update(model, 1)
    model(x)
    assert calls  # the sparse chain ran the user's forward under it
    report.undo()
    assert model.maxpool.forward is mine
