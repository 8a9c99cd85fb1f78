"""summary.md: one row per model with what SPO's claim is about, side by side.

For each model (the SFT output or `start` model, then every preference run) and mean over seeds:
- chosen and rejected log pi/pi_ref at the end of training, and the share of training pairs with both below
  the reference (`report.log_ratio_rows`: the last logged steps of metrics.jsonl);
- held-out pairwise accuracy: the share of held-out pairs (`eval.pairs`) whose log-ratio margin against the
  model every run starts from is positive (`eval.pair_scores.pairwise_accuracy`);
- the share of held-out pairs where the model itself gives the chosen answer the higher log-prob;
- held-out greedy answers right by the reference judge's rule (`report.accuracy_rows`, group `all`).
A column without its input (no `eval.pairs`, no reference answers) is left out; a cell that does not apply
(the base model's log-ratios, a reference-free loss's) reads n/a.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spo_align.experiment.report import AccuracyRow, LogRatioRow
    from spo_align.experiment.spec import LoadedExperiment


PAIR_SCORES = "heldout_pairs"
"""seed<S>/heldout_pairs/<model>.json: each model's log-probs of the held-out pairs (eval.pairs)."""


@dataclass(frozen=True)
class SummaryRow:
    model: str
    chosen: float | None = None
    rejected: float | None = None
    both_below_ref: float | None = None
    pairwise_accuracy: float | None = None
    prefers_chosen: float | None = None
    greedy_right: float | None = None


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def pair_accuracies(experiment: LoadedExperiment) -> dict[str, tuple[list[float], list[float]]]:
    """Model -> (pairwise accuracy per seed, prefers-chosen share per seed) from the cached held-out scores."""
    from spo_align.eval.pair_scores import pairwise_accuracy, preference_accuracy, read_pairs, read_scores

    spec = experiment.spec
    if spec.eval.pairs is None:
        return {}
    source = experiment.base_dir / spec.eval.pairs
    n = len(read_pairs(source, spec.eval.n))
    result: dict[str, tuple[list[float], list[float]]] = {}
    for seed in spec.seeds:
        folder = experiment.seed_dir(seed) / PAIR_SCORES
        reference = read_scores(folder / f"{spec.base_name}.json", source, n)
        for name in experiment.stage_names:
            scores = read_scores(folder / f"{name}.json", source, n)
            if scores is None:
                continue
            pairwise, prefers = result.setdefault(name, ([], []))
            prefers.append(preference_accuracy(scores))
            if reference is not None and name != spec.base_name:  # the base model is the reference: margin 0
                pairwise.append(pairwise_accuracy(scores, reference))
    return result


def summary_rows(
    experiment: LoadedExperiment, log_ratios: Sequence[LogRatioRow], accuracy: Sequence[AccuracyRow]
) -> list[SummaryRow]:
    pairs = pair_accuracies(experiment)
    rows = []
    for name in experiment.stage_names:
        mine = [r for r in log_ratios if r.model == name]
        pairwise, prefers = pairs.get(name, ([], []))
        right = [r.accuracy for r in accuracy if r.model == name and r.group == "all"]
        rows.append(SummaryRow(
            name,
            chosen=_mean([r.chosen for r in mine]),
            rejected=_mean([r.rejected for r in mine]),
            both_below_ref=_mean([r.both_below_ref for r in mine]),
            pairwise_accuracy=_mean(pairwise),
            prefers_chosen=_mean(prefers),
            greedy_right=_mean(right),
        ))
    return rows


def _cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def summary_markdown(rows: Sequence[SummaryRow], base: str, seeds: Sequence[int], *, pairs: bool, greedy: bool) -> str:
    columns = [
        ("chosen log-ratio", lambda r: _cell(r.chosen, "+.2f")),
        ("rejected log-ratio", lambda r: _cell(r.rejected, "+.2f")),
        ("both below reference", lambda r: _cell(r.both_below_ref, ".2f")),
    ]
    if pairs:
        columns += [
            ("held-out pairwise accuracy", lambda r: _cell(r.pairwise_accuracy, ".2f")),
            ("held-out prefers chosen", lambda r: _cell(r.prefers_chosen, ".2f")),
        ]
    if greedy:
        columns.append(("held-out greedy right", lambda r: _cell(r.greedy_right, ".2f")))
    lines = [
        f"Per model, mean over {len(seeds)} seed(s). Log-ratios: log pi/pi_ref summed over the answer's tokens on the "
        "training batches at the end of training (mean of the last logged steps); both below reference: the share "
        "of those pairs whose chosen and rejected log-ratios are both below zero."
        + (f" Held-out pairwise accuracy: share of held-out pairs whose log-ratio margin against {base} is "
           "positive; prefers chosen: share where the model gives the chosen answer the higher log-prob."
           if pairs else "")
        + (" Greedy right: share of held-out greedy answers right by the reference judge's rule." if greedy else "")
        + " Fractions are in [0, 1]; n/a where a value does not apply (the starting model's log-ratios and "
        "pairwise accuracy, a reference-free loss's log-ratios).",
        "",
        "| model | " + " | ".join(title for title, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    lines += [f"| **{r.model}** | " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(
    experiment: LoadedExperiment, log_ratios: Sequence[LogRatioRow], accuracy: Sequence[AccuracyRow]
) -> list[Path]:
    spec = experiment.spec
    rows = summary_rows(experiment, log_ratios, accuracy)
    text = summary_markdown(rows, spec.base_name, spec.seeds, pairs=spec.eval.pairs is not None, greedy=bool(accuracy))
    path = experiment.output_dir / "summary.md"
    path.write_text(text, encoding="utf-8")
    return [path]
