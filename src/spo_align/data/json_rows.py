"""Local JSON Lines / JSON files read strictly, each row with the place it came from.

`datasets`' own JSON reader infers column types across rows and can coerce them (a number among strings turns a
whole column into numbers) and reports a bad line as a generic "error while generating the dataset". Local files
are read here instead, so that every problem is one line naming the file, the line and what is wrong:
an empty file, bytes that are not UTF-8, a line that is not JSON (a half-written last line says so), a line that
is not a JSON object, or a column whose values change type between rows. Message contents given as lists of
text parts are joined into text here (`spo_align.data.messages.content_text`), so that rows that mix both
conventions still make one table, and a non-text part is refused with its line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spo_align.data.errors import DataSourceError
from spo_align.data.messages import content_text, is_message_list


class JsonRowsError(DataSourceError):
    """A local JSON/JSONL file that cannot be read as rows (file and line in the message)."""


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRowsError(
            f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            "re-encode the file as UTF-8"
        ) from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        kind = _kind(value) or "null"
        raise JsonRowsError(f"{where}: holds {kind}, expected one JSON object per row")
    return value


def _json_lines(path: Path, data: bytes) -> list[tuple[str, dict[str, Any]]]:
    rows: list[tuple[str, dict[str, Any]]] = []
    lines = data.split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        where = f"{path}:{i + 1}"
        text = _decode(raw, where)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if i == last and not data.endswith(b"\n"):
                raise JsonRowsError(
                    f"{where}: the last line is cut off ({exc.msg}, column {exc.colno}): a half-written file? "
                    "Finish or remove that line"
                ) from None
            raise JsonRowsError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        rows.append((where, _object(value, where)))
    return rows


def read_json_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, row object) for every row of a .jsonl file, or of a .json file holding an array of objects
    (a .json file written as JSON Lines is read as such), either compressed or not (`local_files`)."""
    from spo_align.data.local_files import file_kind, read_bytes

    path = Path(path)
    data = read_bytes(path)  # decompressed for .jsonl.gz and the like
    if not data.strip():
        raise JsonRowsError(f"{path}: the file is empty (no rows)")
    if file_kind(path) == ".json":
        text = _decode(data, str(path))
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":
                raise JsonRowsError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            return _json_lines(path, data)
        if isinstance(value, dict):
            return [(f"{path}:1", value)]
        if not isinstance(value, list):
            raise JsonRowsError(f"{path}: holds {_kind(value) or 'null'}, expected an array of row objects")
        return [(f"{path} item {k + 1}", _object(item, f"{path} item {k + 1}")) for k, item in enumerate(value)]
    return _json_lines(path, data)


def check_column_types(rows: list[tuple[str, dict[str, Any]]]) -> None:
    """Refuse a column whose values change type between rows (null goes with anything)."""
    first: dict[str, tuple[str, str]] = {}
    for where, row in rows:
        for key, value in row.items():
            kind = _kind(value)
            if kind is None:
                continue
            seen = first.setdefault(key, (kind, where))
            if seen[0] != kind:
                raise JsonRowsError(
                    f"{where}: column {key!r} holds {kind} here but {seen[0]} at {seen[1]}; "
                    "every row must give a column the same type (e.g. text in every row, or message lists in every row)"
                )


def _is_part_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(p, dict) and "type" in p for p in value)


def join_text_parts(row: dict[str, Any], where: str) -> dict[str, Any]:
    """The row with every message content (and every answer) given as text parts joined into text."""
    out = dict(row)
    for key, value in row.items():
        if is_message_list(value):
            out[key] = [
                {**m, "content": content_text(m["content"], where, f"{key}[{k}].content")}
                if isinstance(m["content"], list) else m
                for k, m in enumerate(value)
            ]
        elif _is_part_list(value):
            out[key] = content_text(value, where, key)
    return out


def rows_to_dataset(rows: list[tuple[str, dict[str, Any]]], path: Path, row_column: str) -> Any:
    """A `datasets.Dataset` of the rows, plus `row_column` holding each row's location."""
    import datasets
    import pyarrow as pa

    rows = [(where, join_text_parts(row, where)) for where, row in rows]
    check_column_types(rows)
    records = [{**row, row_column: where} for where, row in rows]
    try:
        return datasets.Dataset.from_list(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        raise JsonRowsError(f"{path}: the rows cannot be read as one table ({exc}); check that every row has "
                            "the same layout") from None
