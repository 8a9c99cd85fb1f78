"""metrics.jsonl damaged by a killed run or by hand never stops a run from continuing or finishing: unreadable
lines are skipped with one warning, and records without a usable step are dropped when a run continues."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from spo_align.run_folder.metrics_file import read_metrics, record_step
from spo_align.train.callbacks import keep_metrics_up_to


def _damaged(path: Path) -> Path:
    lines = [
        json.dumps({"step": 1, "loss": 0.5}).encode(),
        b"\xff\xfe not utf-8",
        json.dumps([1, 2]).encode(),
        json.dumps({"step": "two", "loss": 0.4}).encode(),
        json.dumps({"step": 2, "loss": 0.3}).encode(),
        json.dumps({"step": 3.0, "loss": 0.2}).encode(),
        json.dumps({"step": True, "loss": 0.2}).encode(),
        json.dumps({"step": 4, "loss": 0.1}).encode(),
        b'{"step": 5, "lo',
    ]
    path.write_bytes(b"\n".join(lines))
    return path


def test_unreadable_lines_are_skipped_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING)
    records = read_metrics(_damaged(tmp_path / "metrics.jsonl"))
    assert [r.get("loss") for r in records] == [0.5, 0.4, 0.3, 0.2, 0.2, 0.1]
    warnings = [r.getMessage() for r in caplog.records if "not metric records" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 3 line(s)" in warnings[0] and "line 2, 3, 9" in warnings[0]


def test_steps_are_whole_numbers_or_none():
    assert [record_step({"step": s}) for s in (0, 3, 3.0, 2.5, -1, "2", True, None, float("nan"))] == [
        0, 3, 3, None, None, None, None, None, None
    ]
    assert record_step({}) is None


def test_a_continued_run_keeps_the_usable_records_up_to_its_checkpoint(tmp_path: Path):
    path = _damaged(tmp_path / "metrics.jsonl")
    keep_metrics_up_to(tmp_path, 3)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.3}, {"step": 3.0, "loss": 0.2}
    ]


@pytest.mark.slow
def test_metrics_png_of_a_one_step_run_shows_its_point(small_model: Path, tmp_path: Path) -> None:
    """`spo train` with one logged step: metrics.png is drawn from a figure whose every panel has its dot."""
    from typer.testing import CliRunner

    from spo_align.cli import app
    from spo_align.plots.compare import build_figure, draw
    from spo_align.plots.runs import load_runs
    from tests.plots.test_plot_compare import _dots

    out = tmp_path / "one-step"
    result = CliRunner().invoke(app, [
        "train", str(Path(__file__).resolve().parents[1] / "data" / "recipes" / "spo.yaml"), "--set", f"model.name_or_path={small_model}",
        "--set", f"output.dir={out}", "--set", "training.max_steps=1", "--set", "training.logging_steps=1",
        "--set", "data.train.0.max_samples=8",
    ])
    assert result.exit_code == 0, result.output
    assert (out / "metrics.png").stat().st_size > 0 and "![training curves](metrics.png)" in (out / "README.md").read_text()
    fig = draw(build_figure(load_runs([out]), "one-step", every_curve=True))
    for ax in (ax for ax in fig.axes if ax.get_title()):
        assert any(_dots(line) for line in ax.get_lines() if not line.get_label().startswith("_")), ax.get_title()
