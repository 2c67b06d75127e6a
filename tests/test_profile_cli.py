"""The profile CLI refuses bad input with one line and exit status 2, before building anything,
and profiles AdaBN (``--bn stats``, BN momentum None) analytically."""

from __future__ import annotations

import pytest
import torch

from convpeft.profile import main


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
