"""`spo eval judge` and `spo experiment` build their judge through one `make_judge`."""

from __future__ import annotations

from pathlib import Path

import pytest

from spo_align.eval.judge_client import OpenAIJudge
from spo_align.eval.judge_factory import make_judge
from spo_align.eval.judge_parse import load_judge_prompt
from spo_align.eval.records import EvalInputError
from spo_align.eval.reference_judge import ReferenceJudge


def test_make_judge_builds_each_kind_with_its_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(make_judge("reference"), ReferenceJudge)
    monkeypatch.setenv("SPO_FACTORY_KEY", "sk-factory-Hq3vZ8pLw2Rn5Tb")
    prompt = tmp_path / "mine.txt"
    prompt.write_text("=== user ===\nQ {question}\nA {answer_a}\nB {answer_b}\n")
    judge = make_judge("openai", "judge-x", base_url="http://127.0.0.1:9/v1", api_key_env="SPO_FACTORY_KEY",
                       prompt=prompt, timeout_s=5, max_attempts=3, parse_retries=1, max_tokens=64)
    assert isinstance(judge, OpenAIJudge)
    assert (judge.model, judge.base_url, judge.prompt_version) == ("judge-x", "http://127.0.0.1:9/v1",
                                                                   load_judge_prompt(prompt).version)
    assert (judge.timeout_s, judge.max_attempts, judge.parse_retries, judge.max_tokens) == (5, 3, 1, 64)
    with pytest.raises(EvalInputError, match="needs a model name"):
        make_judge("openai")


def test_the_experiment_judge_is_the_cli_judge_with_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from spo_align.experiment.runner import _judge
    from spo_align.experiment.spec import JudgeSection

    monkeypatch.setenv("SPO_FACTORY_KEY", "sk-factory-Hq3vZ8pLw2Rn5Tb")
    section = JudgeSection(type="openai", model="judge-x", base_url="http://127.0.0.1:9/v1", api_key_env="SPO_FACTORY_KEY")
    from_experiment = _judge(section)
    from_cli_defaults = make_judge("openai", "judge-x", base_url="http://127.0.0.1:9/v1", api_key_env="SPO_FACTORY_KEY")
    settings = ("model", "base_url", "prompt_version", "timeout_s", "max_attempts", "parse_retries", "max_tokens")
    assert [getattr(from_experiment, s) for s in settings] == [getattr(from_cli_defaults, s) for s in settings]
    assert isinstance(_judge(JudgeSection(type="reference")), ReferenceJudge)
