"""Runs side by side: what each panel of the figure shows (`build_figure`, plain data) and the drawing of it.

The panels that compare preference runs come first: the chosen and the rejected answers' log-ratio
log π/π_ref and their margin, in nats (each run's logged reward divided by its reward scale, so runs with
different β compare), the reward accuracy, the share of pairs with both answers below the reference, and
each loss's own terms (SPO's two terms, KTO's reference point), titled by its loss entry. One colour per
run (each loss entry's `colour` when that loss appears once: SPO blue, DPO red, IPO green, KTO orange, ...);
evaluation values (`eval_*`) dashed in the run's colour. For a single run every other logged metric follows, the loss first. The losses of different runs are not
compared by default: their scales differ too much (IPO's starts near (1/2τ)², 25 for τ = 0.1).

NaN and ±inf values are drawn as gaps (the line breaks there); the figure's footnote and the log name the
series that have them. Smoothing is a centred mean over a window of logged points, taken within each
stretch between gaps, with the raw values drawn faintly behind. A point with no finite neighbour (a run that
logged once, a value between two gaps) is drawn as a dot, since a line needs two points.

There are ten colours; past ten runs a colour is shared, and the runs that share it are told apart by a
marker (`RUN_MARKERS`) on their lines and in the legend, which the footnote and the log say.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo_align.losses.registry import CATALOGUE, logged_metrics
from spo_align.plots.runs import PlotError, Run, classify, experiment_seeds, load_runs

logger = logging.getLogger(__name__)

LOG_RATIO_UNIT = "nats (reward ÷ the run's β; 2τ for IPO)"


@dataclass(frozen=True)
class Panel:
    metric: str
    title: str
    ylabel: str
    log_ratio: bool = False
    """Values are divided by the run's reward scale; runs whose scale is unknown are left out."""


PANELS = (
    Panel("rewards/chosen", "chosen answer: log π/π_ref", LOG_RATIO_UNIT, log_ratio=True),
    Panel("rewards/rejected", "rejected answer: log π/π_ref", LOG_RATIO_UNIT, log_ratio=True),
    Panel("rewards/margins", "margin: chosen − rejected log-ratio", LOG_RATIO_UNIT, log_ratio=True),
    Panel("rewards/accuracies", "reward accuracy (chosen > rejected)", "share of pairs"),
    Panel("both_below_ref", "both answers below the reference", "share of pairs"),
)
# Order of the remaining curves of a single run; any other metric follows by name.
PREFERRED = ("loss", "learning_rate", "logps/chosen", "logps/rejected", "grad_norm", "mean_token_accuracy", "entropy")
COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
           "tab:olive", "tab:cyan")
SFT_COLOUR = "tab:gray"
"""A run without a loss (the SFT stage); each loss's own colour is its entry's."""
FORMATS = (".png", ".svg")
RUN_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
"""Markers of the second, third, ... run that shares a colour (the first has none)."""


def term_title(name: str) -> str:
    """A loss term's panel title, as its loss entry gives it (the name itself for a term no entry logs)."""
    return next((m.title for m in logged_metrics() if m.name == name and m.title), name)


@dataclass(frozen=True)
class Line:
    run: str
    """The run's label (its colour is its place in `FigureContent.runs`)."""
    metric: str
    """The logged metric it draws (`eval_*` for evaluation values, drawn dashed)."""
    steps: tuple[int, ...]
    values: tuple[float, ...]
    """As drawn: divided by the reward scale on log-ratio panels; NaN for a gap."""
    smoothed: tuple[float, ...] | None = None

    @property
    def is_eval(self) -> bool:
        return self.metric.startswith("eval_")


@dataclass(frozen=True)
class PanelContent:
    title: str
    ylabel: str
    lines: tuple[Line, ...]
    zero_line: bool = False


@dataclass(frozen=True)
class FigureContent:
    title: str
    runs: tuple[str, ...]
    panels: tuple[PanelContent, ...]
    notes: tuple[str, ...] = ()
    colours: tuple[str, ...] = ()
    """One per run; default: COLOURS in turn."""
    markers: tuple[str | None, ...] = ()
    """One per run: None, or the marker that tells it from earlier runs of the same colour."""


