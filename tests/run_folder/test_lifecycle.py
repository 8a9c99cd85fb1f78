"""Output folder lifecycle, training arguments, metrics.jsonl writer and `spo plot`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from spo_align.run_folder.checkpoints import SEAL, is_sealed, last_checkpoint, rotate, seal
from spo_align.run_folder.layout import COMPLETE_MARKER, RESOLVED_RECIPE, finished_at
from spo_align.run_folder.lifecycle import (
    Claim,
    OutputFolderError,
    claim_folder,
)
from spo_align.run_folder.recipe_hash import RecipeSettings

SETTINGS = RecipeSettings({"stage": "sft", "loss.beta": 0.1, "training.learning_rate": 1e-3})


def _checkpoint(out: Path, step: int, *, sealed: bool = True) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w" * 64)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 100}))
    if sealed:
        seal(folder)
    return folder


def _run_folder(path: Path, *, complete: bool = False, checkpoints: tuple[int, ...] = (), settings=SETTINGS) -> Path:
    path.mkdir(parents=True)
    if complete:  # the marker first, so that directory order cannot put it first by chance
        (path / COMPLETE_MARKER).write_text("done\n")
    (path / RESOLVED_RECIPE).write_text("stage: sft\n")
    settings.write(path)
    for step in checkpoints:
        _checkpoint(path, step)
    if complete:
        for name in ("model.safetensors", "config.json", "tokenizer.json", "run.json", "metrics.jsonl"):
            (path / name).write_bytes(b"x")
    return path


def _claim(out: Path, *, resume: bool = False, overwrite: bool = False, settings=SETTINGS):
    return claim_folder(out, settings, resume=resume, overwrite=overwrite)


def test_a_finished_run_is_not_overwritten_without_overwrite(tmp_path: Path):
    out = _run_folder(tmp_path / "run", complete=True)
    for resume in (False, True):
        with pytest.raises(OutputFolderError, match="holds a finished run; pass --overwrite"):
            _claim(out, resume=resume)
    assert finished_at(out) is not None
    assert _claim(out, overwrite=True).checkpoint is None
    assert list(out.iterdir()) == []


def test_overwrite_removes_the_completion_marker_before_anything_else(tmp_path: Path, monkeypatch):
    out = _run_folder(tmp_path / "run", complete=True, checkpoints=(5,))
    deleted: list[str] = []
    real_unlink = Path.unlink

    def unlink(self, *args, **kwargs):
        deleted.append(self.name)
        if self.name != COMPLETE_MARKER:
            raise KeyboardInterrupt  # interrupted at the first file after the marker
        return real_unlink(self, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        deleted.append(Path(path).name)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "unlink", unlink)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        _claim(out, overwrite=True)
    monkeypatch.undo()
    assert deleted[0] == COMPLETE_MARKER and len(deleted) == 2
    assert finished_at(out) is None  # the folder no longer says finished, though its model is half deleted


def test_a_plain_rerun_continues_an_unfinished_run_of_the_same_recipe(tmp_path: Path):
    out = _run_folder(tmp_path / "run", checkpoints=(5, 10))
    _checkpoint(out, 15, sealed=False)  # killed while saving
    claim = _claim(out)
    assert claim.checkpoint == out / "checkpoint-10" and claim.continued
    assert not (out / "checkpoint-15").exists()  # the torn one is gone
    assert _claim(out, resume=True).checkpoint == out / "checkpoint-10"


def test_a_rerun_with_another_recipe_is_refused_naming_the_keys(tmp_path: Path):
    out = _run_folder(tmp_path / "run", checkpoints=(5,))
    other = RecipeSettings({**SETTINGS.values, "loss.beta": 0.2, "data.train.0.max_samples": 64})
    for resume in (False, True):
        with pytest.raises(OutputFolderError) as exc:
            _claim(out, resume=resume, settings=other)
        message = str(exc.value)
        assert "another recipe" in message and "loss.beta: 0.1 -> 0.2" in message
        assert "data.train.0.max_samples: (unset) -> 64" in message
    assert is_sealed(out / "checkpoint-5")
    assert _claim(out, overwrite=True, settings=other).checkpoint is None
    assert not (out / "checkpoint-5").exists()


def test_a_run_stopped_before_its_first_checkpoint_is_started_over_whatever_its_recipe(tmp_path: Path):
    out = _run_folder(tmp_path / "run")
    _checkpoint(out, 5, sealed=False)
    other = RecipeSettings({**SETTINGS.values, "loss.beta": 0.2})
    with pytest.raises(OutputFolderError, match="no complete checkpoint to resume from"):
        _claim(out, resume=True, settings=other)
    assert _claim(out, settings=other) == Claim(None, continued=False)
    assert list(out.iterdir()) == []


def test_unreadable_recorded_settings_refuse_continuing_a_checkpoint(tmp_path: Path):
    out = _run_folder(tmp_path / "run", checkpoints=(5,))
    (out / "recipe_hash.json").write_text("{not json")
    with pytest.raises(OutputFolderError, match="cannot read the recorded settings of the run in .*; pass --overwrite"):
        _claim(out)
    assert is_sealed(out / "checkpoint-5")


def test_keys_that_cannot_change_the_weights_do_not_change_the_hash(plan_for):
    base = RecipeSettings.from_plan(plan_for("spo"))
    same = RecipeSettings.from_plan(plan_for(
        "spo", "training.save_steps=3", "training.logging_steps=2", "output.report_to=[tensorboard]",
        "description=another", "output.dir=/elsewhere", "training.cpu_threads=2",
    ))
    assert same.hash == base.hash
    assert RecipeSettings.from_plan(plan_for("spo", "loss.beta=0.3")).hash != base.hash
    assert RecipeSettings.from_plan(plan_for("spo", "data.train.0.max_samples=64")).hash != base.hash


def test_a_failed_set_up_is_started_over_deleting_only_what_the_tool_wrote(tmp_path: Path, caplog):
    out = _run_folder(tmp_path / "run")  # a resolved recipe, no checkpoint: a run that failed while setting up
    (out / "metrics.jsonl").write_text("")
    (out / "notes.txt").write_text("keep me")
    (out / "README.md").write_text("# my own notes\n")
    (out / "data").mkdir()
    (out / "data" / "rows.jsonl").write_text("{}\n")
    (out / "reference_logps").mkdir()
    (out / "reference_logps" / "train-x.pt").write_bytes(b"cache")
    caplog.set_level("WARNING", logger="spo_align.run_folder.lifecycle")
    assert _claim(out).checkpoint is None
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "data", "notes.txt", "reference_logps"]
    assert (out / "notes.txt").read_text() == "keep me" and (out / "data" / "rows.jsonl").exists()
    assert any("README.md, data, notes.txt" in r.getMessage() for r in caplog.records)


def test_overwrite_keeps_files_the_tool_did_not_write(tmp_path: Path):
    out = _run_folder(tmp_path / "run", complete=True, checkpoints=(5,))
    (out / "README.md").write_text("---\ntags: [spo-align]\n---\n<!-- model card written by spo-align -->\n")
    (out / "runs").mkdir()
    (out / "my_eval.csv").write_text("a,b\n")
    _claim(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["my_eval.csv"]


def test_resume_fails_where_there_is_nothing_to_continue(tmp_path: Path):
    with pytest.raises(OutputFolderError, match="holds no run to resume"):
        _claim(tmp_path / "new", resume=True)
    out = _run_folder(tmp_path / "run")
    with pytest.raises(OutputFolderError, match="no complete checkpoint to resume from"):
        _claim(out, resume=True)
    assert (out / RESOLVED_RECIPE).exists()


def test_a_folder_of_other_files_is_never_emptied(tmp_path: Path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(OutputFolderError, match="not a spo-align run"):
            _claim(out, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "keep me"


def test_an_output_dir_on_or_under_a_file_is_a_clear_error(tmp_path: Path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputFolderError, match="exists and is not a folder"):
        _claim(afile)
    with pytest.raises(OutputFolderError, match=f"output.dir {afile}/run cannot be created: {afile} is a file, not a folder"):
        _claim(afile / "run")


def test_a_checkpoint_is_resumed_from_only_when_sealed_and_whole(tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    five = _checkpoint(out, 5)
    ten = _checkpoint(out, 10, sealed=False)
    (ten / "trainer_state.json").write_text('{"global_st')  # torn while written
    assert last_checkpoint(out) == five
    seal(ten)
    assert last_checkpoint(out) == ten
    with (ten / "model.safetensors").open("r+b") as handle:
        handle.truncate(10)  # a file lost its tail after the seal (a copy cut short, a lost page cache)
    assert not is_sealed(ten) and last_checkpoint(out) == five
    (five / SEAL).write_text(json.dumps({"step": 6, "files": {"model.safetensors": 64}}))
    assert last_checkpoint(out) is None  # a seal for another step


def test_old_checkpoints_are_deleted_only_after_the_new_one_is_sealed(tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    for step in (5, 10, 15):
        _checkpoint(out, step)
    torn = _checkpoint(out, 20, sealed=False)
    rotate(out, 1)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-15", "checkpoint-20"]  # unsealed newest stays
    seal(torn)
    rotate(out, 1)
    assert [p.name for p in out.iterdir()] == ["checkpoint-20"]


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

    from spo_align.run_folder.metrics_file import read_metrics
    from spo_align.train.callbacks import MetricsJsonlCallback

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
    from spo_align.train.progress import format_values

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
