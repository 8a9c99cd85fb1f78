"""The API key never leaves the judge, whole or in part: not in the judgments file, the log (at DEBUG,
with `spo -v`), stdout or stderr, even against a server that echoes it in headers, error bodies and
replies, and puts it where a cut to a fixed length would split it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spo_align.eval.judge import judge_all
from spo_align.eval.judge_client import OpenAIJudge
from spo_align.eval.judge_store import read_judgments
from spo_align.eval.redact import redact, register_secret
from tests.eval.judge_server import FakeJudgeServer, write_generations

KEY_ENV = "SPO_TEST_JUDGE_KEY"
WINDOW = 8
# `leak at 0` and `leak at 14` hold the key at every offset, half a key length apart: wherever an
# error text is cut, one of the two has at least WINDOW characters of a copy just before the cut.
QUESTIONS = {
    "p0": "plain", "p1": "leak", "p2": "leak at 0", "p3": "leak at 14", "p4": "echo huge", "p5": "crash echo",
}
ANSWERS = {"m1": {p: "x" for p in QUESTIONS}, "m2": {p: "yy" for p in QUESTIONS}}


def assert_no_part_of(secret: str, text: str, where: str) -> None:
    for i in range(len(secret) - WINDOW + 1):
        assert secret[i : i + WINDOW] not in text, f"{where} holds {secret[i : i + WINDOW]!r} of the key"


def _check_records(out: Path) -> None:
    records = read_judgments(out)
    assert len(records) == 2 * len(QUESTIONS)
    errors = {r.prompt_id for r in records if r.status == "error"}
    assert errors == {"p1", "p2", "p3"}  # the 400s; the rest judged ok
    assert all("HTTP 400" in r.error and "***" in r.error for r in records if r.status == "error")
    huge = [r for r in records if r.prompt_id == "p4"]
    assert all(r.winner == "m2" and r.reply and len(r.reply) < 9000 for r in huge)  # parsed in full, stored cut


def test_spo_v_eval_judge_keeps_the_key_out_of_records_log_and_output(
    judge_server: FakeJudgeServer, tmp_path: Path
) -> None:
    secret = judge_server.expected_key
    judge_server.echo_key = True
    gen = write_generations(tmp_path / "gen", ANSWERS, QUESTIONS)
    out = tmp_path / "judgments.jsonl"
    env = {**os.environ, KEY_ENV: secret}
    cmd = [sys.executable, "-m", "spo_align.cli", "-v", "eval", "judge", str(gen), "--judge-model", "judge-x",
           "--out", str(out), "--base-url", judge_server.url, "--api-key-env", KEY_ENV, "--max-attempts", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]  # three prompts' judgments failed, and it says so
    assert "Traceback" not in done.stderr and "6 of 12 judgments failed" in done.stderr
    assert " DEBUG " in done.stderr and "HTTP Request" in done.stderr  # the log really was at DEBUG
    _check_records(out)
    for where, text in (("judgments.jsonl", out.read_text()), ("stdout", done.stdout), ("stderr", done.stderr)):
        assert_no_part_of(secret, text, where)


def test_library_logging_at_debug_keeps_the_key_out(
    judge_server: FakeJudgeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = judge_server.expected_key
    judge_server.echo_key = True
    monkeypatch.setenv(KEY_ENV, secret)
    caplog.set_level(logging.DEBUG)
    for name in ("httpcore", "httpcore2", "httpx", "httpx2", "openai"):  # earlier in-process CLI runs quiet them
        caplog.set_level(logging.DEBUG, logger=name)
    gen = write_generations(tmp_path / "gen", ANSWERS, QUESTIONS)
    out = tmp_path / "judgments.jsonl"
    judge = OpenAIJudge("judge-x", base_url=judge_server.url, api_key_env=KEY_ENV, max_attempts=2, backoff_s=0.01)
    summary = judge_all(gen, judge, out, concurrency=3)
    assert (summary.judged, summary.errors) == (6, 6)
    _check_records(out)
    assert any(r.name.startswith("httpcore") for r in caplog.records)  # the client's own DEBUG records were seen
    captured = capsys.readouterr()
    for where, text in (("judgments", out.read_text()), ("log", caplog.text), ("stdout", captured.out),
                        ("stderr", captured.err)):
        assert_no_part_of(secret, text, where)


def test_redact_masks_any_part_of_a_known_key_and_anything_shaped_like_one() -> None:
    key = "Qz7vR2mX9kLpW4tYb8NcJ3hF"
    register_secret(key)
    assert redact(f"tail {key[-9:]} head {key[:9]}") == "tail *** head ***"
    for text in (
        "Incorrect API key provided: sk-proj-AbCdEf0123456789_-xyz.",
        "key sk-svcacct-0123456789abcdefghij and sk-ant-api03-abcdefghijklmnop",
        "cut short: sk-proj-Ab",
        "Authorization: Bearer abc.def-123_456",
        "{'authorization': 'Basic dXNlcjpwYXNzd29yZA=='}",
        "x-api-key: 0123456789abcdef0123",
        "GET /v1/models?api_key=0123456789abcdef HTTP/1.1",
        "gsk_0123456789abcdefghijABCDEFGHIJ xai-0123456789abcdefghijABCD hf_abcdefghijklmnopqrstuvwxyzABCDEFGH",
        "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJl",
    ):
        clean = redact(text)
        assert "***" in clean, text
        for word in ("0123456789", "AbCdEf", "abc.def", "dXNlcjpw", "eyJzdWIi", "sk-proj-Ab"):
            assert word not in clean, (text, clean)
    ordinary = ("a task-specific prompt", "basic arithmetic answers", "hf_hub_download failed", "skeleton key",
                "sk-learn", "pairwise_v1@3f9a1c0b7e")
    for text in ordinary:
        assert redact(text) == text