def run_colours(kinds: Sequence[str | None]) -> tuple[str, ...]:
    """A loss's own colour for a loss that appears once; the other runs take the unused colours in turn."""
    own = {entry.type: entry.colour for entry in CATALOGUE.values()} | {"sft": SFT_COLOUR}
    fixed = {kind: own[kind] for kind in kinds if kind in own and list(kinds).count(kind) == 1}
    spare = [c for c in COLOURS if c not in fixed.values()]
    colours, taken = [], 0
    for kind in kinds:
        if kind in fixed:
            colours.append(fixed[kind])
        else:
            colours.append(spare[taken % len(spare)])
            taken += 1
    return tuple(colours)


def run_markers(colours: Sequence[str]) -> tuple[str | None, ...]:
    """None for the first run of each colour; the k-th later run of that colour gets `RUN_MARKERS[k - 1]`, so no
    two runs are drawn alike (up to 130 runs)."""
    seen: dict[str, int] = {}
    markers: list[str | None] = []
    for colour in colours:
        earlier = seen.get(colour, 0)
        seen[colour] = earlier + 1
        markers.append(None if earlier == 0 else RUN_MARKERS[(earlier - 1) % len(RUN_MARKERS)])
    return tuple(markers)


def lone_points(values: Sequence[float]) -> list[int]:
    """Indices of the finite values with no finite neighbour: a line through them would draw nothing."""
    finite = [not math.isnan(v) for v in values]
    return [
        i for i, ok in enumerate(finite)
        if ok and (i == 0 or not finite[i - 1]) and (i == len(finite) - 1 or not finite[i + 1])
    ]


def smooth(values: Sequence[float], window: int) -> tuple[float, ...]:
    """Centred mean over `window` points, within each stretch of finite values; NaN stays NaN.

    The window is cut at the ends of a stretch, so a constant stays constant and a non-decreasing stretch
    stays non-decreasing."""
    values = tuple(values)
    if window <= 1:
        return values
    before, after = (window - 1) // 2, window // 2
    out = [math.nan] * len(values)
    start = 0
    while start < len(values):
        if math.isnan(values[start]):
            start += 1
            continue
        end = start
        while end < len(values) and not math.isnan(values[end]):
            end += 1
        for i in range(start, end):
            lo, hi = max(start, i - before), min(end, i + after + 1)
            out[i] = math.fsum(values[lo:hi]) / (hi - lo)
        start = end
    return tuple(out)


def _line(run: Run, metric: str, scale: float, window: int) -> Line:
    series = run.metrics.series[metric]
    values = tuple(v / scale for v in series.values)
    return Line(run.label, metric, series.steps, values, smooth(values, window) if window > 1 else None)


def _panel_lines(runs: Sequence[Run], panel: Panel, window: int, used: set[tuple[str, str]]) -> list[Line]:
    lines = []
    for run in runs:
        scale = run.facts.reward_scale if panel.log_ratio else 1.0
        if scale is None:
            continue
        for metric in (panel.metric, "eval_" + panel.metric):
            if metric in run.metrics.series:
                lines.append(_line(run, metric, scale, window))
                used.add((run.label, metric))
    return lines


def _other_panels(runs: Sequence[Run], window: int, used: set[tuple[str, str]]) -> list[PanelContent]:
    """Every metric not drawn yet, one panel per name (its eval_ variant dashed beside it)."""
    names = {m.removeprefix("eval_") for run in runs for m in run.metrics.series if (run.label, m) not in used}
    ordered = [n for n in PREFERRED if n in names] + sorted(names - set(PREFERRED))
    panels = []
    for name in ordered:
        lines = [
            _line(run, metric, 1.0, window)
            for run in runs for metric in (name, "eval_" + name)
            if metric in run.metrics.series and (run.label, metric) not in used
        ]
        panels.append(PanelContent(name + (" (as logged)" if name.startswith("rewards/") else ""), "", tuple(lines)))
    return panels


