"""Shared builders for the preference-stage tests: tiny model, long-tailed pairs, trainer arguments."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from spo_align.tiny import TinyModelShape, build_model, build_tokenizer

SMALL = TinyModelShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tokenizer():
    return build_tokenizer()


def model(tok: Any, seed: int = 0, spread: float = 0.0):
    """Tiny Llama; `spread` adds N(0, spread) noise to every weight so that its distributions are far from
    uniform (random init gives near-uniform ones, whose log-ratios to another init are close to zero)."""
    torch.manual_seed(seed)
    m = build_model(tok, SMALL, seed=seed).float()
    if spread:
        g = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * spread)
    return m


def pair_rows(n: int, seed: int = 0, max_answer: int = 60) -> list[dict[str, Any]]:
    """Canonical pairs with long-tailed answer lengths (most short, a few long)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompt = f"{a}+{b}=" + " " * rng.randint(0, 6)
        longc = min(max_answer, int(rng.paretovariate(1.2) * 3))
        longr = min(max_answer, int(rng.paretovariate(1.2) * 3))
        chosen = str(a + b) + "".join(rng.choice("0123456789") for _ in range(longc))
        rejected = str(a + b + 10) + "".join(rng.choice("0123456789") for _ in range(longr))
        rows.append({"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected})
    return rows


def tokenized_dataset(tok: Any, n: int, seed: int = 0, max_length: int = 128, max_answer: int = 60):
    import datasets

    from spo_align.data.policies import apply_pair_policy
    from spo_align.data.tokenize import tokenize_pairs
    from spo_align.recipe.schema import RowPolicy

    ds = datasets.Dataset.from_list(pair_rows(n, seed, max_answer))
    ds, _ = apply_pair_policy(tokenize_pairs(ds, tok), RowPolicy(), max_length)
    ds = ds.remove_columns(["prompt", "chosen", "rejected"])
    return ds.add_column("pair_index", list(range(len(ds))))


def training_args(out: Path, **overrides: Any):
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = {
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "optim": "sgd",
        "use_cpu": True,
        "report_to": "none",
        "remove_unused_columns": False,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def lora(m: Any):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(m, cfg)
    # Non-zero B so the adapter changes the outputs: the reference (adapter disabled) must differ.
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model
