"""Training loop: loss goes down, runs repeat for a seed, pretraining is cached (keyed by what
changes the weights) and deterministic, evaluation."""

import json

import pytest
import torch

from convpeft.data import build_task
from convpeft.methods import MethodConfig
from convpeft.models import build_model, get_head
from convpeft.train import (
    deterministic_torch,
    evaluate,
    finetune,
    pretrain,
    resolve_cache_dir,
    state_dict_sha256,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny runs are quickest on one thread; restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _small_tests(task, n: int = 120):
    """Keep the first ``n`` test images of each split: evaluation dominates these tiny runs."""
    task.source_test = task.source_test.subset(range(min(n, len(task.source_test))))
    task.target_test = task.target_test.subset(range(min(n, len(task.target_test))))
    return task


@pytest.fixture(scope="module")
def shift_task():
    task = build_task("shift", resolution=16, corruption="impulse_noise", severity=3, few_shot=4)
    return _small_tests(task, 60)


def _tiny(num_classes: int = 10):
    torch.manual_seed(0)
    return build_model("mobilenet_v2", num_classes, small_input=True)


def test_evaluate(shift_task):
    model = _tiny()
    acc = evaluate(model, shift_task.source_test)
    assert 0.0 <= acc <= 1.0
    model.train()
    evaluate(model, shift_task.source_test)
    assert model.training  # mode restored
    ds = shift_task.source_test
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, ds.subset([]))


def test_finetune_lowers_loss_and_repeats(shift_task):
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(epochs=6, lr=1e-3, batch_size=8, seed=0, device="cpu", progress=False,
              eval_every_epoch=False)
    r1 = finetune(model, "full", shift_task, **kw)
    losses = [h["loss"] for h in r1.history]
    assert losses[-1] < losses[0] * 0.85, losses
    assert len(r1.history) == 6 and "target_acc" in r1.history[-1]
    # the caller's model is untouched (copy), and a second run is identical on the CPU
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    r2 = finetune(model, "full", shift_task, **kw)
    assert [h["loss"] for h in r2.history] == losses
    assert r2.target_acc == r1.target_acc
    d = r1.to_dict()
    json.dumps(d)
    assert "model" not in d and d["method"] == "full" and d["bn"] == "train"
    assert d["trainable_params"] == d["total_params"] and "recovered_fraction" in d
    assert r1.zero_shot_acc == r2.zero_shot_acc


def test_finetune_head_method_config(shift_task):
    cfg = MethodConfig("head", bn="freeze", lr=1e-2)
    r = finetune(_tiny(), cfg, shift_task, epochs=1, batch_size=32, seed=0, device="cpu",
                 progress=False, eval_every_epoch=False)
    assert r.lr == 1e-2 and r.bn == "freeze" and r.trainable_params == 1280 * 10 + 10
    assert r.config["name"] == "head" and r.model is not None


def test_finetune_new_classes_expands_head():
    task = _small_tests(build_task("new_classes", resolution=16, few_shot=4), 60)
    src = _tiny(task.source_num_classes)
    r = finetune(src, "full", task, epochs=6, lr=1e-3, batch_size=8, device="cpu",
                 progress=False, eval_every_epoch=False)
    assert get_head(r.model)[1].out_features == 10
    assert get_head(src)[1].out_features == 5
    # trained on new classes only: the expanded head now predicts mostly new classes
    r.model.eval()
    with torch.no_grad():
        pred = r.model(task.target_test.float_images()).argmax(1)
    assert (pred >= 5).float().mean() > 0.5
    with pytest.raises(ValueError, match="head has 7 outputs"):
        finetune(_tiny(7), "head", task, epochs=1, device="cpu", progress=False)


def test_pretrain_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVPEFT_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    # source = digits 0 and 1 only (~270 images): a small, real pretraining run
    task = _small_tests(build_task("new_classes", resolution=8, source_classes=[0, 1]))
    kw = dict(task=task, epochs=1, batch_size=64, seed=0, device="cpu", progress=False,
              small_input=True)
    m1 = pretrain("mobilenet_v3_small", "digits", **kw)
    info = m1.pretrain_info
    assert info["cached"] is False and (tmp_path / "env").is_dir()
    assert info["path"].startswith(str(tmp_path / "env"))
    # Overwrite the cached weights with a marker: a cache hit must return them, not retrain
    blob = torch.load(info["path"], weights_only=True)
    blob["state_dict"]["classifier.3.bias"] = torch.tensor([7.0, -7.0])
    torch.save(blob, info["path"])
    m2 = pretrain("mobilenet_v3_small", "digits", **kw)
    assert m2.pretrain_info["cached"] is True
    assert torch.equal(m2.classifier[3].bias.detach().cpu(), torch.tensor([7.0, -7.0]))
    # another config (seed) -> another key -> trained afresh
    m3 = pretrain("mobilenet_v3_small", "digits", **{**kw, "seed": 1}, cache_dir=tmp_path / "x")
    assert m3.pretrain_info["cached"] is False and m3.pretrain_info["key"] != info["key"]
    with pytest.raises(ValueError, match="task is on 'digits'"):
        pretrain("mobilenet_v3_small", "cifar10", task=task, epochs=1)


