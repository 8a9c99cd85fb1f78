"""A judge reply that is not a readable chat completion (HTML, broken JSON, null or non-text content, no
choices, a huge body...) becomes an error record for that judgment, with its stored text capped; the run
goes on, a rerun with --retry-errors asks again, and no traceback reaches the user."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from spo_align.cli.eval import register
from spo_align.eval.judge import judge_all
from spo_align.eval.judge_client import OpenAIJudge
from spo_align.eval.judge_reply import MAX_REPLY_BYTES
from spo_align.eval.judge_store import MAX_ERROR_CHARS, MAX_STORED_REPLY_CHARS, read_judgments
from spo_align.eval.reference_judge import ReferenceJudge
from tests.eval.judge_server import FakeJudgeServer, write_generations

KEY_ENV = "SPO_TEST_JUDGE_KEY"
# The question's phrase picks the server's reply (see FakeJudgeServer); the value is what the error says.
UNREADABLE = {
    "html page": "the reply is not JSON (content-type text/html)",
    "not json": "the reply is not JSON (content-type application/json)",
    "null content": "the reply has no content",
    "parts content": "the reply's content is a list, not text",
    "number content": "the reply's content is a number, not text",
    "no choices": "the reply has no choices",
    "no message": "the reply's first choice has no message",
    "array body": "the reply is a JSON list, not an object",
    "error body": "the server answered with an error: model overloaded",
    "bad utf8": "the reply is not UTF-8 text (byte 0xff",
    "huge body": f"the reply is larger than {MAX_REPLY_BYTES} bytes",
}
READABLE = ("plain", "lone surrogate", "odd usage")
QUESTIONS = {f"p{i}": q for i, q in enumerate([*UNREADABLE, *READABLE])}
ANSWERS = {"m1": {p: "x" for p in QUESTIONS}, "m2": {p: "yy" for p in QUESTIONS}}


def test_unreadable_replies_are_recorded_errors_and_the_run_goes_on(
    judge_server: FakeJudgeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, judge_server.expected_key)
    gen = write_generations(tmp_path / "gen", ANSWERS, QUESTIONS)
    out = tmp_path / "judgments.jsonl"
    judge = OpenAIJudge("judge-x", base_url=judge_server.url, api_key_env=KEY_ENV, max_attempts=3, parse_retries=1,
                        backoff_s=0.01)
    summary = judge_all(gen, judge, out, concurrency=4)
    assert (summary.judged, summary.errors) == (2 * len(READABLE), 2 * len(UNREADABLE))

    out.read_bytes().decode("utf-8")  # the file stays valid UTF-8 (an unpaired surrogate became U+FFFD)
    records = read_judgments(out)
    by_question = {QUESTIONS[r.prompt_id]: r for r in records}
    for phrase, reason in UNREADABLE.items():
        record = by_question[phrase]
        assert record.status == "error" and record.attempts == 2, record  # asked again once, then recorded
        assert record.error.startswith(f"unreadable reply: {reason}"), record.error
        assert len(record.error) <= MAX_ERROR_CHARS and "\n" not in record.error
        assert record.reply and len(record.reply) <= MAX_STORED_REPLY_CHARS
    assert by_question["huge body"].reply.endswith(f"[…cut, {MAX_REPLY_BYTES} characters in all]")
    assert by_question["html page"].reply.startswith("<!DOCTYPE html>")
    assert by_question["lone surrogate"].winner == "m2" and "\ufffd" in by_question["lone surrogate"].reply
    odd = by_question["odd usage"]
    assert odd.winner == "m2" and (odd.prompt_tokens, odd.completion_tokens) == (None, None)
    assert by_question["plain"].prompt_tokens and by_question["plain"].completion_tokens == 7

    before = dict(judge_server.attempts)
    again = judge_all(gen, judge, out, concurrency=4, retry_errors=True)
    assert (again.errors, again.skipped_done) == (2 * len(UNREADABLE), 2 * len(READABLE))
    asked = {key[0] for key, n in judge_server.attempts.items() if n > before.get(key, 0)}
    assert asked == set(UNREADABLE)  # the errors were asked again, and only they


def test_spo_eval_judge_on_unreadable_replies_exits_1_without_a_traceback(
    judge_server: FakeJudgeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = typer.Typer()
    register(app)
    app.callback()(lambda: None)
    monkeypatch.setenv(KEY_ENV, judge_server.expected_key)
    questions = {"p1": "plain", "p2": "html page", "p3": "number content"}
    gen = write_generations(tmp_path / "gen", {"a": {p: "x" for p in questions}, "b": {p: "yy" for p in questions}},
                            questions)
    out = tmp_path / "j.jsonl"
    result = CliRunner().invoke(app, ["eval", "judge", str(gen), "--judge-model", "judge-x", "--out", str(out),
                                      "--base-url", judge_server.url, "--api-key-env", KEY_ENV, "--parse-retries", "0"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and "4 of 6 judgments failed" in result.output
    assert [json.loads(line)["status"] for line in out.read_text().splitlines()].count("ok") == 2


def test_a_judge_that_raises_records_an_error_for_that_judgment_only(tmp_path: Path) -> None:
    def fragile(response: str, reference: str) -> bool:
        if response == "boom":
            raise ValueError(f"cannot compare {response!r}")
        return response.strip() == reference.strip()

    questions = {"p1": "1+1=", "p2": "2+2="}
    gen = write_generations(tmp_path / "gen", {"a": {"p1": "2", "p2": "boom"}, "b": {"p1": "3", "p2": "4"}},
                            questions, references={"p1": "2", "p2": "4"})
    out = tmp_path / "j.jsonl"
    summary = judge_all(gen, ReferenceJudge(fragile, name="fragile"), out, concurrency=2)
    assert (summary.judged, summary.errors) == (2, 2)
    errors = [r for r in read_judgments(out) if r.status == "error"]
    assert {r.prompt_id for r in errors} == {"p2"}
    assert all(r.error == "ValueError: cannot compare 'boom'" for r in errors)
