"""Bad dataset rows through the runner: `spo train` prints one located error line and no traceback; KTO labels
are read strictly; empty prompts are counted by the row policy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app
from spo_align.data.messages import RowFormatError
from tests.data.test_bad_rows import BAD_FILES

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"


@pytest.mark.parametrize("name", ["torn", "latin1", "number", "image_part"])
def test_spo_train_prints_the_located_error_and_no_traceback(name: str, tmp_path: Path, small_model: Path):
    data, message = BAD_FILES[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(data)
    result = CliRunner().invoke(app, [
        "train", str(RECIPES / "spo.yaml"), "--set", f"model.name_or_path={small_model}",
        "--set", f"output.dir={tmp_path / 'out'}", "--set", f"data.train=[{{path: {path}, format: pairs}}]",
    ])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), result.stderr
    assert "Traceback" not in result.output


def test_kto_rows_with_string_labels_train_with_the_right_class(plan_for, tmp_path: Path):
    from spo_align.data.unpaired import load_kto_dataset
    from spo_align.tiny import build_tokenizer

    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1 if i % 2 else i), "label": "true" if i % 2 else "false"}
            for i in range(10)]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = plan_for("kto", f"data.train=[{{path: {path}, format: kto}}]")
    ds, counts = load_kto_dataset(plan, build_tokenizer(), "train")
    assert sorted(ds["label"]) == [False] * 5 + [True] * 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({**r, "label": None if i == 4 else r["label"]}) + "\n" for i, r in enumerate(rows)))
    with pytest.raises(RowFormatError, match=r"bad\.jsonl:5: 'label' is null"):
        load_kto_dataset(plan_for("kto", f"data.train=[{{path: {bad}, format: kto}}]"), build_tokenizer(), "train")


def test_empty_prompts_are_dropped_and_counted_or_refused(plan_for, tmp_path: Path):
    from spo_align.data.pairs import prepare_pairs
    from spo_align.data.policies import RowPolicyError
    from spo_align.tiny import build_tokenizer

    rows = [{"prompt": p, "chosen": "2", "rejected": "3"} for p in ("1+1=", "", "   ", "2+2=")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = plan_for("spo", f"data.train=[{{path: {path}, format: pairs}}]")
    prepared = prepare_pairs(list(plan.recipe.data.train), plan.recipe.data, build_tokenizer(), shuffle=False)
    assert (prepared.counts["total"]["rows_kept"], prepared.counts["total"]["empty_prompt_dropped"]) == (2, 2)
    strict = plan_for("spo", f"data.train=[{{path: {path}, format: pairs}}]", "data.policy.empty_prompt=raise")
    with pytest.raises(RowPolicyError, match=r"pairs\.jsonl:2: empty prompt"):
        prepare_pairs(list(strict.recipe.data.train), strict.recipe.data, build_tokenizer(), shuffle=False)
