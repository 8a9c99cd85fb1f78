"""On the real SmolLM2-135M-Instruct tokenizer and template, what every stage scores holds by construction:

- a prompt's ids are exactly those of the generation prompt, the template's default system turn included
  when the conversation has none (and left out when it has one);
- the scored tokens are exactly the answer followed by the template's end of turn (`<|im_end|>`, then a
  newline), and `<|im_end|>` is scored although it is also this tokenizer's pad token: in the padded and
  packed pair batches, in TRL's SFT batches (padded and padding-free packed) and in TRL's KTO batches,
  while the padding made of the same id is never scored.

The expected ids come from `tests/real/independent.py`: the template written out by hand, tokenized with plain
tokenizer calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.real.independent import DEFAULT_SYSTEM, END_OF_TURN, template_text, token_ids
from tests.real.real_runs import PAIR_RECIPE, PAIRS, SFT_ROWS, real_plan

pytestmark = pytest.mark.real

IGNORE = -100


@pytest.fixture(scope="module")
def ids(real_tokenizer: Any) -> dict[str, int]:
    """The template's special ids, looked up by name; the facts the module is about are asserted here."""
    tok = real_tokenizer
    end, start = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.pad_token_id == tok.eos_token_id == end == 2 and start == tok.bos_token_id == 1
    newline = token_ids(tok, "\n")
    assert len(newline) == 1
    return {"end": end, "start": start, "newline": newline[0]}


def expected_pair(tok: Any, row: dict[str, Any]) -> dict[str, list[int]]:
    return {
        "prompt_ids": token_ids(tok, template_text(row["prompt"], add_generation_prompt=True)),
        "chosen_ids": token_ids(tok, row["chosen"] + END_OF_TURN),
        "rejected_ids": token_ids(tok, row["rejected"] + END_OF_TURN),
    }


@pytest.fixture(scope="module")
def pairs(real_data: Path, smollm2_folder: Path, real_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory):
    """The four pairs through the preference stage's own data path (read, convert, tokenize, row policy)."""
    from spo_align.data.pairs import prepare_pairs

    plan = real_plan(real_data / "pairs.yaml", smollm2_folder, tmp_path_factory.mktemp("pairs") / "out")
    return prepare_pairs(list(plan.recipe.data.train), plan.recipe.data, real_tokenizer, base_dir=plan.base_dir, shuffle=False)


def test_the_template_inserts_a_system_turn_only_where_the_conversation_has_none(real_tokenizer: Any):
    for row in PAIRS:
        rendered = real_tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert rendered == template_text(row["prompt"], add_generation_prompt=True)
        has_own = row["prompt"][0]["role"] == "system"
        assert (DEFAULT_SYSTEM in rendered) != has_own
        assert rendered.count("<|im_start|>system\n") == 1


def test_pair_ids_are_the_generation_prompt_then_the_answer_and_its_end_of_turn(pairs, real_tokenizer: Any, ids):
    tok = real_tokenizer
    assert pairs.counts["total"]["rows_in"] == pairs.counts["total"]["rows_kept"] == len(PAIRS)
    # Row 2's blank lines merge with the prompt's last newline when tokenized together: tokenized apart.
    assert pairs.counts["total"]["boundary_split"] == 1
    for row, got in zip(PAIRS, pairs.dataset):
        want = expected_pair(tok, row)
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert got[column] == want[column], column
        assert got["prompt_ids"] == list(
            tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
        )
        for answer in ("chosen_ids", "rejected_ids"):
            assert got[answer][-2:] == [ids["end"], ids["newline"]]
            assert ids["end"] not in got[answer][:-2]
        full = template_text([*row["prompt"], {"role": "assistant", "content": row["chosen"]}], add_generation_prompt=False)
        assert tok.decode(got["prompt_ids"] + got["chosen_ids"]) == full


def _scored_per_sequence(batch: dict[str, Any], count: int) -> list[list[int]]:
    """The token ids each of the 2B sequences is scored on, read from the shifted labels of a pair batch."""
    labels = batch["labels"]
    if "attention_mask" in batch:
        return [[int(t) for t in labels[i] if t != IGNORE] for i in range(count)]
    out: list[list[int]] = [[] for _ in range(count)]
    for s, label in zip(batch["segment_ids"].reshape(-1).tolist(), labels.reshape(-1).tolist()):
        if label != IGNORE:
            out[s].append(int(label))
    return out


@pytest.mark.parametrize("layout", ["padded", "packed_rows", "packed_batch", "packed_single_row"])
def test_pair_batches_score_the_answer_and_end_of_turn_never_the_padding(pairs, real_tokenizer: Any, ids, layout: str):
    from spo_align.data.collate import PairCollator
    from spo_align.train.logps import batch_token_counts

    tok = real_tokenizer
    rows = [pairs.dataset[i] for i in range(len(pairs.dataset))]
    pack_length = 192 if layout in ("packed_rows", "packed_batch") else None
    batch = PairCollator(tok.pad_token_id, layout, pack_length)(rows)  # type: ignore[arg-type]
    b = len(rows)
    want = [expected_pair(tok, r)[k] for k in ("chosen_ids", "rejected_ids") for r in PAIRS]
    assert _scored_per_sequence(batch, 2 * b) == want
    assert batch_token_counts(batch).tolist() == [len(w) for w in want]
    if layout == "padded":
        # The padding is the same id as the end of turn, and only the padding is left out.
        pad = batch["attention_mask"] == 0
        assert pad.any() and bool((batch["input_ids"][pad] == ids["end"]).all())
        assert bool((batch["labels"][pad] == IGNORE).all())
    if layout in ("packed_rows", "packed_batch"):
        assert batch["row_lengths"].numel() > 1 and max(batch["row_lengths"].tolist()) <= 192


