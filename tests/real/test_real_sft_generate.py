"""LoRA SFT with `spo train` on the real SmolLM2-135M-Instruct, then `spo eval generate` from its output.

- The first logged loss of two SFT steps (one batch of all three conversations) is the model's own token-mean
  negative log-likelihood of their assistant turns (each answer and its end of turn), computed independently
  (`tests/real/independent.py`: the template by hand, one unpadded transformers forward per conversation):
  at step 0 LoRA's B matrices are zero, so the policy is the folder's model; TRL's loss is the sum of the
  scored tokens' NLL over the batch divided by their count. Bound: the summed fp32 bound of every
  conversation's scored tokens, divided by their count (the mean of the per-token bounds).
- Greedy `spo eval generate` from the trained adapter answers every prompt with text and stops because the
  model produced `<|im_end|>` (its eos), not because it ran out of `--max-new-tokens`: the same greedy
  decoding, run independently (peft's merge of the same adapter, transformers' generate, one prompt at a time
  as `--batch-size 1` runs it, so the two computations are the same), ends with the `<|im_end|>` id well
  before the limit, and its text without special tokens is the recorded answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.real.independent import DEFAULT_SYSTEM, END_OF_TURN, U, score, template_text, token_ids
from tests.real.real_runs import SFT_ROWS, logged_steps, write_jsonl

pytestmark = [pytest.mark.real, pytest.mark.slow]

PROMPTS = [
    {"id": "capital", "prompt": "What is the capital of France?"},
    {"id": "sum", "prompt": "What is 2 + 2?"},
    {"id": "greeting", "prompt": "Say hello."},
]
MAX_NEW_TOKENS = 64


def _pieces(messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, scored) pieces: each assistant turn's content and end of turn are
    scored; the headers, the other turns and the default system turn are not."""
    pieces: list[tuple[str, bool]] = []
    if messages[0]["role"] != "system":
        pieces.append((f"<|im_start|>system\n{DEFAULT_SYSTEM}{END_OF_TURN}", False))
    for m in messages:
        pieces.append((f"<|im_start|>{m['role']}\n", False))
        pieces.append((m["content"] + END_OF_TURN, m["role"] == "assistant"))
    return pieces


def test_first_sft_loss_is_the_models_token_mean_nll(sft_lora_output: Path, real_model: Any, real_tokenizer: Any):
    tok = real_tokenizer
    steps = logged_steps(sft_lora_output)
    assert [s["step"] for s in steps] == [1, 2]
    total = bound = 0.0
    count = 0
    for row in SFT_ROWS:
        ids: list[int] = []
        scored: list[bool] = []
        for text, is_scored in _pieces(row["messages"]):
            piece = token_ids(tok, text)
            ids += piece
            scored += [is_scored] * len(piece)
        # Tokenized piece by piece, the conversation is what the tokenizer makes of it whole.
        assert ids == token_ids(tok, template_text(row["messages"], add_generation_prompt=False))
        result = score(real_model, ids, scored)
        total -= result.logp
        count += result.tokens
        bound += result.tolerance
    expected = total / count
    first = steps[0]["loss"]
    assert abs(first - expected) <= bound / count + count * U * expected, (first, expected, bound / count)


@pytest.fixture(scope="module")
def generated(sft_lora_output: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    from typer.testing import CliRunner

    from spo_align.cli import app

    folder = tmp_path_factory.mktemp("real_generate")
    prompts = write_jsonl(folder / "prompts.jsonl", PROMPTS)
    result = CliRunner().invoke(
        app,
        [
            "eval", "generate", "--model", f"{sft_lora_output}=sft", "--prompts", str(prompts), "--out",
            str(folder / "gen"), "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "1", "--dtype", "float32",
        ],
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (folder / "gen" / "sft.jsonl").read_text().splitlines()]


def test_generation_from_a_lora_output_returns_text_and_stops_at_end_of_turn(
    generated: list[dict[str, Any]], sft_lora_output: Path, real_tokenizer: Any
):
    import torch
    from peft import AutoPeftModelForCausalLM

    tok = real_tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert (sft_lora_output / "adapter_config.json").is_file() and not (sft_lora_output / "model.safetensors").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(sft_lora_output, dtype=torch.float32).merge_and_unload().eval()
    assert [r["prompt_id"] for r in generated] == [p["id"] for p in PROMPTS]
    for row, record in zip(PROMPTS, generated):
        response = record["response"]
        assert response.strip() and "<|im_" not in response, response
        prompt_ids = token_ids(tok, template_text([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True))
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=end, pad_token_id=end,
            )
        new = out[0, len(prompt_ids):].tolist()
        assert new[-1] == end and end not in new[:-1] and len(new) < MAX_NEW_TOKENS, tok.decode(new)
        assert tok.decode(new, skip_special_tokens=True) == response
