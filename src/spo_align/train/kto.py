"""The KTO stage: TRL's KTOTrainer on desirable/undesirable examples.

The examples come tokenized from `spo_align.data.kto` (row policy applied, every batch mixing both classes) and
enter TRL through `PretokenizedKTOTrainer`. With LoRA the reference is the same model with the adapter disabled
(TRL does this when it wraps the model itself from `peft_config`); with full fine-tuning a frozen copy is loaded
(sharded like the policy under ZeRO-3 by TRL's DeepSpeed preparation).
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
    }


def run_kto(plan: RunPlan, ctx: RunContext) -> None:
    from trl import KTOConfig

    from spo_align.data.kto import load_kto_dataset
    from spo_align.train.args import build_training_args
    from spo_align.train.kto_trainer import PretokenizedKTOTrainer
    from spo_align.train.loop import train_and_save
    from spo_align.train.model import load_model, load_tokenizer, lora_config

    args = build_training_args(plan, ctx.output_dir, KTOConfig, **kto_config_kwargs(plan))
    tokenizer = load_tokenizer(plan)
    train_ds, train_counts = load_kto_dataset(plan, tokenizer, "train")
    eval_ds, eval_counts = load_kto_dataset(plan, tokenizer, "eval")
    ctx.run_info["row_policy"] = {"train": train_counts, "eval": eval_counts}
    ctx.run_info["train_examples"] = len(train_ds) if train_ds is not None else 0

    model = load_model(plan)
    peft_config = None
    ref_model = None
    if plan.recipe.adapter is not None:
        peft_config = lora_config(plan)  # TRL wraps the model; reference = adapter disabled, no second copy
    else:
        ref_model = load_model(plan, plan.reference_model_path or plan.model_path, for_training=False)
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
