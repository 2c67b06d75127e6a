"""benchmarks.compile_speed: the rows of a quick run (structure, one compilation, no graph
break); no timing is asserted (the machine's load decides those)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import compile_speed


def test_quick_run_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    # aot_eager: Dynamo + AOTAutograd as with inductor, without inductor's minutes of codegen
    # (lora-lean: the adapters' and lean's autograd Functions in one graph)
    rows = compile_speed.main(["--quick", "--models", "resnet18", "--configs", "lora-lean",
                               "--batch", "2", "--size", "16", "--backend", "aot_eager",
                               "--json", str(out)])
    assert [(r.model, r.config) for r in rows] == [("resnet18", "lora-lean")]
    for r in rows:
        # compiled once, without a graph break (the counters are per row: Dynamo is reset
        # before each)
        assert (r.frames, r.graph_breaks) == (1, 0)
        assert r.steps == 3 and (r.batch, r.size, r.device) == (2, 16, "cpu")
        assert r.eager_s > 0 and r.compiled_s > 0 and r.compile_s > 0
        assert r.ratio == pytest.approx(r.compiled_s / r.eager_s)
        assert r.target == compile_speed.TARGET and r.meets_target == (r.ratio <= r.target)
    saved = json.loads(out.read_text())
    assert [d["config"] for d in saved] == ["lora-lean"]
    assert saved[0]["frames"] == 1
    printed = capsys.readouterr().out
    assert "ratio = compiled / eager" in printed and "lora-lean" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_cuda_skipped_without_gpu(capsys):
    assert compile_speed.main(["--device", "cuda"]) == []
    assert "no CUDA device" in capsys.readouterr().out
