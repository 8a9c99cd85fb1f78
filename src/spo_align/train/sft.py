"""The SFT stage: TRL's SFTTrainer on conversations, loss on assistant tokens only, optional packing.

The conversations come tokenized (assistant masks, row policy, packing) from `spo_align.data.sft`. Without
packing, TRL receives `input_ids` + `assistant_masks` and builds the labels itself. With packing the rows arrive
packed with `labels` and `seq_lengths`; TRL then skips its own preparation and its padding-free collator emits
`position_ids` that restart at each sequence, from which the model builds a block-diagonal causal mask (flash
attention: varlen kernels; sdpa/eager: a packed-sequence mask), so packed conversations never attend to each other.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan
    from spo_align.train.context import RunContext

logger = logging.getLogger(__name__)


def sft_config_kwargs(plan: RunPlan) -> dict[str, Any]:
    """The SFTConfig fields beyond the shared training arguments."""
    data = plan.recipe.data
    packing = data.packing
    kwargs: dict[str, Any] = {
        "max_length": (plan.pack_length or data.max_length) if packing else data.max_length,
        # With packing the rows arrive packed (pack_conversations); packing + "bfd" here only turns on TRL's
        # padding-free collator, which reads seq_lengths. TRL's own preparation is skipped.
        "packing": packing,
        "packing_strategy": "bfd",
        "assistant_only_loss": False,  # the assistant_masks column below already restricts the loss
        "completion_only_loss": False,
        "dataset_num_proc": data.num_proc,
        "shuffle_dataset": data.shuffle,
    }
    if packing:
        kwargs["dataset_kwargs"] = {"skip_prepare_dataset": True}
    return kwargs


def run_sft(plan: RunPlan, ctx: RunContext) -> None:
    from trl import SFTConfig, SFTTrainer

    from spo_align.data.sft import load_sft_dataset
    from spo_align.train.args import build_training_args
    from spo_align.train.loop import train_and_save
    from spo_align.train.model import apply_adapter, apply_dropout_setting, load_model, load_tokenizer
    from spo_align.train.one_device import device_info

    args = build_training_args(plan, ctx.output_dir, SFTConfig, **sft_config_kwargs(plan))
    ctx.run_info["device"] = device_info(args, plan)
    tokenizer = load_tokenizer(plan)
    train_ds, train_counts = load_sft_dataset(plan, tokenizer, "train")
    eval_ds, eval_counts = load_sft_dataset(plan, tokenizer, "eval")
    ctx.run_info["row_policy"] = {"train": train_counts, "eval": eval_counts}
    ctx.run_info["train_rows"] = len(train_ds) if train_ds is not None else 0
    ctx.run_info["train_tokens"] = int(sum(len(ids) for ids in train_ds["input_ids"])) if train_ds is not None else 0

    model = apply_adapter(load_model(plan), plan)
    ctx.run_info["dropout_disabled"] = apply_dropout_setting(model, plan)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=ctx.callbacks,
    )
    train_and_save(trainer, ctx)
