"""Padded vs packed preference training on long-tailed pairs, CPU, one thread (not a test; a measurement).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python tests/train/bench_preference_layouts.py [STEPS]

Model: tiny Llama, hidden 256, 4 layers, 4 heads, intermediate 1024 (char tokenizer). Data: 8 x STEPS
pairs, prompts of 10-80 characters, answers Pareto(1.1)-distributed up to 900 characters, max_length
1024, 8 pairs per step, SPO, live reference (a frozen copy) unless "+precompute". Every variant trains
on the same pairs in the same order. Prints real (non-pad) tokens per wall second and per CPU second
(CPU time is the steadier figure on a shared machine).
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time

import datasets
import torch
from transformers import TrainingArguments

from spo_align.data.collate import PairCollator
from spo_align.data.policies import apply_pair_policy
from spo_align.data.tokenize import tokenize_pairs
from spo_align.losses.registry import build_pair_loss
from spo_align.losses.spo import SPOLoss
from spo_align.recipe.schema import RowPolicy
from spo_align.tiny import TinyModelShape, build_model, build_tokenizer
from spo_align.train.preference_trainer import PreferenceTrainer, ReferenceSpec
from spo_align.train.stages import dataset_layout_stats

MAX_LENGTH = 1024
PAIRS_PER_STEP = 8


def main(steps: int) -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    tok = build_tokenizer()
    tok.model_max_length = 4096
    shape = TinyModelShape(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, max_position_embeddings=1024
    )
    rng = random.Random(0)

    def answer() -> str:
        return "".join(rng.choice("abcdefghij ") for _ in range(min(900, int(rng.paretovariate(1.1) * 20))))

    rows = [
        {"prompt": [{"role": "user", "content": "q" * rng.randint(10, 80)}], "chosen": answer(), "rejected": answer()}
        for _ in range(PAIRS_PER_STEP * steps)
    ]
    ds, _ = apply_pair_policy(tokenize_pairs(datasets.Dataset.from_list(rows), tok), RowPolicy(), MAX_LENGTH)
    ds = ds.remove_columns(["prompt", "chosen", "rejected"]).add_column("pair_index", list(range(len(ds))))
    results: dict[str, dict[str, float]] = {}
    tmp = tempfile.mkdtemp()
    for variant in ("padded", "packed_rows", "packed_batch", "packed_rows+precompute"):
        layout = variant.split("+")[0]
        stats = dataset_layout_stats(ds, PAIRS_PER_STEP, MAX_LENGTH, layout)  # type: ignore[arg-type]
        model = build_model(tok, shape, seed=0)
        reference = (
            ReferenceSpec(kind="precomputed", cache_dir=f"{tmp}/{variant}")
            if variant.endswith("precompute")
            else ReferenceSpec(kind="model", model=build_model(tok, shape, seed=0))
        )
        args = TrainingArguments(
            output_dir=f"{tmp}/{variant}-out", per_device_train_batch_size=PAIRS_PER_STEP, max_steps=steps,
            use_cpu=True, report_to="none", remove_unused_columns=False, save_strategy="no", logging_steps=steps,
            disable_tqdm=True, seed=0, learning_rate=1e-4,
        )
        trainer = PreferenceTrainer(
            model=model, args=args, train_dataset=ds, processing_class=tok, reference=reference,
            data_collator=PairCollator(tok.pad_token_id, layout, MAX_LENGTH),  # type: ignore[arg-type]
            pair_loss=build_pair_loss(SPOLoss(type="spo")),
        )
        cpu0 = time.process_time()
        wall = trainer.train().metrics["train_runtime"]
        cpu = time.process_time() - cpu0
        results[variant] = {
            "padding_share": round(stats.padded_share if layout == "padded" else stats.packed_share, 4),
            "real_tokens": trainer.real_tokens,
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "real_tokens_per_wall_s": round(trainer.real_tokens / wall, 1),
            "real_tokens_per_cpu_s": round(trainer.real_tokens / cpu, 1),
        }
    return results


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 6), indent=1))
