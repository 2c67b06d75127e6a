"""convpeft inside ordinary training code: checkpoints in every merge state, pickling of
memory-saving models, TorchScript refusal, torch.func per-sample gradients, torch.compile."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import convpeft
from convpeft.adapters import adapter_layers, unmerge_adapters
from convpeft.adapters.state import adapter_state_dict, load_adapter_state_dict

LAYERS = {
    "standard": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "grouped": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
    "linear": lambda: nn.Linear(5, 7),
}
METHODS = ("lora", "dora")


def _adapted(kind: str, method: str, seed: int) -> nn.Module:
    """The same frozen layer (seed 0) with a ``method`` adapter moved off its identity init by
    ``seed`` (a trained adapter, as far as a checkpoint can tell)."""
    torch.manual_seed(0)
    model = nn.Sequential(LAYERS[kind]())
    convpeft.apply_adapters(model, method, rank=2, target="all")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in adapter_layers(model):
            for p in m.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p is m.lora_B else 1.0)
                        + (p if p.dim() == 1 else 0))  # DoRA's m stays near ||W0||
    return model


def _x(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn((3, 5) if kind == "linear" else (2, 4, 6, 6), generator=g)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_equal_states(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- 1. checkpoints in every merge state ------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", LAYERS)
def test_merged_model_saves_its_unmerged_state(kind, method):
    """A reversible merge (evaluate, then save the best checkpoint) saves W0, not W0 + s dW:
    loaded into a fresh adapted model the update counts once, and the state dict equals the
    unmerged model's bit for bit."""
    src = _adapted(kind, method, seed=2)
    x = _x(kind)
    with torch.no_grad():
        y = src(x)
    unmerged = _snapshot(src)
    convpeft.merge_adapters(src, unload=False)
    merged_state = src.state_dict()
    _assert_equal_states(merged_state, unmerged)
    buf = io.BytesIO()
    torch.save(merged_state, buf)
    buf.seek(0)
    fresh = _adapted(kind, method, seed=7)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(src(x), y, rtol=1e-5, atol=1e-6)  # src still merged, same
    assert all(m.merged for _, m in adapter_layers(src))
    _assert_equal_states(_snapshot(fresh), unmerged)


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", LAYERS)
def test_load_state_dict_into_merged_model(kind, method, assign):
    """Loading into a merged model keeps it merged, with the loaded adapter folded in (not the
    old one, and not dropped); unmerging then gives the loaded state exactly."""
    src = _adapted(kind, method, seed=2)
    x = _x(kind)
    state = _snapshot(src)
    given = {k: v.clone() for k, v in state.items()}
    dst = _adapted(kind, method, seed=5)
    convpeft.merge_adapters(dst, unload=False)
    dst.load_state_dict(given, assign=assign)
    _assert_equal_states(given, state)  # the caller's tensors are not merged into
    assert all(m.merged for _, m in adapter_layers(dst))
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=1e-5, atol=1e-6)
    unmerge_adapters(dst)
    _assert_equal_states(_snapshot(dst), state)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", LAYERS)
def test_load_adapter_state_dict_into_merged_model(kind, method):
    src = _adapted(kind, method, seed=2)
    x = _x(kind)
    dst = _adapted(kind, method, seed=5)
    convpeft.merge_adapters(dst, unload=False)
    load_adapter_state_dict(dst, adapter_state_dict(src))
    assert all(m.merged for _, m in adapter_layers(dst))
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=1e-5, atol=1e-6)
    unmerge_adapters(dst)
    _assert_equal_states(_snapshot(dst), _snapshot(src))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", LAYERS)
def test_merged_reload_into_itself_and_unloaded_round_trip(kind, method):
    """A merged model reloaded from its own state is bitwise unchanged; the unloaded (plain)
    model's state loads into the same plain architecture exactly."""
    model = _adapted(kind, method, seed=2)
    x = _x(kind)
    convpeft.merge_adapters(model, unload=False)
    with torch.no_grad():
        y = model(x)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    model.load_state_dict(model.state_dict())
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    with torch.no_grad():
        assert torch.equal(model(x), y)
    convpeft.merge_adapters(model)  # unload
    plain = nn.Sequential(LAYERS[kind]())
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
        torch.testing.assert_close(plain(x), y, rtol=1e-6, atol=1e-6)


