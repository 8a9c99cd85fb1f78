"""`spo plot`: training curves from a run's metrics.jsonl, drawn to PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from spo_align.loss_catalogue import logged_metrics
from spo_align.train.outputs import METRICS, read_metrics

logger = logging.getLogger(__name__)

# Shown first, in this order, when a run logged them; any other numeric metric follows.
PREFERRED = ("loss", "learning_rate", *(metric.name for metric in logged_metrics()))
NOT_CURVES = {"step", "epoch", "elapsed_s", "total_flos"}


class PlotError(ValueError):
    """Nothing to plot (no metrics.jsonl, or no step records in it)."""


def curves(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """metric -> (steps, values) over the per-step records (the final train_* summary is left out)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        if any(key.startswith("train_") for key in record):
            continue
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key in NOT_CURVES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))
    ordered = [k for k in PREFERRED if k in series] + sorted(k for k in series if k not in PREFERRED)
    return {k: series[k] for k in ordered}


def plot_run(output_dir: Path, out: Path | None = None) -> Path:
    """Draw every curve of `output_dir/metrics.jsonl` into one PNG grid; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path = Path(output_dir) / METRICS
    if not metrics_path.is_file():
        raise PlotError(f"{metrics_path} does not exist: is {output_dir} a spo train output folder?")
    series = curves(read_metrics(metrics_path))
    if not series:
        raise PlotError(f"{metrics_path} holds no per-step metrics yet")
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, (steps, values)) in zip(axes.flat, series.items()):
        ax.plot(steps, values, linewidth=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle(str(Path(output_dir).name), fontsize=11)
    fig.tight_layout()
    out = Path(out) if out is not None else Path(output_dir) / "metrics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    logger.info("wrote %s (%d curves)", out, len(series))
    return out
