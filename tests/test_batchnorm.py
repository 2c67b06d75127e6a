"""Precise BN (convpeft.train.batchnorm): exact statistics of the final weights, only for the BNs
that run in train mode, nothing changed on failure, and fine-tuning that evaluates with them
without its training depending on it."""

import pytest
import torch
from torch import nn

from convpeft.data import build_task
from convpeft.methods import MethodConfig, prepare
from convpeft.models import build_model
from convpeft.train import finetune, recalibrate_bn, snapshot_bn

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: quickest on one thread


@pytest.fixture(scope="module")
def task():
    t = build_task("shift", resolution=16, corruption="contrast", severity=5, few_shot=6)
    t.source_test = t.source_test.subset(range(60))
    t.target_test = t.target_test.subset(range(60))
    return t


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if "running" in k or "num_batches" in k}


def _exact_stats(model: nn.Module, bn: nn.BatchNorm2d, data, batch_size: int):
    """Per-batch mean/var (unbiased) of ``bn``'s input in the model's current mode, averaged."""
    seen = []
    h = bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        for x, _ in data.batches(batch_size):
            model(x)
    h.remove()
    means = torch.stack([s.mean(dim=(0, 2, 3)) for s in seen])
    vars_ = torch.stack([s.transpose(0, 1).flatten(1).var(dim=1) for s in seen])
    return means.mean(0), vars_.mean(0)


def _tiny():
    torch.manual_seed(0)
    return build_model("mobilenet_v2", 10, small_input=True)


def test_recalibrate_sets_the_exact_statistics_of_the_current_weights(task):
    model = _tiny()
    bn = model.features[3].conv[1][1]  # a depthwise block's BN, deep inside the net
    model.train()
    want_mean, want_var = _exact_stats(model, bn, task.target_train, 8)
    for m in model.modules():  # stale statistics, as after a short run
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(7.0)
    model.eval()
    n = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert recalibrate_bn(model, task.target_train, batch_size=8, device=CPU) == n
    assert torch.allclose(bn.running_mean, want_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, want_var, rtol=1e-4, atol=1e-5)
    assert not model.training and bn.momentum == 0.1  # modes and momenta restored


def test_frozen_bn_policy_recalibrates_nothing(task):
    model = _tiny()
    prepared = prepare(model, MethodConfig("lora", rank=2, bn="freeze"))
    before = _bn_buffers(model)
    assert recalibrate_bn(model, task.target_train, batch_size=8, device=CPU,
                          train_mode=prepared.train_mode) == 0
    after = _bn_buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("net,blocks,chunks", [("mobilenet_v2", 2, 1), ("resnet18", 1, 4)])
def test_sparse_prefix_keeps_its_statistics_and_the_suffix_gets_exact_ones(task, net, blocks,
                                                                          chunks):
    """The prefix BNs are forced into eval mode by the sparse update (their module calls only
    pass the prefix's output through): they must keep their statistics, and the suffix is
    calibrated on what the prefix computes with them. ResNet18's stem BN is such a module."""
    torch.manual_seed(0)
    model = build_model(net, 10, small_input=True)
    prepared = prepare(model, MethodConfig("full", update_blocks=blocks, prefix_chunks=chunks))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():  # a source model's statistics, not the init's zeros and ones
        for m in norms:
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(100)
    prefix_bn, suffix_bn = norms[0], norms[-1]
    prefix_before = {k: v.clone() for k, v in prefix_bn.state_dict().items()}
    prepared.train_mode()
    want_mean, want_var = _exact_stats(model, suffix_bn, task.target_train, 8)
    suffix_bn.running_mean.fill_(5.0)
    n = recalibrate_bn(model, task.target_train, batch_size=8, device=CPU,
                       train_mode=prepared.train_mode)
    assert 0 < n < len(norms)
    assert all(torch.equal(prefix_bn.state_dict()[k], v) for k, v in prefix_before.items())
    assert torch.allclose(suffix_bn.running_mean, want_mean, atol=1e-5)
    assert torch.allclose(suffix_bn.running_var, want_var, rtol=1e-4, atol=1e-5)


