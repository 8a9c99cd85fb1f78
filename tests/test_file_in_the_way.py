"""A path whose parent is a file (`runs/x` where `runs` is a file): every command says which path is a file, in
one line, instead of `[Errno 17] File exists` / `Not a directory` or a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app
from tests.eval.judge_server import write_generations

REPO = Path(__file__).resolve().parents[1]
TINY_SFT = REPO / "recipes" / "tiny" / "sft.yaml"


@pytest.fixture
def place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder\n")
    return tmp_path


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def _one_line_naming_the_file(result, place: Path, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    text = result.output
    assert "Errno" not in text and "Traceback" not in text and "File exists" not in text
    assert "Not a directory" not in text
    assert f"{place / 'afile'} is a file, not a folder" in text or "afile is a file, not a folder" in text, text
    return text


def test_spo_new_into_a_folder_that_is_a_file(place: Path):
    _one_line_naming_the_file(_run("new", str(TINY_SFT), "afile/new.yaml"), place, code=2)


def test_spo_schema_into_a_folder_that_is_a_file(place: Path):
    _one_line_naming_the_file(_run("schema", "-o", "afile/schema.json"), place, code=2)


@pytest.mark.parametrize("command", ["train", "validate"])
def test_an_output_dir_under_a_file_is_refused_at_its_key(place: Path, command: str):
    args = ["--set", "output.dir=afile/run"] if command == "train" else []
    recipe = TINY_SFT
    if command == "validate":
        recipe = place / "r.yaml"
        recipe.write_text(f"extends: {TINY_SFT}\noutput:\n  dir: afile/run\n")
    text = _one_line_naming_the_file(_run(command, str(recipe), *args), place)
    assert "output.dir" in text


def test_a_dataset_under_a_file_says_so(place: Path):
    recipe = place / "r.yaml"
    recipe.write_text(f"extends: {TINY_SFT}\ndata:\n  train:\n    - path: afile/pairs.jsonl\n")
    text = _one_line_naming_the_file(_run("validate", str(recipe)), place)
    assert "data.train.0.path" in text and "not found" in text


def test_eval_generate_out_under_a_file(place: Path):
    (place / "p.jsonl").write_text('{"id": "1", "prompt": "hi"}\n')
    result = _run("eval", "generate", "--model", "org/not-local=m", "--prompts", "p.jsonl", "--out", "afile/gen")
    _one_line_naming_the_file(result, place)


def test_eval_generate_prompts_under_a_file(place: Path):
    result = _run("eval", "generate", "--model", "org/not-local=m", "--prompts", "afile/p.jsonl", "--out", "gen")
    _one_line_naming_the_file(result, place)


def test_eval_judge_and_table_out_under_a_file(place: Path):
    questions = {"p0": "1+1", "p1": "2+2"}
    refs = {"p0": "2", "p1": "4"}
    write_generations(place / "gen", {"a": {"p0": "2", "p1": "5"}, "b": {"p0": "3", "p1": "4"}}, questions, refs)
    _one_line_naming_the_file(
        _run("eval", "judge", "gen", "--judge-model", "reference", "--out", "afile/j.jsonl"), place
    )
    assert _run("eval", "judge", "gen", "--judge-model", "reference", "--out", "j.jsonl").exit_code == 0
    _one_line_naming_the_file(_run("eval", "table", "j.jsonl", "--out", "afile/tables", "--bootstrap", "10"), place)


def test_spo_plot_out_under_a_file(place: Path):
    run = place / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    _one_line_naming_the_file(_run("plot", str(run), "--out", "afile/curves.png"), place)


def test_an_experiment_output_dir_under_a_file_is_refused_at_its_line(place: Path):
    text = (
        f"output_dir: afile/exp\nseeds: [0]\nsft: {{name: sft, recipe: {TINY_SFT}}}\n"
        f"preference:\n  - {{name: spo, recipe: {REPO / 'recipes' / 'tiny' / 'spo.yaml'}}}\n"
        f"eval:\n  prompts: {REPO / 'data' / 'tiny' / 'test.jsonl'}\n  judge: {{type: reference}}\n"
    )
    (place / "exp.yaml").write_text(text)
    result = _run("experiment", "exp.yaml", "--dry-run")
    out = _one_line_naming_the_file(result, place)
    assert "exp.yaml:1:" in out and "output_dir" in out
