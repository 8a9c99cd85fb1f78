"""The KTO stage: TRL's KTOTrainer on desirable/undesirable examples.

Paired data (any layout `data/pairs.py` reads) goes through the same row policy as the pairwise losses, then
is unpaired here: each pair gives a desirable (chosen) and an undesirable (rejected) example. TRL's own
unpairing puts every chosen row of a map batch before its rejected rows, and KTO reads its data in order
(the KL estimate needs `train_sampling_strategy="sequential"`), so its batches come out all-desirable or
all-undesirable. Here the two classes are shuffled separately, interleaved, and shuffled within each block
of `per_device_batch_size`, so every batch holds both classes and no batch holds both answers of one pair
by construction. Rows already in KTO layout (`format: kto`: prompt / completion / label) are used as they are.

With LoRA the reference is the same model with the adapter disabled (TRL does this when it wraps the model
itself from `peft_config`), unless `reference.model` names another model; with full fine-tuning a frozen
copy is loaded (sharded like the policy under ZeRO-3 by TRL's DeepSpeed preparation). A reference that is
the starting model is loaded at `model.revision`, like the policy.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

from spo_align.data.sources import load_source, sample_source

if TYPE_CHECKING:
    import datasets

    from spo_align.recipe.resolve import RunPlan
    from spo_align.recipe.schema import DatasetSource
    from spo_align.train.context import RunContext

logger = logging.getLogger(__name__)

Message = dict[str, str]


def _as_prompt(value: Any) -> list[Message]:
    return [{"role": "user", "content": value}] if isinstance(value, str) else list(value)


def _as_answer(value: Any) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return [m for m in value if m["role"] == "assistant"][-1:]


def interleave_classes(labels: list[bool], block: int, seed: int) -> list[int]:
    """An order of the examples in which every block of `block` consecutive ones mixes both classes.

    Desirable and undesirable indices are shuffled separately, interleaved (one of each in turn while both
    last), and each block is shuffled. With equal class sizes and `block` >= 2 every block holds both.
    """
    rng = random.Random(seed)
    good = [i for i, label in enumerate(labels) if label]
    bad = [i for i, label in enumerate(labels) if not label]
    rng.shuffle(good)
    rng.shuffle(bad)
    order: list[int] = []
    for k in range(max(len(good), len(bad))):
        if k < len(good):
            order.append(good[k])
        if k < len(bad):
            order.append(bad[k])
    out: list[int] = []
    for start in range(0, len(order), block):
        chunk = order[start : start + block]
        rng.shuffle(chunk)
        out.extend(chunk)
    return out


def unpair(pairs: datasets.Dataset) -> datasets.Dataset:
    """Canonical pairs (prompt messages, chosen/rejected strings) -> prompt/completion/label rows, pair order."""
    import datasets

    prompts: list[list[Message]] = []
    completions: list[list[Message]] = []
    labels: list[bool] = []
    for prompt, chosen, rejected in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]):
        for answer, label in ((chosen, True), (rejected, False)):
            prompts.append(_as_prompt(prompt))
            completions.append(_as_answer(answer))
            labels.append(label)
    return datasets.Dataset.from_dict({"prompt": prompts, "completion": completions, "label": labels})


def _kto_rows(plan: RunPlan, split: str, index: int, source: DatasetSource, ds: datasets.Dataset):
    """A source already in KTO layout -> prompt/completion/label rows (messages)."""
    import datasets

    from spo_align.train.columns import require_columns

    require_columns(plan, split, index, ds, ["prompt", "completion", "label"])  # type: ignore[arg-type]
    cols = source.columns
    return datasets.Dataset.from_dict(
        {
            "prompt": [_as_prompt(p) for p in ds[cols.prompt]],
            "completion": [_as_answer(c) for c in ds[cols.completion]],
            "label": [bool(v) for v in ds[cols.label]],
        }
    )


def _pair_rows(plan: RunPlan, split: str, index: int, source: DatasetSource, ds: datasets.Dataset, tokenizer: Any):
    """A paired source -> canonical pairs -> row policy -> unpaired rows, plus the policy counts."""
    from spo_align.data.pairs import to_canonical_pairs
    from spo_align.data.policies import apply_pair_policy
    from spo_align.data.tokenize import tokenize_pairs
    from spo_align.train.columns import require_columns

    require_columns(plan, split, index, ds, ["chosen", "rejected"])  # type: ignore[arg-type]
    chosen_first = ds[0][source.columns.chosen] if len(ds) else None
    if source.columns.prompt not in ds.column_names and not isinstance(chosen_first, list):
        require_columns(plan, split, index, ds, ["prompt"])  # type: ignore[arg-type]
    pairs = to_canonical_pairs(ds, source)
    tokenized = tokenize_pairs(pairs, tokenizer, num_proc=plan.recipe.data.num_proc)
    kept, counts = apply_pair_policy(tokenized, plan.recipe.data.policy, plan.recipe.data.max_length)
    return unpair(kept), counts.as_dict()


def load_kto_dataset(plan: RunPlan, tokenizer: Any, split: str) -> tuple[datasets.Dataset | None, dict[str, Any]]:
    """All sources of a split as shuffled prompt/completion/label rows in which every batch mixes labels."""
    import datasets

    data = plan.recipe.data
    sources = data.train if split == "train" else data.eval
    if not sources:
        return None, {}
    parts = []
    counts: dict[str, Any] = {}
    for index, source in enumerate(sources):
        ds = load_source(source, plan.base_dir)
        ds = sample_source(ds, source, shuffle=data.shuffle and split == "train", seed=plan.recipe.training.seed)
        name = f"{source.path} [{source.split}]"
        if source.format == "kto":
            rows = _kto_rows(plan, split, index, source, ds)
            counts[name] = {"rows_in": len(ds), "rows_kept": len(rows)}
        else:
            rows, counts[name] = _pair_rows(plan, split, index, source, ds, tokenizer)
        logger.info("%s: %s", name, counts[name])
        parts.append(rows)
    merged = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    order = interleave_classes(list(merged["label"]), plan.recipe.training.per_device_batch_size, plan.recipe.training.seed)
    merged = merged.select(order)
    n_good = sum(merged["label"])
    logger.info("%s: %d desirable, %d undesirable examples", split, n_good, len(merged) - n_good)
    return merged, counts


def kto_config_kwargs(plan: RunPlan) -> dict[str, Any]:
    """The KTOConfig fields beyond the shared training arguments."""
    from spo_align.train.model import dropout_disabled

    loss = plan.recipe.loss
    if loss is None or loss.type != "kto":
        raise ValueError("the kto stage needs loss.type: kto")
    return {
        "loss_type": "kto",
        "beta": loss.beta,
        "desirable_weight": loss.desirable_weight,
        "undesirable_weight": loss.undesirable_weight,
        "max_length": plan.recipe.data.max_length,
        "train_sampling_strategy": "sequential",  # our order already mixes the classes; TRL's KL term needs it
        "precompute_ref_log_probs": plan.recipe.reference.precompute,
        "dataset_num_proc": plan.recipe.data.num_proc,
        "remove_unused_columns": False,
        "disable_dropout": dropout_disabled(plan),  # TRL defaults it on; the recipe's setting wins
    }


def run_kto(plan: RunPlan, ctx: RunContext) -> None:
    from trl import KTOConfig, KTOTrainer

    from spo_align.train.args import build_training_args
    from spo_align.train.model import (
        apply_dropout_setting,
        load_model,
        load_tokenizer,
        lora_config,
        quiet_checkpointing_aliases,
    )
    from spo_align.train.one_device import device_info
    from spo_align.train.run import train_and_save

    args = build_training_args(plan, ctx.output_dir, KTOConfig, **kto_config_kwargs(plan))
    ctx.run_info["device"] = device_info(args, plan)
    tokenizer = load_tokenizer(plan)
    train_ds, train_counts = load_kto_dataset(plan, tokenizer, "train")
    eval_ds, eval_counts = load_kto_dataset(plan, tokenizer, "eval")
    ctx.run_info["row_policy"] = {"train": train_counts, "eval": eval_counts}
    ctx.run_info["train_examples"] = len(train_ds) if train_ds is not None else 0

    model = load_model(plan)
    ctx.run_info["dropout_disabled"] = apply_dropout_setting(model, plan)  # TRL then disables LoRA's (kwargs)
    peft_config = lora_config(plan) if plan.recipe.adapter is not None else None
    separate_reference = plan.reference_model_path not in (None, plan.model_path)
    ref_model = None
    if peft_config is None or separate_reference:
        # A frozen copy of the starting model (at model.revision), or the reference the recipe names; with LoRA
        # and no other reference, TRL disables the adapter instead of holding a second copy.
        ref_model = load_model(plan, plan.reference_model_path or plan.model_path, for_training=False)
    with quiet_checkpointing_aliases():  # TRL reads and toggles checkpointing by its deprecated names
        trainer = KTOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=ctx.callbacks,
        )
        train_and_save(trainer, ctx)