def test_a_failed_pass_leaves_every_statistic_as_it_was(task):
    model = _tiny()
    before = _bn_buffers(model)
    calls = {"n": 0}

    def boom(m, args):
        calls["n"] += 1
        if calls["n"] == 2:  # the second batch: the first has already moved the statistics
            raise RuntimeError("device lost")

    h = model.classifier.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="device lost"):
        recalibrate_bn(model, task.target_train, batch_size=8, device=CPU)
    h.remove()
    after = _bn_buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_snapshot_bn_puts_the_buffers_back():
    model = _tiny()
    before = _bn_buffers(model)
    with snapshot_bn(model):
        model.train()
        model(torch.randn(4, 3, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in _bn_buffers(model).items())
    with pytest.raises(ValueError, match="restore must be"):
        snapshot_bn(model, restore="never")


@pytest.mark.parametrize("method", ["lora", "lora-fa", "full"])
def test_finetune_evaluates_with_precise_statistics_without_changing_training(task, method):
    kw = dict(epochs=2, batch_size=8, seed=0, device="cpu", progress=False, keep_model=True)
    cfg = MethodConfig(method, rank=2) if method != "full" else MethodConfig(method)
    every = finetune(_tiny(), cfg, task, eval_every_epoch=True, **kw)
    once = finetune(_tiny(), cfg, task, eval_every_epoch=False, **kw)
    lagging = finetune(_tiny(), cfg, task, eval_every_epoch=False, precise_bn=False, **kw)
    # an evaluation after epoch 1 (recalibrate, evaluate, put the running averages back) leaves
    # the run exactly as without it: same weights and statistics at the end, same accuracy
    s_every, s_once, s_lag = (r.model.state_dict() for r in (every, once, lagging))
    assert all(torch.equal(s_every[k], s_once[k]) for k in s_once)
    assert every.target_acc == once.target_acc and every.precise_bn and not lagging.precise_bn
    # precise BN changes the statistics only, never the weights
    params = {n for n, _ in lagging.model.named_parameters()}
    assert all(torch.equal(s_lag[k], s_once[k]) for k in params)
    stats = [k for k in s_once if k.endswith("running_mean")]
    assert any(not torch.equal(s_lag[k], s_once[k]) for k in stats)
    # and the statistics are the exact ones of the final weights on the target data
    m = once.model
    bn = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)][-1]
    got = bn.running_mean.clone()
    m.train()
    want, _ = _exact_stats(m, bn, task.target_train, 8)
    assert torch.allclose(got, want, atol=1e-5)


def test_adapt_prefix_bn_re_estimates_the_prefix_only_and_finetune_keeps_it_frozen(task):
    """prefix_stats='target': the frozen prefix's BN statistics are those of the target data
    (AdaBN), set before training and untouched by it; the suffix and the training as before."""
    from convpeft.train import adapt_prefix_bn

    torch.manual_seed(0)
    source = build_model("resnet18", 10, small_input=True)
    with torch.no_grad():  # a source model's statistics
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    cfg = MethodConfig("full", update_blocks=1, prefix_chunks=2, prefix_stats="target")
    split = cfg.split(source)
    import copy
    model = copy.deepcopy(source)
    stem_in = []
    h = model.bn1.register_forward_pre_hook(lambda m, a: stem_in.append(a[0].clone()))
    n = adapt_prefix_bn(model, split, task.target_train, batch_size=4, device=CPU)
    h.remove()
    n_prefix = sum(isinstance(m, nn.BatchNorm2d) for name, m in model.named_modules()
                   if split.in_prefix(name))
    assert n == n_prefix and n_prefix > 0
    want = torch.stack([x.mean(dim=(0, 2, 3)) for x in stem_in]).mean(0)
    assert torch.allclose(model.bn1.running_mean, want, atol=1e-5)
    suffix = model.layer4[1].bn2
    assert torch.equal(suffix.running_mean, source.layer4[1].bn2.running_mean)
    kw = dict(epochs=1, batch_size=8, seed=0, device="cpu", progress=False,
              eval_every_epoch=False)
    r = finetune(source, cfg, task, **kw)
    # the fine-tuned prefix holds exactly the adapted statistics (frozen during training)
    assert torch.equal(r.model.bn1.running_mean, model.bn1.running_mean)
    plain = finetune(source, MethodConfig("full", update_blocks=1, prefix_chunks=2), task, **kw)
    assert torch.equal(plain.model.bn1.running_mean, source.bn1.running_mean)
    with pytest.raises(ValueError, match="need update_blocks"):
        MethodConfig("full", prefix_stats="target")
    with pytest.raises(ValueError, match="prefix_bn='model'"):
        MethodConfig("full", update_blocks=1, prefix_bn="model", prefix_stats="target")
    with pytest.raises(ValueError, match="prefix_stats must be one of source, target"):
        MethodConfig("full", update_blocks=1, prefix_stats="adabn")
