"""Run (a): TRL's DPOTrainer, unmodified, on the bench workload (live reference model, sigmoid loss).

The trainer is constructed and trained exactly as a user would; the bench only attaches the callback that
reads the clock and counts the real and padded tokens of the batches TRL's own collator returns.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from bench.clock import LoopTimes, device_facts, peak_rss_mb, step_clock
from bench.config import Workload

logger = logging.getLogger(__name__)


def run_trl(work: Workload, model_dir: Path, pairs_path: Path, out_dir: Path) -> dict[str, Any]:
    """Train one epoch over the pairs with TRL's DPOTrainer (loss sigmoid, live reference model built by
    TRL from the same folder); return the measured figures."""
    started = time.perf_counter()
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, work.dtype), attn_implementation=work.attention
    )
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
    )
    times = LoopTimes()
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[step_clock(times)],
    )
    setup_s = time.perf_counter() - started
    trainer.train()
    return {
        "engine": "trl",
        "attention": work.attention,
        **times.summary(micro_batches_per_step=work.grad_accum),
        **device_facts(),
        "setup_s": setup_s,
        "precompute_s": 0.0,
        "peak_rss_mb": peak_rss_mb(),
        "has_reference_model": trainer.ref_model is not None,
    }
