"""Local data files of every kind the docs name, compressed or not, are read as what they are: a `.jsonl.gz` that
exists is read (not "not found"), CSV cells are text (an all-digit answer column is answers, not numbers), and a
file whose kind cannot be told from its name is one line saying which names are read."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
from pathlib import Path

import datasets
import pytest

from spo_align.data.pairs import load_canonical_pairs
from spo_align.data.sources import DataSourceError, load_source
from spo_align.recipe.schema import DatasetSource

ROWS = [
    {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
    {"prompt": "40+2=", "chosen": "42", "rejected": "24"},
    {"prompt": "007", "chosen": "0.50", "rejected": "1e3"},
]
COMPRESS = {"": lambda b: b, ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}


def _jsonl() -> bytes:
    return "".join(json.dumps(row) + "\n" for row in ROWS).encode()


def _json_array() -> bytes:
    return json.dumps(ROWS).encode()


def _csv(delimiter: str = ",") -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["prompt", "chosen", "rejected"], delimiter=delimiter, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(ROWS)
    return out.getvalue().encode()


def _parquet() -> bytes:
    out = io.BytesIO()
    datasets.Dataset.from_list(ROWS).to_parquet(out)
    return out.getvalue()


KINDS = {".jsonl": _jsonl, ".json": _json_array, ".csv": _csv, ".tsv": lambda: _csv("\t"), ".parquet": _parquet}


@pytest.mark.parametrize("compression", sorted(COMPRESS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_is_read_compressed_or_not_with_its_text_kept(tmp_path: Path, kind: str, compression: str):
    path = tmp_path / f"pairs{kind}{compression}"
    path.write_bytes(COMPRESS[compression](KINDS[kind]()))
    ds = load_source(DatasetSource(path=str(path), format="pairs"))
    assert [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in ds] == ROWS
    assert all(str(path) in where for where in ds["_row"])
    pairs = load_canonical_pairs(DatasetSource(path=str(path), format="pairs"))
    assert pairs["chosen"] == ["2", "42", "0.50"]  # text, as written: never 2, 42, 0.5


def test_csv_rows_are_named_by_their_line_even_after_a_quoted_multiline_cell(tmp_path: Path):
    path = tmp_path / "pairs.csv"
    path.write_text('\ufeffprompt,chosen,rejected\n"two\nlines",1,2\nx,3,4\n', encoding="utf-8")  # a BOM, too
    ds = load_source(DatasetSource(path=str(path), format="pairs"))
    assert ds["prompt"] == ["two\nlines", "x"] and ds["chosen"] == ["1", "3"]
    assert ds["_row"] == [f"{path}:2", f"{path}:4"]


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("short.csv", b"prompt,chosen,rejected\nx,1\n", r"short\.csv:2: 2 fields, the header has 3"),
        ("long.csv", b"prompt,chosen,rejected\nx,1,2,3\n", r"long\.csv:2: 4 fields, the header has 3"),
        ("empty.csv", b"", r"empty\.csv: the file is empty"),
        ("latin1.csv", "prompt,chosen,rejected\ncaf\xe9,1,2\n".encode("latin-1"), r"latin1\.csv:2: not UTF-8"),
        ("dup.csv", b"prompt,chosen,chosen\nx,1,2\n", r"dup\.csv:1: column 'chosen' appears twice"),
        ("blank_head.csv", b"prompt,,rejected\nx,1,2\n", r"blank_head\.csv:1: column 2 has no name"),
        ("cut.jsonl.gz", gzip.compress(_jsonl())[:-12], r"cut\.jsonl\.gz: cannot decompress \(gzip\)"),
        ("fake.jsonl.bz2", _jsonl(), r"fake\.jsonl\.bz2: cannot decompress \(bz2\)"),
        ("pairs.jsonl.zst", b"\x28\xb5\x2f\xfd", r"pairs\.jsonl\.zst: zstd-compressed files are not read; decompress"),
        ("pairs.zip", b"PK\x03\x04", r"pairs\.zip: .* a data file is named \.jsonl \(or \.ndjson\), \.json, \.csv, \.tsv or \.parquet"),
        ("pairs.txt", b"hello\n", r"pairs\.txt: .* a data file is named \.jsonl \(or \.ndjson\), \.json, \.csv, \.tsv or \.parquet"),
    ],
)
def test_an_unreadable_file_is_one_located_line(tmp_path: Path, name: str, data: bytes, message: str):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataSourceError, match=message):
        load_source(DatasetSource(path=str(path), format="pairs"))


@pytest.mark.parametrize("name", ["pairs.jsonl.gz", "pairs.csv.xz", "pairs.tsv", "pairs.parquet.bz2", "p.json.gz"])
def test_validate_knows_compressed_and_tab_separated_files_are_local(tmp_path: Path, name: str):
    """Missing, they are "not found" at their line (not taken for a hub id); present, they are valid."""
    from spo_align.recipe.load import validate_files

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stage: preference\nmodel: {name_or_path: org/base}\ndata:\n  train:\n"
        f"    - path: {name}\n      format: pairs\nloss: {{type: dpo}}\ntraining: {{learning_rate: 1.0e-6}}\n"
        "output: {dir: out}\n"
    )
    valid, findings = validate_files([recipe])
    assert valid == 0 and [(f.line, f.key_path) for f in findings] == [(5, "data.train.0.path")]
    assert f"dataset '{name}' not found" in findings[0].message
    (tmp_path / name).write_bytes(b"x")
    assert validate_files([recipe]) == (1, [])


@pytest.mark.parametrize("name", ["pairs.ndjson", "PAIRS.JSONL.GZ", "pairs.NDJSON.xz", "Pairs.Csv.Bz2"])
def test_other_spellings_of_the_same_kinds_are_read(tmp_path: Path, name: str):
    kind = ".csv" if ".csv" in name.lower() else ".jsonl"
    compression = next((c for c in (".gz", ".bz2", ".xz") if name.lower().endswith(c)), "")
    path = tmp_path / name
    path.write_bytes(COMPRESS[compression](KINDS[kind]()))
    assert load_canonical_pairs(DatasetSource(path=str(path), format="pairs"))["chosen"] == ["2", "42", "0.50"]


def test_compressed_prompt_files_are_read_by_spo_eval(tmp_path: Path):
    from spo_align.eval.generate import load_prompts
    from spo_align.eval.records import EvalInputError

    lines = b'{"id": "a", "prompt": "1+1="}\n{"id": "b", "prompt": "2+2=", "reference": "4"}\n'
    plain = tmp_path / "prompts.jsonl"
    plain.write_bytes(lines)
    for suffix, compress in (("gz", gzip.compress), ("bz2", bz2.compress), ("xz", lzma.compress)):
        packed = tmp_path / f"prompts.jsonl.{suffix}"
        packed.write_bytes(compress(lines))
        assert load_prompts(str(packed)) == load_prompts(str(plain))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(lines)[:-10])
    with pytest.raises(EvalInputError, match=r"cut\.jsonl\.gz: cannot decompress \(gzip\)"):
        load_prompts(str(cut))
    missing = tmp_path / "nope.jsonl.gz"
    with pytest.raises(EvalInputError, match=r"nope\.jsonl\.gz: file not found"):  # not taken for a hub dataset
        load_prompts(str(missing))
