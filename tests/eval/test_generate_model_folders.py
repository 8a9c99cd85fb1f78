"""`spo eval generate` on a folder that holds no finished model says so in one line, before anything is generated:
an unfinished spo-align run (no COMPLETE, its model missing or cut), a checkpoint that was never sealed, a folder
with no model, a weights file given instead of its folder, unreadable weights. A finished run and a sealed
checkpoint are generated from."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app


@pytest.fixture
def place(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"id": "1", "prompt": "1+1="}\n')
    return tmp_path


def _run_folder(place: Path, model: Path, name: str, *, finished: bool, with_model: bool = True) -> Path:
    out = place / name
    if with_model:
        shutil.copytree(model, out)
    else:
        out.mkdir()
    (out / "resolved_recipe.yaml").write_text("stage: sft\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    if finished:
        (out / "COMPLETE").write_text("")
    return out


def _cut(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def _generate(*models: str):
    args = ["eval", "generate", "--prompts", "p.jsonl", "--out", "gen", "--max-new-tokens", "2"]
    for model in models:
        args += ["--model", model]
    return CliRunner().invoke(app, args)


def _one_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "model_type" not in errors[0] and "SafetensorError" not in errors[0]
    return errors[0]


def test_an_unfinished_run_with_cut_weights_is_refused_by_name(place: Path, tiny_model_dir: Path):
    run = _run_folder(place, tiny_model_dir, "sft", finished=False)
    _cut(run / "model.safetensors")
    error = _one_line(_generate("sft"))
    assert "sft: is an unfinished spo-align run (no COMPLETE marker" in error
    assert not (place / "gen").exists()


def test_an_unfinished_run_without_a_model_is_refused_by_name(place: Path, tiny_model_dir: Path):
    _run_folder(place, tiny_model_dir, "spo", finished=False, with_model=False)
    assert "spo: is an unfinished spo-align run" in _one_line(_generate("spo"))


def test_every_model_is_checked_before_the_first_is_generated(place: Path, tiny_model_dir: Path):
    _run_folder(place, tiny_model_dir, "done", finished=True)
    _run_folder(place, tiny_model_dir, "half", finished=False, with_model=False)
    assert "half: is an unfinished spo-align run" in _one_line(_generate("done", "half"))
    assert not (place / "gen" / "done.jsonl").exists()


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p, m: (p / "empty").mkdir(), "empty: holds no model (no config.json or adapter_config.json)"),
        (lambda p, m: None, "model.safetensors: is a file, not a model folder; give its folder"),
    ],
    ids=["empty-folder", "weights-file"],
)
def test_a_folder_without_a_model_or_a_file_is_one_line(place: Path, tiny_model_dir: Path, make, fragment: str):
    make(place, tiny_model_dir)
    target = "empty" if "empty" in fragment else str(tiny_model_dir / "model.safetensors")
    assert fragment in _one_line(_generate(f"{target}=m"))


def test_cut_weights_outside_a_run_are_one_line(place: Path, tiny_model_dir: Path):
    shutil.copytree(tiny_model_dir, place / "copied")
    _cut(place / "copied" / "model.safetensors")
    error = _one_line(_generate("copied"))
    assert "cannot load model 'copied'" in error and "cut or half-written" in error


def test_checkpoints_are_used_only_when_sealed(place: Path, tiny_model_dir: Path):
    from spo_align.run_folder import seal

    run = _run_folder(place, tiny_model_dir, "run", finished=False, with_model=False)
    shutil.copytree(tiny_model_dir, run / "checkpoint-2")
    assert "checkpoint-2: is a checkpoint that was never completely written" in _one_line(_generate("run/checkpoint-2"))
    seal(run / "checkpoint-2")
    result = _generate("run/checkpoint-2=ckpt")
    assert result.exit_code == 0, result.output
    assert (place / "gen" / "ckpt.jsonl").is_file()


def test_a_finished_run_is_generated_from(place: Path, tiny_model_dir: Path):
    _run_folder(place, tiny_model_dir, "sft", finished=True)
    result = _generate("sft")
    assert result.exit_code == 0, result.output
    assert (place / "gen" / "sft.jsonl").is_file()


def test_the_merged_model_of_an_unfinished_run_is_refused_and_of_a_finished_one_used(place: Path, tiny_model_dir: Path):
    run = _run_folder(place, tiny_model_dir, "lora", finished=False, with_model=False)
    shutil.copytree(tiny_model_dir, run / "merged")
    assert "merged: is the merged model of an unfinished spo-align run" in _one_line(_generate("lora/merged=m"))
    (run / "COMPLETE").write_text("")
    assert _generate("lora/merged=m").exit_code == 0
