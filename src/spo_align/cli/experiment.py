"""`spo experiment EXPERIMENT.yaml`: the thin command over `spo_align.experiment`.

Only typer and the standard library are imported here; `register` adds the command to the top-level app.
Exit codes: 0 done, 1 invalid experiment/recipe or a failed step.
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
        False, "--dry-run", help="Validate the experiment and every recipe, list the stages and their state; run nothing."
    ),
) -> None:
    """Run a whole experiment: SFT, preference runs from its output, generation, judging, tables. Resumable."""
    from spo_align.recipe.errors import RecipeErrors

    try:
        from spo_align.experiment.spec import load_experiment, plan_stages

        experiment = load_experiment(path, set_ or [])
        steps = plan_stages(experiment)
    except RecipeErrors as exc:
        typer.echo(exc.format("text"), err=True)
        raise typer.Exit(1) from None
    if dry_run:
        from spo_align.run_folder import finished_at

        for step in steps:
            started = step.output_dir.is_dir() and any(step.output_dir.iterdir())
            state = "done" if finished_at(step.output_dir) is not None else "resume" if started else "to run"
            typer.echo(f"seed {step.seed} {step.name:<12} {state:<7} {step.command}")
        typer.echo(f"then: generate, judge ({experiment.spec.eval.judge.type}) and tabulate into {experiment.output_dir}")
        return
    _run(experiment)


def _run(experiment: object) -> None:
    from spo_align.eval.judge import JudgeFatalError
    from spo_align.eval.records import EvalInputError
    from spo_align.experiment.report import PromptGroupError
    from spo_align.experiment.runner import ExperimentError, run_experiment
    from spo_align.recipe.errors import RecipeErrors
    from spo_align.run_folder import OutputFolderError

    try:
        result = run_experiment(experiment)  # type: ignore[arg-type]
    except RecipeErrors as exc:
        typer.echo(exc.format("text"), err=True)
        raise typer.Exit(1) from None
    except (ExperimentError, PromptGroupError, EvalInputError, JudgeFatalError, OutputFolderError) as exc:
        from spo_align.eval.redact import redact

        typer.echo(f"error: {redact(str(exc))}", err=True)
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
