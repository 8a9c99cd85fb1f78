"""The win-rate matrix of the paper: each cell is the row model's win rate against the column model.

Per prompt and pair of models, the two orders of judging combine into one outcome: when both orders
name the same winner (or both say tie) that is the outcome; when they disagree (the verdict flips
with the position, or one order says tie) the outcome is a tie. A prompt counts for a cell only
when both orders were judged `ok`. Win rate = (wins + ties / 2) / judged prompts, with a
percentile bootstrap interval over prompts (seeded, so the same file gives the same table).

Python API:

    table = win_rate_table(Path("judgments.jsonl"))            # or win_rate_table_from_outcomes(...)
    write_markdown(table, Path("win_rates.md")); write_csv(table, ...); write_heatmap(table, ...)
"""

from __future__ import annotations

import csv
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spo_align.eval.judge_store import JudgmentRecord, latest_by_key, read_judgments
from spo_align.eval.records import EvalInputError

TIE = "tie"


@dataclass(frozen=True)
class PairOutcome:
    """One prompt's outcome between `model_1` and `model_2`: a model's name or "tie".

    `group` separates otherwise equal prompt ids, such as the same prompts judged for several seeds."""

    prompt_id: str
    model_1: str
    model_2: str
    winner: str
    group: str = ""


@dataclass(frozen=True)
class Cell:
    row: str
    col: str
    win_rate: float
    ci_low: float
    ci_high: float
    n: int
    wins: int
    ties: int
    losses: int


@dataclass(frozen=True)
class WinRateTable:
    models: tuple[str, ...]
    cells: dict[tuple[str, str], Cell]  # (row, col), off the diagonal; absent when nothing was judged
    judge_model: str
    prompt_version: str
    confidence: float
    n_bootstrap: int
    seed: int
    incomplete: int  # (prompt, pair) with fewer than two ok orders, left out

    def cell(self, row: str, col: str) -> Cell | None:
        return self.cells.get((row, col))


def combine_orders(records: Iterable[JudgmentRecord], group: str = "") -> tuple[list[PairOutcome], int]:
    """One outcome per (prompt, pair) judged ok in both orders, and how many pairs lacked an order.

    `records` must come from one judge model and prompt version (filter them first)."""
    records = list(records)
    judges = sorted({(r.judge_model, r.prompt_version) for r in records})
    if len(judges) > 1:
        raise EvalInputError(f"records from {len(judges)} judges or prompt versions; combine one at a time: {judges}")
    by_pair: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for record in latest_by_key(records).values():
        m1, m2 = sorted((record.model_a, record.model_b))
        slot = by_pair[(record.prompt_id, m1, m2)]
        if record.status == "ok":
            slot.append(record.winner or TIE)
    outcomes, incomplete = [], 0
    for (prompt_id, m1, m2), winners in by_pair.items():
        if len(winners) != 2:
            incomplete += 1
            continue
        winner = winners[0] if winners[0] == winners[1] else TIE
        outcomes.append(PairOutcome(prompt_id, m1, m2, winner, group))
    return outcomes, incomplete


def _bootstrap(scores: np.ndarray, n_bootstrap: int, confidence: float, seed: int, salt: str) -> tuple[float, float]:
    rng = np.random.default_rng([seed, zlib.crc32(salt.encode())])
    means = rng.choice(scores, size=(n_bootstrap, scores.size), replace=True).mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def win_rate_table_from_outcomes(
    outcomes: Sequence[PairOutcome],
    models: Sequence[str] | None = None,
    *,
    judge_model: str = "",
    prompt_version: str = "",
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    incomplete: int = 0,
) -> WinRateTable:
    """The matrix from per-prompt outcomes (for example gathered over several seeds)."""
    if n_bootstrap < 1 or not 0 < confidence < 1:
        raise EvalInputError("n_bootstrap must be >= 1 and confidence in (0, 1)")
    present = sorted({m for o in outcomes for m in (o.model_1, o.model_2)})
    if models is None:
        order = tuple(present)
    else:
        order = tuple(models)
        unknown = [m for m in order if m not in present]
        if unknown:
            raise EvalInputError(f"no judgments for {', '.join(unknown)} (models judged: {', '.join(present)})")
    by_pair: dict[tuple[str, str], list[PairOutcome]] = defaultdict(list)
    for o in outcomes:
        by_pair[(o.model_1, o.model_2)].append(o)
    cells: dict[tuple[str, str], Cell] = {}
    for (m1, m2), items in sorted(by_pair.items()):
        if m1 not in order or m2 not in order:
            continue
        wins = sum(o.winner == m1 for o in items)
        losses = sum(o.winner == m2 for o in items)
        ties = len(items) - wins - losses
        scores = np.array([1.0 if o.winner == m1 else 0.0 if o.winner == m2 else 0.5 for o in items])
        rate = (wins + ties / 2) / len(items)
        low, high = _bootstrap(scores, n_bootstrap, confidence, seed, f"{m1}\x00{m2}")
        cells[(m1, m2)] = Cell(m1, m2, rate, low, high, len(items), wins, ties, losses)
        cells[(m2, m1)] = Cell(m2, m1, 1 - rate, 1 - high, 1 - low, len(items), losses, ties, wins)
    return WinRateTable(order, cells, judge_model, prompt_version, confidence, n_bootstrap, seed, incomplete)


