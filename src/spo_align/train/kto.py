"""The KTO stage: TRL's KTOTrainer on desirable/undesirable examples.

The examples come tokenized from `spo_align.data.kto` (row policy applied, every batch mixing both classes) and
enter TRL through `PretokenizedKTOTrainer`. With LoRA the reference is the same model with the adapter disabled
(TRL does this when it wraps the model itself from `peft_config`), unless `reference.model` names another model;
with full fine-tuning a frozen copy is loaded (sharded like the policy under ZeRO-3 by TRL's DeepSpeed
preparation). A reference that is the starting model is loaded at `model.revision`, like the policy.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan
    from spo_align.train.context import RunContext

logger = logging.getLogger(__name__)


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
    from trl import KTOConfig

    from spo_align.data.kto import load_kto_dataset
    from spo_align.train.args import build_training_args
    from spo_align.train.kto_trainer import PretokenizedKTOTrainer
    from spo_align.train.loop import train_and_save
    from spo_align.train.model import (
        apply_dropout_setting,
        load_model,
        load_tokenizer,
        lora_config,
        quiet_checkpointing_aliases,
    )
    from spo_align.train.one_device import device_info

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
    ref_model = None
    if peft_config is None or plan.separate_reference:
        # A frozen copy of the starting model (at model.revision), or the reference the recipe names; with LoRA
        # and no other reference, TRL disables the adapter instead of holding a second copy.
        ref_model = load_model(plan, plan.reference_model_path or plan.model_path, for_training=False)
    with quiet_checkpointing_aliases():  # TRL reads and toggles checkpointing by its deprecated names
        trainer = PretokenizedKTOTrainer(
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
