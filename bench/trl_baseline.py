"""Run (a): TRL's DPOTrainer, unmodified, on the bench workload (sigmoid loss; live reference model, or
TRL's own `precompute_ref_log_probs`).

The trainer is constructed and trained exactly as a user would; the bench only attaches the callback that
reads the clock and counts the real and padded tokens of the batches TRL's own collator returns, and, with
precompute, times TRL's reference pass (which TRL runs while the trainer is constructed).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from bench.clock import LoopTimes, device_facts, peak_rss_mb, step_clock
from bench.config import Workload

logger = logging.getLogger(__name__)


PRECOMPUTE_HOOK = "_precompute_ref_logps"
"""TRL 1.16's method that runs the reference pass of `precompute_ref_log_probs`; timed, never changed."""


def run_trl(work: Workload, model_dir: Path, pairs_path: Path, out_dir: Path, *, precompute: bool = False) -> dict[str, Any]:
    """Train one epoch over the pairs with TRL's DPOTrainer (loss sigmoid; reference: a live model built
    by TRL from the same folder, or with `precompute` TRL's reference pass before training); return the
    measured figures."""
    started = time.perf_counter()
    # A cache of this run's own: TRL stores its precomputed reference log-probs in the datasets cache, which
    # another run over the same file would otherwise find and skip the pass the bench times.
    os.environ["HF_DATASETS_CACHE"] = str(Path(out_dir).resolve() / "datasets-cache")
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Like with like: spo-align trains a bfloat16 full fine-tune without DeepSpeed as float32 master weights
    # under bfloat16 autocast (train/model.fp32_master_weights), so TRL gets the same: float32 weights, bf16=True.
    weights = torch.float32 if work.dtype == "bfloat16" else getattr(torch, work.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights, attn_implementation=work.attention)
    dataset = datasets.load_dataset("json", data_files=str(pairs_path), split="train")
    args = DPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=work.pairs_per_device,
        gradient_accumulation_steps=work.grad_accum,
        num_train_epochs=1,
        learning_rate=work.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=work.beta,
        loss_type=["sigmoid"],
        label_smoothing=0.0,
        max_length=work.lengths.max_length,
        seed=work.seed,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=work.device == "cpu",
        bf16=work.dtype == "bfloat16",
        fp16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        precompute_ref_log_probs=precompute,
        # Explicit: TRL 1.x defaults to True, the spo runs get the same value.
        gradient_checkpointing=work.gradient_checkpointing,
    )
    peft_config = None
    if work.lora_r is not None:  # TRL wraps the model with peft and uses the adapter-off model as reference
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=work.lora_r, lora_alpha=work.lora_alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    times = LoopTimes()
    precompute_s: list[float] = []

    class TimedDPOTrainer(DPOTrainer):
        """DPOTrainer with its reference pass timed (the call itself is TRL's, unchanged)."""

        def _precompute_ref_logps(self, *args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            precompute_s.append(time.perf_counter() - began)
            return out

    if precompute and not hasattr(DPOTrainer, PRECOMPUTE_HOOK):
        raise RuntimeError(f"TRL's DPOTrainer has no {PRECOMPUTE_HOOK}: its precompute pass moved; update the bench")
    trainer = TimedDPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[step_clock(times)],
        peft_config=peft_config,
    )
    setup_s = time.perf_counter() - started
    if precompute and not precompute_s:
        raise RuntimeError("precompute_ref_log_probs was set but TRL's reference pass never ran")
    trainer.train()
    summary = times.summary(micro_batches_per_step=work.grad_accum)
    return {
        "engine": "trl",
        "variant": "precompute" if precompute else "live",
        "attention": work.attention,
        **summary,
        **device_facts(),
        "setup_s": setup_s,
        "precompute_s": sum(precompute_s) if precompute else 0.0,
        "peak_rss_mb": peak_rss_mb(),
        "has_reference_model": trainer.ref_model is not None,
        "lora_r": work.lora_r,
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "loss_finite": bool(summary["losses"]) and all(math.isfinite(x) for x in summary["losses"]),
    }
