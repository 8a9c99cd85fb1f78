"""`spo experiment` notices a finished stage whose recipe changed: `--dry-run` names it `changed` with the keys
(old -> new), the run refuses it before anything runs (as `spo train` refuses a finished run) and names the flag,
and `--rerun-changed` trains it again, with its answers and judgments redone. A preference stage whose SFT run
changed is `stale` and is trained again with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app
from spo_align.experiment.runner import ExperimentError
from spo_align.experiment.spec import load_experiment
from spo_align.run_folder import finished_at

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "experiments" / "tiny.yaml"


def _overrides(out: Path, spo_set: str = "loss.alpha=1", sft_set: str = "") -> list[str]:
    steps = "training.max_steps=2, training.save_steps=100, data.train.0.max_samples=16"
    return [
        f"output_dir={out}", "seeds=[0]", "jobs=1", "eval.n=8", "eval.n_bootstrap=10",
        f"sft={{name: sft, recipe: ../recipes/tiny/sft.yaml, set: [{sft_set}]}}",
        f"preference=[{{name: spo, recipe: ../recipes/tiny/spo.yaml, set: [{spo_set}]}}]",
        f"recipe_set=[{steps}]",
    ]


def _dry_run(overrides: list[str]) -> str:
    args = ["experiment", str(TINY), *(a for o in overrides for a in ("--set", o)), "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def _state(output: str, name: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith(f"seed 0 {name} "))
    return line.split()[3]


def _judged_with(out: Path, name: str) -> int:
    lines = (out / "seed0" / "judgments.jsonl").read_text().splitlines()
    return sum(name in (json.loads(line)["model_a"], json.loads(line)["model_b"]) for line in lines if line.strip())


@pytest.mark.slow
def test_a_finished_stage_whose_recipe_changed_is_named_refused_and_rerun_with_the_flag(tmp_path: Path):
    torch = pytest.importorskip("torch")
    from spo_align.experiment.runner import run_experiment

    torch.set_num_threads(1)
    out = tmp_path / "exp"
    sft, spo = out / "seed0" / "sft", out / "seed0" / "spo"
    first = run_experiment(load_experiment(TINY, _overrides(out)))
    assert first.trained == ["seed0/sft", "seed0/spo"]
    assert {_state(_dry_run(_overrides(out)), n) for n in ("sft", "spo")} == {"done"}

    changed = _overrides(out, spo_set="loss.alpha=3")
    shown = _dry_run(changed)
    assert _state(shown, "sft") == "done" and _state(shown, "spo") == "changed"
    assert "loss.alpha: 1.0 -> 3.0" in shown and "--rerun-changed" in shown
    marker = finished_at(spo)
    answers = (out / "seed0" / "generations" / "spo.jsonl").read_text()
    with pytest.raises(ExperimentError, match=r"seed 0 spo: .*another recipe \(loss\.alpha: 1\.0 -> 3\.0\); pass --rerun-changed"):
        run_experiment(load_experiment(TINY, changed))
    refused = CliRunner().invoke(app, ["experiment", str(TINY), *(a for o in changed for a in ("--set", o))])
    assert refused.exit_code == 1
    errors = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "seed 0 spo" in errors[0] and "--rerun-changed" in errors[0], refused.output
    assert "Traceback" not in refused.output
    assert finished_at(spo) == marker  # refused before anything ran: nothing deleted

    again = run_experiment(load_experiment(TINY, changed), rerun_changed=True)
    assert again.trained == ["seed0/spo"] and again.skipped == ["seed0/sft"]
    assert "alpha: 3.0" in (spo / "resolved_recipe.yaml").read_text()
    assert (out / "seed0" / "generations" / "spo.jsonl").read_text() != answers or finished_at(spo) != marker
    assert _judged_with(out, "spo") == 8 * 2  # 8 prompts x 2 orders against sft, the old ones dropped
    assert _state(_dry_run(changed), "spo") == "done"

    # The SFT stage changes: it is `changed`, the preference stage that starts from it `stale`; both train again.
    sft_changed = _overrides(out, spo_set="loss.alpha=3", sft_set="training.learning_rate=2.0e-3")
    shown = _dry_run(sft_changed)
    assert _state(shown, "sft") == "changed" and _state(shown, "spo") == "stale"
    with pytest.raises(ExperimentError, match=r"seed 0 sft: .*training\.learning_rate: 0\.001 -> 0\.002"):
        run_experiment(load_experiment(TINY, sft_changed))
    last = run_experiment(load_experiment(TINY, sft_changed), rerun_changed=True)
    assert last.trained == ["seed0/sft", "seed0/spo"]
    assert finished_at(spo) > finished_at(sft)  # type: ignore[operator]