# ---- 2. pickling models whose forwards were swapped -------------------------------------------
class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.bn(self.conv(x)))


def _swapped(technique: str) -> nn.Module:
    """A tiny CNN with LoRA on its blocks and ``technique`` applied (BN in eval mode, so that
    lean_activations swaps the BatchNorms too)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Sequential(_Block(8), _Block(8), _Block(8)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    model.eval()
    if technique == "sparse":
        convpeft.apply_adapters(model, "lora", rank=2, target="conv",
                                exclude=["^[0-3]", "^4\\.[01]"])
        convpeft.sparse_update(model, 1, blocks=["4.0", "4.1", "4.2"])
        return model
    convpeft.apply_adapters(model, "lora", rank=2, target="conv", exclude=["^0"])
    if technique in ("lean", "both"):
        convpeft.lean_activations(model)
    if technique in ("checkpoint", "both"):
        convpeft.checkpoint_blocks(model, blocks=["4.0", "4.1", "4.2"])
    return model


def _step(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _round_trips():
    def pickled(m):
        return pickle.loads(pickle.dumps(m))

    def saved(m):
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return {"deepcopy": copy.deepcopy, "pickle": pickled, "torch.save": saved}


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("technique", ["lean", "checkpoint", "both", "sparse"])
def test_swapped_forwards_survive_pickling(technique, how):
    model = _swapped(technique)
    swapped = [n for n, m in model.named_modules() if "forward" in m.__dict__]
    assert swapped
    ref_out, ref_grads = _step(model)
    copy_ = _round_trips()[how](model)
    modules = dict(copy_.named_modules())
    # still swapped, and each replacement forward runs on the copy, not on the original
    assert [n for n, m in modules.items() if "forward" in m.__dict__] == swapped
    for n in swapped:
        assert modules[n].forward.__self__ is modules[n]
    out, grads = _step(copy_)
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        assert torch.equal(grads[n], ref_grads[n]), n


# ---- 3. TorchScript ---------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("merge", ["none", "reversible"])
def test_jit_script_refuses_adapters_and_names_the_fix(merge):
    model = _adapted("standard", "lora", seed=2)
    if merge == "reversible":
        convpeft.merge_adapters(model, unload=False)
    before = _snapshot(model)
    wrapper = model[0]
    with pytest.raises(TypeError, match=r"merge first: convpeft\.merge_adapters\(model\)"):
        torch.jit.script(model)
    assert model[0] is wrapper  # left as it was
    _assert_equal_states(_snapshot(model), before)
    x = _x("standard")
    with torch.no_grad():
        y = model(x)
        scripted = torch.jit.script(convpeft.merge_adapters(model))  # the fix works
        torch.testing.assert_close(scripted(x), y, rtol=1e-5, atol=1e-6)


# ---- 4. torch.func: per-sample gradients ------------------------------------------------------
@pytest.mark.parametrize("mode", ["activation", "weight"])
@pytest.mark.parametrize("kind", ["standard", "depthwise"])
@pytest.mark.parametrize("method", METHODS)
def test_per_sample_gradients_match_a_loop(method, kind, mode):
    """``vmap(grad(loss))`` over a batch (differential privacy, influence functions) gives each
    sample's gradient, as a loop of single-sample backward passes does (the activation mode runs
    the custom autograd Functions)."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    conv = LAYERS[kind]()
    c = conv.out_channels
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(c * 25, 3))
    convpeft.apply_adapters(model, method, rank=2, target="conv", mode=mode,
                            trainable=["^3\\."])
    with torch.no_grad():
        for _, m in adapter_layers(model):
            m.lora_B.normal_()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 4, 5, 5, generator=g), torch.randint(0, 3, (4,), generator=g)
    train = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def loss(params, xi, ti):
        out = functional_call(model, {**frozen, **params}, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, ti.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(train, x, t)
    assert {m.last_mode for _, m in adapter_layers(model)} == {mode}
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), t[i:i + 1]).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                scale = float(p.grad.abs().max())
                torch.testing.assert_close(per_sample[n][i], p.grad, rtol=1e-5,
                                           atol=1e-5 * scale)


