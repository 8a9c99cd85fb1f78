"""SFT data: assistant-only masks from incremental template renders, row policy, packing isolation."""

from __future__ import annotations

import pytest
import torch

from spo_align.data.conversations import ChatTemplateError, tokenize_conversation
from spo_align.data.sft import SFTRowError
from spo_align.tiny import build_tokenizer

CONVERSATION = [
    {"role": "system", "content": "add"},
    {"role": "user", "content": "12+30="},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "1+1="},
    {"role": "assistant", "content": "2"},
]
# The same format without {% generation %} markers: TRL 1.16 cannot add them to an unknown template.
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _decoded_trained(tokenizer, ids, mask) -> list[str]:
    return [tokenizer.decode([i]) for i, m in zip(ids, mask) if m]


def test_assistant_mask_matches_the_generation_markers_of_the_tiny_template():
    tokenizer = build_tokenizer()
    conversation = tokenize_conversation(tokenizer, CONVERSATION)
    ids, mask = conversation.input_ids, conversation.assistant_masks
    assert conversation.boundary == "joint"
    reference = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids == list(reference["input_ids"])
    assert mask == list(reference["assistant_masks"])


def test_assistant_mask_without_generation_markers_covers_answers_and_end_of_turn_only():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = PLAIN_TEMPLATE
    conversation = tokenize_conversation(tokenizer, CONVERSATION)
    ids, mask = conversation.input_ids, conversation.assistant_masks
    assert _decoded_trained(tokenizer, ids, mask) == ["4", "2", "<|end|>", "2", "<|end|>"]
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)


def test_a_template_that_rewrites_earlier_turns_is_refused():
    tokenizer = build_tokenizer()
    # Renders the turn count first: a prefix of the conversation does not render as a prefix.
    tokenizer.chat_template = "{{ messages|length }}" + PLAIN_TEMPLATE
    with pytest.raises(ChatTemplateError, match="not prefix-consistent"):
        tokenize_conversation(tokenizer, CONVERSATION)


def test_row_policy_truncates_drops_and_counts(plan_for):
    import datasets

    from spo_align.data.sft import tokenize_sft_dataset

    rows = [
        [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}],
        [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "  "}],
        [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "9" * 40}],
        [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "2"}],
    ]
    ds = datasets.Dataset.from_dict({"messages": rows})
    tokenizer = build_tokenizer()
    plan = plan_for("sft_packed", "data.max_length=24")
    kept, counts = tokenize_sft_dataset(plan, ds, tokenizer, "messages", "test")
    assert (counts.rows_in, counts.rows_kept) == (4, 2)
    assert (counts.empty_dropped, counts.too_long_truncated, counts.too_long_dropped) == (1, 1, 1)
    assert [len(ids) for ids in kept["input_ids"]][1] == 24 and sum(kept["assistant_masks"][1]) > 0
    with pytest.raises(SFTRowError, match=r"test, row 2: too long \(49 tokens > 24: data.max_length"):
        tokenize_sft_dataset(plan_for("sft_packed", "data.max_length=24", "data.policy.too_long=raise"),
                             ds, tokenizer, "messages", "test")


def test_packed_sequences_do_not_attend_to_each_other(small_model):
    """A BFD-packed, padding-free batch gives each sequence the logits it gets alone.

    transformers builds the block-diagonal mask from position_ids only without a KV cache; TRL's
    SFTTrainer.compute_loss turns the cache off for every forward (checked here, so a TRL change is caught).
    """
    import inspect

    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    assert 'inputs["use_cache"] = False' in inspect.getsource(SFTTrainer.compute_loss)

    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(small_model, attn_implementation="sdpa").eval()
    seqs = [tokenize_conversation(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}]).input_ids
            for q, a in (("12+30=", "42"), ("7+8=", "15"), ("99+1=", "100"))]
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    batch = collator([{"input_ids": [i for s in seqs for i in s], "seq_lengths": [len(s) for s in seqs]}])
    assert batch["position_ids"][0].tolist() == [p for s in seqs for p in range(len(s))]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for seq in seqs:
            alone = model(input_ids=torch.tensor([seq])).logits[0]
            torch.testing.assert_close(packed[start : start + len(seq)], alone, atol=1e-5, rtol=1e-4)
            start += len(seq)


