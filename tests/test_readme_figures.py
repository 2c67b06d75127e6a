"""Every code-produced table and output block of the README and the docs is current (issue 26):
``python -m benchmarks.readme_figures --check`` finds no stale block, so a change that moves a
figure fails here until ``--write`` regenerates it. And the check really fails on a stale block,
and ``--write`` really repairs it (on a copy of the documents, with one block altered)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks import readme_figures as rf

ROOT = Path(__file__).resolve().parents[1]


def test_every_generated_block_is_current():
    """The slow one (~1 min of CPU: one plan, the lean-memory table, two ONNX exports, the
    study's FLOP count; the rest is read from plots/rank_sweep_default.csv)."""
    diffs: list[str] = []
    stale = rf.run(write=False, log=diffs.append)
    assert stale == [], ("stale generated blocks (run python -m benchmarks.readme_figures "
                         "--write):\n" + "\n".join(diffs))


def test_every_generator_is_used_and_every_block_known():
    names = {n for p in rf.documents() for n, _ in rf.blocks(p.read_text())}
    assert names == set(rf.GENERATORS)
    readme = dict(rf.blocks((ROOT / "README.md").read_text()))
    assert {"plan", "default-run"} <= set(readme)


def _copy_docs(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs", symlinks=True)
    return tmp_path


def test_a_stale_block_fails_the_check_until_written(tmp_path, capsys):
    root = _copy_docs(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    body = dict(rf.blocks(text))["default-run"]
    assert "%" in body
    altered = body.replace("%", "0%", 1)  # one figure moved
    readme.write_text(text.replace(body, altered))
    only = ["default-run", "default-run-details"]  # the cheap blocks (read from the CSV)
    log: list[str] = []
    assert rf.run(write=False, root=root, only=only, log=log.append) == ["README.md: default-run"]
    assert "0%" in "".join(log)  # the diff shows the stale figure
    assert readme.read_text() != text  # --check writes nothing
    assert rf.run(write=True, root=root, only=only) == ["README.md: default-run"]
    assert readme.read_text() == text
    assert rf.run(write=False, root=root, only=only) == []
    # the command line: exit 1 on a stale block, 0 once written
    readme.write_text(text.replace(body, altered))
    cli = ["--root", str(root), "--only", "default-run"]
    assert rf.main(["--check", *cli]) == 1
    assert rf.main(["--write", *cli]) == 0
    assert rf.main(["--check", *cli]) == 0
    capsys.readouterr()


def test_unknown_block_name_is_refused_before_writing(tmp_path):
    root = _copy_docs(tmp_path)
    page = root / "docs" / "data.md"
    page.write_text(page.read_text() + "\n<!-- readme-figures: nope -->\nx\n"
                    "<!-- /readme-figures -->\n")
    before = (root / "README.md").read_text()
    with pytest.raises(ValueError, match="nope"):
        rf.run(write=True, root=root)
    assert (root / "README.md").read_text() == before
