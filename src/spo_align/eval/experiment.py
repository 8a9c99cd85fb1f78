"""`spo experiment`: one declarative file for the paper's whole experiment, resumable stage by stage.

An experiment names an SFT recipe, the preference recipes that start from its output, the seeds, and
how to evaluate. For each seed it trains SFT, then every preference recipe from that seed's SFT
output, then generates every model's answers to the test prompts and judges every pair of models;
finally it writes the win-rate matrix (averaged over seeds) and, where the prompts have reference
answers, an accuracy table broken down by a field of the prompt file (the tiny task's `carry`).

Layout under `output_dir`:

    seed<S>/<stage>/          one training run per stage (the recipe's output.dir is overridden)
    seed<S>/generations/      <model>.jsonl answers (eval.generate)
    seed<S>/judgments.jsonl   pairwise judgments (eval.judge)
    win_rates.{md,csv,png}    the matrix pooled over seeds; win_rates_seed<S>.md per seed
    accuracy.{md,csv}         model x group accuracy, mean over seeds (reference answers only)
    log_ratios.md             end-of-training chosen/rejected log pi/pi_ref per preference run
    curves_seed<S>.{png,svg}  training curves of the seed's preference runs overlaid (`spo plot`)
    runs.jsonl                one line per invocation: stages trained/skipped, wall and CPU seconds

Nothing finished is redone: a stage whose folder holds the runner's completion marker is skipped,
an unfinished one resumes from its last checkpoint, generation files that already answer these
prompts with these settings are kept, and judgments already recorded are not asked for again.

Python API:

    experiment = load_experiment(Path("experiments/tiny.yaml"), overrides=["seeds=[0]"])
    steps = plan_stages(experiment)           # validates every recipe; no torch
    result = run_experiment(experiment)       # trains, generates, judges, tabulates

The file is read like a recipe (duplicate keys, unknown keys with did-you-mean, `--set key=value`)
and errors are `RecipeErrors` with `file:line:col`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spo_align.recipe.errors import RecipeError, RecipeErrors, did_you_mean
from spo_align.recipe.locate import make_error
from spo_align.recipe.yaml_positions import KeyPath, Positions, dotted, read_yaml_file
from spo_align.train.outputs import finished_at

logger = logging.getLogger(__name__)

RUNS_LOG = "runs.jsonl"
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class ExperimentError(ValueError):
    """The experiment cannot go on (a stage failed, a file is inconsistent); the message says where."""


# ---------------------------------------------------------------- schema


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class StageSpec(_Section):
    """One training run of the experiment."""

    name: str = Field(description="Name of the run: its folder under seed<S>/ and its label in the tables.")
    recipe: Path = Field(description="Recipe file, relative to the experiment file.")
    set: list[str] = Field(
        default_factory=list,
        description="`key.path=value` overrides for this recipe, applied after `recipe_set` (like `spo train --set`).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not STAGE_NAME.match(value):
            raise ValueError("must start with a letter or digit and use only letters, digits, '.', '_', '+', '-'")
        return value


class GenerationSection(_Section):
    """How every model answers the test prompts (the seed is the experiment's seed)."""

    max_new_tokens: int = Field(512, gt=0)
    batch_size: int = Field(8, gt=0)
    temperature: float = Field(0.0, ge=0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    engine: Literal["transformers", "vllm"] = Field("transformers", description="vllm only when installed.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto")


class JudgeSection(_Section):
    """Who decides which of two answers is better."""

    type: Literal["reference", "openai"] = Field(
        description="reference: a right answer beats a wrong one, else a tie (needs reference answers; offline). "
        "openai: any OpenAI-compatible chat API."
    )
    model: str | None = Field(None, description="openai: the judge model, e.g. gpt-4o.")
    base_url: str | None = Field(None, description="openai: API base URL for a local or other compatible server.")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key.")
    concurrency: int = Field(8, gt=0, description="openai: judge calls in flight at once.")

    @model_validator(mode="after")
    def _fields_match_type(self) -> JudgeSection:
        if self.type == "openai" and not self.model:
            raise ValueError("judge type 'openai' needs 'model' (e.g. gpt-4o)")
        if self.type == "reference" and (self.model is not None or self.base_url is not None):
            raise ValueError("judge type 'reference' takes no 'model' or 'base_url'")
        return self


class EvalSection(_Section):
    prompts: str = Field(
        description="Test prompts: a JSONL file (id, prompt, optional reference; relative to the experiment "
        "file) or a hub dataset as name:split, e.g. HuggingFaceH4/ultrafeedback_binarized:test_prefs."
    )
    n: int | None = Field(200, gt=0, description="Use the first n prompts; null for all.")
    generation: GenerationSection = Field(default_factory=GenerationSection)
    judge: JudgeSection
    accuracy_by: str | None = Field(
        None,
        description="Field of the JSONL prompt file to break reference accuracy down by (true/false fields "
        "give columns '<field>' and 'no-<field>'). Needs reference answers.",
    )
    n_bootstrap: int = Field(1000, gt=0, description="Bootstrap resamples for the win-rate intervals.")


class Experiment(_Section):
    """A whole experiment file."""

    description: str | None = Field(None, description="What this experiment is for.")
    output_dir: Path = Field(description="Where everything goes (relative to the working directory).")
    seeds: list[int] = Field(min_length=1, description="Each seed trains every stage once (training.seed).")
    sft: StageSpec = Field(description="The SFT run every preference run starts from.")
    preference: list[StageSpec] = Field(
        min_length=1, description="Preference runs; each starts from the same seed's SFT output."
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

    @model_validator(mode="after")
    def _distinct(self) -> Experiment:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        names = [self.sft.name, *(p.name for p in self.preference)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"stage names must be distinct; repeated: {', '.join(repeated)}")
        if "generations" in names:
            raise ValueError("'generations' is reserved for the answers folder; rename that stage")
        return self


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
        return [self.spec.sft.name, *(p.name for p in self.spec.preference)]

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
    errors = apply_overrides(data, positions, overrides, file)
    if errors:
        raise RecipeErrors(errors)
    try:
        spec = Experiment.model_validate(data)
    except ValidationError as exc:
        raise RecipeErrors(_errors_from(exc, positions, file)) from None
    loaded = LoadedExperiment(spec, path, tuple(overrides))
    findings: list[tuple[KeyPath, str]] = []
    for key, stage in [(("sft",), spec.sft), *((("preference", i), p) for i, p in enumerate(spec.preference))]:
        if not (loaded.base_dir / stage.recipe).is_file():
            findings.append((key + ("recipe",), f"recipe file not found: {loaded.base_dir / stage.recipe}"))
    prompts = spec.eval.prompts
    looks_local = prompts.endswith((".jsonl", ".json")) or prompts.startswith((".", "/"))
    if looks_local and not (loaded.base_dir / prompts).is_file():
        findings.append((("eval", "prompts"), f"prompt file not found: {loaded.base_dir / prompts}"))
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
    """Every training run in order (per seed: SFT, then each preference run), each recipe validated.

    Raises `RecipeErrors` for a recipe that does not load with its overrides, before anything runs."""
    from spo_align.recipe.load import load_recipe

    spec = experiment.spec
    steps: list[StageStep] = []
    errors: list[RecipeError] = []
    for seed in spec.seeds:
        sft_dir = experiment.seed_dir(seed) / spec.sft.name
        for stage in [spec.sft, *spec.preference]:
            out = experiment.seed_dir(seed) / stage.name
            overrides = [*spec.recipe_set, *stage.set, f"training.seed={seed}", f"output.dir={out}"]
            if stage is not spec.sft:
                overrides.append(f"model.name_or_path={sft_dir}")
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
            steps.append(StageStep(seed, stage.name, recipe_path, tuple(overrides), out))
    if errors:
        raise RecipeErrors(errors)
    return steps


def _device() -> Literal["cpu", "cuda"]:
    from spo_align.train.model import cuda_available

    return "cuda" if cuda_available() else "cpu"


def run_stage(step: StageStep, starts_from: Path | None = None) -> tuple[float, float]:
    """Train one stage (resuming an unfinished folder); returns (wall, CPU) seconds, (0, 0) when skipped.

    CPU seconds are this process's (an in-process run's, not a launcher's children): on a busy machine
    they say what the stage would take alone, where wall time does not.

    `starts_from` is the SFT folder a preference stage starts from: a finished preference run older than
    that SFT run was trained from a model that no longer exists, and is refused rather than reused."""
    done = finished_at(step.output_dir)
    if done is not None:
        base_done = finished_at(starts_from) if starts_from is not None else None
        if base_done is not None and base_done > done:
            raise ExperimentError(
                f"seed {step.seed} {step.name}: the finished run in {step.output_dir} predates the SFT run it "
                f"should start from ({starts_from}); delete {step.output_dir} to train it again"
            )
        logger.info("seed %d %s: finished run in %s, skipping", step.seed, step.name, step.output_dir)
        return 0.0, 0.0
    from spo_align.recipe.load import load_recipe
    from spo_align.recipe.resolve import resolve
    from spo_align.train.launch import LaunchError, launch

    plan = resolve(load_recipe(step.recipe_path, step.overrides), step.recipe_path, _device())
    started, cpu_started = time.perf_counter(), time.process_time()
    logger.info("seed %d %s: training (%s)", step.seed, step.name, step.command)
    try:  # in-process for one process; DeepSpeed/torchrun recipes go through their launcher
        # An unfinished stage of the same recipe is continued from its last complete checkpoint, as
        # `spo train` run again would; one of another recipe is refused with the keys that differ.
        launch(plan, step.recipe_path, step.overrides, resume=False, overwrite=False)
    except LaunchError as exc:
        raise ExperimentError(f"seed {step.seed} {step.name}: {exc}") from exc
    if finished_at(step.output_dir) is None:
        raise ExperimentError(f"seed {step.seed} {step.name}: the run ended without marking {step.output_dir} finished")
    return time.perf_counter() - started, time.process_time() - cpu_started


# ---------------------------------------------------------------- evaluation


def _judge(section: JudgeSection) -> Any:
    from spo_align.eval.judge_factory import make_judge

    return make_judge(section.type, section.model, base_url=section.base_url, api_key_env=section.api_key_env)


def evaluate_seed(experiment: LoadedExperiment, seed: int, prompts: Sequence[Any], judge: Any) -> Path:
    """Generate every model's answers for one seed and judge every pair; returns the judgments file."""
    from spo_align.eval.generate import GenerationSettings, ModelSpec, generate
    from spo_align.eval.judge import judge_all

    spec = experiment.spec
    g = spec.eval.generation
    settings = GenerationSettings(
        max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, temperature=g.temperature, top_p=g.top_p,
        seed=seed, engine=g.engine, dtype=g.dtype,
    )
    seed_dir = experiment.seed_dir(seed)
    models = [ModelSpec(str(seed_dir / name), name) for name in experiment.stage_names]
    generate(models, prompts, settings, seed_dir / "generations")
    out = seed_dir / "judgments.jsonl"
    summary = judge_all(seed_dir / "generations", judge, out, models=experiment.stage_names,
                        concurrency=spec.eval.judge.concurrency, retry_errors=True)
    if summary.errors:
        logger.warning("seed %d: %d judgments failed and are left out of the tables (a rerun retries them)",
                       seed, summary.errors)
    return out


# ---------------------------------------------------------------- the whole experiment


@dataclass
class SeedResult:
    seed: int
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_cpu_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class ExperimentResult:
    output_dir: Path
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_cpu_seconds: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    wall_seconds: float = 0.0


def _eval_inputs(experiment: LoadedExperiment) -> tuple[list[Any], Any]:
    from spo_align.eval.generate import load_prompts

    prompts = load_prompts(experiment.prompts_source(), experiment.spec.eval.n)
    judge = _judge(experiment.spec.eval.judge)
    if judge.needs_reference and any(p.reference is None for p in prompts):
        raise ExperimentError(f"{experiment.path}: eval.judge 'reference' needs a reference answer for every prompt")
    return prompts, judge


def run_seed(experiment: LoadedExperiment, seed: int) -> SeedResult:
    """One seed's chain: SFT, each preference run from it, then its answers and judgments."""
    result = SeedResult(seed)
    prompts, judge = _eval_inputs(experiment)
    sft_dir = experiment.seed_dir(seed) / experiment.spec.sft.name
    for step in (s for s in plan_stages(experiment) if s.seed == seed):
        label = f"seed{seed}/{step.name}"
        seconds, cpu_seconds = run_stage(step, starts_from=None if step.output_dir == sft_dir else sft_dir)
        (result.trained if seconds else result.skipped).append(label)
        result.stage_seconds[label] = round(seconds, 1)
        result.stage_cpu_seconds[label] = round(cpu_seconds, 1)
    evaluate_seed(experiment, seed, prompts, judge)
    return result


def _seed_worker(path: str, overrides: tuple[str, ...], seed: int, log_level: int) -> SeedResult:
    """Entry point of a worker process (spawned): re-read the experiment, run one seed's chain."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s seed{seed} %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return run_seed(load_experiment(Path(path), overrides), seed)
    except Exception as exc:  # noqa: BLE001 - the parent re-raises it; our error types do not all survive pickling
        raise ExperimentError(f"seed {seed}: {type(exc).__name__}: {exc}") from None


def _run_seeds(experiment: LoadedExperiment) -> list[SeedResult]:
    seeds = experiment.spec.seeds
    jobs = min(experiment.spec.jobs, len(seeds))
    if jobs == 1:
        return [run_seed(experiment, seed) for seed in seeds]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    logger.info("running %d seeds, %d at a time in worker processes", len(seeds), jobs)
    context = multiprocessing.get_context("spawn")  # no forked torch/tokenizer state
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_seed_worker, str(experiment.path), experiment.overrides, s, level) for s in seeds]
        return [future.result() for future in futures]


def run_experiment(experiment: LoadedExperiment) -> ExperimentResult:
    """Train every stage, then generate, judge and tabulate; resumable at every step."""
    started = time.perf_counter()
    spec = experiment.spec
    plan_stages(experiment)  # every recipe checked before the first step runs
    _, judge = _eval_inputs(experiment)
    groups = None
    if spec.eval.accuracy_by is not None:
        from spo_align.eval.experiment_report import read_prompt_groups

        groups = read_prompt_groups(Path(experiment.prompts_source()), spec.eval.accuracy_by)
    experiment.output_dir.mkdir(parents=True, exist_ok=True)
    result = ExperimentResult(experiment.output_dir)
    for seed_result in _run_seeds(experiment):
        result.trained += seed_result.trained
        result.skipped += seed_result.skipped
        result.stage_seconds.update(seed_result.stage_seconds)
        result.stage_cpu_seconds.update(seed_result.stage_cpu_seconds)
    from spo_align.eval.experiment_report import (
        accuracy_rows,
        write_accuracy,
        write_log_ratios,
        write_win_rates,
    )
    from spo_align.plots.compare import write_experiment_curves

    _, result.files = write_win_rates(experiment, judge)
    result.files += write_experiment_curves(experiment.output_dir, spec.seeds)  # beside the win rates, per seed
    rows = accuracy_rows(experiment, groups)
    if rows:
        result.files += write_accuracy(rows, experiment)
    result.files += write_log_ratios(experiment)
    result.wall_seconds = time.perf_counter() - started
    summary = {
        "experiment": str(experiment.path),
        "overrides": list(experiment.overrides),
        "seeds": spec.seeds,
        "jobs": spec.jobs,
        "trained": result.trained,
        "skipped": result.skipped,
        "stage_seconds": result.stage_seconds,
        "stage_cpu_seconds": result.stage_cpu_seconds,
        "wall_seconds": round(result.wall_seconds, 1),
        "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],  # other work slows wall time
    }
    with (experiment.output_dir / RUNS_LOG).open("a", encoding="utf-8") as fh:  # one line per invocation
        fh.write(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **summary}) + "\n")
    logger.info("experiment done in %.0f s: %d stages trained, %d skipped; tables in %s",
                result.wall_seconds, len(result.trained), len(result.skipped), experiment.output_dir)
    return result
