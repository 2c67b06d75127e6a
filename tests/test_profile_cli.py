"""The profile CLI refuses bad input with one line and exit status 2, before building anything,
and profiles AdaBN (``--bn stats``, BN momentum None) analytically."""

from __future__ import annotations

import pytest
import torch

from convpeft.profiler.cli import main


@pytest.mark.parametrize(("argv", "message"), [
    (["--batch", "-1"], "--batch must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--resolution", "-32"], "--resolution must be >= 1"),
    (["--rank", "0"], "--rank must be >= 1"),
    (["--device", "tpu9"], "unknown --device"),
    (["--weights", "/no/such/weights.pt"], "no such file"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert main([*argv, "--analytic"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(capsys):
    assert main(["--device", "cuda", "--analytic"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def test_analytic_profile_of_adabn_bn_stats(capsys):
    argv = ["--model", "mobilenet_v3_small", "--method", "lora", "--bn", "stats", "--batch", "2",
            "--resolution", "64", "--analytic", "--no-torch"]
    assert main(argv) == 0
    assert "mobilenet_v3_small + lora (rank 8)" in capsys.readouterr().out


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", ["empty", "nan", "inf", "frozen_optimizer", "frozen_model"])
def test_profile_update_refuses_bad_input_and_leaves_the_model_alone(case):
    from torch import nn

    from convpeft.profiler import profile_update

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 2, (4,))
    if case == "empty":
        x, y = x[:0], y[:0]
    elif case == "nan":
        x[1, 0, 2, 2] = float("nan")
    elif case == "inf":
        x[0, 2, 0, 0] = float("inf")
    elif case == "frozen_optimizer":
        model[0].requires_grad_(False)
        opt = torch.optim.AdamW(model[0].parameters(), lr=1e-3)
    else:
        model.requires_grad_(False)
    before = _snapshot(model)
    match = {"empty": "empty", "nan": "NaN or inf", "inf": "NaN or inf",
             "frozen_optimizer": "only frozen parameters", "frozen_model": "frozen"}[case]
    with pytest.raises(ValueError, match=match):
        profile_update(model, opt, x, y, repeat=1)
    after = _snapshot(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_lean_flag_lowers_the_analytic_peak(capsys):
    import json

    argv = ["--model", "mobilenet_v2", "--method", "lora", "--bn", "freeze", "--batch", "4",
            "--resolution", "64", "--analytic", "--no-torch", "--json"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*argv, "--lean"]) == 0
    lean = json.loads(capsys.readouterr().out)
    assert lean["memory_peak"] < 0.6 * plain["memory_peak"]
    assert lean["flops_forward"] == plain["flops_forward"]


@pytest.mark.parametrize("module", ["convpeft.profiler", "convpeft.profiler.cli"])
def test_cli_runs_as_a_module(module):
    """``python -m convpeft.profiler`` is the CLI (the package runs its ``cli`` module)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "usage: python -m convpeft.profiler" in out.stdout
