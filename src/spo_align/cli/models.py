"""`spo packaged-model NAME`: the local folder of a real model that a pip package ships (spo_align.packaged_model)."""

from __future__ import annotations

import contextlib
import sys

import typer

from spo_align.packaged_model import PACKAGED


def packaged_model(
    name: str = typer.Argument(..., help=f"The packaged model: {', '.join(PACKAGED)}."),
) -> None:
    """Print the local folder of a real model shipped by a pip package (converted once per machine), for
    --set model.name_or_path=... on a machine without a model hub."""
    from spo_align.packaged_model import PackagedModelError, materialise

    try:
        # stdout is the folder alone (`--set model.name_or_path=$(spo packaged-model NAME)` reads it): what the
        # libraries print while converting goes to stderr (DeepSpeed, imported by transformers on save, logs a
        # warning to stdout).
        with contextlib.redirect_stdout(sys.stderr):
            folder = materialise(name)
    except PackagedModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(str(folder))


def register(app: typer.Typer) -> None:
    app.command("packaged-model")(packaged_model)
