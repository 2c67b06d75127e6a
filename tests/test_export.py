"""ONNX / ExecuTorch export: merged graphs equal the base graph node for node, unmerged graphs
carry the adapter convs, outputs match onnxruntime, the caller's model is untouched, errors are
named and leave files alone; plus a smoke run of benchmarks.onnx_latency's functions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from convpeft import apply_adapters, check_onnx, export_onnx, onnx_op_counts  # noqa: E402
from convpeft.adapters import adapter_layers  # noqa: E402

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def tiny_cnn() -> nn.Module:
    """Standard 3x3, depthwise 3x3 (multiplier 2), pointwise and linear layers, with BN."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


def adapted(method: str, mode: str = "auto") -> nn.Module:
    m = tiny_cnn()
    apply_adapters(m, method, rank=2, target="all", mode=mode)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in adapter_layers(m):
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
            if method == "dora":
                layer.magnitude.mul_(1.0 + 0.1 * torch.rand(layer.magnitude.shape, generator=g))
        m[1].running_mean.uniform_(-0.5, 0.5)
    return m


def snapshot(m: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in m.state_dict().items()}, m.training,
            [(n, type(x).__name__, x.training) for n, x in m.named_modules()],
            [(n, p.requires_grad) for n, p in m.named_parameters()])


def assert_same(m: nn.Module, snap: tuple) -> None:
    state, training, modules, flags = snap
    now = m.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k  # bit for bit
    assert m.training == training
    assert [(n, type(x).__name__, x.training) for n, x in m.named_modules()] == modules
    assert [(n, p.requires_grad) for n, p in m.named_parameters()] == flags


@pytest.fixture(scope="module")
def base_counts(tmp_path_factory) -> dict[str, int]:
    path = export_onnx(tiny_cnn(), tmp_path_factory.mktemp("base") / "base.onnx", X)
    return onnx_op_counts(path)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_graph_is_the_base_graph(tmp_path: Path, base_counts, method: str) -> None:
    model = adapted(method)
    model.train()  # BN in train mode: a forward on the caller's model would move its stats
    snap = snapshot(model)
    path = export_onnx(model, tmp_path / "m.onnx", X)
    assert isinstance(path, Path) and path == tmp_path / "m.onnx" and path.stat().st_size > 0
    assert_same(model, snap)
    counts = onnx_op_counts(path)
    assert counts == base_counts  # same nodes: zero inference overhead
    assert counts["Conv"] == 3 and counts["Gemm"] == 1
    assert check_onnx(path, model, X) <= 1e-4
    assert_same(model, snap)
    # the merged graph is the adapted model, not the base one
    eval_copy = adapted(method).eval()
    with torch.no_grad():
        base_out = tiny_cnn().eval()(X)
        assert (eval_copy(X) - base_out).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_unmerged_graph_keeps_adapter_convs(tmp_path: Path, base_counts, method: str) -> None:
    model = adapted(method, mode="activation")
    snap = snapshot(model)
    path = export_onnx(model, tmp_path / "u.onnx", X, merge=False)
    assert_same(model, snap)
    counts = onnx_op_counts(path)
    # conv_A and conv_B (1x1) per adapted conv, two MatMuls for the linear layer
    assert counts["Conv"] == base_counts["Conv"] + 2 * 3
    assert counts.get("MatMul", 0) >= 2
    assert check_onnx(path, model, X, merge=False) <= 1e-4
    assert check_onnx(path, model, X, merge=True) <= 1e-4  # merging does not change outputs


def test_multiple_inputs(tmp_path: Path) -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) * self.b(y)

    m = Two()
    apply_adapters(m, "lora", rank=1)
    with torch.no_grad():
        m.a.lora_B.fill_(0.3)
    path = export_onnx(m, tmp_path / "two.onnx", (X, X + 1))
    assert onnx_op_counts(path)["Conv"] == 2
    assert check_onnx(path, m, (X, X + 1)) <= 1e-4


