"""`spo train` on the real SmolLM2-135M-Instruct: at step 0 its log-probs are the model's own, in every layout.

Each run is one SPO step on the four pairs of tests/real/conftest.py, all of them in one micro-batch, in file
order (`data.shuffle: false`). Four runs cover padded and packed batches, a live and a precomputed reference,
LoRA and full fine-tuning, each of the six at least once with LoRA and once without:

- lora-padded: reference = the policy with its adapter disabled, live;
- lora-packed-precomputed: reference table computed once with the adapter disabled, in packed rows;
- full-padded-precomputed: reference table computed once from the starting weights, padded;
- full-packed: reference = a frozen copy of the starting model, live.

What is compared with an independent computation (`tests/real/independent.py`: one unpadded transformers
forward per sequence on the prompt's generation ids and the answer + end-of-turn ids):
- the policy, through the step-0 means `spo train` logs (`logps/chosen`, `logps/rejected`: the means over the
  four pairs of the per-pair sums it trains on). spo exposes no per-pair policy values without reaching into
  the trainer; with the batch holding every pair the logged mean is exactly the mean of those sums, so it is
  compared with the mean of the independent sums within the mean of their bounds;
- the precomputed reference, per pair, from the table the run writes under its output folder.
Both within the fp32 bound derived in `independent.py` (padded, packed and single-sequence sums differ only
by the order of fp32 sums). At step 0 the policy is the reference: with a live reference the two are the
same weights on the same batch, so every log-ratio (reward) and the SPO loss are exactly 0; with a
precomputed table the reference was computed on a batch of the same pairs in the table's order, so they are
0 within β times the bound.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.real.independent import Scored, U, score_answer
from tests.real.real_runs import PAIR_RECIPE, PAIRS, logged_steps, spo_train

pytestmark = [pytest.mark.real, pytest.mark.slow]

LORA = ("adapter.type=lora", "adapter.r=8", "adapter.alpha=16", "adapter.dropout=0.0")
PACKED = ("data.packing=true", "data.pack_length=192")
PRECOMPUTED = ("reference.precompute=true",)
RUNS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "lora-padded": (LORA, "adapter", "padded"),
    "lora-packed-precomputed": (LORA + PACKED + PRECOMPUTED, "precomputed", "packed_rows"),
    "full-padded-precomputed": (PRECOMPUTED, "precomputed", "padded"),
    "full-packed": (PACKED, "model", "packed_rows"),
}
"""name -> (overrides, the reference kind run.json must report, the layout it must report)."""
BETA = PAIR_RECIPE["loss"]["beta"]


@pytest.fixture(scope="module")
def independent(real_model: Any, real_tokenizer: Any) -> list[tuple[Scored, Scored]]:
    """(chosen, rejected) of every pair, from the plain transformers forward."""
    return [
        (score_answer(real_model, real_tokenizer, row["prompt"], row["chosen"]),
         score_answer(real_model, real_tokenizer, row["prompt"], row["rejected"]))
        for row in PAIRS
    ]


def _reference_table(out: Path) -> Any:
    import torch

    files = sorted((out / "reference_logps").glob("train-*.pt"))
    assert len(files) == 1, files
    return torch.load(files[0], map_location="cpu", weights_only=True)["logps"]


@pytest.mark.parametrize("name", list(RUNS))
def test_step_zero_log_probs_are_the_models_own(
    name: str, independent: list[tuple[Scored, Scored]], real_data: Path, smollm2_folder: Path, tmp_path: Path
):
    overrides, reference, layout = RUNS[name]
    out = spo_train(real_data / "pairs.yaml", smollm2_folder, tmp_path / "out", *overrides)
    info = json.loads((out / "run.json").read_text())["run_info"]
    assert info["reference"] == reference and info["layout"]["layout"] == layout
    if layout != "padded":
        assert info["layout"]["packed_rows"] > 1  # pairs really share rows: 4 pairs of ~80-95 tokens, rows <= 192
    assert info["row_policy"]["train"]["total"]["rows_kept"] == len(PAIRS)
    step = logged_steps(out)[0]
    assert step["step"] == 1

    for k, key in enumerate(("logps/chosen", "logps/rejected")):
        sums = [pair[k] for pair in independent]
        mean = sum(s.logp for s in sums) / len(sums)
        bound = sum(s.tolerance for s in sums) / len(sums) + len(sums) * U * abs(mean)  # + the fp32 mean itself
        assert abs(step[key] - mean) <= bound, (key, step[key], mean, bound)

    if reference == "precomputed":
        table = _reference_table(out)
        assert tuple(table.shape) == (len(PAIRS), 2)
        for i, pair in enumerate(independent):
            for k in range(2):
                assert abs(float(table[i, k]) - pair[k].logp) <= pair[k].tolerance, (i, k, float(table[i, k]), pair[k])
        worst = max(s.tolerance for pair in independent for s in pair)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert abs(step[key]) <= 2 * BETA * worst, (key, step[key])
    else:
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "loss", "both_below_ref"):
            assert step[key] == 0.0, (key, step[key])
