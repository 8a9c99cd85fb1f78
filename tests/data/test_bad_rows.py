"""Bad dataset files and rows: one line naming the file, the row and what is wrong, never a traceback, and no
silently wrong training data (a label read as its opposite, a content list trained on as its Python repr)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from spo_align.data.errors import DataSourceError
from spo_align.data.json_rows import JsonRowsError, read_json_rows
from spo_align.data.messages import RowFormatError, as_messages
from spo_align.data.pairs import load_canonical_pairs
from spo_align.data.sources import load_source
from spo_align.data.unpaired import parse_label
from spo_align.recipe.schema import DatasetSource

GOOD = '{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n'

BAD_FILES = {
    "empty": (b"", r"empty\.jsonl: the file is empty"),
    "blank_lines": (b"\n\n  \n", r"blank_lines\.jsonl: the file is empty"),
    "torn": ((GOOD * 3 + '{"prompt": "1+2=", "cho').encode(), r"torn\.jsonl:4: the last line is cut off"),
    "not_json": ((GOOD + "{prompt: 1}\n" + GOOD).encode(), r"not_json\.jsonl:2: not valid JSON"),
    "latin1": (GOOD.encode() * 2 + '{"prompt": "caf\xe9", "chosen": "2", "rejected": "3"}\n'.encode("latin-1"),
               r"latin1\.jsonl:3: not UTF-8 text \(byte 0xe9"),
    "array": ((GOOD * 2 + '["1+1=", "2", "3"]\n').encode(), r"array\.jsonl:3: holds a list, expected one JSON object"),
    "number": ((GOOD * 3 + '{"prompt": "1+1=", "chosen": 2, "rejected": "3"}\n').encode(),
               r"number\.jsonl:4: column 'chosen' holds a number here but text at .*number\.jsonl:1"),
    "null_chosen": ((GOOD * 2 + '{"prompt": "1+1=", "chosen": null, "rejected": "3"}\n').encode(),
                    r"null_chosen\.jsonl:3: 'chosen' is null, expected text or a message list"),
    "image_part": ((json.dumps({"prompt": [{"role": "user", "content": "1+1="}], "chosen": "2", "rejected": "3"}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": [{"type": "image", "url": "x"}]}],
                                       "chosen": "2", "rejected": "3"}) + "\n").encode(),
                   r"image_part\.jsonl:2: prompt\[0\]\.content\[0\] is a 'image' part; only text parts"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_file_is_one_located_error(name: str, tmp_path: Path):
    data, message = BAD_FILES[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(data)
    with pytest.raises(DataSourceError, match=message):
        load_canonical_pairs(DatasetSource(path=str(path), format="pairs"))


def test_a_json_array_file_names_the_item(tmp_path: Path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([json.loads(GOOD), 7]))
    with pytest.raises(JsonRowsError, match=r"rows\.json item 2: holds a number"):
        read_json_rows(path)
    lines = tmp_path / "lines.json"  # JSON Lines written with a .json suffix
    lines.write_text(GOOD * 2)
    assert [where for where, _ in read_json_rows(lines)] == [f"{lines}:1", f"{lines}:2"]


def test_rows_keep_where_they_came_from_through_shuffling(tmp_path: Path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x"}) for i in range(20)) + "\n")
    ds = load_canonical_pairs(DatasetSource(path=str(path)), shuffle=True, seed=3)
    for row in ds:
        line = int(row["_row"].rsplit(":", 1)[1])
        assert row["prompt"][0]["content"] == f"{line - 1}+1="


def test_text_parts_are_joined_and_other_contents_refused():
    parts = [{"role": "user", "content": [{"type": "text", "text": "1+"}, {"type": "text", "text": "1="}]}]
    assert as_messages(parts, "f:1", "prompt") == [{"role": "user", "content": "1+1="}]
    for content, message in [
        (None, r"f:1: prompt\[0\]\.content is null"),
        (5, r"f:1: prompt\[0\]\.content is a number \(5\)"),
        ([{"type": "text", "text": None}], r"prompt\[0\]\.content\[0\]\.text is null"),
        (["plain"], r"prompt\[0\]\.content\[0\] is text \('plain'\), expected a part"),
    ]:
        with pytest.raises(RowFormatError, match=message):
            as_messages([{"role": "user", "content": content}], "f:1", "prompt")


def test_a_pair_with_parts_trains_on_the_joined_text(tmp_path: Path):
    path = tmp_path / "parts.jsonl"
    row = {
        "prompt": [{"role": "user", "content": [{"type": "text", "text": "12+"}, {"type": "text", "text": "30="}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "42"}]}],
        "rejected": [{"type": "text", "text": "41"}],
    }
    path.write_text(json.dumps(row) + "\n")
    ds = load_canonical_pairs(DatasetSource(path=str(path)))
    assert (ds[0]["prompt"], ds[0]["chosen"], ds[0]["rejected"]) == ([{"role": "user", "content": "12+30="}], "42", "41")


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), (False, False), (1, True), (0, False), (1.0, True), ("true", True), ("False", False),
     (" yes ", True), ("no", False), ("1", True), ("0", False), ("desirable", True), ("undesirable", False)],
)
def test_kto_labels_read_strictly(value, expected):
    assert parse_label(value, "f:3", "label") is expected


@pytest.mark.parametrize("value", [None, 2, -1, 0.5, "maybe", "", [True], {"x": 1}])
def test_other_kto_labels_are_refused_with_their_row(value):
    with pytest.raises(RowFormatError, match=r"f:3: 'label' is .*a KTO label must be true/false"):
        parse_label(value, "f:3", "label")


def test_a_parquet_source_names_its_rows(tmp_path: Path):
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list([json.loads(GOOD), {"prompt": "1+1=", "chosen": None, "rejected": "3"}]).to_parquet(path)
    with pytest.raises(DataSourceError, match=r"pairs\.parquet \[train\] row 1: 'chosen' is null"):
        load_canonical_pairs(DatasetSource(path=str(path)))
    assert load_source(DatasetSource(path=str(path)))["_row"][0].endswith("pairs.parquet [train] row 0")
