"""The parity task (data/parity): the shipped files are what scripts/make_parity_data.py writes, byte for byte;
train and held-out numbers are disjoint; chosen and rejected differ in one word; the rule judge marks every
held-out chosen answer right and every rejected one wrong."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from spo_align.eval.reference_judge import choice_match

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "data" / "parity"


def _generator():
    spec = importlib.util.spec_from_file_location("make_parity_data", ROOT / "scripts" / "make_parity_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FOLDER / name).read_text(encoding="utf-8").splitlines()]


def _number(row: dict) -> int:
    return int(re.search(r"\d+", row["prompt"][0]["content"] if "chosen" in row else row["prompt"]).group())


def test_regenerating_gives_the_shipped_files_byte_for_byte(tmp_path: Path) -> None:
    written = _generator().write_parity_data(tmp_path)
    assert sorted(p.name for p in written) == ["heldout_pairs.jsonl", "heldout_prompts.jsonl", "pairs_train.jsonl"]
    for path in written:
        assert path.read_bytes() == (FOLDER / path.name).read_bytes(), path.name


def test_sizes_and_disjoint_number_ranges() -> None:
    train, pairs, prompts = _rows("pairs_train.jsonl"), _rows("heldout_pairs.jsonl"), _rows("heldout_prompts.jsonl")
    assert (len(train), len(pairs), len(prompts)) == (320, 100, 100)
    assert not {_number(r) for r in train} & {_number(r) for r in pairs}
    assert [_number(r) for r in pairs] == [_number(r) for r in prompts]
    assert [p["prompt"][0]["content"] for p in pairs] == [p["prompt"] for p in prompts]  # the same questions
    assert sum(r["chosen"].endswith(("even.", "even number.")) for r in train) == 160  # balanced classes


def test_chosen_and_rejected_differ_in_the_parity_word_only() -> None:
    for row in _rows("pairs_train.jsonl") + _rows("heldout_pairs.jsonl"):
        chosen, rejected = row["chosen"].split(), row["rejected"].split()
        differ = [(c, r) for c, r in zip(chosen, rejected) if c != r]
        assert len(chosen) == len(rejected) and len(differ) == 1, row
        assert {differ[0][0].strip("."), differ[0][1].strip(".")} == {"even", "odd"}


def test_the_rule_judges_every_held_out_answer_by_its_number() -> None:
    rule = choice_match(["even", "odd"])
    for pair, prompt in zip(_rows("heldout_pairs.jsonl"), _rows("heldout_prompts.jsonl")):
        assert prompt["reference"] == ("even" if _number(prompt) % 2 == 0 else "odd")
        assert rule(pair["chosen"], prompt["reference"]) and not rule(pair["rejected"], prompt["reference"])
