"""`plot_run`: one run's training curves as a PNG (the drawing itself lives in `spo_align.plots`)."""

from __future__ import annotations

from pathlib import Path

from spo_align.plots.runs import PlotError

__all__ = ["PlotError", "plot_run"]


def plot_run(output_dir: Path, out: Path | None = None) -> Path:
    """Draw every curve of `output_dir/metrics.jsonl` (default: into `output_dir/metrics.png`); returns the path."""
    from spo_align.plots.compare import plot_runs

    return plot_runs([Path(output_dir)], out, every_curve=True)[0]
