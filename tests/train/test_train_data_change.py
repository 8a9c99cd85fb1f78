"""`spo train` continued after its data file was replaced (4,000 rows -> 1,000): one line naming the source and
what changed, exit 1, nothing touched; `--accept-data-change` continues on the new data and records it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.mark.slow
def test_a_run_continued_on_replaced_data_is_refused_unless_accepted(small_model: Path, tmp_path: Path):
    data = tmp_path / "pairs.jsonl"
    shutil.copy(REPO / "data" / "tiny" / "pairs_train.jsonl", data)
    out = tmp_path / "out"
    args = [
        "train", str(REPO / "tests" / "data" / "recipes" / "spo.yaml"), "--set", f"model.name_or_path={small_model}",
        "--set", f"output.dir={out}", "--set", f"data.train.0.path={data}", "--set", "training.max_steps=8",
        "--set", "training.save_steps=100", "--set", "data.train.0.max_samples=64",
    ]
    env = {**os.environ, "SIGNAL_AT": "3", "SIGNAL": "TERM", "OMP_NUM_THREADS": "1"}
    stopped = subprocess.run([sys.executable, str(HERE / "signal_at_step.py"), *args], env=env,
                             capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    rows = data.read_text().splitlines()
    assert len(rows) == 4000
    data.write_text("\n".join(rows[:1000]) + "\n")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"data.train.0 ({data}): rows 4000 -> 1000" in lines[0], refused.stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before

    accepted = CliRunner().invoke(app, [*args, "--accept-data-change"])
    assert accepted.exit_code == 0, accepted.output
    info = json.loads((out / "run.json").read_text())
    assert info["resumed_from"].endswith("checkpoint-3") and (out / "COMPLETE").exists()
    assert "rows 4000 -> 1000" in info["sessions"][-1]["data_changed"][0]
    assert info["data_sources"]["data.train.0"]["rows"] == 1000