def build_figure(runs: Sequence[Run], title: str, *, smooth_window: int = 1, every_curve: bool = False) -> FigureContent:
    """What the figure shows: the comparison panels that some run has data for, then (every_curve) the rest."""
    terms = list(dict.fromkeys(term for run in runs for term in run.facts.terms))
    panels = [*PANELS, *(Panel(t, term_title(t), "loss term") for t in terms)]
    used: set[tuple[str, str]] = set()
    content = []
    for panel in panels:
        lines = _panel_lines(runs, panel, smooth_window, used)
        if lines:
            content.append(PanelContent(panel.title, panel.ylabel, tuple(lines), zero_line=panel.log_ratio))
    if every_curve:
        content += _other_panels(runs, smooth_window, used)
    if not content:
        raise PlotError(f"{', '.join(r.label for r in runs)}: no metric to draw")
    notes = []
    if any(p.zero_line for p in content):
        notes.append("log-ratios in nats: each run's logged reward divided by its β (2τ for IPO)")
    if smooth_window > 1:
        notes.append(f"smoothed: centred mean over {smooth_window} logged points (raw values faint)")
    labels = tuple(r.label for r in runs)
    colours = run_colours([r.kind for r in runs])
    markers = run_markers(colours)
    if any(markers):
        shared = f"{len(runs)} runs, {len(COLOURS)} colours: colours repeat, and runs that share one differ by marker"
        notes.append(shared)
        logger.warning("%s", shared)
    if any(lone_points(line.values) for panel in content for line in panel.lines):
        notes.append("a point with no logged neighbour is drawn as a dot")
    gaps = gap_report(content)
    if gaps:
        notes.append("gaps where a run logged NaN/inf: " + gaps)
    return FigureContent(title, labels, tuple(content), tuple(notes), colours, markers)


def gap_report(panels: Sequence[PanelContent]) -> str:
    """`run metric (steps 30, 40); ...` for every drawn series with NaN/inf values; empty if none."""
    parts = []
    for panel in panels:
        for line in panel.lines:
            steps = [s for s, v in zip(line.steps, line.values) if math.isnan(v)]
            if steps:
                shown = ", ".join(map(str, steps[:5])) + (f" and {len(steps) - 5} more" if len(steps) > 5 else "")
                parts.append(f"{line.run} {line.metric} (step{'s' if len(steps) > 1 else ''} {shown})")
    return "; ".join(parts)


def draw(content: FigureContent) -> Any:
    """The matplotlib Figure (no pyplot, so no global state; the caller saves it)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    cols = min(3, len(content.panels))
    rows = math.ceil(len(content.panels) / cols)
    fig = Figure(figsize=(4.0 * cols, 2.8 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    colours = content.colours or tuple(COLOURS[i % len(COLOURS)] for i in range(len(content.runs)))
    colour = dict(zip(content.runs, colours))
    marker = dict(zip(content.runs, content.markers or run_markers(colours)))
    for ax, panel in zip(axes.flat, content.panels):
        if panel.zero_line:
            ax.axhline(0.0, color="0.6", linewidth=0.8)
        for line in panel.lines:
            style = {"color": colour[line.run], "linestyle": "--" if line.is_eval else "-", "linewidth": 1.3}
            label = f"{line.run} (eval)" if line.is_eval else line.run
            shown = line.smoothed if line.smoothed is not None else line.values
            if line.smoothed is not None:
                ax.plot(line.steps, line.values, **{**style, "linewidth": 0.8}, alpha=0.25, label="_raw " + label)
            ax.plot(line.steps, shown, **style, label=label, **_marks(shown, marker[line.run]))
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(content.panels):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colour[run], linewidth=2, marker=marker[run]) for run in content.runs]
    labels = list(content.runs)
    if any(line.is_eval for panel in content.panels for line in panel.lines):
        handles.append(Line2D([], [], color="0.3", linestyle="--"))
        labels.append("evaluation")
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 5), fontsize=9, frameon=False,
               title=content.title, title_fontsize=11)
    if content.notes:
        fig.supxlabel("\n".join(content.notes), fontsize=8, color="0.3")
    return fig


def _marks(values: Sequence[float], run_marker: str | None) -> dict[str, Any]:
    """Matplotlib marker settings for one drawn series: the run's own marker (about ten along the line), and a
    dot on every point with no finite neighbour."""
    lone = lone_points(values)
    if run_marker is not None:
        every = sorted(set(range(0, len(values), max(1, len(values) // 10))) | set(lone))
        return {"marker": run_marker, "markevery": every, "markersize": 5}
    if lone:
        return {"marker": "o", "markevery": lone, "markersize": 4}
    return {}


def save(fig: Any, out: Path, *, svg: bool = False) -> list[Path]:
    """Write `out` (.png or .svg), and with `svg` the SVG beside a PNG; each file replaced whole or not at all."""
    from matplotlib import rc_context

    out = Path(out)
    paths = [out] + ([out.with_suffix(".svg")] if svg and out.suffix == ".png" else [])
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in paths:
        fmt = path.suffix.removeprefix(".")
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        if fmt == "png":
            _write_png(fig, tmp)
        else:
            with rc_context({"svg.hashsalt": "spo-align"}):  # stable element ids, no date: the same bytes each time
                fig.savefig(tmp, format=fmt, metadata={"Date": None})
        os.replace(tmp, path)
    return paths


def _write_png(fig: Any, path: Path) -> None:
    """An 8-bit palette PNG: a third of the size of matplotlib's RGBA one, the lines indistinguishable."""
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256).save(path, format="PNG", optimize=True)


