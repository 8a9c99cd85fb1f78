"""Row policies: each rule counted once, truncation keeps the prompt, raise names the row."""

from __future__ import annotations

import datasets
import pytest

from spo_align.data.policies import RowPolicyError, apply_pair_policy
from spo_align.recipe.schema import RowPolicy


def _rows():
    def row(p, c, r, ct="x", rt="y"):
        return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "chosen": ct, "rejected": rt}

    return datasets.Dataset.from_list(
        [
            row([1, 2], [3, 4], [5, 6]),  # fine
            row([1, 2], [3], [4], ct="  "),  # empty chosen text
            row([1, 2], list(range(10, 20)), [5]),  # too long (12 > 8)
            row([1, 2], [7, 8], [7, 8]),  # identical
            row(list(range(9)), [3], [4]),  # prompt alone too long
            row([1, 2], [9, 9, 9, 9, 9, 9, 1], [9, 9, 9, 9, 9, 9, 2]),  # identical once truncated to 6
        ]
    )


def test_default_policy_counts_each_rule():
    kept, counts = apply_pair_policy(_rows(), RowPolicy(), max_length=8)
    assert counts.as_dict() == {
        "rows_in": 6,
        "rows_kept": 2,
        "empty_prompt_dropped": 0,
        "empty_dropped": 1,
        "template_mismatch_dropped": 0,
        "boundary_dropped": 0,
        "boundary_split": 0,
        "too_long_truncated": 2,
        "too_long_dropped": 0,
        "prompt_too_long_dropped": 1,
        "identical_dropped": 2,
    }
    assert kept["chosen_ids"] == [[3, 4], list(range(10, 16))]  # truncated to 8 - 2 prompt tokens
    assert kept["prompt_ids"][1] == [1, 2]


def test_drop_policy():
    _, counts = apply_pair_policy(_rows(), RowPolicy(too_long="drop"), max_length=8)
    assert (counts.too_long_dropped, counts.too_long_truncated, counts.identical_dropped) == (3, 0, 1)
    assert counts.rows_kept == 1


@pytest.mark.parametrize(
    "policy, message",
    [
        (RowPolicy(empty_response="raise"), "row 1: empty response"),
        (RowPolicy(too_long="raise"), "row 2: too long"),
        (RowPolicy(identical_pair="raise"), "row 3: identical pair"),
    ],
)
def test_raise_policy_names_the_row(policy, message):
    with pytest.raises(RowPolicyError, match=message):
        apply_pair_policy(_rows(), policy, max_length=8)


def test_nothing_left_is_an_error():
    ds = datasets.Dataset.from_list([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [2], "chosen": "a", "rejected": "a"}])
    with pytest.raises(RowPolicyError, match="left no pairs out of 1"):
        apply_pair_policy(ds, RowPolicy(), max_length=8)


def _text_rows():
    def row(prompt, boundary="joint", where=None):
        return {
            "prompt": [{"role": "user", "content": prompt}], "prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4],
            "chosen": "a", "rejected": "b", "boundary": boundary, "_row": where,
        }

    return datasets.Dataset.from_list(
        [row("1+1="), row("  ", where="f.jsonl:2"), row("2+2=", "split", "f.jsonl:3"), row("3+3=", "mismatch", "f.jsonl:4")]
    )


def test_empty_prompts_and_token_boundaries_are_counted():
    kept, counts = apply_pair_policy(_text_rows(), RowPolicy(), max_length=8)
    assert (counts.rows_kept, counts.empty_prompt_dropped, counts.boundary_split, counts.template_mismatch_dropped) == (
        2, 1, 1, 1
    )
    _, dropped = apply_pair_policy(_text_rows(), RowPolicy(token_boundary="drop"), max_length=8)
    assert (dropped.rows_kept, dropped.boundary_dropped, dropped.boundary_split) == (1, 1, 0)


@pytest.mark.parametrize(
    "policy, message",
    [
        (RowPolicy(empty_prompt="raise"), r"f.jsonl:2: empty prompt .*data.policy.empty_prompt is 'raise'"),
        (RowPolicy(token_boundary="raise"), r"f.jsonl:3: token boundary .*data.policy.token_boundary is 'raise'"),
    ],
)
def test_raise_names_the_row_where_it_came_from(policy, message):
    with pytest.raises(RowPolicyError, match=message):
        apply_pair_policy(_text_rows(), policy, max_length=8)
