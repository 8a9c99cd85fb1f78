"""The tables `spo experiment` ends with: win rates pooled over seeds, and reference accuracy by group.

`write_win_rates` reads each seed's judgments, combines the two orders of every comparison per prompt
(`table.combine_orders`, grouped by seed) and pools the seeds: every cell then counts each prompt once
per seed, so it is the mean of the per-seed win rates and n = prompts x seeds. `accuracy_rows` scores
every generation file by exact match against the reference, per seed and per group of prompts (a field
of the prompt file, such as the tiny task's `carry`), and `accuracy_markdown` averages the seeds.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spo_align.experiment.spec import LoadedExperiment


class PromptGroupError(ValueError):
    """The prompt file lacks the field that `eval.accuracy_by` names."""


@dataclass(frozen=True)
class AccuracyRow:
    model: str
    seed: int
    group: str
    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n


def read_prompt_groups(path: Path, field_name: str) -> dict[str, str]:
    """Prompt id -> group label from one field of a JSONL prompt file (`x`/`no-x` for a boolean field x). A line
    that is no JSON object of UTF-8 text, or has no usable id, is an `EvalInputError` naming it."""
    from spo_align.eval.records import field_id, iter_json_objects

    groups: dict[str, str] = {}
    path = Path(path)
    for number, row in iter_json_objects(path):
        row_id = field_id(row, "id", path, number)
        if field_name not in row:
            raise PromptGroupError(f"{path}:{number}: no field '{field_name}' (eval.accuracy_by)")
        value = row[field_name]
        groups[row_id] = (field_name if value else f"no-{field_name}") if isinstance(value, bool) else str(value)
    return groups


def accuracy_rows(experiment: LoadedExperiment, groups: dict[str, str] | None) -> list[AccuracyRow]:
    """Accuracy of each model, seed and group (and `all`) from the generation files, by the reference judge's
    rule (`eval.judge.match`: exact match, or the one choice named)."""
    from spo_align.eval.records import read_generation_file
    from spo_align.eval.reference_judge import comparison

    judge = experiment.spec.eval.judge
    is_correct, _ = comparison(judge.match, judge.choices)

    rows: list[AccuracyRow] = []
    for seed in experiment.spec.seeds:
        for name in experiment.stage_names:
            records = read_generation_file(experiment.seed_dir(seed) / "generations" / f"{name}.jsonl")
            tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            for record in records:
                if record.reference is None:
                    return []
                right = int(is_correct(record.response, record.reference))
                labels = ["all"] + ([groups[record.prompt_id]] if groups and record.prompt_id in groups else [])
                for label in labels:
                    tally[label][0] += right
                    tally[label][1] += 1
            rows += [AccuracyRow(name, seed, label, c, n) for label, (c, n) in tally.items()]
    return rows


def accuracy_markdown(rows: Sequence[AccuracyRow], models: Sequence[str], seeds: Sequence[int]) -> str:
    """Model x group table of mean accuracy over seeds, with the per-seed range."""
    groups = sorted({r.group for r in rows} - {"all"}) + ["all"]
    by_key: dict[tuple[str, str], list[AccuracyRow]] = defaultdict(list)
    for row in rows:
        by_key[(row.model, row.group)].append(row)
    lines = [
        f"Held-out accuracy (%) by the reference rule, mean over {len(seeds)} seed(s) ({', '.join(map(str, seeds))})"
        + ("; [min, max] over seeds." if len(seeds) > 1 else "."),
        "",
        "| model | " + " | ".join(f"{g} (n={by_key[(models[0], g)][0].n})" for g in groups) + " |",
        "|---" * (len(groups) + 1) + "|",
    ]
    for model in models:
        cells = []
        for group in groups:
            accs = [100 * r.accuracy for r in by_key[(model, group)]]
            cell = f"{statistics.fmean(accs):.1f}"
            if len(accs) > 1:
                cell += f" [{min(accs):.1f}, {max(accs):.1f}]"
            cells.append(cell)
        lines.append(f"| **{model}** | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_accuracy(rows: Sequence[AccuracyRow], experiment: LoadedExperiment) -> list[Path]:
    out = experiment.output_dir
    md = out / "accuracy.md"
    md.write_text(accuracy_markdown(rows, experiment.stage_names, experiment.spec.seeds), encoding="utf-8")
    csv_path = out / "accuracy.csv"
    lines = ["model,seed,group,correct,n,accuracy"]
    lines += [f"{r.model},{r.seed},{r.group},{r.correct},{r.n},{r.accuracy:.6f}" for r in rows]
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [md, csv_path]


def write_win_rates(experiment: LoadedExperiment, judge: Any) -> tuple[Any, list[Path]]:
    """The matrix pooled over seeds (each seed's prompts count once per seed), plus one table per seed."""
    from spo_align.eval.judge_store import read_judgments
    from spo_align.eval.table import (
        combine_orders,
        to_markdown,
        win_rate_table_from_outcomes,
        write_csv,
        write_heatmap,
    )

    spec = experiment.spec
    models = experiment.stage_names
    out = experiment.output_dir
    pooled: list[Any] = []
    incomplete = 0
    written: list[Path] = []
    for seed in spec.seeds:
        records = [
            r for r in read_judgments(experiment.seed_dir(seed) / "judgments.jsonl")
            if r.judge_model == judge.model and r.prompt_version == judge.prompt_version
        ]
        outcomes, missing = combine_orders(records, group=f"seed{seed}")
        pooled += outcomes
        incomplete += missing
        per_seed = win_rate_table_from_outcomes(
            outcomes, models, judge_model=judge.model, prompt_version=judge.prompt_version,
            n_bootstrap=spec.eval.n_bootstrap, incomplete=missing,
        )
        path = out / f"win_rates_seed{seed}.md"
        path.write_text(f"Seed {seed} only.\n\n" + to_markdown(per_seed), encoding="utf-8")
        written.append(path)
    table = win_rate_table_from_outcomes(
        pooled, models, judge_model=judge.model, prompt_version=judge.prompt_version,
        n_bootstrap=spec.eval.n_bootstrap, incomplete=incomplete,
    )
    seeds = ", ".join(map(str, spec.seeds))
    header = (
        f"Averaged over {len(spec.seeds)} seed(s) ({seeds}): each cell pools every seed's prompts, "
        f"so n = prompts x seeds and the cell is the mean of the per-seed win rates.\n\n"
    )
    md = out / "win_rates.md"
    md.write_text(header + to_markdown(table), encoding="utf-8")
    written += [md, write_csv(table, out / "win_rates.csv")]
    title = f"Win rate (%) of row vs column, judge {judge.model}, mean of {len(spec.seeds)} seed(s)"
    written.append(write_heatmap(table, out / "win_rates.png", title=title))
    return table, written


# ---------------------------------------------------------------- what training did to the log-ratios

LAST_LOGS = 5  # the end of a run: mean of the last logged training records, which are noisy one by one


@dataclass(frozen=True)
class LogRatioRow:
    """End-of-training log pi/pi_ref of chosen and rejected answers (summed over tokens) for one run; None
    for a reference-free loss (SimPO), which never computes a reference to compare with."""

    model: str
    seed: int
    chosen: float | None
    rejected: float | None
    both_below_ref: float | None


def reward_scale(loss: Any) -> float | None:
    """What the runner's `rewards/*` are the log-ratio multiplied by (the loss's catalogue entry): beta (SPO,
    DPO, DPOP, KTO), 2 tau (IPO), None for a reference-free loss (SimPO), whose rewards are no log-ratio."""
    from spo_align.losses.registry import reward_scale as scale

    return scale(loss)


def _numbers(record: dict[str, Any], *keys: str) -> bool:
    """True when every key holds a finite number (a damaged or NaN value leaves the record out)."""
    return all(
        isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool) and math.isfinite(record[k])
        for k in keys
    )


