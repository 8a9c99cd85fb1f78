"""The stages: what each one does with a plan and a `RunContext` (`train/run.py` calls exactly one).

Each stage reads its data (`spo_align.data`), loads the model (`model.py`), builds its Trainer with the
shared arguments (`args.py`) and the context's callbacks, and trains and finishes through `finish.py`. What it
learns about the run (row-policy counts, sizes, the batch layout, the reference mode, real tokens/s) goes into
``ctx.run_info`` for run.json and the model card.

- `run_sft`: TRL's SFTTrainer on conversations, loss on assistant tokens only, optional packing. The
  conversations come tokenized (assistant masks, row policy, packing) from `spo_align.data.sft`. Without
  packing, TRL receives `input_ids` + `assistant_masks` and builds the labels itself. With packing the rows
  arrive packed with `labels` and `seq_lengths`; TRL then skips its own preparation and its padding-free
  collator emits `position_ids` that restart at each sequence, from which the model builds a block-diagonal
  causal mask (flash attention: varlen kernels; sdpa/eager: a packed-sequence mask), so packed conversations
  never attend to each other.
- `run_kto`: TRL's KTOTrainer on desirable/undesirable examples, tokenized by `spo_align.data.unpaired` (row policy
  applied, every batch mixing both classes) and entering TRL through `PretokenizedKTOTrainer`. With LoRA the
  reference is the same model with the adapter disabled (TRL does this when it wraps the model itself from
  `peft_config`), unless `reference.model` names another model; with full fine-tuning a frozen copy is loaded
  (sharded like the policy under ZeRO-3 by TRL's DeepSpeed preparation). A reference that is the starting
  model is loaded at `model.revision`, like the policy.
- `run_preference`: every registry loss of stage "pair", on this project's `PreferenceTrainer`: data -> pairs
  -> tokens -> row policy -> layout -> trainer; it also reports the batch layout and its padding share
  (padded vs packed, over the training data as it will be batched) and the real (non-pad) tokens per second.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import TYPE_CHECKING, Any

from spo_align.data.collate import Layout, LayoutStats, PairCollator, choose_layout, layout_stats
from spo_align.data.pairs import pair_columns, prepare_pairs
from spo_align.losses.registry import build_pair_loss, loss_entry

if TYPE_CHECKING:
    import datasets

    from spo_align.recipe.resolve import RunPlan
    from spo_align.train.finish import RunContext

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- SFT


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
    from spo_align.train.args import build_training_args, device_info
    from spo_align.train.finish import train_and_save
    from spo_align.train.model import apply_adapter, apply_dropout_setting, load_model, load_tokenizer

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


# ---------------------------------------------------------------- KTO


TOKENIZED = ("prompt_ids", "completion_ids", "label")


def is_tokenized(dataset: Any) -> bool:
    columns = getattr(dataset, "column_names", None) or []
    return all(c in columns for c in TOKENIZED) and "prompt" not in columns


@cache
def _pretokenized_kto_trainer() -> type:
    """`PretokenizedKTOTrainer`, made on first use: TRL is imported by the stages that use it, not by preference
    runs (`__getattr__` below gives it its name here)."""
    from trl import KTOTrainer

    class PretokenizedKTOTrainer(KTOTrainer):
        """TRL's KTOTrainer, fed examples this project has already tokenized.

        TRL 1.16 tokenizes KTO examples itself and, where tokens merge across the prompt/completion boundary, moves
        the prompt's last tokens into the completion (a warning says the model then trains on a context it never
        sees at inference). Examples here are tokenized by `spo_align.data.tokenize`, the rule every stage shares,
        so this subclass takes rows that already hold ``prompt_ids``/``completion_ids``/``label`` and runs only the
        step TRL does after tokenizing: the KL completions, each example's completion rotated by one within its
        batch of ``per_device_train_batch_size`` (TRL's mismatched pairs for the KL reference point). Rows in any
        other shape go through TRL's own preparation. `tests/train/test_train_kto.py` checks that both paths give
        TRL's columns for rows that tokenize the same either way, and fails if TRL changes how it prepares them.
        """

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            if not is_tokenized(dataset):
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if not getattr(self, "calculate_KL", False):
                return dataset

            def add_kl_completions(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
                completions = batch["completion_ids"]
                return {"KL_completion_ids": [completions[-1], *completions[:-1]]}

            return dataset.map(
                add_kl_completions,
                batched=True,
                batch_size=args.per_device_train_batch_size,
                desc=f"KL completions of the {dataset_name} dataset",
            )

    PretokenizedKTOTrainer.__module__ = __name__
    PretokenizedKTOTrainer.__qualname__ = "PretokenizedKTOTrainer"
    return PretokenizedKTOTrainer


def __getattr__(name: str) -> Any:
    if name == "PretokenizedKTOTrainer":
        return _pretokenized_kto_trainer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

    from spo_align.data.unpaired import load_kto_dataset
    from spo_align.train.args import build_training_args, device_info
    from spo_align.train.finish import train_and_save
    from spo_align.train.model import (
        apply_dropout_setting,
        load_model,
        load_tokenizer,
        lora_config,
        quiet_checkpointing_aliases,
    )

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
        trainer = _pretokenized_kto_trainer()(
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


# ---------------------------------------------------------------- pairwise preference losses


def dataset_layout_stats(ds: datasets.Dataset, batch_size: int, pack_length: int, layout: Layout) -> LayoutStats:
    lengths = [(len(p), len(c), len(r)) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    return layout_stats(
        [x[0] for x in lengths], [x[1] for x in lengths], [x[2] for x in lengths], batch_size, pack_length, layout
    )


def _ensure_deepspeed_comm(plan: RunPlan, args: Any) -> None:
    """Under DeepSpeed, set up torch.distributed (touching ``args.device``) and DeepSpeed's own comm layer
    before any model is loaded: ZeRO-3's zero.Init in from_pretrained reads the world size from the latter
    and otherwise assumes 1, which fails its batch-size check."""
    if plan.deepspeed_config is None:
        return
    import deepspeed

    _ = args.device
    deepspeed.init_distributed(dist_backend=args.ddp_backend or "nccl")


def _starting_model(plan: RunPlan) -> Any:
    """The policy as it starts, loaded again: what the precomputed reference of a full fine-tune is computed from."""
    from spo_align.train.model import apply_dropout_setting, load_model

    model = load_model(plan)
    apply_dropout_setting(model, plan)
    return model


def run_preference(plan: RunPlan, ctx: RunContext) -> None:
    """Train the recipe's preference stage; save through `ctx.save_final`."""
    import torch

    from spo_align.data.columns import require_columns
    from spo_align.run_folder import REFERENCE_CACHE
    from spo_align.train.args import build_training_args, device_info
    from spo_align.train.model import (
        apply_adapter,
        apply_dropout_setting,
        load_model,
        load_tokenizer,
        resolve_attention,
    )
    from spo_align.train.preference_trainer import FixedOrderSampler, PreferenceTrainer, ReferenceSpec

    recipe = plan.recipe
    pair_loss = build_pair_loss(recipe.loss)  # its entry's function, the NLL term added when nll_weight > 0
    data = recipe.data
    t = recipe.training

    # TrainingArguments first: under ZeRO-3 it makes from_pretrained load the weights already sharded.
    args = build_training_args(plan, ctx.output_dir, remove_unused_columns=False)
    ctx.run_info["device"] = device_info(args, plan)
    _ensure_deepspeed_comm(plan, args)
    tokenizer = load_tokenizer(plan)

    def checker(split: str) -> Any:
        def check(index: int, ds: Any) -> None:
            source = getattr(data, split)[index]
            require_columns(plan, split, index, ds, pair_columns(source, ds))  # type: ignore[arg-type]

        return check

    train = prepare_pairs(
        list(data.train), data, tokenizer, base_dir=plan.base_dir, seed=t.seed, shuffle=data.shuffle,
        check_columns=checker("train"),
    )
    evaluation = (
        prepare_pairs(list(data.eval), data, tokenizer, base_dir=plan.base_dir, seed=t.seed, shuffle=False,
                      check_columns=checker("eval"))
        if data.eval
        else None
    )
    ctx.run_info["row_policy"] = {"train": train.counts, "eval": evaluation.counts if evaluation is not None else {}}

    attention = resolve_attention(plan)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    layout = choose_layout(data.packing, attention, device_type)
    pack_length = plan.pack_length or data.max_length
    # as the trainer will batch it: its fixed order (the trainer's data_seed is training.seed), cut into micro-batches
    in_order = train.dataset.select(list(FixedOrderSampler(len(train.dataset), t.seed)))
    stats = dataset_layout_stats(in_order, t.per_device_batch_size, pack_length, layout)
    logger.info(
        "batch layout %s: padding share %.1f%% padded vs %.1f%% packed (%d real tokens; micro-batches of %d pairs%s)",
        layout,
        100 * stats.padded_share,
        100 * stats.packed_share,
        stats.real_tokens,
        t.per_device_batch_size,
        f", rows of <= {pack_length} tokens" if layout in ("packed_rows", "packed_batch") else "",
    )
    ctx.run_info["layout"] = {"layout": layout, "pack_length": pack_length if data.packing else None, **stats.as_dict()}

    model = load_model(plan)
    adapter = recipe.adapter is not None
    if adapter:
        model = apply_adapter(model, plan)
    ctx.run_info["dropout_disabled"] = apply_dropout_setting(model, plan)
    if not loss_entry(recipe.loss).needs_reference:  # SimPO: no reference model, table or forward
        reference = ReferenceSpec(kind="none")
    elif recipe.reference.precompute:
        reference = ReferenceSpec(
            kind="precomputed",
            model=load_model(plan, plan.reference_model_path, for_training=False) if plan.separate_reference else None,
            cache_dir=ctx.output_dir / REFERENCE_CACHE,
            adapter=adapter,
            settings={"max_length": data.max_length, "layout": layout, "pack_length": pack_length},
            starting_model=None if adapter or plan.separate_reference else lambda: _starting_model(plan),
            starting_path=plan.model_path,
        )
    elif adapter and not plan.separate_reference:
        reference = ReferenceSpec(kind="adapter")
    else:
        reference = ReferenceSpec(kind="model", model=load_model(plan, plan.reference_model_path, for_training=False))
    ctx.run_info["reference"] = reference.kind
    if layout == "packed_rows" and attention == "sdpa":  # CPU packing: attention per sequence, no row-long mask
        from spo_align.train.logps import SEGMENT_SDPA, unwrap_causal_lm, use_segment_attention

        for loaded in (model, reference.model):
            if loaded is not None:
                use_segment_attention(unwrap_causal_lm(loaded))
        ctx.run_info["layout"]["attention"] = SEGMENT_SDPA

    trainer = PreferenceTrainer(
        model=model,
        args=args,
        train_dataset=train.dataset,
        eval_dataset=evaluation.dataset if evaluation is not None else None,
        data_collator=PairCollator(tokenizer.pad_token_id, layout, pack_length),
        processing_class=tokenizer,
        callbacks=list(ctx.callbacks),
        pair_loss=pair_loss,
        reference=reference,
    )
    from spo_align.train.finish import train

    # None: continued from a checkpoint at the last step, nothing trained
    result = train(trainer, ctx, restore_tokens=True)
    tokens = torch.tensor([trainer.real_tokens], dtype=torch.long, device=args.device)
    tokens = trainer.accelerator.reduce(tokens, reduction="sum")
    runtime = float(result.metrics.get("train_runtime", 0.0)) if result is not None else 0.0
    ctx.run_info["real_tokens"] = int(tokens.item())
    ctx.run_info["real_tokens_per_second"] = round(int(tokens.item()) / runtime, 2) if runtime > 0 else None
    ctx.run_info["reference_forwards"] = trainer.reference_forwards
    logger.info("real tokens/s: %s", ctx.run_info["real_tokens_per_second"])
    if ctx.save_final is not None:
        ctx.save_final(trainer)
