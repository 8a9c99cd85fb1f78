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
