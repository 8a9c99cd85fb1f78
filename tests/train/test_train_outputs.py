"""Output folder lifecycle, training arguments, metrics.jsonl writer and `spo plot`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spo_align.train.outputs import (
    COMPLETE_MARKER,
    RESOLVED_RECIPE,
    OutputFolderError,
    is_complete,
    last_checkpoint,
    prepare_output_dir,
)


def _run_folder(path: Path, *, complete: bool = False, checkpoints: tuple[int, ...] = ()) -> Path:
    path.mkdir(parents=True)
    (path / RESOLVED_RECIPE).write_text("stage: sft\n")
    for step in checkpoints:
        (path / f"checkpoint-{step}").mkdir()
        (path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    if complete:
        (path / "model.safetensors").write_bytes(b"x")
        (path / COMPLETE_MARKER).write_text("done\n")
    return path


def test_a_finished_run_is_not_overwritten_without_overwrite(tmp_path: Path):
    out = _run_folder(tmp_path / "run", complete=True)
    for resume in (False, True):
        with pytest.raises(OutputFolderError, match="holds a finished run; pass --overwrite"):
            prepare_output_dir(out, resume=resume, overwrite=False)
    assert is_complete(out)
    assert prepare_output_dir(out, resume=False, overwrite=True) is None
    assert list(out.iterdir()) == []


def test_an_unfinished_run_needs_resume_or_overwrite(tmp_path: Path):
    out = _run_folder(tmp_path / "run", checkpoints=(5, 10))
    with pytest.raises(OutputFolderError, match="unfinished run; pass --resume"):
        prepare_output_dir(out, resume=False, overwrite=False)
    assert prepare_output_dir(out, resume=True, overwrite=False) == out / "checkpoint-10"


def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path: Path):
    out = _run_folder(tmp_path / "run", checkpoints=(5,))
    (out / "checkpoint-10").mkdir()  # killed while saving: no trainer_state.json yet
    (out / "checkpoint-10" / "model.safetensors").write_bytes(b"partial")
    assert last_checkpoint(out) == out / "checkpoint-5"
    assert not is_complete(out)


def test_a_folder_left_by_a_failed_set_up_is_reused(tmp_path: Path):
    out = _run_folder(tmp_path / "run")
    (out / "metrics.jsonl").write_text("")
    assert prepare_output_dir(out, resume=False, overwrite=False) is None
    assert list(out.iterdir()) == []


def test_a_folder_of_other_files_is_never_emptied(tmp_path: Path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(OutputFolderError, match="not a spo-align run"):
            prepare_output_dir(out, resume=False, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "keep me"


def test_training_arguments_follow_the_recipe_on_cpu(plan_for, tmp_path: Path):
    from trl import KTOConfig, SFTConfig

    from spo_align.train.args import build_training_args

    plan = plan_for("spo", "training.cpu_threads=1", "training.warmup_ratio=0.25", "output.report_to=[none]")
    args = build_training_args(plan, tmp_path)
    assert args.use_cpu and not args.bf16 and not args.fp16
    assert (args.max_steps, args.per_device_train_batch_size, args.learning_rate) == (12, 8, 3e-3)
    assert (args.save_steps, args.save_total_limit, args.logging_steps, args.seed) == (6, 2, 1, 0)
    assert args.warmup_steps == 0.25 and args.report_to == []
    assert args.deepspeed is None
    assert torch.get_num_threads() == 1
    sft = build_training_args(plan, tmp_path, SFTConfig, max_length=48)
    kto = build_training_args(plan, tmp_path, KTOConfig, beta=0.3)
    assert sft.max_length == 48 and kto.beta == 0.3 and kto.use_cpu


def test_tensorboard_is_reported_to_only_when_installed(plan_for, monkeypatch: pytest.MonkeyPatch):
    from spo_align.train import args as args_mod

    plan = plan_for("spo", "output.report_to=[tensorboard]")
    monkeypatch.setattr(args_mod.importlib.util, "find_spec", lambda name: None)
    assert args_mod.report_to(plan) == []
    monkeypatch.setattr(args_mod.importlib.util, "find_spec", lambda name: object())
    assert args_mod.report_to(plan) == ["tensorboard"]


def test_zero3_config_gathers_weights_on_save(plan_for):
    from spo_align.train.args import deepspeed_config

    plan = plan_for("spo_zero3")
    config = deepspeed_config(plan)
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "stage3_gather_16bit_weights_on_model_save" not in plan.deepspeed_config["zero_optimization"]


def _state(step: int, zero: bool = True):
    from transformers import TrainerState

    state = TrainerState()
    state.global_step = step
    state.epoch = step / 10
    state.is_world_process_zero = zero
    return state


def test_metrics_jsonl_gets_every_logged_step_and_drops_steps_past_a_resumed_checkpoint(tmp_path: Path):
    from transformers import TrainerControl

    from spo_align.train.callbacks import MetricsJsonlCallback
    from spo_align.train.outputs import read_metrics

    path = tmp_path / "metrics.jsonl"
    cb = MetricsJsonlCallback(path)
    cb.on_train_begin(None, _state(0), TrainerControl())
    for step in range(1, 8):
        cb.on_log(None, _state(step), TrainerControl(), logs={"loss": torch.tensor(1.0 / step), "learning_rate": 0.1})
    cb.on_log(None, _state(3, zero=False), TrainerControl(), logs={"loss": 9.0})  # other ranks write nothing
    with path.open("a") as handle:
        handle.write('{"step": 8, "lo')  # torn line of a killed run
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 8))
    assert read_metrics(path)[1]["loss"] == pytest.approx(0.5)
    MetricsJsonlCallback(path).on_train_begin(None, _state(5), TrainerControl())
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    MetricsJsonlCallback(path).on_train_begin(None, _state(0), TrainerControl())
    assert not path.exists()


def test_progress_line_shows_the_preference_values():
    from spo_align.train.callbacks import format_values

    line = format_values({"loss": 0.5, "learning_rate": 1e-4, "rewards/margins": 1.25, "grad_norm": 3.0})
    assert line == "loss 0.5  lr 0.0001  margin 1.25"


def test_spo_plot_draws_a_png_of_every_curve(tmp_path: Path):
    from typer.testing import CliRunner

    from spo_align.cli import app

    records = [
        {"step": s, "loss": 1.0 / s, "learning_rate": 0.1, "rewards/margins": 0.1 * s, "spo_margin_term": -s}
        for s in range(1, 6)
    ] + [{"step": 5, "train_runtime": 1.0, "train_loss": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 0, result.output
    png = tmp_path / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from spo_align.plots.compare import build_figure
    from spo_align.plots.runs import load_runs

    titles = [p.title for p in build_figure(load_runs([tmp_path]), "run", every_curve=True).panels]
    assert titles == ["loss", "learning_rate", "rewards/margins (as logged)", "spo_margin_term"]
    missing = CliRunner().invoke(app, ["plot", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
