"""The experiment file of `spo experiment`: its schema, its loading (errors with file:line), and its plan.

An experiment names an SFT recipe, or a `start` model, and the preference recipes that start from its output
(or from that model), the seeds, and how to evaluate. `load_experiment` reads the file like a recipe (duplicate keys, unknown keys with
did-you-mean, `--set key=value`) and raises `RecipeErrors` with `file:line:col`; `plan_stages` turns it
into the ordered training runs (`StageStep`), every recipe validated, without importing torch.
Running them is `experiment/runner.py`; the tables are `experiment/report.py`; a sweep's values and the keys
the experiment owns are `experiment/sweep.py`.
"""

from __future__ import annotations

import itertools
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from spo_align.experiment.eval_section import EvalSection, GenerationSection, JudgeSection
from spo_align.experiment.sweep import SWEEPABLE, StagePoint, SweepValue, owned_by_experiment, run_label
from spo_align.os_errors import file_in_the_way
from spo_align.recipe.errors import RecipeError, RecipeErrors, did_you_mean
from spo_align.recipe.file_kinds import not_an_experiment
from spo_align.recipe.locate import make_error
from spo_align.recipe.paths import data_file_name, expand_path_keys
from spo_align.recipe.yaml_positions import KeyPath, Positions, dotted, read_yaml_file

STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
START_NAME = "start"
"""The `start` model's label in the tables when an experiment has no SFT stage (reserved as a stage name)."""


# ---------------------------------------------------------------- schema


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


__all__ = ["EvalSection", "GenerationSection", "JudgeSection"]  # the eval section's models, read here as before


class StageSpec(_Section):
    """One training run of the experiment."""

    name: str = Field(description="Name of the run: its folder under seed<S>/ and its label in the tables.")
    recipe: Path = Field(description="Recipe file, relative to the experiment file.")
    set: list[str] = Field(
        default_factory=list,
        description="`key.path=value` overrides for this recipe, applied after `recipe_set` (like `spo train --set`).",
    )
    sweep: dict[str, list[SweepValue]] = Field(
        default_factory=dict,
        description="A small grid, recipe key path -> values, e.g. {loss.beta: [0.05, 0.1, 0.2]}: one run per value "
        "(per combination with several keys), applied after `set`, named <name>_<last key part><value> "
        "(dpo_beta0.05). Every point is tabulated, and the best point of each stage in sweep.md.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not STAGE_NAME.match(value):
            raise ValueError("must start with a letter or digit and use only letters, digits, '.', '_', '+', '-'")
        return value

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, value: dict[str, list[SweepValue]]) -> dict[str, list[SweepValue]]:
        for key, values in value.items():
            if not key or any(not part for part in key.split(".")):
                raise ValueError(f"sweep key {key!r} must be a recipe key path such as loss.beta")
            why = owned_by_experiment(key)
            if why is not None:
                raise ValueError(f"sweep key '{key}' cannot be swept: the experiment owns it ({why}); {SWEEPABLE}")
            if not values:
                raise ValueError(f"sweep '{key}' lists no values")
            if len({run_label(v) for v in values}) != len(values):
                raise ValueError(f"sweep '{key}' repeats a value")
        return value

    @model_validator(mode="after")
    def _point_names(self) -> StageSpec:
        for point in self.points():
            if not STAGE_NAME.match(point.name):
                raise ValueError(
                    f"a sweep value makes the run name {point.name!r}: use values of letters, digits, '.', '_', '+', '-'"
                )
        return self

    def points(self) -> list[StagePoint]:
        """The runs of this stage: itself, or one per point of its sweep (in the order the values are listed)."""
        if not self.sweep:
            return [StagePoint(self.name, self.name)]
        keys = list(self.sweep)
        points = []
        for combination in itertools.product(*(self.sweep[key] for key in keys)):
            swept = tuple(zip(keys, combination))
            name = "_".join([self.name, *(f"{key.split('.')[-1]}{run_label(v)}" for key, v in swept)])
            points.append(StagePoint(name, self.name, swept))
        return points