def test_trl_turns_our_assistant_masks_into_labels(plan_for, tmp_path):
    """TRL's SFTTrainer must build labels from the `assistant_masks` column (fails loudly if TRL stops)."""
    from trl import SFTConfig, SFTTrainer

    from spo_align.data.sft import load_sft_dataset
    from spo_align.train.args import build_training_args
    from spo_align.train.model import load_model, load_tokenizer
    from spo_align.train.stages import sft_config_kwargs

    plan = plan_for("sft_packed", "data.packing=false", "data.pack_length=null", "data.shuffle=false", "data.train.0.max_samples=4")
    tokenizer = load_tokenizer(plan)
    tokenizer.chat_template = PLAIN_TEMPLATE  # no generation markers
    ds, _ = load_sft_dataset(plan, tokenizer, "train")
    args = build_training_args(plan, tmp_path, SFTConfig, **sft_config_kwargs(plan))
    trainer = SFTTrainer(model=load_model(plan), args=args, train_dataset=ds, processing_class=tokenizer)
    row = trainer.train_dataset[0]
    ids, mask = ds[0]["input_ids"], ds[0]["assistant_masks"]
    assert row["input_ids"] == ids
    assert row["labels"] == [i if m else -100 for i, m in zip(ids, mask)]
    trained = [tokenizer.decode([i]) for i in row["labels"] if i != -100]
    assert trained[-1] == "<|end|>" and "<|assistant|>" not in trained and "<|user|>" not in trained


def test_conversations_are_packed_best_fit_decreasing_with_their_labels():
    import datasets

    from spo_align.data.sft import pack_conversations

    lengths = [5, 9, 3, 7, 2, 6, 4]
    ids = [[100 * k + t for t in range(n)] for k, n in enumerate(lengths)]
    masks = [[int(t >= n // 2) for t in range(n)] for n in lengths]
    ds = datasets.Dataset.from_dict({"input_ids": ids, "assistant_masks": masks})
    packed = pack_conversations(ds, 10, shuffle=False, seed=0)
    assert len(packed) == 4  # 36 tokens in rows of 10: best-fit decreasing needs the minimum, 4
    seen = []
    for row in packed:
        assert len(row["input_ids"]) == sum(row["seq_lengths"]) <= 10
        start = 0
        for n in row["seq_lengths"]:
            k = row["input_ids"][start] // 100
            assert row["input_ids"][start : start + n] == ids[k]
            assert row["labels"][start : start + n] == [i if m else -100 for i, m in zip(ids[k], masks[k])]
            seen.append(k)
            start += n
    assert sorted(seen) == list(range(len(lengths)))


def test_packed_rows_reach_the_model_with_position_ids_restarting_per_conversation(plan_for, tmp_path):
    from trl import SFTConfig, SFTTrainer

    from spo_align.data.sft import load_sft_dataset
    from spo_align.train.args import build_training_args
    from spo_align.train.model import load_model, load_tokenizer
    from spo_align.train.stages import sft_config_kwargs

    plan = plan_for("sft_packed", "data.train.0.max_samples=24")
    tokenizer = load_tokenizer(plan)
    ds, counts = load_sft_dataset(plan, tokenizer, "train")
    assert counts["packed"]["conversations"] == 24 and len(ds) <= 8  # all rows fit one batch of 8
    args = build_training_args(plan, tmp_path, SFTConfig, **sft_config_kwargs(plan))
    trainer = SFTTrainer(model=load_model(plan), args=args, train_dataset=ds, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # padding-free: one flat row
    positions = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0]
    assert len(starts) == 24
    assert all(batch["labels"][0, s].item() == -100 for s in starts)
