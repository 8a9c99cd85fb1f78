"""Prompt rows and generation records: the files that pass between `generate` and `judge`.

No torch here: the judge reads generation files without loading a model.

A generation directory holds one JSONL file per model, `<name>.jsonl`, each line a
`GenerationRecord`. A prompt file (input to `generate`) holds one `PromptRow` per line:
`{"id": ..., "prompt": "...", "reference": "..."}` with `reference` optional.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class EvalInputError(ValueError):
    """Bad input to an evaluation step, with the place it was found (`path:line: message`)."""

    def __init__(self, message: str, path: Path | str | None = None, line: int | None = None) -> None:
        self.message = message
        self.path = None if path is None else Path(path)
        self.line = line
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class PromptRow:
    """One test prompt. `reference` is the known answer, if the task has one."""

    id: str
    prompt: str
    reference: str | None = None


@dataclass(frozen=True)
class GenerationRecord:
    """One model's answer to one prompt, with the settings that produced it."""

    model: str
    prompt_id: str
    prompt: str
    response: str
    reference: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["settings"] = dict(self.settings)
        if self.reference is None:
            del data["reference"]
        return json.dumps(data, ensure_ascii=False)


def check_model_name(name: str) -> str:
    """Model names become file names and table labels: letters, digits, `.`, `_`, `+`, `-`."""
    if not MODEL_NAME_RE.match(name):
        raise EvalInputError(
            f"model name {name!r} must start with a letter or digit and use only letters, digits, '.', '_', '+', '-'"
        )
    return name


def json_kind(value: object) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _valid_unicode(text: str, path: Path, line: int, key: str) -> str:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise EvalInputError(f"'{key}' holds an unpaired surrogate escape, which is not valid Unicode", path, line) from None
    return text


def field_id(obj: Mapping[str, Any], key: str, path: Path, line: int) -> str:
    """A required, non-empty identifier: a string, or an integer (read as its decimal text)."""
    if key not in obj:
        raise EvalInputError(f"missing '{key}'", path, line)
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise EvalInputError(f"'{key}' must be a string or an integer, not {json_kind(value)}", path, line)
    text = _valid_unicode(str(value), path, line, key)
    if not text:
        raise EvalInputError(f"'{key}' must not be empty", path, line)
    return text


def field_text(obj: Mapping[str, Any], key: str, path: Path, line: int, *, nonempty: bool = False) -> str:
    """A required string field."""
    if key not in obj:
        raise EvalInputError(f"missing '{key}'", path, line)
    value = obj[key]
    if not isinstance(value, str):
        raise EvalInputError(f"'{key}' must be a string, not {json_kind(value)}", path, line)
    if nonempty and not value:
        raise EvalInputError(f"'{key}' must not be empty", path, line)
    return _valid_unicode(value, path, line, key)


def field_optional_text(obj: Mapping[str, Any], key: str, path: Path, line: int) -> str | None:
    """A string field that may be absent or null (None)."""
    return None if obj.get(key) is None else field_text(obj, key, path, line)


def field_count(obj: Mapping[str, Any], key: str, path: Path, line: int, default: int | None = None,
                nullable: bool = True) -> int | None:
    """A non-negative integer field; absent gives `default`, null gives None when `nullable`."""
    if key not in obj:
        return default
    value = obj[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        shown = json.dumps(value, ensure_ascii=False, default=repr)
        raise EvalInputError(f"'{key}' must be a non-negative integer, got {shown:.40}", path, line)
    return value


def iter_json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each non-blank line of a JSONL file, which must be UTF-8 and hold one JSON object.

    Lines end at a newline only: a raw U+2028 or U+0085 inside a JSON string is text, not a line break."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EvalInputError("file not found", path) from None
    except IsADirectoryError:
        raise EvalInputError("is a directory, not a file", path) from None
    except OSError as exc:
        from spo_align.os_errors import reason

        raise EvalInputError(f"cannot read: {reason(exc)}", path) from None
    from spo_align.data.local_files import DataFileError, decompress

    try:
        data = decompress(data, path)  # a .jsonl.gz (.bz2, .xz) is read as the JSON Lines it holds
    except DataFileError as exc:
        raise EvalInputError(str(exc).removeprefix(f"{path}: "), path) from None
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EvalInputError(f"not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})", path, number) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"not valid JSON ({exc.msg} at column {exc.colno})", path, number) from None
        except RecursionError:
            raise EvalInputError("not valid JSON (nested too deeply)", path, number) from None
        if not isinstance(obj, dict):
            raise EvalInputError(f"each line must be a JSON object, not {json_kind(obj)}", path, number)
        yield number, obj


def _optional_text(value: Any, path: Path, line: int, key: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise EvalInputError(f"'{key}' must be a string or a number", path, line)
    return _valid_unicode(str(value), path, line, key)


def read_prompt_jsonl(path: Path, n: int | None = None) -> list[PromptRow]:
    """Read a prompt file; the first `n` rows when `n` is given. Duplicate ids are an error."""
    rows: list[PromptRow] = []
    seen: dict[str, int] = {}
    for line, obj in iter_json_objects(path):
        row_id = field_id(obj, "id", path, line)
        if not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise EvalInputError("'prompt' must be a non-empty string", path, line)
        prompt = _valid_unicode(obj["prompt"], path, line, "prompt")
        if row_id in seen:
            raise EvalInputError(f"duplicate id {row_id!r} (first on line {seen[row_id]})", path, line)
        seen[row_id] = line
        rows.append(PromptRow(row_id, prompt, _optional_text(obj.get("reference"), path, line, "reference")))
        if n is not None and len(rows) >= n:
            break
    if not rows:
        raise EvalInputError("no prompts", path)
    return rows


def read_generation_file(path: Path) -> list[GenerationRecord]:
    """Read one model's generation file, checking every line has the fields the judge needs.

    Generation files are written whole (temporary file, then rename), so an interrupted run never
    leaves a torn line: every bad line, the last one included, is an error with its line number."""
    records: list[GenerationRecord] = []
    seen: dict[str, int] = {}
    for line, obj in iter_json_objects(path):
        missing = [key for key in ("model", "prompt_id", "prompt", "response") if key not in obj]
        if missing:
            raise EvalInputError(f"missing '{missing[0]}' (is this a generation file?)", path, line)
        prompt_id = field_id(obj, "prompt_id", path, line)
        if prompt_id in seen:
            raise EvalInputError(f"duplicate prompt_id {prompt_id!r} (first on line {seen[prompt_id]})", path, line)
        seen[prompt_id] = line
        settings = obj.get("settings", {})
        if not isinstance(settings, dict):
            raise EvalInputError(f"'settings' must be an object, not {json_kind(settings)}", path, line)
        records.append(
            GenerationRecord(
                model=field_text(obj, "model", path, line),
                prompt_id=prompt_id,
                prompt=field_text(obj, "prompt", path, line),
                response=field_text(obj, "response", path, line),
                reference=_optional_text(obj.get("reference"), path, line, "reference"),
                settings=settings,
            )
        )
    return records


def write_generation_file(path: Path, records: list[GenerationRecord]) -> None:
    """Write atomically (temporary file, then rename), so a half-written file never looks complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(record.to_json() + "\n")
    tmp.replace(path)