class Experiment(_Section):
    """A whole experiment file."""

    description: str | None = Field(None, description="What this experiment is for.")
    output_dir: Path = Field(description="Where everything goes (relative to the working directory).")
    seeds: list[int] = Field(min_length=1, description="Each seed trains every stage once (training.seed).")
    sft: StageSpec | None = Field(None, description="The SFT run every preference run starts from (or give `start`).")
    start: str | None = Field(
        None,
        description="Instead of `sft`: the model every preference run starts from, as it is (a hub id or a model "
        "folder); evaluated beside them as 'start'. Offline, e.g. --set start=$(spo packaged-model smollm2-135m-instruct).",
    )
    preference: list[StageSpec] = Field(
        min_length=1, description="Preference runs; each starts from the same seed's SFT output, or from `start`."
    )
    recipe_set: list[str] = Field(
        default_factory=list,
        description="`key.path=value` overrides applied to every recipe (e.g. fewer steps for a quick check).",
    )
    jobs: int = Field(
        1,
        gt=0,
        description="Seeds trained and evaluated at once, each in its own process. On CPU, one per core with "
        "training.cpu_threads 1; on GPU keep 1 unless each job has its own device.",
    )
    eval: EvalSection

    @field_validator("start")
    @classmethod
    def _start(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("start must name a model: a hub id or a model folder")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> Experiment:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        if (self.sft is None) == (self.start is None):
            raise ValueError(
                "give either 'sft' (an SFT run every preference run starts from) or 'start' (a model they start "
                "from as it is), not both" if self.sft is not None else
                "required key 'sft' or 'start' is missing: what the preference runs start from"
            )
        if self.sft is not None and self.sft.sweep:
            raise ValueError("the sft stage takes no sweep: every preference run starts from its one output")
        names = [self.base_name, *(point.name for p in self.preference for point in p.points())]
        if self.start is not None and START_NAME in names[1:]:
            raise ValueError(f"'{START_NAME}' is reserved for the start model in the tables; rename that stage")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"stage names must be distinct; repeated: {', '.join(repeated)}")
        if "generations" in names:
            raise ValueError("'generations' is reserved for the answers folder; rename that stage")
        return self

    @property
    def base_name(self) -> str:
        """What every preference run starts from, as named in the tables: the SFT stage, or 'start'."""
        return self.sft.name if self.sft is not None else START_NAME


@dataclass(frozen=True)
class LoadedExperiment:
    """A valid experiment and where it was read from (recipe and prompt paths are relative to it)."""

    spec: Experiment
    path: Path
    overrides: tuple[str, ...] = ()
    """The `--set` overrides it was read with (a worker process re-reads the file with them)."""

    @property
    def base_dir(self) -> Path:
        return self.path.resolve().parent

    @property
    def output_dir(self) -> Path:
        return Path(self.spec.output_dir).expanduser().resolve()

    def seed_dir(self, seed: int) -> Path:
        return self.output_dir / f"seed{seed}"

    @property
    def stage_names(self) -> list[str]:
        """Every evaluated model's name: the SFT stage (or the start model), then each preference stage's points."""
        return [self.spec.base_name, *(point.name for point in self.points)]

    @property
    def start_model(self) -> str | None:
        """The `start` model as a preference run's model.name_or_path: an existing folder (relative to the
        working directory) made absolute, a hub id as written; None with an SFT stage."""
        start = self.spec.start
        if start is None:
            return None
        return str(Path(start).resolve()) if Path(start).is_dir() else start

    def model_path(self, seed: int, name: str) -> str:
        """Where the evaluated model `name` of `seed` is: its run folder, or the start model."""
        if self.spec.sft is None and name == START_NAME:
            return str(self.start_model)
        return str(self.seed_dir(seed) / name)

    @property
    def points(self) -> list[StagePoint]:
        """Every preference run, sweep points expanded, in file order."""
        return [point for stage in self.spec.preference for point in stage.points()]

    def prompts_source(self) -> str:
        """A local prompt file as an absolute path, else the dataset id as written."""
        local = self.base_dir / self.spec.eval.prompts
        return str(local) if local.is_file() else self.spec.eval.prompts


