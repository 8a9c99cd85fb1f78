"""`spo experiment EXPERIMENT.yaml`: the thin command over `spo_align.experiment`.

Only typer and the standard library are imported here; `register` adds the command to the top-level app.
Exit codes: 0 done, 1 invalid experiment/recipe or a failed step, 143 when stopped by SIGTERM after the stage in
training saved a checkpoint (one line; the same command continues), as `spo train`.
"""

from __future__ import annotations

from pathlib import Path

import typer


def experiment_command(
    path: Path = typer.Argument(..., help="Experiment file, e.g. experiments/tiny.yaml."),
    set_: list[str] | None = typer.Option(
        None, "--set", help="key.path=value override of the experiment file (one value, typed as in the file), e.g. seeds=[0]."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run",
        help="Validate the experiment and every recipe, list the stages and their state (done, changed, stale, "
        "resume, to run); run nothing.",
    ),
    rerun_changed: bool = typer.Option(
        False, "--rerun-changed",
        help="Train again, from the start, every finished stage whose recipe changed and every preference stage "
        "whose SFT run changed (without it such stages are refused, named, before anything runs).",
    ),
) -> None:
    """Run a whole experiment: SFT, preference runs from its output, generation, judging, tables. Resumable."""
    from spo_align.recipe.errors import RecipeErrors

    try:
        from spo_align.experiment.spec import load_experiment, plan_stages

        experiment = load_experiment(path, set_ or [])
        plan_stages(experiment)  # every recipe validated before anything is shown or run
    except RecipeErrors as exc:
        typer.echo(exc.format("text"), err=True)
        raise typer.Exit(1) from None
    if dry_run:
        _dry_run(experiment, rerun_changed)
        return
    _run(experiment, rerun_changed)


def _dry_run(experiment: object, rerun_changed: bool) -> None:
    from spo_align.experiment.state import RERUN_FLAG, ExperimentError, stage_states
    from spo_align.run_folder import OutputFolderError

    try:
        states = stage_states(experiment)  # type: ignore[arg-type]
    except (ExperimentError, OutputFolderError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for step, state in states:
        typer.echo(f"seed {step.seed} {step.name:<12} {state.name:<7} {step.command}")
        if state.why:
            typer.echo(f"    {state.name}: {state.why}")
    held = sum(state.name in ("changed", "stale") for _, state in states)
    if held and not rerun_changed:
        typer.echo(f"{held} finished stage(s) changed or stale: the run refuses them; pass {RERUN_FLAG} to train them again")
    typer.echo(f"then: generate, judge ({experiment.spec.eval.judge.type}) and tabulate into {experiment.output_dir}")  # type: ignore[attr-defined]


def _run(experiment: object, rerun_changed: bool = False) -> None:
    from spo_align.eval.judge import JudgeFatalError
    from spo_align.eval.records import EvalInputError
    from spo_align.experiment.report import PromptGroupError
    from spo_align.experiment.runner import ExperimentError, ExperimentStopped, run_experiment
    from spo_align.recipe.errors import RecipeErrors
    from spo_align.run_folder import OutputFolderError

    try:
        result = run_experiment(experiment, rerun_changed=rerun_changed)  # type: ignore[arg-type]
    except RecipeErrors as exc:
        typer.echo(exc.format("text"), err=True)
        raise typer.Exit(1) from None
    except ExperimentStopped as exc:
        typer.echo(f"stopped: {exc}", err=True)
        raise typer.Exit(128 + 15) from None  # 128 + SIGTERM, as `spo train`
    except (ExperimentError, PromptGroupError, EvalInputError, JudgeFatalError, OutputFolderError) as exc:
        from spo_align.eval.redact import redact

        for line in redact(str(exc)).splitlines():  # one line per stage refused
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(1) from None
    for name in ("accuracy.md", "sweep.md", "win_rates.md", "summary.md"):
        table = result.output_dir / name
        if table.is_file():
            typer.echo(table.read_text(encoding="utf-8"))
    typer.echo(
        f"{len(result.trained)} stage(s) trained, {len(result.skipped)} skipped, "
        f"{result.wall_seconds:.0f} s; files in {result.output_dir}"
    )


def register(app: typer.Typer) -> None:
    """Add `spo experiment` to the top-level app."""
    app.command("experiment")(experiment_command)
