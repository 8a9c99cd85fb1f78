"""The judge that `spo eval judge` and `spo experiment` both use, built in one place from its settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from spo_align.eval.judge import Judge
from spo_align.eval.judge_parse import DEFAULT_PROMPT

JudgeKind = Literal["reference", "openai"]


def make_judge(
    kind: JudgeKind,
    model: str | None = None,
    *,
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    prompt: str | Path = DEFAULT_PROMPT,
    timeout_s: float = 60.0,
    max_attempts: int = 6,
    parse_retries: int = 2,
    max_tokens: int = 512,
    match: str = "exact",
    choices: tuple[str, ...] = (),
) -> Judge:
    """`reference`: the offline judge against known answers, by the rule `match` ('exact', or 'choice' among
    `choices`; the other settings do not apply).
    `openai`: `model` behind an OpenAI-compatible API (`prompt`: a shipped prompt name or a file)."""
    if kind == "reference":
        from spo_align.eval.reference_judge import ReferenceJudge, comparison

        is_correct, name = comparison(match, choices)
        return ReferenceJudge(is_correct, name)
    from spo_align.eval.judge_client import OpenAIJudge
    from spo_align.eval.judge_parse import load_judge_prompt
    from spo_align.eval.records import EvalInputError

    if not model:
        raise EvalInputError("an OpenAI-compatible judge needs a model name")
    return OpenAIJudge(
        model,
        base_url=base_url,
        api_key_env=api_key_env,
        prompt=load_judge_prompt(prompt),
        timeout_s=timeout_s,
        max_attempts=max_attempts,
        parse_retries=parse_retries,
        max_tokens=max_tokens,
    )