# ---------------------------------------------------------------- loading (errors with file:line)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _model_at(path: KeyPath) -> type[BaseModel] | None:
    model: type[BaseModel] = Experiment
    for part in path:
        if isinstance(part, int):
            continue
        field_info = model.model_fields.get(part)
        candidates = _models_in(field_info.annotation) if field_info else []
        if not candidates:
            return None
        model = candidates[0]
    return model


def _errors_from(exc: ValidationError, positions: Positions, file: str) -> list[RecipeError]:
    errors = []
    for err in exc.errors(include_url=False):
        path: KeyPath = tuple(p for p in err["loc"] if isinstance(p, (str, int)))
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = _model_at(path[:-1])
            valid = sorted(parent.model_fields) if parent else []
            where = f"in '{dotted(path[:-1])}'" if path[:-1] else "at the top level"
            message = f"unknown key '{path[-1]}' {where}{did_you_mean(str(path[-1]), valid)}; valid keys: {', '.join(valid)}"
        elif err["type"] == "missing":
            message = f"required key '{path[-1]}' is missing"
        elif err["type"] == "literal_error" and isinstance(err.get("input"), str):
            choices = [c.strip(" '") for c in str(err.get("ctx", {}).get("expected", "")).replace(" or ", ",").split(",")]
            message += did_you_mean(err["input"], [c for c in choices if c])
        errors.append(make_error(path, message, positions, file))
    return errors


def _path_keys(data: dict[str, Any]) -> list[KeyPath]:
    """The keys of an experiment that hold paths; `$VAR`, `${VAR}` and `~` in them are expanded when read."""
    keys: list[KeyPath] = [("output_dir",), ("sft", "recipe"), ("start",), ("eval", "prompts"), ("eval", "pairs")]
    preference = data.get("preference")
    if isinstance(preference, list):
        keys += [("preference", index, "recipe") for index in range(len(preference))]
    return keys


def _owned_keys_set(spec: Experiment) -> list[tuple[KeyPath, str]]:
    """A `set` (or `recipe_set`) of a key the experiment sets itself after it, which would be overridden."""
    lists: list[tuple[KeyPath, list[str], bool]] = [(("recipe_set",), spec.recipe_set, False)]
    if spec.sft is not None:
        lists.append((("sft", "set"), spec.sft.set, False))
    lists += [(("preference", i, "set"), stage.set, True) for i, stage in enumerate(spec.preference)]
    findings: list[tuple[KeyPath, str]] = []
    for where, entries, preference in lists:
        for index, entry in enumerate(entries):
            key = entry.partition("=")[0].strip()
            why = owned_by_experiment(key)
            if why is not None and (preference or key.split(".")[0] == "output"):
                findings.append((where + (index,), f"'{entry}' cannot be set: the experiment sets {key} itself ({why})"))
    return findings