@pytest.fixture(scope="module")
def kto_recipe(real_data: Path) -> Path:
    recipe = {**PAIR_RECIPE, "loss": {"type": "kto", "beta": 0.1}}
    recipe["training"] = {**PAIR_RECIPE["training"], "per_device_batch_size": 2 * len(PAIRS)}
    path = real_data / "kto.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def test_kto_batches_score_the_answer_and_end_of_turn(kto_recipe: Path, smollm2_folder: Path, real_tokenizer: Any, ids, tmp_path: Path):
    """TRL's KTO collator, fed by PretokenizedKTOTrainer: its completion mask (what TRL turns into labels with
    `input_ids.masked_fill(completion_mask == 0, -100)`) covers exactly each answer and its end of turn."""
    from trl import KTOConfig

    from spo_align.data.unpaired import load_kto_dataset
    from spo_align.train.args import build_training_args
    from spo_align.train.model import load_model
    from spo_align.train.stages import PretokenizedKTOTrainer, kto_config_kwargs

    tok = real_tokenizer
    plan = real_plan(kto_recipe, smollm2_folder, tmp_path / "out")
    ds, _ = load_kto_dataset(plan, tok, "train")
    args = build_training_args(plan, tmp_path / "out", KTOConfig, **kto_config_kwargs(plan))
    trainer = PretokenizedKTOTrainer(
        model=load_model(plan), ref_model=load_model(plan, for_training=False), args=args, train_dataset=ds,
        processing_class=tok,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 * len(PAIRS)
    answers = {tuple(token_ids(tok, r[k] + END_OF_TURN)): r["prompt"] for r in PAIRS for k in ("chosen", "rejected")}
    for prefix in ("", "KL_"):
        input_ids, attention, completion = (batch[prefix + k] for k in ("input_ids", "attention_mask", "completion_mask"))
        labels = input_ids.masked_fill(completion == 0, IGNORE)
        seen = []
        for i in range(input_ids.shape[0]):
            scored = tuple(int(t) for t in labels[i] if t != IGNORE)
            assert scored in answers, tok.decode(list(scored))
            assert scored[-2:] == (ids["end"], ids["newline"])
            seen.append(scored)
            n = int(attention[i].sum())
            assert bool((input_ids[i, n:] == ids["end"]).all()) and not bool(completion[i, n:].any())  # padding
            prompt = input_ids[i, : n - len(scored)].tolist()
            if prefix == "":
                assert prompt == token_ids(tok, template_text(answers[scored], add_generation_prompt=True))
        if prefix == "":
            assert sorted(seen) == sorted(answers)
        assert bool((attention == 0).any())  # the batch really is padded with the end-of-turn id


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sft_batches_score_each_assistant_turn_and_its_end_of_turn(
    real_data: Path, smollm2_folder: Path, real_tokenizer: Any, ids, tmp_path: Path, packing: bool
):
    """The assistant masks of `spo_align.data.sft`, turned into labels by TRL's SFTTrainer and its collator
    (right-padded, or padding-free packed rows with positions restarting per conversation)."""
    from trl import SFTConfig, SFTTrainer

    from spo_align.data.sft import load_sft_dataset
    from spo_align.train.args import build_training_args
    from spo_align.train.model import load_model
    from spo_align.train.stages import sft_config_kwargs

    tok = real_tokenizer
    overrides = ["data.packing=true", "data.pack_length=256"] if packing else []
    plan = real_plan(real_data / "sft.yaml", smollm2_folder, tmp_path / "out", *overrides)
    ds, _ = load_sft_dataset(plan, tok, "train")
    expected_ids = [token_ids(tok, template_text(r["messages"], add_generation_prompt=False)) for r in SFT_ROWS]
    expected_scored = [
        [t for m in r["messages"] if m["role"] == "assistant" for t in token_ids(tok, m["content"] + END_OF_TURN)]
        for r in SFT_ROWS
    ]
    args = build_training_args(plan, tmp_path / "out", SFTConfig, **sft_config_kwargs(plan))
    trainer = SFTTrainer(model=load_model(plan), args=args, train_dataset=ds, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    labels, input_ids = batch["labels"], batch["input_ids"]
    if packing:
        assert "attention_mask" not in batch and input_ids.shape[0] == 1
        starts = [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0] + [input_ids.shape[1]]
        sequences = [(a, b) for a, b in zip(starts, starts[1:])]
        rows = [(input_ids[0, a:b].tolist(), labels[0, a:b].tolist()) for a, b in sequences]
    else:
        lengths = batch["attention_mask"].sum(-1).tolist()
        pad = batch["attention_mask"] == 0
        assert pad.any() and bool((input_ids[pad] == ids["end"]).all()) and bool((labels[pad] == IGNORE).all())
        rows = [(input_ids[i, :n].tolist(), labels[i, :n].tolist()) for i, n in enumerate(lengths)]
    assert len(rows) == len(SFT_ROWS)
    for row_ids, row_labels in rows:
        k = expected_ids.index(row_ids)  # the batch order is the sampler's
        scored = [t for t in row_labels if t != IGNORE]
        assert scored == expected_scored[k]
        turns = sum(m["role"] == "assistant" for m in SFT_ROWS[k]["messages"])
        assert scored.count(ids["end"]) == turns  # every assistant turn's end, none of the others'
        assert row_ids.count(ids["end"]) == len(SFT_ROWS[k]["messages"]) + (SFT_ROWS[k]["messages"][0]["role"] != "system")
