"""The win-rate matrix from a hand-made judgments file equals the hand-computed one (ties half);
intervals are seeded bootstrap percentiles; Markdown, CSV and heatmap are written."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from spo_align.eval.judge_store import JudgmentRecord
from spo_align.eval.records import EvalInputError
from spo_align.eval.table import (
    PairOutcome,
    combine_orders,
    to_markdown,
    win_rate_table,
    win_rate_table_from_outcomes,
    write_csv,
    write_heatmap,
    write_markdown,
)


def _r(prompt: str, a: str, b: str, verdict: str | None, judge: str = "j") -> JudgmentRecord:
    if verdict is None:
        return JudgmentRecord(prompt, a, b, judge, "v1", "error", None, error="HTTP 503")
    return JudgmentRecord(prompt, a, b, judge, "v1", "ok", verdict)  # type: ignore[arg-type]


RECORDS = [
    # a vs b: p1 a both orders; p2 flips with the order -> tie; p3 tie + a -> tie; p4 b both; p5 a both
    _r("p1", "a", "b", "A"), _r("p1", "b", "a", "B"),
    _r("p2", "a", "b", "A"), _r("p2", "b", "a", "A"),
    _r("p3", "a", "b", "C"), _r("p3", "b", "a", "B"),
    _r("p4", "a", "b", "B"), _r("p4", "b", "a", "A"),
    _r("p5", "a", "b", "A"), _r("p5", "b", "a", "B"),
    # a vs c: p1, p2 a; p3 c; p4 one order failed -> left out; p5 tie both orders
    _r("p1", "a", "c", "A"), _r("p1", "c", "a", "B"),
    _r("p2", "c", "a", "B"), _r("p2", "a", "c", "A"),
    _r("p3", "a", "c", "B"), _r("p3", "c", "a", "A"),
    _r("p4", "a", "c", None), _r("p4", "c", "a", "A"),
    _r("p5", "a", "c", "C"), _r("p5", "c", "a", "C"),
    # b vs c: p1 tie; p2 failed first, then judged b on a retry; b in the other order too
    _r("p1", "b", "c", "C"), _r("p1", "c", "b", "C"),
    _r("p2", "b", "c", None), _r("p2", "c", "b", "B"), _r("p2", "b", "c", "A"),
]
# Hand-computed: a-b 2 wins, 2 ties, 1 loss of 5 -> 3/5; a-c 2 wins, 1 tie, 1 loss of 4 -> 2.5/4; b-c 1 win, 1 tie of 2.
EXPECTED = {
    ("a", "b"): (0.6, 5), ("b", "a"): (0.4, 5),
    ("a", "c"): (0.625, 4), ("c", "a"): (0.375, 4),
    ("b", "c"): (0.75, 2), ("c", "b"): (0.25, 2),
}


@pytest.fixture
def judgments(tmp_path: Path) -> Path:
    path = tmp_path / "judgments.jsonl"
    lines = [r.to_json() for r in RECORDS] + [_r("p1", "a", "b", "B", judge="other").to_json()]
    path.write_text("\n".join(lines) + "\n" + RECORDS[0].to_json()[:30])  # truncated tail of a killed run
    return path


def test_matrix_equals_the_hand_computed_one(judgments: Path) -> None:
    with pytest.raises(EvalInputError, match="several judges"):
        win_rate_table(judgments)
    table = win_rate_table(judgments, judge_model="j", models=["a", "b", "c"])
    assert table.models == ("a", "b", "c") and table.incomplete == 1
    assert {k: (round(c.win_rate, 6), c.n) for k, c in table.cells.items()} == EXPECTED
    ab = table.cell("a", "b")
    assert (ab.wins, ab.ties, ab.losses) == (2, 2, 1)
    assert table.cell("a", "a") is None
    assert (table.judge_model, table.prompt_version) == ("j", "v1")


def test_bootstrap_interval_is_seeded_mirrored_and_degenerate_when_unanimous(judgments: Path) -> None:
    one = win_rate_table(judgments, judge_model="j", seed=7, n_bootstrap=500)
    two = win_rate_table(judgments, judge_model="j", seed=7, n_bootstrap=500)
    assert one == two
    for (row, col), c in one.cells.items():
        assert 0 <= c.ci_low <= c.win_rate <= c.ci_high <= 1
        mirror = one.cell(col, row)
        assert mirror.ci_low == pytest.approx(1 - c.ci_high) and mirror.ci_high == pytest.approx(1 - c.ci_low)
    ab = one.cell("a", "b")
    assert ab.ci_low < ab.win_rate < ab.ci_high  # 5 mixed outcomes: a real interval
    unanimous = win_rate_table_from_outcomes([PairOutcome(f"p{i}", "x", "y", "x") for i in range(20)])
    assert (unanimous.cell("x", "y").ci_low, unanimous.cell("x", "y").ci_high) == (1.0, 1.0)


def test_combine_orders_counts_ties_and_missing_orders() -> None:
    outcomes, incomplete = combine_orders(RECORDS, group="seed0")
    by = {(o.prompt_id, o.model_1, o.model_2): o.winner for o in outcomes}
    assert by[("p2", "a", "b")] == "tie" and by[("p3", "a", "b")] == "tie" and by[("p4", "a", "b")] == "b"
    assert by[("p2", "b", "c")] == "b" and ("p4", "a", "c") not in by and incomplete == 1
    assert all(o.group == "seed0" for o in outcomes)
    with pytest.raises(EvalInputError, match="2 judges or prompt versions"):
        combine_orders([*RECORDS, _r("p1", "a", "b", "A", judge="other")])


def test_writers_produce_markdown_csv_and_png(judgments: Path, tmp_path: Path) -> None:
    table = win_rate_table(judgments, judge_model="j", models=["c", "a", "b"])
    text = to_markdown(table)
    assert "| **a** | 62.5 [" in text and "n=4 | – | 60.0 [" in text
    assert "\n| | c | a | b |\n" in text
    write_markdown(table, tmp_path / "t.md")
    assert (tmp_path / "t.md").read_text() == text
    rows = list(csv.DictReader(write_csv(table, tmp_path / "t.csv").open()))
    assert len(rows) == 6
    ac = next(r for r in rows if (r["row_model"], r["col_model"]) == ("a", "c"))
    assert (float(ac["win_rate"]), int(ac["n"]), ac["wins"], ac["ties"], ac["losses"]) == (0.625, 4, "2", "1", "1")
    png = write_heatmap(table, tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bad_inputs_are_errors(judgments: Path, tmp_path: Path) -> None:
    with pytest.raises(EvalInputError, match="no judgments for d"):
        win_rate_table(judgments, judge_model="j", models=["a", "d"])
    with pytest.raises(EvalInputError, match="not found"):
        win_rate_table(tmp_path / "none.jsonl")
    only_errors = tmp_path / "errors.jsonl"
    only_errors.write_text(_r("p1", "a", "b", None).to_json() + "\n")
    with pytest.raises(EvalInputError, match="both orders"):
        win_rate_table(only_errors)
