"""`spo experiment`: one declarative file for the paper's whole experiment, resumable stage by stage.

An experiment names an SFT recipe (or a `start` model), the preference recipes that start from its output
(each a single run or a small sweep of recipe keys, one run per point), the seeds, and how to evaluate. For
each seed it trains SFT, then every preference run from that seed's SFT output (or from the start model), then generates every model's answers
to the test prompts and judges every pair of models; finally it writes the win-rate matrix (averaged over
seeds) and, where the prompts have reference answers, an accuracy table broken down by a field of the
prompt file (the tiny task's `carry`).

Layout under `output_dir`:

    seed<S>/<stage>/          one training run per stage (the recipe's output.dir is overridden)
    seed<S>/generations/      <model>.jsonl answers (eval.generate)
    seed<S>/judgments.jsonl   pairwise judgments (eval.judge)
    seed<S>/heldout_pairs/    <model>.json log-probs of the held-out pairs (eval.pairs)
    win_rates.{md,csv,png}    the matrix pooled over seeds; win_rates_seed<S>.md per seed
    accuracy.{md,csv}         model x group accuracy, mean over seeds (reference answers only)
    log_ratios.md             end-of-training chosen/rejected log pi/pi_ref per preference run
    summary.md                per model: log-ratios, both below reference, held-out pairwise accuracy and
                              greedy answers right by the rule (experiment/summary.py)
    curves_seed<S>.{png,svg}  training curves of the seed's preference runs overlaid (`spo plot`)
    sweep.md                  every point of each swept stage and the best per stage (when a stage sweeps)
    runs.jsonl                one line per invocation: stages trained/skipped, wall and CPU seconds

Nothing finished is redone: a stage whose folder holds the runner's completion marker and whose recipe is the
same (compared as `spo train` compares it: `run_folder.recipe_changes`) is skipped, an unfinished one resumes
from its last checkpoint, generation files that already answer these prompts with these settings are kept, and
judgments already recorded are not asked for again. A finished stage whose recipe changed, and a preference stage
whose SFT run changed (stale), are refused before anything runs, naming each and the keys that changed, as `spo
train` refuses a finished run; `--rerun-changed` (`rerun_changed=True`) trains them again from the start. A stage
that trains (again) first loses its answers and every judgment involving it, so the tables never mix models.

Python API:

    experiment = load_experiment(Path("experiments/tiny.yaml"), overrides=["seeds=[0]"])
    steps = plan_stages(experiment)           # validates every recipe; no torch
    result = run_experiment(experiment)       # trains, generates, judges, tabulates

The file's schema, loading and plan live in `experiment/spec.py` (torch-free), the tables in
`experiment/report.py`, each stage's state (done, changed, stale) in `experiment/state.py`, the command in
`cli/experiment.py`; this module runs the plan.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spo_align.eval.redact import redact
from spo_align.experiment.spec import JudgeSection, LoadedExperiment, StageStep, load_experiment, plan_stages
from spo_align.experiment.state import (
    ExperimentError,
    check_stages,
    forget_evaluation,
    refusal,
    stage_plan,
    stage_state,
)
from spo_align.run_folder import finished_at

logger = logging.getLogger(__name__)

RUNS_LOG = "runs.jsonl"


class ExperimentStopped(ExperimentError):
    """A stage was stopped on request (SIGTERM) after saving a checkpoint; the same command continues it.
    One message argument, so that it survives the trip back from a worker process."""


def _stopped(step: StageStep, exc: Exception) -> ExperimentStopped:
    checkpoint = getattr(exc, "checkpoint", None)
    if checkpoint is None:  # stopped before this stop's checkpoint was sealed: the stopper's own words
        return ExperimentStopped(f"seed {step.seed} {step.name}: {exc}; continue with the same spo experiment command")
    return ExperimentStopped(
        f"seed {step.seed} {step.name}: stopped on request (SIGTERM) after step {getattr(exc, 'step', '?')}: "
        f"{checkpoint} is saved and the stage is not finished; run the same spo experiment command to continue"
    )


# ---------------------------------------------------------------- the stages


def run_stage(step: StageStep, starts_from: Path | None = None, *, rerun_changed: bool = False) -> tuple[float, float]:
    """Train one stage (resuming an unfinished folder); returns (wall, CPU) seconds, (0, 0) when skipped.

    CPU seconds are this process's (an in-process run's, not a launcher's children): on a busy machine
    they say what the stage would take alone, where wall time does not.

    A finished stage is skipped when its recipe is the same; one whose recipe changed, or that is older than the
    SFT run `starts_from` it should start from, is refused (`ExperimentError`), or trained again from the start
    with `rerun_changed` (its old run deleted, as `spo train --overwrite`)."""
    state = stage_state(step, starts_from)
    if state.name == "done":
        logger.info("seed %d %s: finished run in %s, skipping", step.seed, step.name, step.output_dir)
        return 0.0, 0.0
    if state.name in ("changed", "stale"):
        if not rerun_changed:
            raise ExperimentError(refusal(step, state))
        logger.warning("seed %d %s: the finished run is %s (%s): training it again", step.seed, step.name,
                       state.name, state.why)
    from spo_align.train.launch import LaunchError, launch
    from spo_align.train.preemption import RunStopped

    plan = stage_plan(step)
    started, cpu_started = time.perf_counter(), time.process_time()
    logger.info("seed %d %s: training (%s)", step.seed, step.name, step.command)
    try:  # in-process for one process; DeepSpeed/torchrun recipes go through their launcher
        # An unfinished stage of the same recipe is continued from its last complete checkpoint, as
        # `spo train` run again would; one of another recipe is refused with the keys that differ. A finished
        # one that changed or is stale is replaced (`rerun_changed`).
        launch(plan, step.recipe_path, step.overrides, resume=False, overwrite=state.name in ("changed", "stale"))
    except LaunchError as exc:
        raise ExperimentError(f"seed {step.seed} {step.name}: {exc}") from exc
    except RunStopped as exc:  # its checkpoint is saved: one line and 143, as `spo train` (cli/experiment.py)
        raise _stopped(step, exc) from None
    if finished_at(step.output_dir) is None:
        raise ExperimentError(f"seed {step.seed} {step.name}: the run ended without marking {step.output_dir} finished")
    return time.perf_counter() - started, time.process_time() - cpu_started


# ---------------------------------------------------------------- evaluation


def _judge(section: JudgeSection) -> Any:
    from spo_align.eval.judge_factory import make_judge

    return make_judge(section.type, section.model, base_url=section.base_url, api_key_env=section.api_key_env,
                      match=section.match, choices=tuple(section.choices))


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
    models = [ModelSpec(experiment.model_path(seed, name), name) for name in experiment.stage_names]
    generate(models, prompts, settings, seed_dir / "generations")
    out = seed_dir / "judgments.jsonl"
    summary = judge_all(seed_dir / "generations", judge, out, models=experiment.stage_names,
                        concurrency=spec.eval.judge.concurrency, retry_errors=True)
    if summary.errors:
        logger.warning("seed %d: %d judgments failed and are left out of the tables (a rerun retries them)",
                       seed, summary.errors)
    if spec.eval.pairs is not None:
        from spo_align.eval.pair_scores import score_models
        from spo_align.experiment.summary import PAIR_SCORES

        score_models(models, experiment.base_dir / spec.eval.pairs, spec.eval.n, seed_dir / PAIR_SCORES)
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
    choices = {c.lower() for c in experiment.spec.eval.judge.choices}
    outside = [p for p in prompts if choices and (p.reference or "").strip().lower() not in choices]
    if outside:
        raise ExperimentError(
            f"{experiment.spec.eval.prompts}: prompt {outside[0].id!r} has reference {outside[0].reference!r}, "
            f"not one of eval.judge.choices ({', '.join(experiment.spec.eval.judge.choices)})"
        )
    return prompts, judge


def run_seed(experiment: LoadedExperiment, seed: int, rerun_changed: bool = False) -> SeedResult:
    """One seed's chain: SFT (unless the runs start from `start`), each preference run from it, then its answers
    and judgments."""
    result = SeedResult(seed)
    prompts, judge = _eval_inputs(experiment)
    sft = experiment.spec.sft
    sft_dir = experiment.seed_dir(seed) / sft.name if sft is not None else None
    for step in (s for s in plan_stages(experiment) if s.seed == seed):
        label = f"seed{seed}/{step.name}"
        starts_from = None if step.output_dir == sft_dir else sft_dir
        state = stage_state(step, starts_from)
        if state.name in ("resume", "to run") or (state.trains and rerun_changed):
            forget_evaluation(experiment, seed, step.name)  # before training: a crash leaves no stale answers
        seconds, cpu_seconds = run_stage(step, starts_from, rerun_changed=rerun_changed)
        (result.trained if seconds else result.skipped).append(label)
        result.stage_seconds[label] = round(seconds, 1)
        result.stage_cpu_seconds[label] = round(cpu_seconds, 1)
    evaluate_seed(experiment, seed, prompts, judge)
    return result


def _seed_worker(path: str, overrides: tuple[str, ...], seed: int, log_level: int, rerun_changed: bool) -> SeedResult:
    """Entry point of a worker process (spawned): re-read the experiment, run one seed's chain."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s seed{seed} %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return run_seed(load_experiment(Path(path), overrides), seed, rerun_changed)
    except ExperimentStopped:
        raise
    except Exception as exc:  # noqa: BLE001 - the parent re-raises it; our error types do not all survive pickling
        raise ExperimentError(f"seed {seed}: {type(exc).__name__}: {exc}") from None


