"""Read one run's metrics.jsonl into a series per metric, whatever a killed run or a damaged file left in it.

The lines, their values and their steps are parsed by the run folder's one reader (`run_folder.metrics_file`);
this module turns them into curves. A record is a JSON object with a whole-number `step` and numeric fields;
the runner writes NaN and ±inf as the strings "nan", "inf" and "-inf". What cannot be used is skipped and
counted, never fatal:

- the whole record, for a line that is not UTF-8, not JSON (a torn last line), not a JSON object, or
  whose `step` is missing, not a whole number or negative;
- one field, for a value that is null, a boolean, a list, an object or a string other than nan/inf.

NaN and ±inf values are kept, as NaN, so a drawn line breaks there (a gap) instead of silently joining
its neighbours. The closing summary record (`train_runtime`, `train_loss`, ...) is not a curve point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from spo_align.run_folder import metric_lines, metric_value, parse_step

# Bookkeeping fields, never drawn.
NOT_CURVES = frozenset(
    {"step", "epoch", "elapsed_s", "total_flos", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
)
_SHOWN = 5  # skipped lines named in the warning; the rest are counted


@dataclass(frozen=True)
class Series:
    """One metric over training, sorted by step; NaN where the run logged NaN or ±inf."""

    steps: tuple[int, ...]
    values: tuple[float, ...]

    @property
    def gap_steps(self) -> tuple[int, ...]:
        return tuple(s for s, v in zip(self.steps, self.values) if math.isnan(v))


@dataclass(frozen=True)
class Skipped:
    """Something in the file that could not be used: a whole record (`field` None) or one field of it."""

    line: int
    reason: str
    field: str | None = None


@dataclass(frozen=True)
class RunMetrics:
    path: Path
    series: dict[str, Series]
    skipped: tuple[Skipped, ...] = ()

    def warning(self) -> str | None:
        """One line naming the file, how many records and fields were skipped, and where; None if none were."""
        if not self.skipped:
            return None
        records = sum(1 for s in self.skipped if s.field is None)
        fields = len(self.skipped) - records
        where = ", ".join(
            f"line {s.line} " + (f"{s.field!r} ({s.reason})" if s.field is not None else f"({s.reason})")
            for s in self.skipped[:_SHOWN]
        )
        more = len(self.skipped) - _SHOWN
        return (
            f"{self.path}: skipped {records} record(s) and {fields} field(s) holding no usable number: {where}"
            + (f", and {more} more" if more > 0 else "")
        )


def read_metrics_file(path: Path) -> RunMetrics:
    """Every usable point of a metrics.jsonl file, and what was skipped. Raises OSError if it cannot be read."""
    path = Path(path)
    points: dict[str, list[tuple[int, float]]] = {}
    skipped: list[Skipped] = []
    for number, record in metric_lines(path):
        if isinstance(record, str):
            skipped.append(Skipped(number, record))
            continue
        if any(key.startswith("train_") for key in record):
            continue  # the closing summary of the run
        step = parse_step(record)
        if isinstance(step, str):
            skipped.append(Skipped(number, step))
            continue
        for key, value in record.items():
            if key in NOT_CURVES:
                continue
            parsed = metric_value(value)
            if isinstance(parsed, str):
                skipped.append(Skipped(number, parsed, key))
                continue
            points.setdefault(key, []).append((step, parsed))
    series = {}
    for key, pairs in points.items():
        pairs.sort(key=lambda pair: pair[0])  # stable: records of one step keep their order
        series[key] = Series(tuple(s for s, _ in pairs), tuple(v for _, v in pairs))
    return RunMetrics(path, series, tuple(skipped))
