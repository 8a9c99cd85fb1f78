"""Local data files by their names: the kind a name says (`.jsonl`, `.json`, `.csv`, `.tsv`, `.parquet`), each
optionally compressed (`.gz`, `.bz2`, `.xz`), decompressed here; CSV and TSV rows read as text.

A CSV holds text: every cell is read as the text it is (an answer column of digits stays "42", a prompt "007"
keeps its zeros, an empty cell is ""), never guessed into numbers that a preference row would refuse. Rows are
named `file:line` (the line where the row starts, so a quoted cell that spans lines does not shift the rest);
a UTF-8 byte-order mark is dropped. A row whose field count differs from the header's, a header with a blank or
repeated name, bytes that are not UTF-8, a file that does not decompress: one line naming the file and line.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import lzma
import zlib
from pathlib import Path
from typing import Any

from spo_align.data.errors import DataSourceError
from spo_align.recipe.paths import COMPRESSION_SUFFIXES, data_file_name, data_file_problem

Rows = list[tuple[str, dict[str, Any]]]
_DECOMPRESS = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}


class DataFileError(DataSourceError):
    """A local data file that cannot be read (the file, and the line where there is one, in the message)."""


def file_kind(path: Path) -> str:
    """The kind of data `path` holds by its name (`.jsonl`, `.json`, `.csv`, `.tsv`, `.parquet`); raises
    `DataFileError` for a name that says no readable kind."""
    problem = data_file_problem(Path(path).name)
    if problem is not None:
        raise DataFileError(f"{path}: {problem}")
    kind = data_file_name(Path(path).name).kind
    assert kind is not None
    return kind


def is_compressed(path: Path) -> bool:
    return data_file_name(Path(path).name).compression in COMPRESSION_SUFFIXES


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when its name ends in .gz, .bz2 or .xz."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        from spo_align.os_errors import reason

        raise DataFileError(f"cannot read {path}: {reason(exc)}") from None
    return decompress(data, Path(path))


def decompress(data: bytes, path: Path) -> bytes:
    """`data` decompressed as the name of `path` says (.gz, .bz2, .xz); as it is otherwise."""
    compression = data_file_name(Path(path).name).compression
    if compression not in _DECOMPRESS:
        return data
    try:
        return _DECOMPRESS[compression](data)
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exc:
        raise DataFileError(
            f"{path}: cannot decompress ({COMPRESSION_SUFFIXES[compression]}): {exc or type(exc).__name__}"
        ) from None


def _text(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataFileError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); re-encode the file as UTF-8"
        ) from None


def _header(header: list[str], path: Path) -> None:
    seen: set[str] = set()
    for index, name in enumerate(header):
        if not name.strip():
            raise DataFileError(f"{path}:1: column {index + 1} has no name in the header")
        if name in seen:
            raise DataFileError(f"{path}:1: column {name!r} appears twice in the header")
        seen.add(name)


def read_csv_rows(path: Path) -> Rows:
    """(`file:line`, row of text cells) for every row of a CSV (`.csv`) or tab-separated (`.tsv`) file."""
    path = Path(path)
    text = _text(read_bytes(path), path)
    if not text.strip():
        raise DataFileError(f"{path}: the file is empty (no header, no rows)")
    delimiter = "\t" if file_kind(path) == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: Rows = []
    try:
        header = next(reader)
        _header(header, path)
        start = reader.line_num + 1
        for record in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not record or (len(record) == 1 and not record[0].strip() and len(header) > 1):
                continue  # a blank line
            if len(record) != len(header):
                raise DataFileError(f"{where}: {len(record)} fields, the header has {len(header)}")
            rows.append((where, dict(zip(header, record))))
    except csv.Error as exc:
        raise DataFileError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
    if not rows:
        raise DataFileError(f"{path}: no rows after the header")
    return rows


def read_compressed_parquet(path: Path) -> Any:
    """A compressed Parquet file (`.parquet.gz`) as a `datasets.Dataset` (plain Parquet is read by `datasets`)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(read_bytes(path)))
    except (pa.ArrowException, OSError) as exc:
        raise DataFileError(f"{path}: not a readable Parquet file ({exc})") from None
    return datasets.Dataset(table)
