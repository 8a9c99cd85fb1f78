"""Answers whose first tokens merge with the prompt's last ones (blank lines after ChatML's "assistant\\n" on a
whitespace-merging byte-level BPE) train like every other row, in every stage: the prompt ids stay those of
generation, prompt + answer ids spell exactly the rendered conversation, the scored tokens are exactly the
answer's (plus the template's end of turn), and run.json counts the rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app
from spo_align.data.conversations import tokenize_conversation
from spo_align.data.tokenize import encode, render, tokenize_completions, tokenize_pair
from tests.data.bpe_chatml import build_bpe_chatml_tokenizer, write_bpe_chatml_model

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"
PROMPT = [{"role": "user", "content": "Say hi."}]
ANSWERS = ["\n\nHello there.", "\nHi", " Hey", "Bye\n", "\n\n\n- one\n- two", "Plain answer."]
END = "<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
    return build_bpe_chatml_tokenizer()


def test_the_tokenizer_really_merges_across_the_boundary(tok):
    full = encode(tok, render(tok, [*PROMPT, {"role": "assistant", "content": "\n\nHello there."}], add_generation_prompt=False))
    prompt = encode(tok, render(tok, PROMPT, add_generation_prompt=True))
    assert full[: len(prompt)] != prompt  # the case this module is about


@pytest.mark.parametrize("answer", ANSWERS)
def test_pair_ids_are_the_generation_prompt_then_exactly_the_answer(tok, answer: str):
    pair = tokenize_pair(tok, PROMPT, answer, "Plain answer.")
    prompt_text = render(tok, PROMPT, add_generation_prompt=True)
    full_text = render(tok, [*PROMPT, {"role": "assistant", "content": answer}], add_generation_prompt=False)
    assert pair.prompt_ids == list(tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert tok.decode(pair.prompt_ids) == prompt_text
    assert tok.decode(pair.chosen_ids) == answer + END
    assert tok.decode(pair.prompt_ids + pair.chosen_ids) == full_text
    assert pair.boundary == ("split" if answer.startswith("\n") else "joint")


def test_kto_examples_follow_the_same_rule(tok):
    import datasets

    rows = [{"prompt": PROMPT, "completion": answer} for answer in ANSWERS]
    out = tokenize_completions(datasets.Dataset.from_list(rows), tok)
    for answer, prompt_ids, completion_ids, boundary in zip(ANSWERS, out["prompt_ids"], out["completion_ids"], out["boundary"]):
        assert tok.decode(completion_ids) == answer + END
        assert prompt_ids == tokenize_pair(tok, PROMPT, answer, "x").prompt_ids
        assert boundary == ("split" if answer.startswith("\n") else "joint")


def test_sft_masks_cover_exactly_each_answer(tok):
    conversation = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "\n\nHello there."},
        {"role": "user", "content": "And a list?"},
        {"role": "assistant", "content": "\n- one\n- two\n"},
    ]
    out = tokenize_conversation(tok, conversation)
    assert out.boundary == "split"
    assert tok.decode(out.input_ids) == render(tok, conversation, add_generation_prompt=False)
    trained = tok.decode([i for i, m in zip(out.input_ids, out.assistant_masks) if m])
    assert trained == "\n\nHello there." + END + "\n- one\n- two\n" + END
    # the tokens before the first answer are the generation prompt's, as for the pairs
    first = out.assistant_masks.index(1)
    assert out.input_ids[:first] == encode(tok, render(tok, conversation[:2], add_generation_prompt=True))


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bpe_chatml_model(tmp_path_factory.mktemp("bpe") / "model")


def _ultrafeedback_file(path: Path, n: int = 40, blank_starts: int = 2) -> Path:
    rows = []
    for i in range(n):
        question = f"What is {i} plus one?"
        good = ("\n\n" if i < blank_starts else "") + f"It is {i + 1}."
        bad = f"It is {i + 2}."
        rows.append({
            "prompt": question,
            "chosen": [{"role": "user", "content": question}, {"role": "assistant", "content": good}],
            "rejected": [{"role": "user", "content": question}, {"role": "assistant", "content": bad}],
        })
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["spo", "kto"])
def test_a_preference_run_trains_every_row_and_counts_the_split_ones(recipe: str, tmp_path: Path, bpe_model: Path):
    data = _ultrafeedback_file(tmp_path / "prefs.jsonl")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "train", str(RECIPES / f"{recipe}.yaml"),
        "--set", f"model.name_or_path={bpe_model}", "--set", f"output.dir={out}",
        "--set", f"data.train=[{{path: {data}, format: ultrafeedback}}]", "--set", "data.max_length=64",
        "--set", "training.max_steps=2",
    ])
    assert result.exit_code == 0, result.output
    counts = json.loads((out / "run.json").read_text())["run_info"]["row_policy"]["train"]["total"]
    assert (counts["rows_in"], counts["rows_kept"], counts["boundary_split"]) == (40, 40, 2)


@pytest.mark.slow
def test_an_sft_run_trains_every_row_and_counts_the_split_ones(tmp_path: Path, bpe_model: Path):
    rows = [
        {"messages": [{"role": "user", "content": f"Count to {i}."},
                      {"role": "assistant", "content": ("\n\n" if i < 3 else "") + " ".join(str(k) for k in range(i))}]}
        for i in range(1, 21)
    ]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "train", str(RECIPES / "sft_packed.yaml"),
        "--set", f"model.name_or_path={bpe_model}", "--set", f"output.dir={out}",
        "--set", f"data.train=[{{path: {data}}}]", "--set", "data.max_length=96", "--set", "data.pack_length=192", "--set", "training.max_steps=2",
    ])
    assert result.exit_code == 0, result.output
    counts = json.loads((out / "run.json").read_text())["run_info"]["row_policy"]["train"]["total"]
    assert (counts["rows_in"], counts["rows_kept"], counts["boundary_split"]) == (20, 20, 2)
