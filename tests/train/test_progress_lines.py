"""Progress where there is no terminal: plain lines per logging step and a heartbeat, read from a real run's log."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spo_align.train.progress import PlainProgress, format_duration, heartbeat_seconds, progress_mode

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_plain_line_carries_position_eta_losses_log_ratios_and_tokens_per_second() -> None:
    out, clock = io.StringIO(), _Clock()
    progress = PlainProgress(40, "spo", start_tokens=0, reward_scale=0.5, heartbeat_s=3600, stream=out, clock=clock)
    progress._emit("started")
    clock.now += 30.0  # 10 of 40 steps in 30 s: 90 s to go
    progress.log(10, {"loss": 0.25, "spo_margin_term": -0.5, "rewards/chosen": 0.25, "rewards/rejected": -1.0,
                      "num_tokens": 6000.0})
    clock.now += 10.0
    progress.log(20, {"loss": 0.125, "num_tokens": 7000.0})
    first, second = out.getvalue().splitlines()[1:]
    assert first.startswith("[spo] spo step 10/40 (25.0%) | elapsed 30s | eta 1m30s | loss 0.25")
    assert "spo_m -0.5" in first
    # log-ratios are the logged rewards over the reward scale: 0.25 / 0.5 and -1.0 / 0.5
    assert "log-ratio chosen +0.5 rejected -2" in first
    assert first.endswith("| 200 tok/s")  # 6000 tokens in 30 s
    assert "step 20/40 (50.0%) | elapsed 40s | eta 40s" in second and second.endswith("| 100 tok/s")


def test_a_continued_run_counts_eta_and_tokens_from_where_it_restarted() -> None:
    out, clock = io.StringIO(), _Clock()
    progress = PlainProgress(100, "dpo", start_step=50, start_tokens=5000, heartbeat_s=3600, stream=out, clock=clock)
    clock.now += 10.0
    progress.log(60, {"loss": 1.0, "num_tokens": 6000.0})
    line = out.getvalue().splitlines()[0]
    assert "step 60/100 (60.0%) | elapsed 10s | eta 40s" in line  # 10 steps in 10 s, 40 to go
    assert line.endswith("| 100 tok/s")


def test_evaluation_records_are_labelled_and_the_closing_summary_says_finished() -> None:
    out, clock = io.StringIO(), _Clock()
    progress = PlainProgress(10, "sft", heartbeat_s=3600, stream=out, clock=clock)
    clock.now += 5
    progress.log(10, {"eval_loss": 0.75, "eval_runtime": 1.0})
    progress.log(10, {"train_runtime": 125.0, "train_loss": 0.5})
    evaluation, summary = out.getvalue().splitlines()
    assert "| eval loss 0.75" in evaluation
    assert summary.endswith("finished in 2m05s")


def test_a_quiet_run_prints_a_heartbeat_line() -> None:
    out = io.StringIO()
    progress = PlainProgress(10, "spo", heartbeat_s=0.2, stream=out)
    progress.start()
    progress.step(3)
    deadline = time.monotonic() + 30
    try:
        while "working on step 4" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        progress.close()
    assert "step 3/10 (30.0%)" in out.getvalue() and "working on step 4 (no log line for" in out.getvalue()


def test_mode_and_heartbeat_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPO_PROGRESS", raising=False)
    assert progress_mode(io.StringIO()) == "plain"  # no terminal
    monkeypatch.setenv("SPO_PROGRESS", "bar")
    assert progress_mode(io.StringIO()) == "bar"
    monkeypatch.setenv("SPO_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="SPO_PROGRESS='fancy'"):
        progress_mode(io.StringIO())
    monkeypatch.setenv("SPO_PROGRESS_HEARTBEAT_S", "-1")
    with pytest.raises(ValueError, match="positive"):
        heartbeat_seconds()
    monkeypatch.setenv("SPO_PROGRESS_HEARTBEAT_S", "15")
    assert heartbeat_seconds() == 15.0
    assert [format_duration(s) for s in (0, 59.4, 61, 3599, 7260)] == ["0s", "59s", "1m01s", "59m59s", "2h01m"]


@pytest.mark.slow
def test_spo_train_with_stdout_to_a_file_writes_progress_lines_while_it_runs(tmp_path: Path, small_model: Path):
    """A real `spo train > log`: the start line is in the file while the process still runs, then one line per
    logging step with the loss, the log-ratios and real tokens/s."""
    log, out = tmp_path / "train.log", tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "SPO_PROGRESS"}
    env["OMP_NUM_THREADS"] = "1"
    args = [
        sys.executable, "-m", "spo_align.cli", "train", str(RECIPES / "spo.yaml"),
        "--set", f"model.name_or_path={small_model}", "--set", f"output.dir={out}",
        "--set", "training.max_steps=6", "--set", "training.logging_steps=2", "--set", "training.save_steps=100",
    ]
    with log.open("w") as handle:
        proc = subprocess.Popen(args, env=env, stdout=handle, stderr=subprocess.STDOUT)
        seen_while_running = False
        while proc.poll() is None:
            if "[spo] spo started: step 0/6" in log.read_text():
                seen_while_running = proc.poll() is None
                break
            time.sleep(0.02)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert seen_while_running, "no progress line reached the file while the run was going"
    steps = [line for line in log.read_text().splitlines() if re.match(r"\[spo\] spo step [246]/6 ", line)]
    assert [line.split()[3] for line in steps[:3]] == ["2/6", "4/6", "6/6"]
    for line in steps[:3]:
        assert " | loss " in line and "log-ratio chosen " in line and line.endswith(" tok/s")
    assert "finished in" in steps[-1]
