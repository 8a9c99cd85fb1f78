"""metrics.jsonl: one JSON object per logged step (`step`, `epoch`, the values, `elapsed_s`), then the closing
summary (`train_runtime`, `train_loss`, ...). The one reader of the file, for the runner (continuing a run,
the model card, the experiment's tables) and for `spo plot`; torch-free.

The runner writes NaN and ±inf as the strings "nan", "inf" and "-inf". A killed run or a damaged disk can
leave a torn last line, bytes that are not UTF-8, or a line that is not an object: `metric_lines` says which
line is no record and why, and every reader skips such lines rather than fail.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spo_align.run_folder.checkpoints import write_durably

logger = logging.getLogger(__name__)

NON_FINITE_WORDS = frozenset({"nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"})
"""How a non-finite value may be written (the runner writes "nan", "inf", "-inf")."""


def metric_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, record) for every non-blank line of a metrics.jsonl file, or (line number, why the line is
    no record): torn by a killed run, not UTF-8, not JSON, or not a JSON object."""
    for number, raw in enumerate(Path(path).read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield number, "not UTF-8"
            continue
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            yield number, "not JSON: a torn line?"
            continue
        yield number, value if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


def metric_value(value: Any) -> float | str:
    """A logged value as a float (NaN for NaN/±inf, however written), or why it is not a number."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        number = float(value)
        return number if math.isfinite(number) else math.nan
    if isinstance(value, str):
        return math.nan if value.strip().lower() in NON_FINITE_WORDS else f"text {value[:20]!r}"
    if value is None:
        return "null"
    return f"a JSON {type(value).__name__}"


def parse_step(record: dict[str, Any]) -> int | str:
    """The record's `step` as a whole number >= 0, or why it has none."""
    if "step" not in record:
        return "no step"
    step = metric_value(record["step"])
    if isinstance(step, str):
        return f"step is {step}"
    if math.isnan(step) or step != int(step) or step < 0:
        return f"step {record['step']!r} is not a whole number >= 0"
    return int(step)


def record_step(record: dict[str, Any]) -> int | None:
    """The record's `step` as a whole number >= 0, or None when it has none that is."""
    step = parse_step(record)
    return step if isinstance(step, int) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl file. A line that cannot be a record (`metric_lines`) is skipped, and one
    warning names the file and those lines."""
    path = Path(path)
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    skipped: list[int] = []
    for number, record in metric_lines(path):
        if isinstance(record, str):
            skipped.append(number)
        else:
            records.append(record)
    if skipped:
        shown = ", ".join(str(n) for n in skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        logger.warning("%s: skipped %d line(s) that are not metric records (line %s)", path, len(skipped), shown)
    return records


def keep_records_up_to(path: Path, step: int, *, keep_summary: bool = False) -> None:
    """Rewrite metrics.jsonl with the records up to `step` only (and no torn line), so that the file of a run
    continued from checkpoint `step` reads like the file of an uninterrupted run; step 0 deletes it.

    A session that will train on drops the closing summary (train_runtime, ...) of one stopped on request, since
    its own summary closes the run; `keep_summary` keeps it (a run continued at its last step trains no more)."""
    path = Path(path)
    if step > 0 and path.exists():
        kept = [
            r for r in read_metrics(path)
            if (at := record_step(r)) is not None and at <= step and (keep_summary or "train_runtime" not in r)
        ]
        write_durably(path, "".join(json.dumps(r) + "\n" for r in kept))
    elif step == 0 and path.exists():
        path.unlink()
