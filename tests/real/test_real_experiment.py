"""`spo experiment` on the real SmolLM2-135M-Instruct, cut down: experiments/smollm2-parity.yaml with two of
its losses (SPO, DPO), two steps of two pairs each, four held-out prompts and pairs, started from the packaged
model folder with `--set start=...` as a user offline would. What holds by construction: the instruct model is
evaluated as 'start' and never trained, summary.md has every column and a row per model, its fractions are
in [0, 1], and the log-ratio figure is written."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.real, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ("chosen log-ratio", "rejected log-ratio", "both below reference", "held-out pairwise accuracy",
           "held-out prefers chosen", "held-out greedy right")


def test_the_smollm2_experiment_cut_down_writes_every_column(smollm2_folder: Path, tmp_path: Path, one_thread: None) -> None:
    from typer.testing import CliRunner

    from spo_align.cli import app

    out = tmp_path / "exp"
    sets = [
        f"start={smollm2_folder}",
        f"output_dir={out}",
        "preference=[{name: spo, recipe: ../recipes/smollm2-135m-instruct/spo.yaml}, "
        "{name: dpo, recipe: ../recipes/smollm2-135m-instruct/dpo.yaml}]",
        "recipe_set=[training.max_steps=2, training.per_device_batch_size=2, data.train.0.max_samples=4]",
        "eval.n=4",
        "eval.n_bootstrap=20",
        "eval.generation.max_new_tokens=8",
    ]
    args = ["experiment", str(ROOT / "experiments" / "smollm2-parity.yaml"), *(a for s in sets for a in ("--set", s))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert not (out / "seed0" / "start").exists()  # the instruct model is read where it is
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "| model | " + " | ".join(COLUMNS) + " |" in summary
    rows = {line.split("|")[1].strip(" *"): line.split("|")[2:-1] for line in summary.splitlines() if line.startswith("| **")}
    assert list(rows) == ["start", "spo", "dpo"]
    assert [c.strip() for c in rows["start"][:4]] == ["n/a"] * 4  # the reference of every log-ratio
    for name in ("spo", "dpo"):
        float(rows[name][0]), float(rows[name][1])  # measured log-ratios, whatever their sign
        assert all(0.0 <= float(c) <= 1.0 for c in rows[name][2:]), rows[name]
    assert 0.0 <= float(rows["start"][4]) <= 1.0 and 0.0 <= float(rows["start"][5]) <= 1.0
    assert (out / "curves_seed0.png").stat().st_size > 0
