"""`spo plot`: training curves of one run, several runs, or an experiment's runs of one seed. Thin: parse, call
`plots.compare.plot_runs`, print the files written. Only typer and the standard library are imported here.

Exit codes: 0 drawn; 1 nothing to draw (a path that is no run or experiment folder, a run with no usable
records) or the figure cannot be written (one `error:` line).
"""

from __future__ import annotations

from pathlib import Path

import typer


def plot(
    paths: list[Path] = typer.Argument(
        ..., help="Run folders (each holds metrics.jsonl), or an experiment folder (holds seed<S>/): its runs of one seed."
    ),
    out: Path = typer.Option(
        None,
        "--out",
        help="Figure to write, .png or .svg. Default: RUN/metrics.png for one run, EXPERIMENT/curves_seed<S>.png for "
        "an experiment folder, FOLDER/curves.png for several runs of one folder.",
    ),
    seed: int = typer.Option(None, "--seed", help="Which seed's runs of an experiment folder (default: the lowest)."),
    smooth: int = typer.Option(
        1, "--smooth", min=1, help="Centred mean over N logged points for noisy curves (raw values stay faint); 1: off."
    ),
    svg: bool = typer.Option(False, "--svg", help="Also write the figure as SVG beside the PNG."),
    every_curve: bool = typer.Option(
        False, "--all", help="After the comparison panels, every other metric the runs logged (always for one run)."
    ),
) -> None:
    """Draw training curves; several runs overlay, one colour each: log-ratios, margin, accuracy, loss terms."""
    from spo_align.plots.compare import plot_runs
    from spo_align.plots.runs import PlotError

    try:
        written = plot_runs(paths, out, seed=seed, smooth_window=smooth, svg=svg, every_curve=every_curve or None)
    except PlotError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    except OSError as exc:
        from spo_align.os_errors import reason

        typer.echo(f"error: cannot write the figure: {reason(exc)}", err=True)
        raise typer.Exit(code=1) from None
    for path in written:
        typer.echo(str(path))


def register(app: typer.Typer) -> None:
    app.command("plot")(plot)
