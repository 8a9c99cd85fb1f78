"""`run_preference` through the runner, in process: LoRA, packing, precomputed reference, eval split.

Checks what the stage promises the runner: row-policy counts, layout and padding share, reference mode
and real tokens/s in run.json; reward metrics (train and eval) in metrics.jsonl; an output that loads;
and that a second run into the same folder (--overwrite) reads the cached reference log-probs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "data" / "tiny" / "pairs_train.jsonl"

RECIPE = """\
stage: preference
model:
  name_or_path: tiny:arith
  dtype: float32
data:
  train:
    - path: {pairs}
      format: pairs
      max_samples: 40
  eval:
    - path: {pairs}
      format: pairs
      max_samples: 8
  max_length: 32
  packing: true
  pack_length: 64
reference:
  precompute: true
adapter:
  r: 4
  alpha: 8
  dropout: 0.0
loss:
  type: dpo
  beta: 0.1
training:
  learning_rate: 1.0e-2
  lr_scheduler: constant
  warmup_ratio: 0.0
  max_steps: 3
  per_device_batch_size: 8
  seed: 0
  logging_steps: 1
  eval_steps: 3
  save_steps: 100
  cpu_threads: 1
output:
  dir: {out}
  report_to: [none]
"""


@pytest.mark.slow
def test_run_preference_lora_packed_precomputed(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import spo_align.train.preference_trainer as pt
    from spo_align.recipe.load import load_recipe
    from spo_align.recipe.resolve import resolve
    from spo_align.train.run import run

    torch.set_num_threads(1)
    monkeypatch.setenv("SPO_ALIGN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    recipe_path = tmp_path / "dpo.yaml"
    recipe_path.write_text(RECIPE.format(pairs=PAIRS, out=out))
    plan = resolve(load_recipe(recipe_path), recipe_path, "cpu")

    forwards: list[int] = []
    original = pt.PreferenceTrainer.train

    def counting_train(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        forwards.append(self.reference_forwards)
        return result

    monkeypatch.setattr(pt.PreferenceTrainer, "train", counting_train)
    run(plan, resume=False, overwrite=False)

    info = json.loads((out / "run.json").read_text())["run_info"]
    counts = info["row_policy"]["train"]["total"]
    assert counts["rows_in"] == 40 and counts["rows_kept"] <= 40
    assert info["layout"]["layout"] == "packed_rows" and info["layout"]["padding_share_packed"] == 0.0
    assert info["layout"]["attention"] == "sdpa_segments"  # CPU packing attends per sequence
    assert info["layout"]["packed_rows"] < counts["rows_kept"]  # rows hold several pairs
    assert info["reference"] == "precomputed"
    assert info["real_tokens"] > 0 and info["real_tokens_per_second"] > 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*metrics)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "both_below_ref", "eval_rewards/margins", "eval_loss"):
        assert name in keys, name
    # Precompute: ceil(40/8) train + 1 eval micro-batches, no reference forward during training.
    assert forwards == [6]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "cache" / "tiny" / "arith")
    assert isinstance(PeftModel.from_pretrained(base, out), PeftModel)

    run(plan, resume=False, overwrite=True)
    assert forwards == [6, 0]  # the second run read both tables


def test_missing_column_names_column_and_recipe_line(tmp_path, monkeypatch):
    from spo_align.data.errors import DataSourceError
    from spo_align.recipe.load import load_recipe
    from spo_align.recipe.resolve import resolve
    from spo_align.train.run import run

    monkeypatch.setenv("SPO_ALIGN_CACHE", str(tmp_path / "cache"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"question": "1+1=", "chosen": "2", "rejected": "3"}\n')
    recipe_path = tmp_path / "dpo.yaml"
    recipe_path.write_text(
        "stage: preference\nmodel: {name_or_path: 'tiny:arith'}\n"
        f"data:\n  train:\n    - path: {pairs}\n      format: pairs\n"
        "loss: {type: dpo}\ntraining: {learning_rate: 1.0e-3, max_steps: 1}\n"
        f"output: {{dir: {tmp_path / 'out'}, report_to: [none]}}\n"
    )
    plan = resolve(load_recipe(recipe_path), recipe_path, "cpu")
    with pytest.raises(DataSourceError, match=r"dpo.yaml:\d+: data.train\[0\].columns.prompt.*no column 'prompt'"):
        run(plan, resume=False, overwrite=False)


SIMPO = """\
stage: preference
model:
  name_or_path: tiny:arith
  dtype: float32
data:
  train:
    - path: {pairs}
      format: pairs
      max_samples: 16
  eval:
    - path: {pairs}
      format: pairs
      max_samples: 8
  max_length: 32
  packing: true
  pack_length: 64
loss:
  type: simpo
  beta: 2.0
  gamma: 0.5
  nll_weight: 0.2
training:
  learning_rate: 1.0e-3
  lr_scheduler: constant
  warmup_ratio: 0.0
  max_steps: 2
  per_device_batch_size: 8
  logging_steps: 1
  eval_steps: 2
  save_steps: 100
  cpu_threads: 1
output:
  dir: {out}
  report_to: [none]
"""


def test_reference_free_loss_loads_and_runs_no_reference(tmp_path, monkeypatch):
    """SimPO through the runner: one model loaded (the policy), no reference forward (train or eval), no
    reference metrics; its NLL term logged as its own metric."""
    import spo_align.train.model as model_module
    from spo_align.recipe.load import load_recipe
    from spo_align.recipe.resolve import resolve
    from spo_align.train.run import run

    torch.set_num_threads(1)
    monkeypatch.setenv("SPO_ALIGN_CACHE", str(tmp_path / "cache"))
    loads: list[bool] = []
    original = model_module.load_model

    def counting_load(plan, *args, **kwargs):
        loads.append(kwargs.get("for_training", True))
        return original(plan, *args, **kwargs)

    monkeypatch.setattr(model_module, "load_model", counting_load)
    out = tmp_path / "out"
    recipe_path = tmp_path / "simpo.yaml"
    recipe_path.write_text(SIMPO.format(pairs=PAIRS, out=out))
    run(resolve(load_recipe(recipe_path), recipe_path, "cpu"), resume=False, overwrite=False)

    assert loads == [True]  # the policy only
    info = json.loads((out / "run.json").read_text())["run_info"]
    assert info["reference"] == "none" and info["reference_forwards"] == 0
    assert not (out / "reference_logps").exists()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*metrics)
    assert {"rewards/chosen", "rewards/margins", "nll_term", "eval_nll_term", "eval_rewards/margins"} <= keys
    assert not any("both_below_ref" in k for k in keys)
    step = next(m for m in metrics if "nll_term" in m)
    # rewards are beta x per-token mean log-probs, the NLL term 0.2 x per-token NLL: the same per-token means
    assert step["rewards/chosen"] < 0 < step["nll_term"]
    assert step["nll_term"] == pytest.approx(-0.2 / 2.0 * step["rewards/chosen"], rel=1e-5)
