"""A real DeepSpeed run on CPU: `spo train` re-launches itself with 2 processes (gloo), ZeRO-2 under the
`deepspeed` launcher and ZeRO-3 under torchrun, SPO, full fine-tuning, on the hidden-32 tiny model. The first loss is SPO's at zero log-ratios (0), every loss is
finite, the weights moved, the output and the
checkpoint load with from_pretrained, and (ZeRO-3) resuming from the mid-run checkpoint ends where the
uninterrupted run ended."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app

pytest.importorskip("deepspeed")

TESTS = Path(__file__).resolve().parents[1]
RECIPES = TESTS / "data" / "recipes"
STEPS = 12


@pytest.fixture
def gloo_only(monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(TESTS / "data" / "gloo_only")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _train(zero: int, model: Path, out: Path, *extra: str):
    return CliRunner().invoke(
        app,
        [
            "train", str(RECIPES / f"spo_zero{zero}.yaml"), "--set", f"model.name_or_path={model}",
            "--set", f"output.dir={out}", "--set", f"training.max_steps={STEPS}",
                        "--set", "data.train.0.max_samples=8", *extra,
        ],
    )


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_finished_run(out: Path, start: Path) -> list[dict]:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    records = _records(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    assert losses[0] == pytest.approx(0.0, abs=1e-6)  # SPO at zero log-ratios: f(0) + f(0); the policy starts as the reference
    before, after = load_file(start / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not bool((after[k] == before[k]).all()) for k in before if k in after)  # the optimiser moved the weights
    assert (out / "COMPLETE").exists()
    assert json.loads((out / "run.json").read_text())["hardware"]["world_size"] == 2
    AutoModelForCausalLM.from_pretrained(out)
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-6")
    return records


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_zero2_two_processes_spo_full_fine_tune_under_the_deepspeed_launcher(
    tmp_path: Path, small_model: Path, gloo_only, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    out = tmp_path / "zero2"
    result = _train(2, small_model, out, "--set", "distributed.launcher=deepspeed")
    assert result.exit_code == 0, result.output
    _check_finished_run(out, small_model)


@pytest.mark.slow
def test_zero3_two_processes_spo_full_fine_tune_and_resume_from_its_checkpoint(
    tmp_path: Path, small_model: Path, gloo_only
):
    out = tmp_path / "zero3"
    result = _train(3, small_model, out)
    assert result.exit_code == 0, result.output
    expected = _check_finished_run(out, small_model)

    # Turn the folder back into the state of a run stopped after checkpoint-6, then resume it.
    for name in ("COMPLETE", "model.safetensors", "run.json"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoint-12")
    resumed = _train(3, small_model, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "run.json").read_text())["resumed_from"].endswith("checkpoint-6")
    got = _records(out)
    skip = {"elapsed_s", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"}
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for want, have in zip(expected, got):
        for key, value in want.items():
            if key not in skip:
                assert have[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (want["step"], key)

    # The state of a run killed during its final save (after checkpoint-12): the same command finishes it
    # without a training step, the final weights being checkpoint-12's, gathered from the ZeRO-3 shards.
    from safetensors.torch import load_file

    for name in ("COMPLETE", "README.md", "run.json"):
        (out / name).unlink()
    model = out / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    finished = _train(3, small_model, out)
    assert finished.exit_code == 0, finished.output
    assert _records(out) == got  # nothing trained, nothing logged
    final, checkpoint = load_file(model), load_file(out / "checkpoint-12" / "model.safetensors")
    assert final.keys() == checkpoint.keys() and all((final[k] == checkpoint[k]).all() for k in final)
    assert (out / "COMPLETE").exists()
