"""The runs behind the paths given to `spo plot`, each with its curves, its label and what its loss logs.

A path is a run folder (it holds metrics.jsonl) or an experiment folder (it holds seed<S>/ folders, as
`spo experiment` writes them). An experiment folder stands for the preference runs of one seed: every
seed<S>/<stage>/ folder with a metrics.jsonl whose resolved recipe is not an SFT stage (the SFT run they
all start from logs none of the compared metrics, and its longer step count would set the x axis).

Each run is labelled from its resolved_recipe.yaml by its loss and that loss's key parameters
("spo β=0.2 α=1", "dpo β=0.1 ε=0.1", "sft"); two runs with one label get their folder names appended.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo_align.plots.metrics import RunMetrics, read_metrics_file
from spo_align.run_folder import METRICS, RESOLVED_RECIPE

logger = logging.getLogger(__name__)

SEED_FOLDER = re.compile(r"^seed(\d+)$")

class PlotError(ValueError):
    """Nothing to draw: a path that is no run or experiment folder, or a run with no usable records."""


@dataclass(frozen=True)
class LossFacts:
    """What drawing a run needs to know about its loss."""

    reward_scale: float | None
    """The logged `rewards/*` are the log-ratio times this (beta; 2 tau for IPO); None when unknown."""
    terms: tuple[str, ...] = ()
    """The loss's own logged terms, drawn in a panel each."""


def loss_facts(loss: Any) -> LossFacts:
    """Reward scale and logged terms of a recipe's loss section (None: a stage without one, such as SFT)."""
    if loss is None:
        return LossFacts(None)
    from spo_align.losses.registry import logged_terms, reward_scale

    return LossFacts(reward_scale(loss), logged_terms(loss))


def loss_label(stage: str | None, loss: Any) -> str:
    """`spo β=0.2 α=1`, `dpo β=0.1 ε=0.1`, `ipo τ=0.1`, `kto β=0.1` (the catalogue's `loss_label`); the stage name
    for a run without a loss."""
    if loss is None:
        return stage or "run"
    from spo_align.losses.registry import loss_label as catalogue_label

    return catalogue_label(loss)


@dataclass(frozen=True)
class RecipeFacts:
    stage: str | None
    loss: Any
    problem: str | None = None


