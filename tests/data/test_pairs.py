"""Preference datasets in their real layouts convert to canonical pairs; bad rows name column and dataset."""

from __future__ import annotations

import json

import datasets
import pytest

from spo_align.data.errors import DataSourceError
from spo_align.data.pairs import (
    PairFormatError,
    convert_pair_row,
    load_canonical_pairs,
    prepare_pairs,
    to_canonical_pairs,
)
from spo_align.data.tokenize import tokenize_pair
from spo_align.recipe.schema import ColumnMap, DataSection, DatasetSource
from spo_align.tiny import build_tokenizer


def _ultrafeedback_rows() -> list[dict]:
    """Rows laid out as HuggingFaceH4/ultrafeedback_binarized really is (train_prefs)."""
    rows = []
    for i, (q, good, bad) in enumerate(
        [("What is 2+2?", "4.", "5."), ("Name a colour.", "Blue.", ""), ("Say hi.", "Hi!", "Hello there!")]
    ):
        rows.append(
            {
                "prompt": q,
                "prompt_id": f"id{i}",
                "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
                "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}],
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
                "score_chosen": 8.0,
                "score_rejected": 3.0,
            }
        )
    return rows


def test_ultrafeedback_layout_converts():
    ds = datasets.Dataset.from_list(_ultrafeedback_rows())
    out = to_canonical_pairs(ds, DatasetSource(path="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs"))
    assert out.column_names == ["prompt", "chosen", "rejected"]
    assert out[0] == {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": "4.", "rejected": "5."}
    assert out[1]["rejected"] == ""  # empty answers are left for the row policy to count


def test_ultrafeedback_with_system_turn_keeps_it():
    row = convert_pair_row(
        "Q?",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "B"}],
        "here",
    )
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]


def test_string_pairs_and_message_list_pairs_convert():
    assert convert_pair_row("1+1=", "2", "3", "x") == {
        "prompt": [{"role": "user", "content": "1+1="}],
        "chosen": "2",
        "rejected": "3",
    }
    prompt = [{"role": "user", "content": "1+1="}]
    row = convert_pair_row(prompt, [{"role": "assistant", "content": "2"}], [{"role": "assistant", "content": "3"}], "x")
    assert row == {"prompt": prompt, "chosen": "2", "rejected": "3"}


def test_inconsistent_conversations_are_refused():
    with pytest.raises(PairFormatError, match="different conversations"):
        convert_pair_row(
            "Q",
            [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            [{"role": "user", "content": "other"}, {"role": "assistant", "content": "B"}],
            "ds, row 3",
        )
    with pytest.raises(PairFormatError, match="not the last user turn"):
        convert_pair_row("Z", [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "B", "x")
    with pytest.raises(PairFormatError, match="does not end with an assistant"):
        convert_pair_row("Q", [{"role": "user", "content": "Q"}], "B", "x")


def test_column_map_and_missing_column_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"question": "1+1=", "good": "2", "bad": "3"}) for _ in range(3)))
    mapped = DatasetSource(path=str(path), columns=ColumnMap(prompt="question", chosen="good", rejected="bad"))
    ds = load_canonical_pairs(mapped)
    first = ds[0]
    assert first.pop("_row") == f"{path}:1"  # where the row came from, for error messages
    assert first == {"prompt": [{"role": "user", "content": "1+1="}], "chosen": "2", "rejected": "3"}

    unmapped = DatasetSource(path=str(path))
    with pytest.raises(DataSourceError, match=r"missing column 'chosen'.*columns.chosen") as err:
        load_canonical_pairs(unmapped)
    assert str(path) in str(err.value)


def test_sources_convert_before_concatenation(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"q": "1+1=", "c": "2", "r": "3"}))
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps(_ultrafeedback_rows()[0]))
    sources = [
        DatasetSource(path=str(a), columns=ColumnMap(prompt="q", chosen="c", rejected="r")),
        DatasetSource(path=str(b), format="ultrafeedback"),
    ]
    tokenizer = build_tokenizer()
    pairs = prepare_pairs(sources, DataSection(train=sources), tokenizer, shuffle=False)
    assert len(pairs.dataset) == 2 and list(pairs.counts["by_source"]) == [f"{a} [train]", f"{b} [train]"]
    assert tokenizer.decode(pairs.dataset[1]["chosen_ids"]).startswith("4.")


def test_kto_format_is_not_a_pair_format():
    ds = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(PairFormatError, match="not a preference-pair format"):
        to_canonical_pairs(ds, DatasetSource(path="x", format="kto"))


def test_tokenization_is_prefix_consistent():
    tok = build_tokenizer()
    pair = tokenize_pair(tok, [{"role": "user", "content": "23+58="}], "81", "71")
    full = tok.apply_chat_template(
        [{"role": "user", "content": "23+58="}, {"role": "assistant", "content": "81"}], tokenize=True, return_dict=False
    )
    assert pair.prompt_ids + pair.chosen_ids == list(full)
    assert tok.decode(pair.chosen_ids) == "81<|end|>"
    assert tok.decode(pair.prompt_ids).endswith("<|assistant|>")


def test_template_that_is_not_prefix_consistent_is_dropped_and_counted_or_refused():
    from spo_align.data.policies import RowPolicyError, apply_pair_policy
    from spo_align.data.tokenize import tokenize_pairs
    from spo_align.recipe.schema import RowPolicy

    tok = build_tokenizer()
    # A template that renders the generation prompt differently from the assistant turn.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant>' }}{% endif %}"
    )
    assert tokenize_pair(tok, [{"role": "user", "content": "1+1="}], "2", "3").boundary == "mismatch"
    rows = [{"prompt": [{"role": "user", "content": "1+1="}], "chosen": "2", "rejected": "3", "_row": "f.jsonl:7"}]
    tokenized = tokenize_pairs(datasets.Dataset.from_list(rows), tok)
    with pytest.raises(RowPolicyError, match=r"left no pairs out of 1: .*'template_mismatch_dropped': 1"):
        apply_pair_policy(tokenized, RowPolicy(), max_length=64)
    with pytest.raises(RowPolicyError, match=r"f.jsonl:7: template mismatch .*token_boundary is 'raise'"):
        apply_pair_policy(tokenized, RowPolicy(token_boundary="raise"), max_length=64)
