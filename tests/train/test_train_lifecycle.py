"""A run's folder through interruptions: real `spo train` processes SIGKILLed halfway through a checkpoint
and halfway through the final save, then the same command run again; the model card of a finished run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "data" / "recipes"
STEPS = 12
# Wall time differs, and the Trainer's closing summary covers only the session that ran last.
NOT_COMPARED = {
    "elapsed_s", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss",
}


def _args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", str(RECIPES / "spo.yaml"), "--set", f"model.name_or_path={model}", "--set", f"output.dir={out}",
        "--set", f"training.max_steps={STEPS}", "--set", "training.save_steps=4", "--set", "training.save_total_limit=1",
        "--set", "data.train.0.max_samples=64", *extra,
    ]


def _killed(args: list[str], where: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_AT": where, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "kill_during_save.py"), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL, as planned
    return proc


def _records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in NOT_COMPARED} for row in rows]


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def straight(small_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run the interrupted ones must end like."""
    out = tmp_path_factory.mktemp("straight") / "out"
    result = CliRunner().invoke(app, _args(small_model, out))
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_a_run_killed_while_writing_a_checkpoint_continues_from_the_last_whole_one(
    straight: Path, small_model: Path, tmp_path: Path
):
    out = tmp_path / "out"
    _killed(_args(small_model, out), "checkpoint:8")
    assert (out / "checkpoint-8" / "trainer_state.json").exists()  # half written, never sealed
    assert (out / "checkpoint-4").is_dir() and not (out / "COMPLETE").exists()

    again = CliRunner().invoke(app, _args(small_model, out))  # the same command, no flag
    assert again.exit_code == 0, again.output
    info = json.loads((out / "run.json").read_text())
    assert info["resumed_from"].endswith("checkpoint-4") and len(info["sessions"]) == 2
    assert info["started"] == info["sessions"][0]["started"]
    assert _records(out) == _records(straight)
    a, b = _weights(straight), _weights(out)
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-6, name
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-12"]  # save_total_limit 1, after sealing


@pytest.mark.slow
def test_a_run_killed_during_its_final_save_finishes_without_training(
    straight: Path, small_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    out = tmp_path / "out"
    _killed(_args(small_model, out), "final")
    assert (out / f"checkpoint-{STEPS}").is_dir() and not (out / "COMPLETE").exists()
    before = _records(out)

    caplog.set_level("INFO", logger="spo_align.train.finish")
    again = CliRunner().invoke(app, _args(small_model, out))
    assert again.exit_code == 0, again.output
    assert any("finishing the run without training" in r.getMessage() for r in caplog.records)
    assert _records(out) == before  # not one step more was trained or logged
    assert max(r["step"] for r in _records(out)) == STEPS
    checkpoint, final = _weights(out / f"checkpoint-{STEPS}"), _weights(out)
    assert all((checkpoint[n] == final[n]).all() for n in checkpoint)
    straight_weights = _weights(straight)
    assert all((straight_weights[n] - final[n]).abs().max().item() <= 1e-6 for n in final)
    assert json.loads((out / "run.json").read_text())["resumed_from"].endswith(f"checkpoint-{STEPS}")
    assert (out / "COMPLETE").exists() and (out / "README.md").exists()

    resumed = CliRunner().invoke(app, _args(small_model, out, "--resume"))
    assert resumed.exit_code == 1 and "holds a finished run" in resumed.stderr


@pytest.mark.slow
def test_a_changed_recipe_is_refused_and_the_folder_left_as_it_was(straight: Path, small_model: Path, tmp_path: Path):
    out = tmp_path / "out"
    _killed(_args(small_model, out), "checkpoint:8")
    # the killed run's lock stays behind (its pid is gone); the next launch takes it over, the rest stays as it was
    def files() -> list[str]:
        return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name != ".spo-lock")

    before = files()
    for flag in ((), ("--resume",)):
        refused = CliRunner().invoke(app, _args(small_model, out, "--set", "loss.beta=0.3", *flag))
        assert refused.exit_code == 1 and "Traceback" not in refused.output
        assert "another recipe (loss.beta: 0.2 -> 0.3)" in refused.stderr
    assert files() == before
    assert "beta: 0.2" in (out / "resolved_recipe.yaml").read_text()


def test_a_failed_runs_folder_is_started_over_keeping_the_users_files(small_model: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "resolved_recipe.yaml").write_text("stage: preference\n")  # a run that failed while setting up
    (out / "metrics.jsonl").write_text("")
    (out / "notes.md").write_text("my notes")
    (out / "eval").mkdir()
    (out / "eval" / "scores.csv").write_text("a,b\n")
    result = CliRunner().invoke(app, _args(small_model, out, "--set", "training.max_steps=2"))
    assert result.exit_code == 0, result.output
    assert (out / "notes.md").read_text() == "my notes" and (out / "eval" / "scores.csv").exists()
    assert (out / "COMPLETE").exists()


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_the_same_command_continues(small_model: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = _args(small_model, out)
    # Ctrl-C during step 6, after checkpoint-4 (chosen inside the process, so a fast machine cannot finish first)
    env = {**os.environ, "SIGNAL_AT": "6", "SIGNAL": "INT", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "signal_at_step.py"), *args], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"interrupted: the run in {out} is not finished")
    assert not (out / "COMPLETE").exists()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "run.json").read_text())["resumed_from"].endswith("checkpoint-4")
