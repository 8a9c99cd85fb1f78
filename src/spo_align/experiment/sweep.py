"""A stage's sweep: its values, how they name a run and reach the recipe, and the recipe keys a sweep (or a
stage's `set`) cannot change because the experiment sets them itself. Used by `experiment/spec.py`; torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr

SweepScalar = StrictBool | StrictInt | StrictFloat | StrictStr
SweepValue = SweepScalar | list[SweepScalar]

OWNED_KEYS: dict[str, str] = {
    "output.dir": "the experiment puts every run in <output_dir>/seed<S>/<run name>",
    "model.name_or_path": "every preference run starts from its seed's SFT output",
}
"""Recipe keys the experiment sets itself for every preference run, after the stage's `set` and `sweep`: a
`set` or `sweep` of them would be overridden, so it is refused. (`training.seed` is the experiment's seed, but a
stage's `set` or `sweep` of it wins: a sweep of seeds trains at each listed seed.)"""

SWEEPABLE = (
    "a sweep can vary any other recipe key: loss.* (loss.beta, loss.alpha, ...), training.* (training.seed, "
    "training.learning_rate, ...), data.*, model.* but model.name_or_path, reference.*, adapter.*"
)


def run_label(value: SweepValue) -> str:
    """A sweep value as it appears in a run's name: 0.05, 50, 1e-05, true; a list's items joined by '-'."""
    if isinstance(value, list):
        return "-".join(run_label(item) for item in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _yaml_value(value: SweepValue) -> str:
    """A sweep value as a `--set` value that reads back as the same value: JSON, which a `--set` value reads as
    YAML (a number stays that number, 1e-05 included; a string stays a string, quoted, whatever it holds; a
    list stays a list)."""
    return json.dumps(value)


def owned_by_experiment(key: str) -> str | None:
    """Why the experiment owns recipe key `key` (None when it does not)."""
    return next((why for owned, why in OWNED_KEYS.items() if key == owned or key.startswith(owned + ".")), None)


@dataclass(frozen=True)
class StagePoint:
    """One run of a stage: the stage itself, or one point of its sweep."""

    name: str
    """The run's folder under seed<S>/ and its label in the tables (<stage>_<key><value> for a sweep point)."""
    stage: str
    """The stage (`StageSpec.name`) it belongs to."""
    swept: tuple[tuple[str, SweepValue], ...] = ()
    """(recipe key path, value) of each swept key; empty for a stage without a sweep."""

    @property
    def overrides(self) -> tuple[str, ...]:
        return tuple(f"{key}={_yaml_value(value)}" for key, value in self.swept)