def test_lora_conv_function_gradcheck():
    from convpeft.ops.adapter_conv import LoRAConvFunction

    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.double).requires_grad_()

    def y(x, w, bias, a, b, s, stride, padding, dilation, groups):
        # conv_A's weight is A repeated per group (the Function's input gradient relies on it)
        a_w = a.repeat(groups, 1, 1, 1)
        return LoRAConvFunction.apply(x, w, bias, a_w, b, s, stride, padding, dilation,
                                      groups)[0]

    # a standard conv and a grouped one; b is (C_out, r)
    args = (t(1, 4, 4, 4), t(6, 4, 3, 3), t(6), t(2, 4, 3, 3), t(6, 2), 0.7, (1, 1), (1, 1),
            (1, 1), 1)
    assert torch.autograd.gradcheck(y, args)
    args = (t(1, 4, 4, 4), t(6, 2, 3, 3), None, t(2, 2, 3, 3), t(6, 2), 1.3, (2, 1), (0, 1),
            (1, 2), 2)
    assert torch.autograd.gradcheck(y, args)
    # LoRA-FA: A and W0 frozen, so h (not x) is saved, or recomputed where x is smaller
    x, a = t(1, 4, 4, 4), t(2, 2, 3, 3).detach()
    assert torch.autograd.gradcheck(
        lambda x, b: y(x, args[1].detach(), None, a, b, 0.5, (1, 1), (1, 1), (1, 1), 2),
        (x, t(6, 2)))


@pytest.mark.parametrize("technique", ["lean", "both"])
def test_per_sample_gradients_with_memory_techniques(technique):
    """Under torch.func, lean layers run their plain op (their bit masks cannot be batched)
    and checkpointed blocks recompute as usual: per-sample gradients still match a loop."""
    from torch.func import functional_call, grad, vmap

    model = _swapped(technique)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    train = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def loss(params, xi):
        return functional_call(model, {**frozen, **params}, (xi.unsqueeze(0),)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(train, x)
    for i in range(len(x)):
        model.zero_grad()
        model(x[i:i + 1]).square().sum().backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per_sample[n][i], p.grad, rtol=1e-5,
                                           atol=1e-5 * float(p.grad.abs().max()))


# ---- 5. torch.compile -------------------------------------------------------------------------
def _compiled_model(technique: str) -> nn.Module:
    if technique in ("lora", "dora"):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(), nn.Conv2d(8, 8, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        convpeft.apply_adapters(model, technique, rank=2, target="all")  # mode auto
        return model
    return _swapped(technique)


@pytest.mark.parametrize("technique", ["lora", "dora", "lean", "checkpoint", "both", "sparse"])
def test_compiles_once_without_graph_breaks(technique):
    """One compilation for repeated training steps (the auto mode's per-layer cache, filled by
    the first call, is not read while tracing), no graph break (lean's masks trace: no
    ``storage_offset()``, in-place activations return their dirty input); the compiled steps
    (AOTAutograd, eager kernels) give the eager outputs and gradients."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _compiled_model(technique)
    ref = _step(copy.deepcopy(model))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    for _ in range(3):
        _step(compiled)
    # one graph handed to the backend: a recompilation or a graph break would make two
    assert counter.frame_count == 1
    torch._dynamo.reset()
    out, grads = _step(torch.compile(copy.deepcopy(model), backend="aot_eager"))
    torch.testing.assert_close(out, ref[0], rtol=1e-6, atol=1e-6)
    grads = {n.removeprefix("_orig_mod."): g for n, g in grads.items()}
    assert grads.keys() == ref[1].keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref[1][n], rtol=1e-5, atol=1e-6)


def _traced_functions(model: nn.Module) -> int:
    """How many custom autograd Functions torch.compile's graph of ``model`` applies."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(torch.randn(2, 3, 8, 8))
    return sum("autograd_function_apply" in str(n.target) for g in graphs
               for n in g.graph.nodes)


def test_compiled_lean_layers_stay_lean():
    """Compiling does not quietly drop lean's Functions (only torch.func transforms do)."""
    lean, plain = _traced_functions(_swapped("lean")), _traced_functions(_swapped("none"))
    # lean adds the three blocks' BN affines and ReLU masks (the stem's input needs no
    # gradient, so its layers run plain, compiled or not)
    assert lean == plain + 6
