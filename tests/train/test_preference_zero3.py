"""Packed SPO under real 2-process DeepSpeed ZeRO-3 on CPU (gloo), with precomputed reference log-probs.

Launched through `spo train` (torchrun + the HF Trainer's DeepSpeed integration). Checks that it trains,
that the saved model reloads, and that the reference table the two ranks computed and gathered equals a
single-process pass over the same pairs.
"""

from __future__ import annotations

import json
import os
import subprocess

import preference_helpers as h
import pytest
import torch

RECIPE = """\
stage: preference
model:
  name_or_path: tiny:arith
  dtype: float32
data:
  train:
    - path: {pairs}
      format: pairs
  max_length: 96
  packing: true
  pack_length: 96
reference:
  precompute: true
loss:
  type: spo
  beta: 0.2
  alpha: 1.0
training:
  learning_rate: 1.0e-2
  lr_scheduler: constant
  warmup_ratio: 0.0
  max_steps: 3
  per_device_batch_size: 4
  seed: 0
  logging_steps: 1
  save_steps: 100
  cpu_threads: 1
distributed:
  num_processes: 2
  deepspeed: zero3.json
  launcher: torchrun
output:
  dir: {out}
  report_to: [none]
"""

ZERO3 = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": False,
        "stage3_gather_16bit_weights_on_model_save": True,
        "reduce_bucket_size": 1000000,
        "allgather_bucket_size": 1000000,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "steps_per_print": 1000000,
}


@pytest.mark.slow
def test_packed_spo_under_zero3_trains_reloads_and_gathers_reference(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from spo_align.data.collate import PairCollator
    from spo_align.data.pairs import prepare_pairs
    from spo_align.recipe.load import load_recipe
    from spo_align.recipe.resolve import resolve
    from spo_align.train.model import load_tokenizer
    from spo_align.train.preference_trainer import FixedOrderSampler
    from spo_align.train.reference import compute_reference_table, consecutive_batches

    torch.set_num_threads(1)
    out = tmp_path / "out"
    # Long-tailed pairs, so that the two ranks' micro-batches pack into different numbers of rows.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(row) for row in h.pair_rows(48, seed=11, max_answer=60)))
    (tmp_path / "zero3.json").write_text(json.dumps(ZERO3))
    recipe_path = tmp_path / "spo_zero3.yaml"
    recipe_path.write_text(RECIPE.format(pairs=pairs, out=out))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SPO_ALIGN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["spo", "train", str(recipe_path)], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    info = json.loads((out / "run.json").read_text())["run_info"]
    assert info["layout"]["layout"] == "packed_rows"  # row by row, filler forwards equalise the ranks
    assert info["reference"] == "precomputed"
    assert info["real_tokens_per_second"] > 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))

    start = AutoModelForCausalLM.from_pretrained(tmp_path / "cache" / "tiny" / "arith")
    trained = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        delta = max(float((a - b).abs().max()) for a, b in zip(trained.parameters(), start.parameters()))
    assert delta > 0  # it trained, and the saved weights load

    # The table the two ranks computed equals a single-process pass with the same layout.
    plan = resolve(load_recipe(recipe_path), recipe_path, "cpu")
    monkeypatch.setenv("SPO_ALIGN_CACHE", env["SPO_ALIGN_CACHE"])
    tokenizer = load_tokenizer(plan)
    data = plan.recipe.data
    prepared = prepare_pairs(list(data.train), data, tokenizer, base_dir=plan.base_dir, seed=0, shuffle=data.shuffle)
    # Training (and the reference pass) cut the trainer's fixed order into micro-batches of 4; rank 0 runs
    # batches 0, 2, 4, ... and rank 1 batches 1, 3, 5, ...: their row counts differ, so without the filler
    # forwards ZeRO-3's weight gathering would deadlock.
    collate = PairCollator(tokenizer.pad_token_id, "packed_rows", plan.pack_length)
    ordered = prepared.dataset.select(list(FixedOrderSampler(48, plan.recipe.training.seed)))
    rows = [len(collate([ordered[i] for i in range(s, s + 4)])["row_lengths"]) for s in range(0, 48, 4)]
    assert rows[0::2] != rows[1::2]
    # The same micro-batches in one process give the same table (fp32: to float32 rounding of the gather).
    expected = compute_reference_table(
        start.eval(), consecutive_batches(ordered, collate, 4), 48, device=torch.device("cpu"), disable_adapter=False
    )
    (cached,) = list((out / "reference_logps").glob("train-*.pt"))
    table = torch.load(cached, weights_only=True)["logps"]
    assert table.shape == (48, 2)
    assert float((table.double() - expected.double()).abs().max() / expected.double().abs().max()) < 1e-5

