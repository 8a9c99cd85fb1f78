"""Corrupt judgments and generation files (nulls, wrong types, non-UTF-8 bytes, unpaired surrogates,
torn lines) give `spo eval table` / `spo eval judge` a one-line error naming the file, the line and
the field, never a traceback; a torn last line of the judgments file (a killed run) is skipped with a
warning, while generation files, written whole, have no such excuse."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from spo_align.cli.eval import register
from spo_align.eval.judge_store import JudgmentRecord, JudgmentStore, read_judgments
from spo_align.eval.records import GenerationRecord, read_generation_file
from tests.eval.judge_server import write_generations

runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    app.callback()(lambda: None)
    return app


def _good_lines() -> list[str]:
    records = []
    for prompt in ("p1", "p2"):
        records += [JudgmentRecord(prompt, "a", "b", "j", "v1", "ok", "A", reply="é [[A]]"),
                    JudgmentRecord(prompt, "b", "a", "j", "v1", "ok", "B", reply="é [[B]]")]
    return [r.to_json() for r in records]


def _one_line_error(output: str, *fragments: str) -> None:
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and len([line for line in output.splitlines() if line.strip()]) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], output


# (what is done to line 2, what the error says)
BAD_FIELDS = [
    ({"prompt_id": None}, "'prompt_id' must be a string or an integer, not null"),
    ({"prompt_id": [1]}, "'prompt_id' must be a string or an integer, not a list"),
    ({"model_a": None}, "'model_a' must be a string, not null"),
    ({"model_b": 3}, "'model_b' must be a string, not a number"),
    ({"judge_model": ""}, "'judge_model' must not be empty"),
    ({"status": None}, "'status' must be a string, not null"),
    ({"verdict": 1}, "'verdict' must be 'A', 'B', 'C' or null, got 1"),
    ({"verdict": "D"}, "'verdict' must be 'A', 'B', 'C' or null, got 'D'"),
    ({"attempts": "3"}, "'attempts' must be a non-negative integer, got \"3\""),
    ({"attempts": None}, "'attempts' must be a non-negative integer, got null"),
    ({"prompt_tokens": -1}, "'prompt_tokens' must be a non-negative integer, got -1"),
    ({"completion_tokens": 2.5}, "'completion_tokens' must be a non-negative integer, got 2.5"),
    ({"reply": {"text": "[[A]]"}}, "'reply' must be a string, not an object"),
    ({"error": 404}, "'error' must be a string, not a number"),
    ({"source": "guess"}, "'source' must be 'judge' or 'identical', got 'guess'"),
]


@pytest.mark.parametrize(("change", "message"), BAD_FIELDS, ids=[m.split(" must")[0].strip("'") + str(i)
                                                                 for i, (_, m) in enumerate(BAD_FIELDS)])
def test_table_names_file_line_and_field_of_a_bad_judgment(app: typer.Typer, tmp_path: Path, change: dict,
                                                           message: str) -> None:
    lines = _good_lines()
    lines[1] = json.dumps({**json.loads(lines[1]), **change})
    path = tmp_path / "judgments.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["eval", "table", str(path), "--no-heatmap"])
    assert result.exit_code == 1
    _one_line_error(result.output, f"{path}:2: {message}")


RAW_BAD_LINES = [
    (b'{"prompt_id": "p1", "model_a": "\xff\xfe"}', "not a valid judgment line (not UTF-8 text (byte 0xff at column 33))"),
    (b"[1, 2]", "not a valid judgment line (a list, not an object)"),
    (b'{"prompt_id": "p1", "model_a": "a", "model_b": "b", "judge_model": "j", "prompt_version": "v1", '
     b'"status": "ok", "verdict": "A", "prompt_tokens": NaN}', "'prompt_tokens' must be a non-negative integer, got NaN"),
    (b"[" * 100_000, "not a valid judgment line (not JSON)"),
    (b'{"prompt_id": "p1", "model_a": "a", "model_b": "b", "judge_model": "j", "prompt_version": "v1", '
     b'"status": "ok", "verdict": "A", "attempts": 1e400}', "'attempts' must be a non-negative integer, got Infinity"),
    (b'{"prompt_id": "\\ud800", "model_a": "a", "model_b": "b", "judge_model": "j", "prompt_version": "v1", '
     b'"status": "ok", "verdict": "A"}', "'prompt_id' holds an unpaired surrogate escape"),
]


@pytest.mark.parametrize(("raw", "message"), RAW_BAD_LINES, ids=["utf8", "list", "nan", "deep", "inf", "surrogate"])
def test_table_names_the_line_that_is_not_a_judgment(app: typer.Typer, tmp_path: Path, raw: bytes,
                                                     message: str) -> None:
    lines = [line.encode() for line in _good_lines()]
    path = tmp_path / "judgments.jsonl"
    path.write_bytes(b"\n".join([lines[0], raw, *lines[1:]]) + b"\n")
    result = runner.invoke(app, ["eval", "table", str(path), "--no-heatmap"])
    assert result.exit_code == 1
    _one_line_error(result.output, f"{path}:2: {message}")


def test_a_torn_last_line_even_inside_a_character_is_skipped_with_a_warning_and_cut_on_append(
    app: typer.Typer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = [line.encode() for line in _good_lines()]
    torn = lines[-1][: lines[-1].index("é".encode()) + 1]  # ends on the first byte of a two-byte character
    path = tmp_path / "judgments.jsonl"
    path.write_bytes(b"\n".join(lines[:-1]) + b"\n" + torn)
    with caplog.at_level(logging.WARNING):
        result = runner.invoke(app, ["eval", "table", str(path), "--no-heatmap", "--bootstrap", "10"])
    assert result.exit_code == 0, result.output
    assert f"{path}:4: ignoring a truncated last line" in caplog.text
    assert "1 (prompt, pair) comparisons lacked an ok judgment in one order" in result.output
    with JudgmentStore(path):
        pass
    assert path.read_bytes() == b"\n".join(lines[:-1]) + b"\n" and len(read_judgments(path)) == 3


def _generation_dir(tmp_path: Path, line2: bytes, last: bytes | None = None) -> Path:
    gen = write_generations(tmp_path / "gen", {"a": {"p1": "1", "p2": "2", "p3": "3"}, "b": {"p1": "1", "p2": "2", "p3": "4"}},
                            {"p1": "q1", "p2": "q2", "p3": "q3"}, references={"p1": "1", "p2": "2", "p3": "3"})
    lines = (gen / "b.jsonl").read_bytes().split(b"\n")
    lines[1] = line2
    if last is not None:
        lines[2] = last
    (gen / "b.jsonl").write_bytes(b"\n".join(lines))
    return gen


def _generation(**change: object) -> bytes:
    record = json.loads(GenerationRecord("b", "p2", "q2", "2", "2", {}).to_json())
    return json.dumps({**record, **change}).encode()


BAD_GENERATIONS = [
    (_generation(response=None), "'response' must be a string, not null"),
    (_generation(prompt=["q2"]), "'prompt' must be a string, not a list"),
    (_generation(prompt_id=None), "'prompt_id' must be a string or an integer, not null"),
    (_generation(prompt_id=2.0), "'prompt_id' must be a string or an integer, not a number"),
    (_generation(settings=None), "'settings' must be an object, not null"),
    (_generation(response="ok").replace(b'"ok"', b'"\\udc80"'), "'response' holds an unpaired surrogate escape"),
    (_generation().replace(b'"q2"', b'"q\xe92"'), "not UTF-8 text (byte 0xe9 at column"),
    (b'{"model": "b", "prompt_id"', "not valid JSON"),
]


@pytest.mark.parametrize(("line2", "message"), BAD_GENERATIONS,
                         ids=["null", "list", "id-null", "id-float", "settings", "surrogate", "utf8", "torn"])
def test_judge_names_file_line_and_field_of_a_bad_generation(app: typer.Typer, tmp_path: Path, line2: bytes,
                                                             message: str) -> None:
    gen = _generation_dir(tmp_path, line2)
    result = runner.invoke(app, ["eval", "judge", str(gen), "--judge-model", "reference", "--out",
                                 str(tmp_path / "j.jsonl"), "--dry-run"])
    assert result.exit_code == 1
    _one_line_error(result.output, f"{gen / 'b.jsonl'}:2: {message}")


def test_generation_files_have_no_torn_last_line_excuse(app: typer.Typer, tmp_path: Path) -> None:
    gen = _generation_dir(tmp_path, _generation(), last=_generation(prompt_id="p3")[:25])
    result = runner.invoke(app, ["eval", "judge", str(gen), "--judge-model", "reference", "--out",
                                 str(tmp_path / "j.jsonl")])
    assert result.exit_code == 1
    _one_line_error(result.output, f"{gen / 'b.jsonl'}:3: not valid JSON")
    assert not (tmp_path / "j.jsonl").exists()


def test_line_separators_inside_answers_are_text_not_line_breaks(tmp_path: Path) -> None:
    odd = "one\u2028two\u2029three\x85four\x1cfive"
    gen = write_generations(tmp_path / "gen", {"a": {"p1": odd}}, {"p1": "q\u2028?"})
    (record,) = read_generation_file(gen / "a.jsonl")
    assert (record.response, record.prompt) == (odd, "q\u2028?")