def _run_seeds(experiment: LoadedExperiment, rerun_changed: bool) -> list[SeedResult]:
    seeds = experiment.spec.seeds
    jobs = min(experiment.spec.jobs, len(seeds))
    if jobs == 1:
        return [run_seed(experiment, seed, rerun_changed) for seed in seeds]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    logger.info("running %d seeds, %d at a time in worker processes", len(seeds), jobs)
    context = multiprocessing.get_context("spawn")  # no forked torch/tokenizer state
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool, _StopWorkers(pool) as stop:
        futures = [pool.submit(_seed_worker, str(experiment.path), experiment.overrides, s, level, rerun_changed) for s in seeds]
        results, failures = [], []
        for future in futures:  # every worker is waited for: each stage stopped by a SIGTERM saves first
            try:
                results.append(future.result())
            except Exception as exc:  # noqa: BLE001 - re-raised below, the first in seed order
                failures.append(exc)
    if failures:
        stopped = [f for f in failures if isinstance(f, ExperimentStopped)]
        if stop.told:
            detail = "; ".join(str(f) for f in stopped) or f"a worker ended before it could save: {failures[0]}"
            raise ExperimentStopped(detail)
        raise failures[0]
    return results


class _StopWorkers:
    """While the seed workers run, a SIGTERM to this process is passed on to each of them (each stage then saves
    at the end of its step and stops, `train/preemption.py`); a second SIGTERM ends this process at once."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.told = False
        self._previous: Any = None

    def __enter__(self) -> _StopWorkers:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        import signal

        self.told = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        logger.warning("SIGTERM: passing it on to the seed workers; each saves its stage at the end of its step")
        for process in list(getattr(self.pool, "_processes", {}).values()):
            try:
                os.kill(process.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous)


def run_experiment(experiment: LoadedExperiment, *, rerun_changed: bool = False) -> ExperimentResult:
    """Train every stage, then generate, judge and tabulate; resumable at every step.

    A finished stage whose recipe changed, or that starts from an SFT run that changed, is refused before anything
    runs (`ExperimentError` naming each one and the keys), or trained again with `rerun_changed`."""
    started = time.perf_counter()
    spec = experiment.spec
    check_stages(experiment, rerun_changed)  # every recipe checked, and every changed stage named, before any step
    _, judge = _eval_inputs(experiment)
    groups = None
    if spec.eval.accuracy_by is not None:
        from spo_align.experiment.report import read_prompt_groups

        groups = read_prompt_groups(Path(experiment.prompts_source()), spec.eval.accuracy_by)
    experiment.output_dir.mkdir(parents=True, exist_ok=True)
    result = ExperimentResult(experiment.output_dir)
    for seed_result in _run_seeds(experiment, rerun_changed):
        result.trained += seed_result.trained
        result.skipped += seed_result.skipped
        result.stage_seconds.update(seed_result.stage_seconds)
        result.stage_cpu_seconds.update(seed_result.stage_cpu_seconds)
    from spo_align.experiment.report import (
        accuracy_rows,
        log_ratio_rows,
        write_accuracy,
        write_log_ratios,
        write_sweep,
        write_win_rates,
    )
    from spo_align.experiment.summary import write_summary
    from spo_align.plots.compare import write_experiment_curves

    win_rates, result.files = write_win_rates(experiment, judge)
    result.files += write_experiment_curves(experiment.output_dir, spec.seeds)  # beside the win rates, per seed
    rows = accuracy_rows(experiment, groups)
    if rows:
        result.files += write_accuracy(rows, experiment)
    result.files += write_log_ratios(experiment)
    result.files += write_summary(experiment, log_ratio_rows(experiment), rows)
    result.files += write_sweep(experiment, rows, win_rates)
    result.wall_seconds = time.perf_counter() - started
    summary = {
        "experiment": str(experiment.path),
        "overrides": [redact(o) for o in experiment.overrides],  # a judge URL's password stays out
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