def test_precomputed_zero_shot_skips_the_baseline_evaluation(shift_task):
    model = _tiny()
    kw = dict(epochs=1, lr=1e-3, batch_size=8, seed=0, device="cpu", progress=False,
              eval_every_epoch=False, keep_model=False)
    r1 = finetune(model, "head", shift_task, **kw)
    r2 = finetune(model, "head", shift_task, zero_shot=(r1.zero_shot_acc,
                                                        r1.zero_shot_source_acc), **kw)
    for k in ("zero_shot_acc", "zero_shot_source_acc", "target_acc", "source_acc", "forgetting",
              "recovered_fraction", "trainable_params"):
        assert getattr(r2, k) == getattr(r1, k), k
    assert [h["loss"] for h in r2.history] == [h["loss"] for h in r1.history]
    # the given baseline is what the result reports (nothing re-evaluated behind it)
    r3 = finetune(model, "head", shift_task, zero_shot=(0.25, 0.5), **kw)
    assert (r3.zero_shot_acc, r3.zero_shot_source_acc) == (0.25, 0.5)
    assert r3.target_acc == r1.target_acc
    assert r3.forgetting == pytest.approx(0.5 - r3.source_acc)


def test_corrupt_pretrain_cache_entry_is_named_and_rebuilt(tmp_path):
    task = _small_tests(build_task("new_classes", resolution=8, source_classes=[0, 1]))
    kw = dict(task=task, epochs=1, batch_size=64, seed=0, device="cpu", progress=False,
              small_input=True, cache_dir=tmp_path)
    path = pretrain("mobilenet_v3_small", "digits", **kw).pretrain_info["path"]
    with open(path, "r+b") as f:  # a truncated file, as a full disk or a kill leaves it
        f.truncate(100)
    with pytest.warns(UserWarning, match="pretrain cache entry .* is unreadable"):
        m = pretrain("mobilenet_v3_small", "digits", **kw)
    assert m.pretrain_info["cached"] is False and m.pretrain_info["path"] == path
    assert pretrain("mobilenet_v3_small", "digits", **kw).pretrain_info["cached"] is True


def test_unwritable_pretrain_cache_is_named(tmp_path):
    task = _small_tests(build_task("new_classes", resolution=8, source_classes=[0, 1]))
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot write the pretrain cache .*not_a_folder"):
        pretrain("mobilenet_v3_small", "digits", task=task, epochs=1, batch_size=64,
                 device="cpu", progress=False, small_input=True, cache_dir=blocker)


def _torch_state() -> tuple:
    return (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)


def test_deterministic_torch_sets_and_restores_the_global_state():
    before = _torch_state()
    with deterministic_torch(threads=3) as n:
        assert n == 3 == torch.get_num_threads()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert _torch_state() == before
    with pytest.raises(RuntimeError, match="boom"), deterministic_torch(threads=2):
        raise RuntimeError("boom")
    assert _torch_state() == before
    with pytest.raises(ValueError, match="threads must be >= 1"), deterministic_torch(threads=0):
        pass
    assert _torch_state() == before


def test_pretrain_is_deterministic_and_keyed_by_what_changes_the_weights():
    task = _small_tests(build_task("new_classes", resolution=8, source_classes=[0, 1]))
    kw = dict(task=task, epochs=1, batch_size=64, seed=0, device="cpu", progress=False,
              small_input=True, use_cache=False)
    state, rng = _torch_state(), torch.random.get_rng_state()
    a = pretrain("mobilenet_v3_small", "digits", **kw)
    # the caller's thread count, flags and global RNG are as they were
    assert _torch_state() == state and torch.equal(torch.random.get_rng_state(), rng)
    b = pretrain("mobilenet_v3_small", "digits", **kw)
    assert a.pretrain_info["key"] == b.pretrain_info["key"]
    assert a.pretrain_info["weights_sha256"] == b.pretrain_info["weights_sha256"]
    assert a.pretrain_info["weights_sha256"] == state_dict_sha256(b)
    cfg = a.pretrain_info["config"]
    assert cfg["torch"] == torch.__version__ and cfg["threads"] == 2  # PRETRAIN_DEFAULTS
    assert cfg["backend"] == f"cpu:{torch.backends.cpu.get_cpu_capability()}"
    assert len(cfg["data"]) == 16 and cfg["deterministic"] is True
    # each of these changes the weights, so each changes the key
    keys = {a.pretrain_info["key"]}
    for extra in ({"threads": 1}, {"seed": 1}):
        keys.add(pretrain("mobilenet_v3_small", "digits", **{**kw, **extra}).pretrain_info["key"])
    other = _small_tests(build_task("new_classes", resolution=8, source_classes=[0, 2]))
    keys.add(pretrain("mobilenet_v3_small", "digits", **{**kw, "task": other}).pretrain_info["key"])
    assert len(keys) == 4
    with pytest.raises(ValueError, match="threads must be >= 1"):
        pretrain("mobilenet_v3_small", "digits", **{**kw, "threads": 0})


def test_recalibrate_bn_sets_the_exact_statistics_and_restores_modes(shift_task):
    from convpeft.train import recalibrate_bn

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.3), torch.nn.Flatten())
    model.eval()
    data = shift_task.target_train
    assert recalibrate_bn(model, data, batch_size=7, device=torch.device("cpu")) == 1
    bn = model[0]
    x = data.float_images()
    # cumulative average of per-batch means over one pass = the data's channel mean here
    # (7 does not divide the dataset, so batches differ in size: the average is per batch)
    means = torch.stack([xb.mean(dim=(0, 2, 3)) for xb, _ in data.batches(7)])
    assert torch.allclose(bn.running_mean, means.mean(0), atol=1e-6)
    assert torch.allclose(bn.running_mean, x.mean(dim=(0, 2, 3)), atol=2e-2)
    assert bn.momentum == 0.3 and not model.training
    assert recalibrate_bn(torch.nn.Linear(2, 2), data, batch_size=8,
                          device=torch.device("cpu")) == 0
