"""The preference stage (every catalogue loss of stage "pair"): data -> pairs -> tokens -> row policy -> layout -> trainer.

`run_preference(plan, ctx)` is what `train/run.py` calls. Reported into ``ctx.run_info``: the row-policy
counts, the batch layout and its padding share (padded vs packed, over the training data as it will be
batched), the reference mode, and the real (non-pad) tokens per second of the run.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from spo_align.data.collate import Layout, LayoutStats, PairCollator, choose_layout, layout_stats
from spo_align.data.pairs import pair_columns, prepare_pairs
from spo_align.losses.registry import build_pair_loss, loss_entry

if TYPE_CHECKING:
    import datasets

    from spo_align.recipe.resolve import RunPlan
    from spo_align.train.context import RunContext

logger = logging.getLogger(__name__)


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


def run_preference(plan: RunPlan, ctx: RunContext) -> None:
    """Train the recipe's preference stage; save through `ctx.save_final`."""
    import torch

    from spo_align.data.columns import require_columns
    from spo_align.run_folder import REFERENCE_CACHE
    from spo_align.train.args import build_training_args
    from spo_align.train.model import (
        apply_adapter,
        apply_dropout_setting,
        load_model,
        load_tokenizer,
        resolve_attention,
    )
    from spo_align.train.one_device import device_info
    from spo_align.train.preference_trainer import PreferenceTrainer, ReferenceSpec

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
    stats = dataset_layout_stats(train.dataset, t.per_device_batch_size, pack_length, layout)
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
        )
    elif adapter and not plan.separate_reference:
        reference = ReferenceSpec(kind="adapter")
    else:
        reference = ReferenceSpec(kind="model", model=load_model(plan, plan.reference_model_path, for_training=False))
    ctx.run_info["reference"] = reference.kind

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
    from spo_align.train.loop import train

    result = train(trainer, ctx)  # None: continued from a checkpoint at the last step, nothing trained
    tokens = torch.tensor([trainer.real_tokens], dtype=torch.long, device=args.device)
    tokens = trainer.accelerator.reduce(tokens, reduction="sum")
    runtime = float(result.metrics.get("train_runtime", 0.0)) if result is not None else 0.0
    ctx.run_info["real_tokens"] = int(tokens.item())
    ctx.run_info["real_tokens_per_second"] = round(int(tokens.item()) / runtime, 2) if runtime > 0 else None
    ctx.run_info["reference_forwards"] = trainer.reference_forwards
    logger.info("real tokens/s: %s", ctx.run_info["real_tokens_per_second"])
    if ctx.save_final is not None:
        ctx.save_final(trainer)