def win_rate_table(
    judgments: Path,
    *,
    models: Sequence[str] | None = None,
    judge_model: str | None = None,
    prompt_version: str | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> WinRateTable:
    """The matrix from a judgments file. A file holding several judges or prompt versions needs
    `judge_model` / `prompt_version` to say which one to tabulate."""
    records = read_judgments(Path(judgments))
    if judge_model is not None:
        records = [r for r in records if r.judge_model == judge_model]
    if prompt_version is not None:
        records = [r for r in records if r.prompt_version == prompt_version]
    judges = sorted({(r.judge_model, r.prompt_version) for r in records})
    if not judges:
        raise EvalInputError("no judgments" + (" for the chosen judge/prompt version" if judge_model or prompt_version else ""), judgments)
    if len(judges) > 1:
        listed = ", ".join(f"{j} ({v})" for j, v in judges)
        raise EvalInputError(f"judgments from several judges or prompt versions: {listed}; choose one", judgments)
    outcomes, incomplete = combine_orders(records)
    if not outcomes:
        raise EvalInputError("no prompt was judged ok in both orders", judgments)
    return win_rate_table_from_outcomes(
        outcomes,
        models,
        judge_model=judges[0][0],
        prompt_version=judges[0][1],
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        seed=seed,
        incomplete=incomplete,
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def to_markdown(table: WinRateTable) -> str:
    level = round(table.confidence * 100)
    lines = [
        (
            "Win rate (%) of the row model against the column model; ties count half. Judge: "
            f"{table.judge_model} ({table.prompt_version}), each prompt judged in both orders."
        ),
        (
            f"[{level}% bootstrap interval over prompts, {table.n_bootstrap} resamples, seed {table.seed}]; "
            "n = prompts judged for the pair."
        ),
    ]
    if table.incomplete:
        lines.append(f"{table.incomplete} (prompt, pair) comparisons lacked an ok judgment in one order and are left out.")
    lines += ["", "| | " + " | ".join(table.models) + " |", "|---" * (len(table.models) + 1) + "|"]
    for row in table.models:
        cells = []
        for col in table.models:
            c = table.cell(row, col)
            if row == col:
                cells.append("–")
            elif c is None:
                cells.append("n/a")
            else:
                cells.append(f"{_pct(c.win_rate)} [{_pct(c.ci_low)}, {_pct(c.ci_high)}] n={c.n}")
        lines.append(f"| **{row}** | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(table: WinRateTable, path: Path) -> Path:
    Path(path).write_text(to_markdown(table), encoding="utf-8")
    return Path(path)


def write_csv(table: WinRateTable, path: Path) -> Path:
    """One row per ordered pair of models (long format), rates as fractions."""
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row_model", "col_model", "win_rate", "ci_low", "ci_high", "n", "wins", "ties", "losses",
                         "judge_model", "prompt_version"])
        for row in table.models:
            for col in table.models:
                c = table.cell(row, col)
                if c is not None:
                    writer.writerow([row, col, f"{c.win_rate:.6f}", f"{c.ci_low:.6f}", f"{c.ci_high:.6f}", c.n,
                                     c.wins, c.ties, c.losses, table.judge_model, table.prompt_version])
    return Path(path)


def write_heatmap(table: WinRateTable, path: Path, title: str | None = None) -> Path:
    """A PNG heatmap of the matrix (Agg canvas; no display or pyplot state needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(table.models)
    grid = np.full((k, k), np.nan)
    for i, row in enumerate(table.models):
        for j, col in enumerate(table.models):
            c = table.cell(row, col)
            if c is not None:
                grid[i, j] = 100 * c.win_rate
    size = 1.2 + 1.1 * k
    fig = Figure(figsize=(size + 1.2, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu", vmin=0, vmax=100)
    for i in range(k):
        for j in range(k):
            c = table.cell(table.models[i], table.models[j])
            if c is not None:
                ax.text(j, i, f"{_pct(c.win_rate)}\n[{_pct(c.ci_low)}, {_pct(c.ci_high)}]", ha="center",
                        va="center", fontsize=8, color="white" if abs(c.win_rate - 0.5) > 0.3 else "black")
    ax.set_xticks(range(k), labels=table.models)
    ax.set_yticks(range(k), labels=table.models)
    ax.set_xlabel("column model")
    ax.set_ylabel("row model")
    ax.set_title(title or f"Win rate (%) of row vs column, judge {table.judge_model}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)
