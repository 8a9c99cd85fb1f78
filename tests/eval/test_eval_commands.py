"""`spo eval generate | judge | table` from the command line: exit codes, one-line errors, light imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from spo_align.cli.eval import register
from tests.eval.judge_server import FakeJudgeServer, write_generations

runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # keeps `eval` a sub-command even with one group registered
        pass

    return app


def _one_line_error(output: str, *fragments: str) -> None:
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], output


def test_generate_judge_table_offline_with_the_reference_judge(app: typer.Typer, tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"{i}+1=", "reference": str(i + 1)}) + "\n" for i in range(4)))
    gen = tmp_path / "gen"
    result = runner.invoke(app, ["eval", "generate", "--model", f"{tiny_model_dir}=m1", "--model", f"{tiny_model_dir}=m2",
                                 "--prompts", str(prompts), "--n", "3", "--out", str(gen), "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in gen.iterdir()) == ["m1.jsonl", "m2.jsonl"]
    assert len((gen / "m1.jsonl").read_text().splitlines()) == 3

    out = tmp_path / "judgments.jsonl"
    result = runner.invoke(app, ["eval", "judge", str(gen), "--judge-model", "reference", "--out", str(out), "--dry-run"])
    assert result.exit_code == 0 and "calls to make: 0" in result.output and not out.exists()
    result = runner.invoke(app, ["eval", "judge", str(gen), "--judge-model", "reference", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 3 * 2  # identical models: identical answers, ties without calls

    result = runner.invoke(app, ["eval", "table", str(out), "--out", str(tmp_path / "tables"), "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    assert "| **m1** | – | 50.0 [50.0, 50.0] n=3 |" in result.output
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == ["win_rates.csv", "win_rates.md", "win_rates.png"]


def test_bad_input_is_one_line_and_exit_1(app: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    result = runner.invoke(app, ["eval", "generate", "--model", "x", "--prompts", str(bad), "--out", str(tmp_path / "g")])
    assert result.exit_code == 1
    _one_line_error(result.output, f"{bad}:2: duplicate id '1'")

    good = tmp_path / "good.jsonl"
    good.write_text('{"id": 1, "prompt": "a"}\n')
    for model, message in ((tmp_path / "missing", "model directory not found"), (tmp_path, "holds no model")):
        result = runner.invoke(app, ["eval", "generate", "--model", f"{model}=m", "--prompts", str(good),
                                     "--out", str(tmp_path / "g")])
        assert result.exit_code == 1
        _one_line_error(result.output, message)

    result = runner.invoke(app, ["eval", "judge", str(tmp_path / "nope"), "--judge-model", "reference", "--out", "j.jsonl"])
    assert result.exit_code == 1
    _one_line_error(result.output, "generation directory not found")

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    gen = write_generations(tmp_path / "gen", {"a": {"p": "1"}, "b": {"p": "2"}}, {"p": "q"})
    result = runner.invoke(app, ["eval", "judge", str(gen), "--judge-model", "gpt-4o", "--out", str(tmp_path / "j.jsonl")])
    assert result.exit_code == 1
    _one_line_error(result.output, "set the OPENAI_API_KEY environment variable")

    result = runner.invoke(app, ["eval", "table", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 1
    _one_line_error(result.output, "judgments file not found")


def test_usage_errors_exit_2(app: typer.Typer, tmp_path: Path) -> None:
    assert runner.invoke(app, ["eval", "judge", str(tmp_path)]).exit_code == 2  # no --judge-model/--out
    assert runner.invoke(app, ["eval", "generate", "--model", "m", "--prompts", "p.jsonl", "--out", "o",
                               "--engine", "tgi"]).exit_code == 2
    assert runner.invoke(app, ["eval", "judge", str(tmp_path), "--judge-model", "j", "--out", "o",
                               "--concurrency", "0"]).exit_code == 2


def test_dry_run_counts_calls_and_tokens_and_failed_judgments_exit_1(
    app: typer.Typer, judge_server: FakeJudgeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPO_TEST_JUDGE_KEY", judge_server.expected_key)
    gen = write_generations(tmp_path / "gen", {"a": {"p1": "x", "p2": "x"}, "b": {"p1": "yy", "p2": "x"}},
                            {"p1": "hopeless", "p2": "same answers"})
    out = tmp_path / "j.jsonl"
    base = ["eval", "judge", str(gen), "--judge-model", "judge-x", "--out", str(out), "--base-url", judge_server.url,
            "--api-key-env", "SPO_TEST_JUDGE_KEY"]
    result = runner.invoke(app, [*base, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "calls to make: 2" in result.output and "2 identical-answer ties" in result.output
    assert "estimated tokens: " in result.output and judge_server.requested == []
    result = runner.invoke(app, [*base, "--parse-retries", "0"])
    assert result.exit_code == 1
    assert "2 of 4 judgments failed" in result.output and judge_server.expected_key not in result.output


def test_commands_module_imports_no_heavy_dependencies() -> None:
    code = ("import sys, spo_align.cli.eval; "
            "heavy = {'torch', 'transformers', 'openai', 'matplotlib', 'numpy'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
