"""A message role the chat template does not render as a turn (`human`, `gpt`, `User`) is refused with its row,
in every stage, instead of being trained on as the text `<|human|>`. The roles a template renders: system, user
and assistant, plus `tool`, `ipython`, `function` or `developer` where the template names them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app
from spo_align.tiny import build_tokenizer
from tests.data.bpe_chatml import build_bpe_chatml_tokenizer

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"
QWEN_LIKE = (
    "{% for m in messages %}{% if m.role == 'user' or m.role == 'system' %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "<|im_end|>\n{% elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}<|im_end|>\n"
    '{% elif m.role == "tool" %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n'
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA_LIKE = "{% for m in messages %}{% if m['role'] in ['ipython', 'tool'] %}x{% endif %}{{ m['content'] }}{% endfor %}"


def test_the_roles_of_each_template():
    from spo_align.data.tokenize import template_roles

    assert template_roles(build_tokenizer()) == {"system", "user", "assistant"}  # the tiny template
    assert template_roles(build_bpe_chatml_tokenizer()) == {"system", "user", "assistant"}  # renders any role as is
    tok = build_bpe_chatml_tokenizer()
    tok.chat_template = QWEN_LIKE
    assert template_roles(tok) == {"system", "user", "assistant", "tool"}
    tok.chat_template = LLAMA_LIKE
    assert template_roles(tok) == {"system", "user", "assistant", "ipython", "tool"}
    tok.chat_template = {"default": QWEN_LIKE, "other": LLAMA_LIKE}  # named templates: any of them
    assert template_roles(tok) == {"system", "user", "assistant", "ipython", "tool"}


PAIR = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}


def _pairs_with(role: str) -> list[dict]:
    odd = {"prompt": [{"role": "system", "content": "Add."}, {"role": role, "content": "2+2="}],
           "chosen": "4", "rejected": "5"}
    return [{**PAIR, "prompt": [{"role": "user", "content": PAIR["prompt"]}]}] * 2 + [odd] + [
        {**PAIR, "prompt": [{"role": "user", "content": "3+3="}]}]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(recipe: str, model: Path, tmp_path: Path, data: Path, fmt: str):
    return CliRunner().invoke(app, [
        "train", str(RECIPES / f"{recipe}.yaml"), "--set", f"model.name_or_path={model}",
        "--set", f"output.dir={tmp_path / 'out'}", "--set", f"data.train=[{{path: {data}, format: {fmt}}}]",
        "--set", "training.max_steps=1",
    ])


def _one_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize("role", ["human", "gpt", "User", "bot", " user", "tool"])
def test_a_preference_prompt_turn_with_an_unknown_role_is_refused_with_its_row(
    role: str, small_model: Path, tmp_path: Path
):
    data = _write(tmp_path / "pairs.jsonl", _pairs_with(role))
    error = _one_error(_train("spo", small_model, tmp_path, data, "pairs"))
    assert re.search(rf"pairs\.jsonl:3: prompt\[1\]\.role is {re.escape(repr(role))}", error), error
    assert "renders only assistant, system, user" in error
    assert not (tmp_path / "out" / "COMPLETE").exists()


def test_sft_messages_and_kto_prompts_are_checked_too(small_model: Path, tmp_path: Path):
    sft = [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}] * 3
    sft.insert(1, {"messages": [{"role": "human", "content": "1+1="}, {"role": "gpt", "content": "2"}]})
    error = _one_error(_train("sft_packed", small_model, tmp_path, _write(tmp_path / "sft.jsonl", sft), "messages"))
    assert "sft.jsonl:2: messages[0].role is 'human'" in error and "'human' is 'user'" in error
    kto = [{"prompt": [{"role": "user", "content": "1+1="}], "completion": c, "label": c == "2"} for c in "23"]
    kto.append({"prompt": [{"role": "customer", "content": "1+1="}], "completion": "2", "label": True})
    error = _one_error(_train("kto", small_model, tmp_path, _write(tmp_path / "kto.jsonl", kto), "kto"))
    assert "kto.jsonl:3: prompt[0].role is 'customer'" in error


def test_a_role_the_template_names_is_trained_on(tmp_path: Path):
    """A Qwen-like template renders `tool` turns: such a row is kept, and what it renders holds no `<|tool|>`."""
    import datasets

    from spo_align.data.tokenize import tokenize_pairs

    tok = build_bpe_chatml_tokenizer()
    tok.chat_template = QWEN_LIKE
    prompt = [{"role": "user", "content": "Weather?"}, {"role": "tool", "content": "sunny"}]
    ds = datasets.Dataset.from_list([{"prompt": prompt, "chosen": "Sunny.", "rejected": "Rain."}])
    assert len(tokenize_pairs(ds, tok)["prompt_ids"][0]) > 0
    tok.chat_template = build_bpe_chatml_tokenizer().chat_template  # plain ChatML: `tool` is not a turn it knows
    with pytest.raises(ValueError, match=r"row 0: prompt\[1\]\.role is 'tool'"):
        tokenize_pairs(ds, tok)


def test_a_template_that_refuses_a_turn_is_one_line_naming_the_row(small_model: Path, tmp_path: Path):
    """Gemma-style templates raise on a system turn: the run stops at that row with the template's own words,
    not a jinja traceback; in every stage."""
    import shutil

    model = tmp_path / "gemma-like"
    shutil.copytree(small_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (model / name).unlink(missing_ok=True)
    data = _write(tmp_path / "pairs.jsonl", _pairs_with("user"))  # row 3 has a system turn
    error = _one_error(_train("spo", model, tmp_path, data, "pairs"))
    assert re.search(r"pairs\.jsonl:3: the chat template refused this conversation: System role not supported", error)
    sft = [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}] * 2
    sft.append({"messages": [{"role": "system", "content": "Add."}, *sft[0]["messages"]]})
    error = _one_error(_train("sft_packed", model, tmp_path, _write(tmp_path / "sft.jsonl", sft), "messages"))
    assert "sft.jsonl:3: the chat template refused this conversation: System role not supported" in error
