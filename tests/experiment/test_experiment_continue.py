"""`spo experiment` run again after a stage was killed mid-save: the stage goes on from its last complete
checkpoint, exactly as `spo train` run again would; with a changed recipe it is refused, naming the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spo_align.experiment.runner import run_stage
from spo_align.experiment.spec import load_experiment, plan_stages
from spo_align.run_folder import OutputFolderError, finished_at

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "experiments" / "tiny.yaml"
KILLER = ROOT / "tests" / "train" / "kill_during_save.py"


def _overrides(out: Path, *spo_set: str) -> list[str]:
    steps = "training.max_steps=4, training.save_steps=2, data.train.0.max_samples=32"
    return [
        f"output_dir={out}", "seeds=[0]", "jobs=1", "eval.n=8", "eval.n_bootstrap=10",
        f"preference=[{{name: spo, recipe: ../recipes/tiny/spo.yaml, set: [{', '.join(spo_set)}]}}]",
        f"recipe_set=[{steps}]",
    ]


@pytest.mark.slow
def test_rerunning_an_experiment_continues_its_interrupted_stage(tmp_path: Path):
    torch = pytest.importorskip("torch")
    from spo_align.experiment.runner import run_experiment

    torch.set_num_threads(1)
    out = tmp_path / "exp"
    experiment = load_experiment(TINY, _overrides(out))
    sft, spo = plan_stages(experiment)
    run_stage(sft)
    assert finished_at(sft.output_dir) is not None

    # The spo stage, started as the experiment starts it, SIGKILLed while writing checkpoint-4.
    args = ["train", str(spo.recipe_path), *(a for o in spo.overrides for a in ("--set", o))]
    env = {**os.environ, "KILL_AT": "checkpoint:4", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(KILLER), *args], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (spo.output_dir / "checkpoint-4").is_dir() and finished_at(spo.output_dir) is None

    changed = load_experiment(TINY, _overrides(out, "loss.beta=0.3"))
    with pytest.raises(OutputFolderError, match=r"another recipe \(loss.beta: 0.2 -> 0.3\)"):
        run_experiment(changed)

    result = run_experiment(experiment)
    assert result.trained == ["seed0/spo"] and result.skipped == ["seed0/sft"]
    info = json.loads((spo.output_dir / "run.json").read_text())
    assert info["resumed_from"].endswith("checkpoint-2") and len(info["sessions"]) == 2
    assert finished_at(spo.output_dir) is not None
    assert (out / "seed0" / "generations" / "spo.jsonl").is_file()
