"""A judge for tasks with known answers: a correct answer beats a wrong one; otherwise a tie.

Runs offline and for free, so the whole pipeline (generate, judge, table) can be tested on the
embedded tiny task. With it, win(a, b) = 0.5 + (accuracy_a - accuracy_b) / 2 on each prompt set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from spo_align.eval.judge import JudgeCallError, JudgeItem, JudgeResult
from spo_align.eval.judge_parse import Verdict

Comparison = Callable[[str, str], bool]


def exact_match(response: str, reference: str) -> bool:
    """Correct when the answer equals the reference after stripping surrounding whitespace."""
    return response.strip() == reference.strip()


def choices_named(response: str, choices: Sequence[str]) -> set[str]:
    """The choices that the response names as whole words, ignoring case ("Odd." names "odd"; "oddly" does not)."""
    return {c for c in choices if re.search(rf"(?<!\w){re.escape(c)}(?!\w)", response, flags=re.IGNORECASE)}


def choice_match(choices: Sequence[str]) -> Comparison:
    """Correct when the answer names exactly one of `choices` (whole words, any case) and it is the reference:
    "147 is odd." is right for reference "odd"; "147 is even, not odd" names both and is wrong."""
    options = tuple(choices)

    def is_correct(response: str, reference: str) -> bool:
        named = choices_named(response, options)
        return len(named) == 1 and next(iter(named)).lower() == reference.strip().lower()

    return is_correct


def comparison(match: str, choices: Sequence[str] = ()) -> tuple[Comparison, str]:
    """The correctness rule `match` ('exact' or 'choice' over `choices`) and the judge name its judgments carry."""
    if match == "exact":
        return exact_match, "reference-exact"
    if match == "choice":
        if len(choices) < 2:
            raise ValueError("the 'choice' rule needs at least two choices")
        return choice_match(choices), "reference-choice:" + "|".join(choices)
    raise ValueError(f"unknown reference rule {match!r}: use 'exact' or 'choice'")


class ReferenceJudge:
    """Judges by correctness against `PromptRow.reference`.

    `is_correct(response, reference)` decides correctness (default: `exact_match`). `name` is the
    judge model recorded in every judgment key: give a custom comparison its own name, so its
    judgments are never mixed with those of another comparison.
    """

    needs_reference = True
    prompt_version = "reference_v1"

    def __init__(self, is_correct: Comparison = exact_match, name: str = "reference-exact") -> None:
        self.is_correct = is_correct
        self.model = name

    def judge(self, item: JudgeItem) -> JudgeResult:
        if item.reference is None:
            raise JudgeCallError(f"prompt {item.prompt_id!r} has no reference answer", attempts=1)
        a_right = self.is_correct(item.answer_a, item.reference)
        b_right = self.is_correct(item.answer_b, item.reference)
        verdict: Verdict = "A" if a_right and not b_right else "B" if b_right and not a_right else "C"
        return JudgeResult(verdict, reply=f"A {'right' if a_right else 'wrong'}, B {'right' if b_right else 'wrong'}")

    def estimate_tokens(self, item: JudgeItem) -> tuple[int, int]:
        return 0, 0
