"""The reference judge: right beats wrong, else a tie; with it win(a, b) = 0.5 + (acc_a - acc_b) / 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from spo_align.eval.judge import JudgeItem, judge_all, plan_judging
from spo_align.eval.records import EvalInputError
from spo_align.eval.reference_judge import ReferenceJudge, exact_match
from spo_align.eval.table import win_rate_table
from tests.eval.judge_server import write_generations


def test_verdicts_by_correctness() -> None:
    judge = ReferenceJudge()
    item = lambda a, b: JudgeItem("p", "23+58=", a, b, "81")
    assert judge.judge(item(" 81\n", "71")).verdict == "A"
    assert judge.judge(item("71", "81")).verdict == "B"
    assert judge.judge(item("81", "81 ")).verdict == "C"
    assert judge.judge(item("71", "80")).verdict == "C"
    assert exact_match(" 81 ", "81") and not exact_match("081", "81")


def test_comparison_is_a_parameter_and_names_the_judge() -> None:
    numeric = ReferenceJudge(lambda r, ref: r.strip().lstrip("0") == ref.strip(), name="reference-numeric")
    assert numeric.judge(JudgeItem("p", "q", "081", "71", "81")).verdict == "A"
    assert numeric.model == "reference-numeric" != ReferenceJudge().model


def test_pipeline_offline_gives_half_plus_half_accuracy_gap(tmp_path: Path) -> None:
    refs = {f"p{i}": str(10 + i) for i in range(10)}
    questions = {p: f"{p}?" for p in refs}
    right = lambda p: refs[p]
    answers = {
        "sft": {p: right(p) if i < 4 else "0" for i, p in enumerate(refs)},  # acc .4
        "spo": {p: right(p) if i < 9 else "1" for i, p in enumerate(refs)},  # acc .9
        "dpo": {p: right(p) if i % 2 else "2" for i, p in enumerate(refs)},  # acc .5
    }
    acc = {"sft": 0.4, "spo": 0.9, "dpo": 0.5}
    gen_dir = write_generations(tmp_path / "gen", answers, questions, refs)
    out = tmp_path / "judgments.jsonl"
    assert plan_judging(gen_dir, ReferenceJudge(), out).est_prompt_tokens == 0
    summary = judge_all(gen_dir, ReferenceJudge(), out, concurrency=1)
    assert summary.complete and summary.total == 10 * 3 * 2
    table = win_rate_table(out)
    for (row, col), cell in table.cells.items():
        assert cell.win_rate == pytest.approx(0.5 + (acc[row] - acc[col]) / 2)
        assert cell.n == 10


def test_missing_references_are_refused_before_any_judging(tmp_path: Path) -> None:
    gen_dir = write_generations(tmp_path / "gen", {"a": {"p": "1"}, "b": {"p": "2"}}, {"p": "q"})
    with pytest.raises(EvalInputError, match="needs a reference answer; 1 prompts have none"):
        judge_all(gen_dir, ReferenceJudge(), tmp_path / "j.jsonl")
    assert not (tmp_path / "j.jsonl").exists()


def test_the_choice_rule_wants_exactly_one_choice_named_and_it_the_reference() -> None:
    from spo_align.eval.reference_judge import choice_match, choices_named, comparison

    rule = choice_match(["even", "odd"])
    assert rule("147 is odd.", "odd") and rule("ODD", "odd") and rule("The number is Even!", "even")
    assert not rule("147 is even.", "odd")
    assert not rule("147 is not even, it is odd", "odd")  # names both: no answer
    assert not rule("Oddly, I cannot say.", "odd") and not rule("", "odd")  # whole words only
    assert choices_named("uneven odd-numbered", ["even", "odd"]) == {"odd"}
    is_correct, name = comparison("choice", ("even", "odd"))
    assert is_correct("7 is odd", "odd") and name == "reference-choice:even|odd" != comparison("exact")[1]
    with pytest.raises(ValueError, match="at least two choices"):
        comparison("choice", ("even",))


def test_the_factory_builds_the_choice_judge_under_its_own_name() -> None:
    from spo_align.eval.judge_factory import make_judge

    judge = make_judge("reference", match="choice", choices=("even", "odd"))
    assert judge.model == "reference-choice:even|odd"
    assert judge.judge(JudgeItem("p", "Is 3 even or odd?", "3 is odd.", "3 is even.", "odd")).verdict == "A"