def read_recipe_facts(folder: Path) -> RecipeFacts:
    """Stage and loss section of the run's resolved recipe; `problem` says why they are unknown."""
    import yaml
    from pydantic import TypeAdapter, ValidationError

    from spo_align.recipe.schema import Loss

    path = Path(folder) / RESOLVED_RECIPE
    if not path.is_file():
        return RecipeFacts(None, None, f"no {RESOLVED_RECIPE}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return RecipeFacts(None, None, f"{path} cannot be read ({type(exc).__name__})")
    if not isinstance(data, dict):
        return RecipeFacts(None, None, f"{path} is not a recipe")
    stage = data.get("stage") if isinstance(data.get("stage"), str) else None
    if data.get("loss") is None:
        return RecipeFacts(stage, None)
    try:
        return RecipeFacts(stage, TypeAdapter(Loss).validate_python(data["loss"]))
    except ValidationError:
        return RecipeFacts(stage, None, f"{path}: its loss section is not valid")


@dataclass(frozen=True)
class Run:
    folder: Path
    label: str
    facts: LossFacts
    metrics: RunMetrics
    kind: str | None = None
    """The loss type, or the stage for a run without a loss (`sft`); None when unknown."""


def experiment_seeds(folder: Path) -> dict[int, Path]:
    """seed -> seed<S>/ folder of an experiment folder (empty for any other folder)."""
    found = {}
    for child in Path(folder).iterdir():
        match = SEED_FOLDER.match(child.name)
        if match and child.is_dir():
            found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def _is_run(folder: Path) -> bool:
    return (folder / METRICS).is_file()


def seed_runs(experiment_dir: Path, seed: int | None = None) -> tuple[int, list[Path]]:
    """The seed (default: the lowest) and its preference run folders, by name."""
    seeds = experiment_seeds(experiment_dir)
    if seed is None:
        seed = next(iter(seeds))
    if seed not in seeds:
        raise PlotError(f"{experiment_dir} has no seed{seed}/; its seeds: {', '.join(map(str, seeds))}")
    folders = sorted(
        child for child in seeds[seed].iterdir()
        if child.is_dir() and _is_run(child) and read_recipe_facts(child).stage != "sft"
    )
    if not folders:
        raise PlotError(f"{seeds[seed]} holds no preference run with a {METRICS} yet")
    return seed, folders


def classify(path: Path) -> str:
    """'run' or 'experiment'; PlotError for anything else."""
    path = Path(path)
    if not path.exists():
        raise PlotError(f"{path} does not exist")
    if path.is_dir() and _is_run(path):
        return "run"
    if path.is_dir() and experiment_seeds(path):
        return "experiment"
    raise PlotError(
        f"{path} is neither a spo train output folder (no {METRICS}) nor a spo experiment folder (no seed<S>/ folders)"
    )


def _read(folder: Path, *, required: bool) -> RunMetrics | None:
    """The run's metrics; a run with no usable point is an error when named, else left out with a warning."""
    path = folder / METRICS
    try:
        metrics = read_metrics_file(path)
    except OSError as exc:
        from spo_align.os_errors import reason

        raise PlotError(f"{path} cannot be read: {reason(exc)}") from None
    warning = metrics.warning()
    if warning:
        logger.warning("%s", warning)
    if not any(series.steps for series in metrics.series.values()):
        if required:
            raise PlotError(f"{folder}: {METRICS} holds no usable metric record")
        logger.warning("%s: %s holds no usable metric record yet; left out", folder, METRICS)
        return None
    return metrics


def _unique_labels(folders: Sequence[Path], labels: Sequence[str]) -> list[str]:
    """Labels made distinct: the folder name appended to shared ones, then its parent's too, then a number."""
    result = list(labels)
    for suffix in (lambda f: f.name, lambda f: f"{f.parent.name}/{f.name}"):
        repeated = {label for label in result if result.count(label) > 1}
        if not repeated:
            return result
        result = [f"{base} ({suffix(f)})" if now in repeated else now for f, base, now in zip(folders, labels, result)]
    seen: dict[str, int] = {}
    numbered = []
    for label in result:
        seen[label] = seen.get(label, 0) + 1
        numbered.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return numbered


def load_runs(paths: Sequence[Path], seed: int | None = None) -> list[Run]:
    """The runs the paths stand for, in order (an experiment folder: its chosen seed's runs, by name)."""
    kinds = [classify(Path(p)) for p in paths]
    if seed is not None and "experiment" not in kinds:
        raise PlotError("--seed picks the runs of an experiment folder, and none of the paths is one")
    found: list[tuple[Path, RunMetrics]] = []
    for path, kind in zip(map(Path, paths), kinds):
        if kind == "run":
            metrics = _read(path, required=True)
            assert metrics is not None
            found.append((path, metrics))
            continue
        _, folders = seed_runs(path, seed)
        found += [(f, m) for f in folders if (m := _read(f, required=False)) is not None]
    if not found:
        raise PlotError(f"no run with usable metric records under {', '.join(map(str, paths))}")
    facts = [read_recipe_facts(folder) for folder, _ in found]
    for (folder, _), fact in zip(found, facts):
        if fact.problem:
            logger.warning("%s: %s: its loss is unknown, so its rewards are not drawn as log-ratios", folder, fact.problem)
    labels = [loss_label(f.stage, f.loss) if not f.problem else folder.name for (folder, _), f in zip(found, facts)]
    labels = _unique_labels([folder for folder, _ in found], labels)
    return [
        Run(folder, label, loss_facts(fact.loss), metrics, fact.loss.type if fact.loss is not None else fact.stage)
        for (folder, metrics), fact, label in zip(found, facts, labels)
    ]