def log_ratio_rows(experiment: LoadedExperiment) -> list[LogRatioRow]:
    """Per preference run and seed, from its metrics.jsonl; runs that log no `rewards/chosen` are left out."""
    from spo_align.experiment.spec import plan_stages
    from spo_align.recipe.load import load_recipe
    from spo_align.run_folder import read_metrics

    rows: list[LogRatioRow] = []
    for step in plan_stages(experiment):
        loss = load_recipe(step.recipe_path, step.overrides).loss
        metrics = step.output_dir / "metrics.jsonl"
        if loss is None or not metrics.is_file():
            continue
        last = [r for r in read_metrics(metrics) if _numbers(r, "rewards/chosen", "rewards/rejected")][-LAST_LOGS:]
        if not last:
            continue
        scale = reward_scale(loss)
        below = [r["both_below_ref"] for r in last if _numbers(r, "both_below_ref")]
        if scale is None:  # its rewards are no log-ratio (SimPO): nothing to undo, nothing to report
            rows.append(LogRatioRow(step.name, step.seed, None, None, None))
            continue
        rows.append(
            LogRatioRow(
                step.name,
                step.seed,
                statistics.fmean(r["rewards/chosen"] for r in last) / scale,
                statistics.fmean(r["rewards/rejected"] for r in last) / scale,
                statistics.fmean(below) if below else None,
            )
        )
    return rows


