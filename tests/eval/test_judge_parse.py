"""Strict verdict parsing and the versioned judge prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from spo_align.eval.judge_parse import (
    PromptTemplateError,
    VerdictParseError,
    load_judge_prompt,
    parse_prompt_text,
    parse_verdict,
)


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("A is correct, B is not.\n[[A]]", "A"),
        ("Both fine.\n\n[[C]]\n", "C"),
        ("B explains more.\n**[[B]]**", "B"),
        ("Restating: [[B]] is my call.\n[[B]].", "B"),
    ],
)
def test_replies_ending_with_one_verdict_parse(reply: str, verdict: str) -> None:
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ("I prefer A.", "no \\[\\[A\\]\\]"),
        ("[[A]] hmm, on reflection B is better.", "does not end"),
        ("Earlier I said [[A]].\n[[B]]", "conflicting"),
        ("[[D]]", "not A, B or C"),
        ("[[a]]", "not A, B or C"),
        ("", "no "),
    ],
)
def test_anything_else_is_refused_not_guessed(reply: str, why: str) -> None:
    with pytest.raises(VerdictParseError, match=why):
        parse_verdict(reply)


def test_shipped_prompt_renders_both_answers_and_has_a_content_version() -> None:
    prompt = load_judge_prompt("pairwise_v1")
    assert prompt.version.startswith("pairwise_v1@") and len(prompt.version) == len("pairwise_v1@") + 10
    messages = prompt.render("What is 2+2? {answer_b}", "4 {question}", "5")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "[[A]]" in messages[0]["content"] and "[[C]]" in messages[0]["content"]
    user = messages[1]["content"]
    assert "What is 2+2? {answer_b}" in user and "4 {question}" in user  # answers are not re-substituted
    assert user.index("4 {question}") < user.index("\n5\n")


def test_editing_a_prompt_changes_its_version(tmp_path: Path) -> None:
    base = load_judge_prompt()
    text = "=== system ===\n" + base.system + "\n=== user ===\n" + base.user + "\n"
    path = tmp_path / "pairwise_v1.txt"
    path.write_text(text)
    assert load_judge_prompt(path).version == base.version
    path.write_text(text.replace("impartial", "fair"))
    assert load_judge_prompt(path).version != base.version


def test_malformed_prompt_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PromptTemplateError, match="lacks \\{answer_b\\}"):
        parse_prompt_text("x", "=== user ===\n{question} {answer_a}\n", "x.txt")
    with pytest.raises(PromptTemplateError, match="exactly one"):
        parse_prompt_text("x", "=== system ===\nhello\n", "x.txt")
    with pytest.raises(PromptTemplateError, match="before the first"):
        parse_prompt_text("x", "stray\n=== user ===\n{question}{answer_a}{answer_b}", "x.txt")
    with pytest.raises(PromptTemplateError, match="no shipped judge prompt"):
        load_judge_prompt("pairwise_v99")
