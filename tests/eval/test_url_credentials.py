"""Credentials written into a URL (`http://user:password@host/v1`) never reach the log (default or `-v`), the
judgments file, stdout or stderr: every URL's userinfo is masked wherever the tool logs or stores text."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spo_align.eval.redact import redact
from tests.eval.judge_server import FakeJudgeServer, write_generations

PASSWORD = "Pa55-w0rd-Qx7Zr"
USER = "judge-user"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://user:password@host/v1", "http://***@host/v1"),
        ("calling https://u:p%40ss@judge.example.com:8443/v1/chat", "calling https://***@judge.example.com:8443/v1/chat"),
        ("HTTP://Admin:Secret@HOST", "HTTP://***@HOST"),
        ("http://tokenonly@host:8000/v1", "http://***@host:8000/v1"),
        ("http://:justpassword@host/", "http://***@host/"),
        ("http://user:p@ss@host/v1", "http://***@host/v1"),
        ("http://u:p@[::1]:8000/v1", "http://***@[::1]:8000/v1"),
        ("socks5://proxyuser:proxypass@10.0.0.1:1080", "socks5://***@10.0.0.1:1080"),
        ("redis+tls://default:hunter22@cache:6380/0", "redis+tls://***@cache:6380/0"),
        ("'base_url': 'http://a:b@h/v1', other", "'base_url': 'http://***@h/v1', other"),
        ("two http://a:b@x/ and https://c:d@y/", "two http://***@x/ and https://***@y/"),
    ],
)
def test_userinfo_of_every_url_shape_is_masked(text: str, shown: str) -> None:
    assert redact(text) == shown


@pytest.mark.parametrize(
    "text",
    ["http://host:8000/v1", "mail me at user@example.com", "git@github.com:org/repo.git", "http://host/a@b",
     "https://host/v1?next=x@y", "pairwise_v1@3f9a1c0b7e"],
)
def test_text_without_userinfo_is_left_alone(text: str) -> None:
    assert redact(text) == text


def test_mask_url_keeps_none_and_plain_urls() -> None:
    from spo_align.eval.redact import mask_url

    assert mask_url(None) is None and mask_url("http://h/v1") == "http://h/v1"
    assert mask_url(f"http://{USER}:{PASSWORD}@h/v1") == "http://***@h/v1"


def _assert_clean(text: str, where: str) -> None:
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, basic, f"{USER}:"):
        assert secret not in text, f"{where} holds {secret!r}"


@pytest.mark.parametrize("verbose", [False, True])
def test_a_judge_url_with_credentials_never_shows_them(judge_server: FakeJudgeServer, tmp_path: Path, verbose: bool):
    """No API key set: the default log names the URL it sends a placeholder key to; -v adds a line per request.
    The server takes the URL's user:password (as a proxy in front of a judge would), so the run succeeds."""
    judge_server.basic_auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    judge_server.echo_key = True  # the server echoes what it was sent, in headers and replies
    questions = {"p0": "plain", "p1": "crash echo"}
    gen = write_generations(tmp_path / "gen", {"m1": {p: "x" for p in questions}, "m2": {p: "yy" for p in questions}},
                            questions)
    out = tmp_path / "judgments.jsonl"
    url = judge_server.url.replace("http://", f"http://{USER}:{PASSWORD}@")
    env = {k: v for k, v in os.environ.items() if k != "SPO_NO_KEY_HERE"}
    cmd = [sys.executable, "-m", "spo_align.cli", *(["-v"] if verbose else []), "eval", "judge", str(gen),
           "--judge-model", "judge-x", "--out", str(out), "--base-url", url, "--api-key-env", "SPO_NO_KEY_HERE"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    masked = judge_server.url.replace("http://", "http://***@")
    assert f"sending a placeholder key to {masked}" in done.stderr
    if verbose:
        assert f"HTTP Request: POST {masked}/chat/completions" in done.stderr
    for where, text in (("judgments.jsonl", out.read_text()), ("stdout", done.stdout), ("stderr", done.stderr)):
        _assert_clean(text, where)


def test_the_judges_repr_masks_its_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from spo_align.eval.judge_client import OpenAIJudge

    monkeypatch.delenv("SPO_NO_KEY_HERE", raising=False)
    judge = OpenAIJudge("m", base_url=f"http://{USER}:{PASSWORD}@127.0.0.1:9/v1", api_key_env="SPO_NO_KEY_HERE")
    assert "http://***@127.0.0.1:9/v1" in repr(judge)
    _assert_clean(repr(judge), "repr")
