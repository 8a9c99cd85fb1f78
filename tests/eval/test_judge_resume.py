"""A judge run killed half-way (SIGKILL to a real subprocess) and restarted ends with exactly one judgment
per key, and asks nothing again that was recorded before the kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from spo_align.eval.judge import judge_all
from spo_align.eval.judge_client import OpenAIJudge
from spo_align.eval.judge_store import JudgmentStore, read_judgments
from tests.eval.judge_server import FakeJudgeServer, write_generations

KEY_ENV = "SPO_TEST_JUDGE_KEY"
CLI = "import typer; from spo_align.cli.eval import register; app = typer.Typer(); register(app); app()"


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_killed_run_resumes_with_one_judgment_per_key(
    judge_server: FakeJudgeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, judge_server.expected_key)
    judge_server.delay_s = 0.1  # 48 calls two at a time: ~2.4 s, ample for the kill to land midway
    questions = {f"p{i}": f"question {i}" for i in range(8)}
    answers = {m: {p: m * (k + 1) for p in questions} for k, m in enumerate(["x", "y", "z"])}
    gen_dir = write_generations(tmp_path / "gen", answers, questions)
    out = tmp_path / "judgments.jsonl"
    total = 8 * 3 * 2

    env = {**os.environ, KEY_ENV: judge_server.expected_key}
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "eval", "judge", str(gen_dir), "--judge-model", "judge-x", "--out", str(out),
         "--base-url", judge_server.url, "--api-key-env", KEY_ENV, "--concurrency", "2", "--timeout", "5"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while _complete_lines(out) < 12 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the judge finished before it could be killed: " + proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        asked_at_kill = len(judge_server.requested)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    if out.read_bytes().endswith(b"\n"):  # the kill fell between two lines: cut one by hand as well
        with out.open("ab") as fh:
            fh.write(b'{"prompt_id": "p0", "model_a": "x", "mod')
    before_kill = {r.key for r in read_judgments(out)}
    assert 12 <= len(before_kill) < total
    # Judgments reached the file as they arrived, while calls were still being made (not in one burst at the end).
    assert asked_at_kill < total - 2
    requests_before = len(judge_server.requested)

    judge = OpenAIJudge("judge-x", base_url=judge_server.url, api_key_env=KEY_ENV, timeout_s=5)
    summary = judge_all(gen_dir, judge, out, concurrency=2)
    assert summary.complete and summary.skipped_done == len(before_kill)
    assert summary.judged == total - len(before_kill) and summary.errors == 0
    records = read_judgments(out)
    assert len(records) == total and set(Counter(r.key for r in records).values()) == {1}
    assert all(r.status == "ok" for r in records)
    assert out.read_bytes().endswith(b"\n") and b'"mod\n' not in out.read_bytes()

    asked_again = judge_server.requested[requests_before:]
    recorded_texts = {(questions[k.prompt_id], answers[k.model_a][k.prompt_id], answers[k.model_b][k.prompt_id])
                      for k in before_kill}
    assert not recorded_texts & set(asked_again)  # nothing paid twice
    assert len(asked_again) == total - len(before_kill)


def test_truncated_last_line_is_ignored_on_read_and_cut_on_append(tmp_path: Path) -> None:
    from spo_align.eval.judge_store import JudgmentRecord

    path = tmp_path / "j.jsonl"
    first = JudgmentRecord("p1", "a", "b", "j", "v", "ok", "A", reply="r")
    second = JudgmentRecord("p1", "b", "a", "j", "v", "ok", "B")
    path.write_text(first.to_json() + "\n" + second.to_json()[:25])
    assert read_judgments(path) == [first]
    assert path.read_text().endswith(second.to_json()[:25])  # reading never changes the file
    with JudgmentStore(path) as store:
        assert store.records == [first]
        store.append(second)
    assert read_judgments(path) == [first, second]
    assert path.read_text() == first.to_json() + "\n" + second.to_json() + "\n"


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    from spo_align.eval.judge_store import JudgmentRecord

    path = tmp_path / "j.jsonl"
    first = JudgmentRecord("p1", "a", "b", "j", "v", "ok", "C")
    second = JudgmentRecord("p2", "a", "b", "j", "v", "error", None, error="boom")
    path.write_text(first.to_json())
    with JudgmentStore(path) as store:
        store.append(second)
    assert read_judgments(path) == [first, second]


def test_corrupt_line_in_the_middle_is_an_error_with_its_line(tmp_path: Path) -> None:
    from spo_align.eval.judge_store import JudgmentRecord
    from spo_align.eval.records import EvalInputError

    path = tmp_path / "j.jsonl"
    good = JudgmentRecord("p1", "a", "b", "j", "v", "ok", "A").to_json()
    path.write_text(good + "\n{oops\n" + good + "\n")
    with pytest.raises(EvalInputError, match=r"j.jsonl:2: not a valid judgment line"):
        read_judgments(path)
    path.write_text(good.replace('"status": "ok"', '"status": "maybe"') + "\n")
    with pytest.raises(EvalInputError, match=r":1: status must be"):
        read_judgments(path)
