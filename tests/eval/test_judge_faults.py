"""The OpenAI-compatible judge against a local server that answers 429, 500, 503, slowly, or without a verdict:
every judgment ends up recorded ok or counted as an error, none twice, and the key never leaks."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from spo_align.eval.judge import JudgeFatalError, judge_all, plan_judging
from spo_align.eval.judge_client import OpenAIJudge
from spo_align.eval.judge_store import read_judgments
from tests.eval.judge_server import FakeJudgeServer, write_generations

KEY_ENV = "SPO_TEST_JUDGE_KEY"
QUESTIONS = {
    "q0": "plain one", "q1": "rate limited", "q2": "crash once", "q3": "slow once", "q4": "garbled once",
    "q5": "hopeless", "q6": "down", "q7": "biased judge", "q8": "plain same",
}
ANSWERS = {
    "alpha": {q: "a" * 1 for q in QUESTIONS},
    "beta": {q: "b" * 3 for q in QUESTIONS},
    "gamma": {**{q: "c" * 5 for q in QUESTIONS}, "q8": "bbb"},  # q8: same answer as beta, judged without a call
}


def _judge(server: FakeJudgeServer, **overrides: float) -> OpenAIJudge:
    settings = {"timeout_s": 2.0, "max_attempts": 4, "parse_retries": 1, "backoff_s": 0.01, "backoff_max_s": 0.05}
    settings.update(overrides)
    return OpenAIJudge("judge-x", base_url=server.url, api_key_env=KEY_ENV, **settings)  # type: ignore[arg-type]


def _key_of(record) -> tuple[str, str, str]:
    return (QUESTIONS[record.prompt_id], ANSWERS[record.model_a][record.prompt_id], ANSWERS[record.model_b][record.prompt_id])


def test_faults_end_recorded_or_counted_once_and_rerun_calls_nothing(
    judge_server: FakeJudgeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, judge_server.expected_key)
    gen_dir = write_generations(tmp_path / "gen", ANSWERS, QUESTIONS)
    out = tmp_path / "judgments.jsonl"
    judge = _judge(judge_server)

    plan = plan_judging(gen_dir, judge, out)
    assert (plan.total, plan.calls, plan.identical, plan.done) == (54, 52, 2, 0)
    assert plan.est_prompt_tokens > 52 * 100 and plan.est_completion_tokens == 52 * judge.expected_completion_tokens

    summary = judge_all(gen_dir, judge, out, concurrency=4)
    records = read_judgments(out)
    keys = [r.key for r in records]
    assert len(keys) == len(set(keys)) == 54  # every judgment written exactly once
    errors = [r for r in records if r.status == "error"]
    assert {r.prompt_id for r in errors} == {"q5", "q6"} and len(errors) == 12
    assert (summary.judged, summary.identical, summary.errors, summary.skipped_done) == (42, 2, 12, 0)
    assert not summary.complete
    for r in errors:
        if r.prompt_id == "q5":
            assert r.error.startswith("unparseable verdict") and r.attempts == 2 and r.verdict is None
            assert judge_server.attempts[_key_of(r)] == 2
        else:
            assert "HTTP 503" in r.error and r.attempts == 4
            assert judge_server.attempts[_key_of(r)] == 4

    lengths = {"alpha": 1, "beta": 3, "gamma": 5}
    # On q8 beta and gamma answer alike, so the server sees (alpha, beta) and (alpha, gamma) as one text.
    same_text = Counter(_key_of(r) for r in records if r.status == "ok" and r.source == "judge")
    for r in records:
        if r.status != "ok":
            continue
        if r.source == "identical":
            assert r.prompt_id == "q8" and r.winner == "tie" and judge_server.attempts[_key_of(r)] == 0
            continue
        expected = r.model_a if r.prompt_id == "q7" else max((r.model_a, r.model_b), key=lengths.__getitem__)
        assert r.winner == expected, r
        assert r.prompt_tokens and r.completion_tokens == 7
        key = _key_of(r)
        if r.prompt_id == "q3":
            assert judge_server.attempts[key] == 2 and r.attempts == 2  # timed out once
        else:
            assert judge_server.verdicts_served[key] == same_text[key]  # paid once per judgment
            assert r.attempts == {"q1": 3, "q2": 2, "q4": 2}.get(r.prompt_id, 1)
            assert judge_server.attempts[key] == r.attempts * same_text[key]

    before = len(judge_server.requested)
    again = judge_all(gen_dir, judge, out, concurrency=4)
    assert (again.judged, again.skipped_done, again.errors_kept, again.errors) == (0, 42, 12, 0)
    assert len(judge_server.requested) == before  # nothing asked twice
    assert read_judgments(out) == records

    retried = judge_all(gen_dir, judge, out, concurrency=4, retry_errors=True)
    assert (retried.judged, retried.errors, retried.skipped_done) == (0, 12, 42)
    ok_keys = Counter(r.key for r in read_judgments(out) if r.status == "ok")
    assert set(ok_keys.values()) == {1} and len(ok_keys) == 42


def test_api_key_never_appears_in_records_logs_or_errors(
    judge_server: FakeJudgeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    secret = judge_server.expected_key
    monkeypatch.setenv(KEY_ENV, secret)
    caplog.set_level(logging.DEBUG)
    questions = {"p1": "leak it", "p2": "plain"}
    gen_dir = write_generations(tmp_path / "gen", {"m1": {"p1": "x", "p2": "x"}, "m2": {"p1": "yy", "p2": "yy"}}, questions)
    out = tmp_path / "j.jsonl"
    judge = _judge(judge_server)
    assert secret not in repr(judge)
    summary = judge_all(gen_dir, judge, out, concurrency=2)
    assert summary.errors == 2 and summary.judged == 2
    leaked = [r for r in read_judgments(out) if r.status == "error"]
    assert all("HTTP 400" in r.error and "Bearer ***" in r.error for r in leaked)  # the server echoed it; redacted
    captured = capsys.readouterr()
    for text in (out.read_text(), caplog.text, captured.out, captured.err):
        assert secret not in text

    monkeypatch.setenv(KEY_ENV, secret + "-wrong")
    with pytest.raises(JudgeFatalError) as info:
        judge_all(gen_dir, _judge(judge_server), tmp_path / "j2.jsonl", concurrency=2, retry_errors=True)
    assert "HTTP 401" in str(info.value) and secret not in str(info.value)
    assert not (tmp_path / "j2.jsonl").read_text().strip()  # nothing recorded for a refused key


def test_missing_key_is_an_error_for_openai_and_a_placeholder_for_local_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    from spo_align.eval.records import EvalInputError

    monkeypatch.delenv("SPO_NO_SUCH_KEY", raising=False)
    with pytest.raises(EvalInputError, match="set the SPO_NO_SUCH_KEY environment variable"):
        OpenAIJudge("gpt-4o", api_key_env="SPO_NO_SUCH_KEY")
    assert OpenAIJudge("local", base_url="http://127.0.0.1:9/v1", api_key_env="SPO_NO_SUCH_KEY").model == "local"
