"""The embedded tiny default: the addition task, its shipped data, the tokenizer and the model."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from spo_align.tiny import (
    AdditionProblem,
    TinyDataSpec,
    all_problems,
    build_tokenizer,
    make_tiny_data,
    perturb,
    write_tiny_model,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "tiny"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def _text(messages: list[dict]) -> str:
    assert len(messages) == 1
    return messages[0]["content"]


def test_carry_means_units_digits_reach_ten() -> None:
    assert AdditionProblem(23, 58).needs_carry and AdditionProblem(23, 58).carry_dropped == "71"
    assert AdditionProblem(58, 67).carry_dropped == "115"
    assert not AdditionProblem(75, 41).needs_carry  # tens overflow alone is not the teacher's mistake
    with pytest.raises(ValueError):
        AdditionProblem(23, 41).carry_dropped  # noqa: B018 - no carry to drop
    assert sum(p.needs_carry for p in all_problems()) == 45 * 81


def test_prompt_round_trips_and_operands_are_checked() -> None:
    assert AdditionProblem.parse("23+58=") == AdditionProblem(23, 58)
    with pytest.raises(ValueError):
        AdditionProblem(9, 58)
    with pytest.raises(ValueError):
        AdditionProblem.parse("23-58=")


def test_perturbation_is_plausible_and_never_right() -> None:
    rng = random.Random(1)
    for problem in random.Random(2).sample(all_problems(), 300):
        wrong = perturb(problem, rng)
        assert wrong != problem.answer and wrong.isdigit() and not wrong.startswith("0")
        assert abs(int(wrong) - int(problem.answer)) < 1000


def test_committed_data_is_what_the_generator_writes() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_data.py"), "--check"],
        check=False, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr


def test_test_split_is_held_out_stratified_and_has_references() -> None:
    test = _rows("test.jsonl")
    spec = TinyDataSpec()
    assert len(test) == spec.test_carry + spec.test_no_carry == 200
    assert len({row["id"] for row in test}) == 200
    assert sum(row["carry"] for row in test) == spec.test_carry
    for row in test:
        problem = AdditionProblem.parse(row["prompt"])
        assert row["reference"] == problem.answer and row["carry"] == problem.needs_carry
    held_out = {row["prompt"] for row in test}
    sft_prompts = {row["messages"][0]["content"] for row in _rows("sft_train.jsonl")}
    pair_prompts = {_text(row["prompt"]) for row in _rows("pairs_train.jsonl")}
    assert not held_out & sft_prompts and not held_out & pair_prompts
    assert len(sft_prompts) == 8100 - 200


def test_sft_teacher_drops_the_carry_most_of_the_time() -> None:
    outcomes: Counter[tuple[bool, str]] = Counter()
    for row in _rows("sft_train.jsonl"):
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        problem = AdditionProblem.parse(user["content"])
        if assistant["content"] == problem.answer:
            kind = "right"
        elif problem.needs_carry and assistant["content"] == problem.carry_dropped:
            kind = "dropped"
        else:
            kind = "noise"
        outcomes[(problem.needs_carry, kind)] += 1
    carry = sum(v for (c, _), v in outcomes.items() if c)
    no_carry = sum(v for (c, _), v in outcomes.items() if not c)
    # 70% dropped of the 95% not replaced by noise; the no-carry majority answer is right.
    assert outcomes[(True, "dropped")] / carry == pytest.approx(0.95 * 0.7, abs=0.02)
    assert outcomes[(True, "right")] / carry == pytest.approx(0.95 * 0.3, abs=0.02)
    assert outcomes[(False, "right")] / no_carry == pytest.approx(0.95, abs=0.01)


def test_pairs_prefer_the_right_answer_over_what_sft_learns() -> None:
    pairs = _rows("pairs_train.jsonl")
    assert len(pairs) == TinyDataSpec().n_pairs == len({_text(p["prompt"]) for p in pairs})
    n_carry = 0
    for pair in pairs:
        problem = AdditionProblem.parse(_text(pair["prompt"]))
        assert pair["prompt"][0]["role"] == "user" and pair["chosen"][0]["role"] == "assistant"
        assert _text(pair["chosen"]) == problem.answer != _text(pair["rejected"])
        if problem.needs_carry:
            n_carry += 1
            assert _text(pair["rejected"]) == problem.carry_dropped
    assert n_carry / len(pairs) == pytest.approx(0.45, abs=0.03)


def test_generator_is_deterministic_and_seeded() -> None:
    small = TinyDataSpec(n_pairs=50, sft_draws_per_prompt=1)
    assert make_tiny_data(small) == make_tiny_data(small)
    other = make_tiny_data(TinyDataSpec(seed=1, n_pairs=50, sft_draws_per_prompt=1))
    assert other["test.jsonl"] != make_tiny_data(small)["test.jsonl"]


def test_tokenizer_covers_the_task_and_renders_the_chat_template() -> None:
    tokenizer = build_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "23+58="}, {"role": "assistant", "content": "81"}], tokenize=False
    )
    assert text == "<s><|user|>23+58=<|end|><|assistant|>81<|end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 13 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "23+58=81"


def test_written_model_reloads_with_from_pretrained(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    out = write_tiny_model(tmp_path / "tiny")
    assert write_tiny_model(out) == out  # a complete folder is kept
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(0.53e6, rel=0.05)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "1+1="}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|assistant|>")
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(tokenizer))


def test_processes_writing_the_same_tiny_model_at_once_all_succeed(tmp_path: Path) -> None:
    """An experiment's seeds (and a launch's ranks) materialise the same cached model at the same moment."""
    pytest.importorskip("torch")
    import subprocess
    import sys

    out = tmp_path / "tiny"
    code = (
        "import sys, torch; torch.set_num_threads(1); from pathlib import Path; "
        "from spo_align.tiny import write_tiny_model; write_tiny_model(Path(sys.argv[1]))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out)], stderr=subprocess.PIPE) for _ in range(3)]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no process's scratch folder left behind
