"""`spo train`. Thin: parse, call the library, print. torch is imported inside the bodies.

Exit codes: 0 success; 2 contradictory flags (`--resume --overwrite`); 1 bad input (recipe errors printed exactly like `spo validate`, or one `error:` line
for data, model, output-folder, reference-cache and launch problems) or a failed write (a full disk, an
unwritable folder: one `error:` line); 130 when interrupted (Ctrl-C: one line, the run left to continue); 143
when stopped by SIGTERM after saving a checkpoint (one line; the same command continues);
a failed launcher's own exit code otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (recipe, data, model set-up, output folder): one line, no traceback."""
    from spo_align.data.errors import DataSourceError
    from spo_align.data.policies import RowPolicyError
    from spo_align.data.tokenize import TemplateError
    from spo_align.run_folder import OutputFolderError
    from spo_align.train.model import ModelSetupError
    from spo_align.train.reference import ReferenceCacheError

    return (DataSourceError, ModelSetupError, OutputFolderError, TemplateError, RowPolicyError, ReferenceCacheError)


def train(
    recipe: Path = typer.Argument(..., help="Recipe file."),
    overrides: list[str] = typer.Option([], "--set", help="Override a key: --set training.max_steps=10 (repeatable)."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the launch command and the trainer arguments; load nothing, train nothing."
    ),
    resume: bool = typer.Option(
        False, "--resume",
        help="Continue the unfinished run in output.dir from its last complete checkpoint; fail if there is none. "
        "(Without a flag, an unfinished run of the same recipe is continued too, or started over if it has no checkpoint.)",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start over: delete the finished or unfinished run in output.dir (only files spo-align wrote)."
    ),
    accept_data_change: bool = typer.Option(
        False, "--accept-data-change",
        help="Continue an unfinished run although a data source changed since it started (rows, size or content; "
        "otherwise refused, naming the source). The change is recorded in run.json.",
    ),
) -> None:
    """Train: SFT, preference (SPO/DPO/IPO) or KTO, as the recipe says; in-process or under its launcher."""
    import torch

    from spo_align.recipe.errors import RecipeErrors
    from spo_align.recipe.load import load_recipe
    from spo_align.recipe.resolve import resolve
    from spo_align.train.launch import LaunchError, dry_run_report, launch
    from spo_align.train.preemption import EXIT_CODE, RunStopped

    if resume and overwrite:
        from spo_align.train.launch import CONTRADICTORY_FLAGS

        typer.echo(f"error: {CONTRADICTORY_FLAGS}", err=True)
        raise typer.Exit(code=2)
    if not recipe.is_file():
        typer.echo(f"error: no such recipe file: {recipe}", err=True)
        raise typer.Exit(code=1)
    try:
        # A real run refuses a local model or dataset path that does not exist before it loads anything; a dry
        # run loads nothing, so it may show a later stage whose starting model is not written yet.
        loaded = load_recipe(recipe, overrides, require_local_paths=not dry_run)
        plan = resolve(loaded, recipe, "cuda" if torch.cuda.is_available() else "cpu")
    except RecipeErrors as exc:
        typer.echo(exc.format("text"))
        raise typer.Exit(code=1) from None

    bad_input = _input_errors()
    try:
        if dry_run:
            report = dry_run_report(plan, recipe, overrides)
            typer.echo(f"launch: {report.pop('command')}")
            typer.echo(json.dumps(report, indent=2, default=str))
            return
        output_dir = launch(
            plan, recipe, overrides, resume=resume, overwrite=overwrite, accept_data_change=accept_data_change
        )
    except bad_input as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    except LaunchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=exc.returncode) from None
    except RunStopped as exc:
        typer.echo(f"stopped: {exc}", err=True)
        raise typer.Exit(code=EXIT_CODE) from None
    except KeyboardInterrupt:
        typer.echo(
            f"interrupted: the run in {plan.output_dir} is not finished; run the same command again to continue "
            "from its last complete checkpoint",
            err=True,
        )
        raise typer.Exit(code=130) from None
    except Exception as exc:
        from spo_align.run_folder import write_failure

        message = write_failure(exc, Path(plan.output_dir))
        if message is None:
            raise
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(f"done: {output_dir}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