def _default_seed(path: Path, seed: int | None) -> int:
    return seed if seed is not None else next(iter(experiment_seeds(path)))


def default_out(paths: Sequence[Path], seed: int | None) -> Path:
    """RUN/metrics.png; EXPERIMENT/curves_seed<S>.png; several runs of one folder: FOLDER/curves.png."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1:
        kind = classify(paths[0])
        return paths[0] / ("metrics.png" if kind == "run" else f"curves_seed{_default_seed(paths[0], seed)}.png")
    parents = {p.resolve().parent for p in paths}
    if len(parents) > 1:
        raise PlotError("the runs are in different folders: say where the figure goes with --out")
    return parents.pop() / "curves.png"


def _title(paths: Sequence[Path], seed: int | None) -> str:
    names = []
    for path in map(Path, paths):
        if classify(path) == "experiment":
            names.append(f"{path.resolve().name}, seed {_default_seed(path, seed)}")
        else:
            names.append(path.resolve().name)
    return " | ".join(names)


def plot_runs(
    paths: Sequence[Path],
    out: Path | None = None,
    *,
    seed: int | None = None,
    smooth_window: int = 1,
    svg: bool = False,
    every_curve: bool | None = None,
) -> list[Path]:
    """Draw the runs the paths stand for into one figure; returns the files written.

    `every_curve` (default: when there is one run) adds every other logged metric after the comparison."""
    if out is not None and Path(out).suffix not in FORMATS:
        raise PlotError(f"--out {out}: the figure is written as .png or .svg")
    if smooth_window < 1:
        raise PlotError(f"smoothing window {smooth_window}: must be 1 (off) or more logged points")
    runs = load_runs(paths, seed)
    out = Path(out) if out is not None else default_out(paths, seed)
    every = len(runs) == 1 if every_curve is None else every_curve
    content = build_figure(runs, _title(paths, seed), smooth_window=smooth_window, every_curve=every)
    gaps = gap_report(content.panels)
    if gaps:
        logger.warning("NaN/inf values drawn as gaps: %s", gaps)
    written = save(draw(content), out, svg=svg)
    logger.info("wrote %s (%d runs, %d panels)", ", ".join(map(str, written)), len(runs), len(content.panels))
    return written


def write_experiment_curves(output_dir: Path, seeds: Sequence[int]) -> list[Path]:
    """Each seed's preference runs compared, as OUTPUT_DIR/curves_seed<S>.png and .svg (`spo experiment`).

    A seed whose runs cannot be drawn is logged and skipped: the experiment's other results stand."""
    written: list[Path] = []
    for seed in seeds:
        try:
            written += plot_runs([output_dir], Path(output_dir) / f"curves_seed{seed}.png", seed=seed, svg=True)
        except PlotError as exc:
            logger.warning("seed %d: no training-curve figure: %s", seed, exc)
    return written