def log_ratio_markdown(rows: Sequence[LogRatioRow], seeds: Sequence[int]) -> str:
    models = list(dict.fromkeys(r.model for r in rows))
    intro = (
        f"Log-ratio log pi/pi_ref (summed over the answer's tokens) on the training batches at the end of "
        f"training (mean of the last {LAST_LOGS} logged steps), mean over {len(seeds)} seed(s). A chosen "
        "log-ratio below zero means the preferred answer became less likely than under the SFT model."
    )
    lines = [
        intro,
        "",
        "| model | chosen | rejected | both below reference (share of pairs) |",
        "|---|---|---|---|",
    ]
    reference_free = False
    for model in models:
        mine = [r for r in rows if r.model == model]
        chosen = [r.chosen for r in mine if r.chosen is not None]
        rejected = [r.rejected for r in mine if r.rejected is not None]
        if not chosen or not rejected:
            reference_free = True
            lines.append(f"| **{model}** | n/a | n/a | n/a (reference-free loss) |")
            continue
        below = [r.both_below_ref for r in mine if r.both_below_ref is not None]
        lines.append(
            f"| **{model}** | {statistics.fmean(chosen):+.2f} | "
            f"{statistics.fmean(rejected):+.2f} | "
            + (f"{statistics.fmean(below):.2f}" if below else "n/a")
            + " |"
        )
    if reference_free:
        lines += [
            "",
            "n/a (reference-free loss): SimPO trains with no reference model, so its run logs no log-ratio; its "
            "rewards are beta x per-token mean log-probs, which are not comparable (docs/losses.md).",
        ]
    return "\n".join(lines) + "\n"


def write_log_ratios(experiment: LoadedExperiment) -> list[Path]:
    rows = log_ratio_rows(experiment)
    if not rows:
        return []
    path = experiment.output_dir / "log_ratios.md"
    path.write_text(log_ratio_markdown(rows, experiment.spec.seeds), encoding="utf-8")
    return [path]


# ---------------------------------------------------------------- sweeps: every point, and the best per stage


def sweep_scores(experiment: LoadedExperiment, rows: Sequence[AccuracyRow], win_rates: Any) -> tuple[dict[str, float], str]:
    """Each preference run's score for picking the best point of a stage, and what the score is.

    With reference answers: held-out exact-match accuracy on all prompts, mean over seeds. Otherwise the
    judge's win rate against the SFT model, pooled over seeds (the win-rate matrix's cell)."""
    names = [point.name for point in experiment.points]
    if rows:
        by_name: dict[str, list[float]] = defaultdict(list)
        for row in rows:
            if row.group == "all":
                by_name[row.model].append(100 * row.accuracy)
        scores = {name: statistics.fmean(by_name[name]) for name in names if by_name.get(name)}
        return scores, f"held-out accuracy on all prompts (%), mean over {len(experiment.spec.seeds)} seed(s)"
    sft = experiment.spec.base_name
    scores = {}
    for name in names:
        cell = win_rates.cell(name, sft) if win_rates is not None else None
        if cell is not None:
            scores[name] = 100 * cell.win_rate
    return scores, f"win rate (%) against {sft}, pooled over {len(experiment.spec.seeds)} seed(s)"


def sweep_markdown(experiment: LoadedExperiment, scores: dict[str, float], criterion: str) -> str:
    """One row per preference stage: every point with its score, and the best point(s) by that score."""
    lines = [
        f"Every point of each preference stage and the best by {criterion}. The best is picked on the same "
        "evaluation it is reported on (there is no separate validation split), so it is an optimistic figure, "
        "equally so for every stage: each gets the same number of points.",
        "",
        "| stage | swept | points | best | best score |",
        "|---|---|---|---|---|",
    ]
    for stage in experiment.spec.preference:
        points = [p for p in stage.points() if p.name in scores]
        if not points:
            continue
        keys = ", ".join(stage.sweep) if stage.sweep else "(no sweep)"
        cells = " · ".join(
            (", ".join(f"{k.split('.')[-1]} {v}" for k, v in p.swept) if p.swept else p.name) + f": {scores[p.name]:.1f}"
            for p in points
        )
        top = max(scores[p.name] for p in points)
        best = [p.name for p in points if abs(scores[p.name] - top) < 1e-9]
        lines.append(f"| **{stage.name}** | {keys} | {cells} | {', '.join(best)} | {top:.1f} |")
    return "\n".join(lines) + "\n"


def write_sweep(experiment: LoadedExperiment, rows: Sequence[AccuracyRow], win_rates: Any) -> list[Path]:
    """sweep.md, when any preference stage sweeps a key."""
    if not any(stage.sweep for stage in experiment.spec.preference):
        return []
    scores, criterion = sweep_scores(experiment, rows, win_rates)
    path = experiment.output_dir / "sweep.md"
    path.write_text(sweep_markdown(experiment, scores, criterion), encoding="utf-8")
    return [path]
