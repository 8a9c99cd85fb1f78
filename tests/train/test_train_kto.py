"""KTO stage: every batch mixes desirable and undesirable examples; TRL's KTO loss is the paper's KTO."""

from __future__ import annotations

import pytest
import torch

from spo_align.data.unpaired import interleave_classes
from spo_align.train.stages import PretokenizedKTOTrainer


@pytest.mark.parametrize("block", [2, 4, 8, 64])
def test_every_batch_mixes_desirable_and_undesirable_examples(block: int):
    labels = [True, False] * 200  # unpaired pairs: chosen rows next to their rejected rows
    order = interleave_classes(labels, block, seed=3)
    assert sorted(order) == list(range(len(labels)))
    for start in range(0, len(order), block):
        batch = [labels[i] for i in order[start : start + block]]
        assert True in batch and False in batch
    # the two answers of one pair are not kept side by side
    assert sum(order[k] // 2 == order[k + 1] // 2 for k in range(len(order) - 1)) < len(order) // 10
    assert interleave_classes(labels, block, seed=3) == order


def test_paired_data_is_unpaired_with_the_row_policy_and_mixed(plan_for):
    from spo_align.data.unpaired import load_kto_dataset
    from spo_align.tiny import build_tokenizer

    plan = plan_for("kto", "data.train.0.max_samples=40")
    ds, counts = load_kto_dataset(plan, build_tokenizer(), "train")
    assert len(ds) == 80 and sum(ds["label"]) == 40
    assert counts["total"]["rows_in"] == 40 and counts["total"]["rows_kept"] == 40
    assert set(ds.column_names) == {"prompt_ids", "completion_ids", "label"}
    for start in range(0, len(ds), 8):
        assert 0 < sum(ds["label"][start : start + 8]) < 8


def _completion_logps(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    token_logps = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


def paper_kto_losses(
    log_ratio: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *, beta: float, desirable_weight: float
) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 7) per example, undesirable weight 1: with r = log pi/pi_ref and the reference
    point z0 = max(0, kl), detached, a desirable example costs w_D (1 - s(beta (r - z0))), an undesirable one
    1 - s(beta (z0 - r))."""
    z0 = kl.detach().clamp(min=0.0)
    return torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - z0))),
        1 - torch.sigmoid(beta * (z0 - log_ratio)),
    )


def test_trl_kto_loss_matches_the_paper_s_kto_on_a_batch(plan_for, tmp_path):
    """Fails loudly if TRL's KTOTrainer stops computing the paper's KTO (eq. 7 with a detached, clamped z0)."""
    from trl import KTOConfig

    from spo_align.data.unpaired import load_kto_dataset
    from spo_align.train.args import build_training_args
    from spo_align.train.model import load_model, load_tokenizer
    from spo_align.train.stages import kto_config_kwargs

    plan = plan_for("kto", "data.train.0.max_samples=16", "loss.desirable_weight=1.5", "loss.beta=0.5")
    args = build_training_args(plan, tmp_path, KTOConfig, **kto_config_kwargs(plan))
    tokenizer = load_tokenizer(plan)
    ds, _ = load_kto_dataset(plan, tokenizer, "train")
    model = load_model(plan)
    with torch.no_grad():  # move the policy away from the reference so that the log-ratios are not zero
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    ref = load_model(plan, for_training=False)
    trainer = PretokenizedKTOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, batch)
        policy = _completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        reference = _completion_logps(ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        kl_policy = _completion_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
        kl_ref = _completion_logps(ref, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
    desirable = batch["label"].bool()
    assert desirable.any() and (~desirable).any()
    assert (policy - reference).abs().max() > 0.1
    ours = paper_kto_losses(policy - reference, desirable, (kl_policy - kl_ref).mean(), beta=0.5, desirable_weight=1.5)
    torch.testing.assert_close(trl_loss, ours.mean(), atol=1e-5, rtol=1e-5)


def test_rows_already_in_kto_layout_are_read_as_they_are(plan_for, tmp_path):
    import json

    from spo_align.data.columns import MissingColumnError
    from spo_align.data.unpaired import load_kto_dataset
    from spo_align.tiny import build_tokenizer

    rows = [{"q": f"{i}+1=", "answer": str(i + 1 if i % 3 else i), "good": bool(i % 3)} for i in range(12)]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = f"data.train=[{{path: {path}, format: kto, columns: {{prompt: q, completion: answer, label: good}}}}]"
    tokenizer = build_tokenizer()
    ds, _ = load_kto_dataset(plan_for("kto", source, "data.shuffle=false"), tokenizer, "train")
    assert len(ds) == 12 and sum(ds["label"]) == 8
    by_prompt = {tokenizer.decode(row["prompt_ids"], skip_special_tokens=True): row for row in ds}
    four = next(row for text, row in by_prompt.items() if "4+1=" in text)
    assert tokenizer.decode(four["completion_ids"], skip_special_tokens=True).strip() == "5" and four["label"]
    assert not next(row for text, row in by_prompt.items() if "3+1=" in text)["label"]
    wrong = source.replace("label: good", "label: verdict")
    with pytest.raises(MissingColumnError, match="has no column 'verdict'"):
        load_kto_dataset(plan_for("kto", wrong), build_tokenizer(), "train")


def test_pretokenized_examples_reach_trl_as_its_own_preparation_makes_them(plan_for, tmp_path):
    """Fails loudly if TRL changes what its KTO preparation produces (columns, KL completions), since
    PretokenizedKTOTrainer runs only its post-tokenization step on rows tokenized by spo_align.data.tokenize."""
    import datasets
    from trl import KTOConfig, KTOTrainer

    from spo_align.data.pairs import load_canonical_pairs
    from spo_align.data.tokenize import tokenize_completions
    from spo_align.train.args import build_training_args
    from spo_align.train.model import load_model, load_tokenizer
    from spo_align.train.stages import kto_config_kwargs

    plan = plan_for("kto", "data.train.0.max_samples=12")
    args = build_training_args(plan, tmp_path, KTOConfig, **kto_config_kwargs(plan))
    tokenizer = load_tokenizer(plan)
    pairs = load_canonical_pairs(plan.recipe.data.train[0], plan.base_dir)
    text_rows = [
        {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}], "label": label}
        for prompt, chosen, rejected in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])
        for answer, label in ((chosen, True), (rejected, False))
    ]
    theirs = KTOTrainer(
        model=load_model(plan), ref_model=load_model(plan, for_training=False), args=args,
        train_dataset=datasets.Dataset.from_list(text_rows), processing_class=tokenizer,
    ).train_dataset
    plain = [{"prompt": r["prompt"], "completion": r["completion"][0]["content"], "label": r["label"]} for r in text_rows]
    tokenized = tokenize_completions(datasets.Dataset.from_list(plain), tokenizer)
    assert set(tokenized["boundary"]) == {"joint"}  # rows that tokenize the same either way
    ours = PretokenizedKTOTrainer(
        model=load_model(plan), ref_model=load_model(plan, for_training=False), args=args,
        train_dataset=tokenized.select_columns(["prompt_ids", "completion_ids", "label"]), processing_class=tokenizer,
    ).train_dataset
    for column in ("prompt_ids", "completion_ids", "KL_completion_ids", "label"):
        assert ours[column] == theirs[column], column
