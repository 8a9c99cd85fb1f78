"""`spo train` as a command: dry runs, launch commands, and bad input reported without a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"


@pytest.fixture
def no_weights_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded a model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def _invoke(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def test_dry_run_prints_the_launch_command_and_trainer_arguments_and_loads_nothing(
    tmp_path: Path, small_model: Path, no_weights_loaded
):
    out = tmp_path / "out"
    result = _invoke(
        str(RECIPES / "spo_zero3.yaml"), "--set", f"model.name_or_path={small_model}", "--set", f"output.dir={out}",
        "--dry-run",
    )
    assert result.exit_code == 0, result.output
    first, rest = result.stdout.split("\n", 1)
    assert first.startswith("launch: torchrun --nproc_per_node=2 --nnodes=1 --standalone -m spo_align.train.launch ")
    assert f"--set output.dir={out}" in first
    report = json.loads(rest)
    assert report["stage"] == "spo" and report["adapter"] == "full"
    args = report["trainer_args"]
    assert args["deepspeed"]["zero_optimization"]["stage"] == 3
    assert (args["per_device_train_batch_size"], args["max_steps"], args["use_cpu"]) == (4, 12, True)
    assert not out.exists()


def test_dry_run_of_an_in_process_sft_recipe_shows_the_packing_arguments(small_model: Path, no_weights_loaded):
    result = _invoke(str(RECIPES / "sft_packed.yaml"), "--set", f"model.name_or_path={small_model}", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("launch: in-process")
    args = json.loads(result.stdout.split("\n", 1)[1])["trainer_args"]
    assert (args["packing"], args["packing_strategy"], args["max_length"]) == (True, "bfd", 64)


def test_launch_commands_for_accelerate_deepspeed_and_multi_node_torchrun(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, plan_from
):
    make_plan = plan_from
    from spo_align.train.launch import launch_command

    recipe = RECIPES / "spo_zero2.yaml"
    plan = make_plan("spo_zero2", "distributed.launcher=accelerate")
    assert launch_command(plan, recipe, []).command[:5] == [
        "accelerate", "launch", "--num_processes=2", "--num_machines=1", "--multi_gpu",
    ]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    plan = make_plan("spo_zero2", "distributed.launcher=deepspeed", "distributed.num_nodes=2", f"distributed.hostfile={hostfile}")
    command = launch_command(plan, recipe, ["loss.beta=0.3"], resume_from="/x/checkpoint-6").command
    assert command[:2] == ["deepspeed", "--num_gpus=2"] and f"--hostfile={hostfile}" in command
    assert command[-7:] == [
        "--module", "spo_align.train.launch", str(recipe.resolve()), "--set", "loss.beta=0.3",
        "--resume-from", "/x/checkpoint-6",
    ]
    monkeypatch.setenv("SPO_NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    plan = make_plan("spo_zero2", "distributed.num_nodes=2")
    command = launch_command(plan, recipe, []).command
    assert command[:6] == [
        "torchrun", "--nproc_per_node=2", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29500",
    ]


def test_recipe_errors_are_printed_exactly_like_spo_validate(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES / "spo.yaml").read_text().replace("beta: 0.2", "betta: 0.2"))
    trained = _invoke(str(bad))
    validated = CliRunner().invoke(app, ["validate", str(bad)])
    assert trained.exit_code == 1 and validated.exit_code == 1
    assert "betta" in trained.stdout and "Traceback" not in trained.output
    assert trained.stdout == validated.stdout


@pytest.mark.parametrize(
    ("recipe", "column", "line", "key"),
    [("sft_bad_column", "conversation", 8, "data.train[0].columns.messages"),
     ("spo_bad_column", "better", 8, "data.train[0].columns.chosen")],
)
def test_a_missing_dataset_column_names_the_column_and_the_recipe_line(
    recipe: str, column: str, line: int, key: str, tmp_path: Path, small_model: Path
):
    result = _invoke(
        str(RECIPES / f"{recipe}.yaml"), "--set", f"model.name_or_path={small_model}",
        "--set", f"output.dir={tmp_path / 'out'}",
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    message = result.stderr
    assert f"{RECIPES / recipe}.yaml:{line}" in message and key in message and repr(column) in message
    assert not (tmp_path / "out" / "COMPLETE").exists()


def test_flash_attention_on_cpu_is_a_one_line_error(tmp_path: Path, small_model: Path, no_weights_loaded):
    result = _invoke(
        str(RECIPES / "spo.yaml"), "--set", f"model.name_or_path={small_model}", "--set", "model.attention=flash_attention_2",
        "--set", "model.dtype=bfloat16", "--set", f"output.dir={tmp_path / 'out'}",
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("error: model.attention: flash_attention_2 cannot run here")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_accelerate_launch_runs_two_cpu_processes(tmp_path: Path, small_model: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    result = _invoke(
        str(RECIPES / "spo.yaml"), "--set", f"model.name_or_path={small_model}", "--set", f"output.dir={out}",
        "--set", "distributed.num_processes=2", "--set", "distributed.launcher=accelerate",
        "--set", "training.per_device_batch_size=4", "--set", "training.max_steps=4",
    )
    assert result.exit_code == 0, result.output
    assert (out / "COMPLETE").exists()
    assert json.loads((out / "run.json").read_text())["hardware"]["world_size"] == 2
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]) == 4


def test_resume_and_overwrite_together_are_refused_before_anything_is_touched(small_model: Path, tmp_path: Path):
    """--resume continues the run, --overwrite deletes it: given both, a finished run was deleted. Now the pair is
    refused in either order, with one line, and the finished run stays as it was."""
    from spo_align.run_folder import OutputFolderError
    from spo_align.train.launch import launch
    from tests.train.conftest import make_plan

    out = tmp_path / "out"
    sets = ["--set", f"model.name_or_path={small_model}", "--set", f"output.dir={out}",
            "--set", "training.max_steps=1", "--set", "data.train.0.max_samples=8"]
    assert _invoke(str(RECIPES / "sft_packed.yaml"), *sets).exit_code == 0
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    assert (out / "COMPLETE").is_file()
    for flags in (("--resume", "--overwrite"), ("--overwrite", "--resume")):
        result = _invoke(str(RECIPES / "sft_packed.yaml"), *sets, *flags)
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines() == [
            "error: --resume and --overwrite contradict each other: --resume continues the run in output.dir, "
            "--overwrite deletes it; give one of them"
        ]
    plan = make_plan("sft_packed", f"model.name_or_path={small_model}", f"output.dir={out}")
    with pytest.raises(OutputFolderError, match="contradict"):
        launch(plan, RECIPES / "sft_packed.yaml", [], resume=True, overwrite=True)
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before


@pytest.mark.parametrize("key", ["model.name_or_path", "reference.model"])
def test_a_starting_model_that_is_an_unfinished_run_is_refused_by_name(small_model: Path, tmp_path: Path, key: str):
    """An SFT stage stopped before its end has no model, or half of one: a preference run from it is refused in one
    line before anything is loaded, whether it is the starting model or the reference."""
    import shutil

    sft = tmp_path / "sft"
    shutil.copytree(small_model, sft)
    (sft / "resolved_recipe.yaml").write_text("stage: sft\n")  # a run's folder, without its COMPLETE marker
    base = small_model if key == "reference.model" else sft
    result = _invoke(str(RECIPES / "spo.yaml"), "--set", f"model.name_or_path={base}", "--set", f"{key}={sft}",
                     "--set", f"output.dir={tmp_path / 'out'}")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {key}: {sft} is an unfinished spo-align run (no COMPLETE marker: its model may be "
                      "missing or half-written); finish it by running its spo train command again, or use one of its "
                      "sealed checkpoint-N folders"], result.output
    assert not (tmp_path / "out").exists()
    (sft / "COMPLETE").write_text("")
    assert _invoke(str(RECIPES / "spo.yaml"), "--set", f"model.name_or_path={base}", "--set", f"{key}={sft}",
                   "--set", f"output.dir={tmp_path / 'out'}", "--dry-run").exit_code == 0