class Noisy(nn.Module):
    """Exports, but onnxruntime draws other random numbers: the check must refuse it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


def test_failed_check_leaves_the_file_alone(tmp_path: Path) -> None:
    target = tmp_path / "keep.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(ValueError, match="differs from PyTorch.*nothing was written"):
        export_onnx(Noisy(), target, X)
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.onnx"]  # no temp file left


def test_relative_error() -> None:
    from convpeft.export import relative_error

    want = [torch.tensor([1.0, -4.0])]
    assert relative_error([torch.tensor([1.0, -3.0])], want) == 0.25
    assert relative_error([torch.tensor([float("nan"), -4.0])], want) == float("inf")
    assert relative_error([torch.zeros(2)], [torch.zeros(2)]) == 0.0
    with pytest.raises(ValueError, match="output shape"):
        relative_error([torch.zeros(3)], want)


@pytest.mark.parametrize("bad, exc, match", [
    ("missing_dir/m.onnx", FileNotFoundError, "does not exist; create it first"),
    ("m.pt", ValueError, "should end in '.onnx'"),
    ("adir.onnx", IsADirectoryError, "is a directory"),
])
def test_bad_paths(tmp_path: Path, bad: str, exc: type, match: str) -> None:
    (tmp_path / "adir.onnx").mkdir()
    with pytest.raises(exc, match=match):
        export_onnx(tiny_cnn(), tmp_path / bad, X)


@pytest.mark.parametrize("bad, match", [
    (X.numpy(), "example_input is a ndarray, not a torch.Tensor"),
    ([1.0, 2.0], r"example_input\[0\] is a float"),
    ((X, "y"), r"example_input\[1\] is a str"),
    ((), "example_input is empty"),
])
def test_bad_inputs(tmp_path: Path, bad, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        export_onnx(tiny_cnn(), tmp_path / "m.onnx", bad)
    assert not (tmp_path / "m.onnx").exists()


def test_bad_model_path_and_rtol(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        export_onnx(lambda x: x, tmp_path / "m.onnx", X)
    with pytest.raises(TypeError, match="pass a str or pathlib.Path"):
        export_onnx(tiny_cnn(), 3, X)
    with pytest.raises(ValueError, match="rtol=0 must be a number > 0"):
        export_onnx(tiny_cnn(), tmp_path / "m.onnx", X, rtol=0)


def test_missing_onnxruntime_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"pip install convpeft\[export\]"):
        export_onnx(tiny_cnn(), tmp_path / "m.onnx", X)


def test_executorch_export(tmp_path: Path) -> None:
    pytest.importorskip("executorch.runtime")
    from convpeft import export_executorch

    model = adapted("dora")
    snap = snapshot(model)
    path = export_executorch(model, tmp_path / "m.pte", X)
    assert path.stat().st_size > 0
    assert_same(model, snap)


def test_benchmark_functions_smoke() -> None:
    from benchmarks import onnx_latency

    rows = onnx_latency.measure("tiny", tiny_cnn, X, runs=2, warmup=1, rank=2)
    variants = [r.variant for r in rows]
    assert variants == ["base", "merged", "unmerged"]
    base, merged, unmerged = rows
    assert merged.conv_nodes == base.conv_nodes == 3
    assert unmerged.conv_nodes == 3 + 2 * 3
    assert all(r.median_ms > 0 and r.max_rel_error <= 1e-4 for r in rows)
    table = onnx_latency.format_table(rows)
    assert "tiny" in table and "1.00x" in table


@pytest.mark.parametrize("argv, match", [
    (["--models", "nope_net"], "unknown torchvision model"),
    (["--runs", "0"], "--runs must be >= 1"),
])
def test_benchmark_cli_refuses_bad_arguments(argv: list[str], match: str, capsys) -> None:
    from benchmarks import onnx_latency

    with pytest.raises(SystemExit) as e:
        onnx_latency.main(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err