def load_experiment(path: Path, overrides: Sequence[str] = ()) -> LoadedExperiment:
    """Read and validate an experiment file; raise `RecipeErrors` with every problem and its line."""
    from spo_align.recipe.load import apply_overrides

    path = Path(path)
    file = str(path)
    data, positions, errors = read_yaml_file(path)
    if errors:
        raise RecipeErrors(errors)
    if not isinstance(data, dict):
        raise RecipeErrors([RecipeError(file, 1, 1, "", "an experiment must be a YAML mapping")])
    recipe = not_an_experiment(data, file)
    if recipe is not None:
        raise RecipeErrors([RecipeError(file, 1, 1, "", recipe)])
    errors = apply_overrides(data, positions, overrides, file)
    errors += [make_error(key, message, positions, file) for key, message in expand_path_keys(data, _path_keys(data))]
    if errors:
        raise RecipeErrors(errors)
    try:
        spec = Experiment.model_validate(data)
    except ValidationError as exc:
        raise RecipeErrors(_errors_from(exc, positions, file)) from None
    loaded = LoadedExperiment(spec, path, tuple(overrides))
    findings: list[tuple[KeyPath, str]] = []
    out = loaded.output_dir
    blocker = out if out.exists() and not out.is_dir() else file_in_the_way(out)
    if blocker is not None:
        findings.append((("output_dir",), f"output_dir cannot be created: {blocker} is a file, not a folder"))
    stages = [(("sft",), spec.sft)] if spec.sft is not None else []
    for key, stage in [*stages, *((("preference", i), p) for i, p in enumerate(spec.preference))]:
        if not (loaded.base_dir / stage.recipe).is_file():
            findings.append((key + ("recipe",), f"recipe file not found: {loaded.base_dir / stage.recipe}"))
    prompts = spec.eval.prompts
    looks_local = data_file_name(prompts).kind in (".jsonl", ".json") or prompts.startswith((".", "/"))
    if looks_local and not (loaded.base_dir / prompts).is_file():
        findings.append((("eval", "prompts"), f"prompt file not found: {loaded.base_dir / prompts}"))
    findings += _owned_keys_set(spec)
    if spec.eval.pairs is not None and not (loaded.base_dir / spec.eval.pairs).is_file():
        findings.append((("eval", "pairs"), f"held-out pair file not found: {loaded.base_dir / spec.eval.pairs}"))
    if spec.eval.accuracy_by is not None and not looks_local:
        findings.append((("eval", "accuracy_by"), "accuracy_by reads a field of a local JSONL prompt file"))
    if findings:
        raise RecipeErrors([make_error(key, message, positions, file) for key, message in findings])
    return loaded


# ---------------------------------------------------------------- the stages


@dataclass(frozen=True)
class StageStep:
    """One training run: which recipe, with which overrides, into which folder."""

    seed: int
    name: str
    recipe_path: Path
    overrides: tuple[str, ...]
    output_dir: Path

    @property
    def command(self) -> str:
        """The equivalent `spo train` command line (what a user would type to run this step alone)."""
        sets = " ".join(f"--set '{o}'" for o in self.overrides)
        return f"spo train {self.recipe_path} {sets}"  # continues an unfinished run of the same recipe


def plan_stages(experiment: LoadedExperiment) -> list[StageStep]:
    """Every training run in order (per seed: SFT, then each preference run, sweep points expanded), each
    recipe validated.

    Raises `RecipeErrors` for a recipe that does not load with its overrides, before anything runs."""
    from spo_align.recipe.load import load_recipe

    spec = experiment.spec
    steps: list[StageStep] = []
    errors: list[RecipeError] = []
    runs = [(spec.sft, StagePoint(spec.sft.name, spec.sft.name))] if spec.sft is not None else []
    runs += [(stage, point) for stage in spec.preference for point in stage.points()]
    for seed in spec.seeds:
        starts_from = str(experiment.seed_dir(seed) / spec.sft.name) if spec.sft is not None else experiment.start_model
        for stage, point in runs:
            out = experiment.seed_dir(seed) / point.name
            # The experiment's seed, then the stage's own keys (a `set` or `sweep` of training.seed wins), then
            # the keys the experiment owns (refused in `set` and `sweep` when the file is read).
            overrides = [*spec.recipe_set, f"training.seed={seed}", *stage.set, *point.overrides, f"output.dir={out}"]
            if stage is not spec.sft:
                overrides.append(f"model.name_or_path={starts_from}")
            recipe_path = (experiment.base_dir / stage.recipe).resolve()
            try:
                recipe = load_recipe(recipe_path, overrides)
            except RecipeErrors as exc:
                errors.extend(exc.errors)
                continue
            if stage is spec.sft and recipe.stage != "sft":
                errors.append(RecipeError(str(recipe_path), None, None, "stage", "the experiment's sft recipe must have stage: sft"))
            if stage is not spec.sft and recipe.stage != "preference":
                errors.append(RecipeError(str(recipe_path), None, None, "stage", f"preference run '{stage.name}' needs stage: preference"))
            steps.append(StageStep(seed, point.name, recipe_path, tuple(overrides), out))
    if errors:
        raise RecipeErrors(list(dict.fromkeys(errors)))  # a recipe's error once, not once per seed and point
    return steps


