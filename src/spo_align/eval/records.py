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


def _iter_json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalInputError("file not found", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalInputError(f"cannot read: {exc}", path) from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"not valid JSON ({exc.msg} at column {exc.colno})", path, number) from None
        if not isinstance(obj, dict):
            raise EvalInputError("each line must be a JSON object", path, number)
        yield number, obj


def _id_value(value: Any, path: Path, line: int, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise EvalInputError(f"'{key}' must be a string or an integer", path, line)
    text = str(value)
    if not text:
        raise EvalInputError(f"'{key}' must not be empty", path, line)
    return text


def _optional_text(value: Any, path: Path, line: int, key: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise EvalInputError(f"'{key}' must be a string or a number", path, line)
    return str(value)


def read_prompt_jsonl(path: Path, n: int | None = None) -> list[PromptRow]:
    """Read a prompt file; the first `n` rows when `n` is given. Duplicate ids are an error."""
    rows: list[PromptRow] = []
    seen: dict[str, int] = {}
    for line, obj in _iter_json_objects(path):
        if "id" not in obj:
            raise EvalInputError("missing 'id'", path, line)
        if not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise EvalInputError("'prompt' must be a non-empty string", path, line)
        row_id = _id_value(obj["id"], path, line, "id")
        if row_id in seen:
            raise EvalInputError(f"duplicate id {row_id!r} (first on line {seen[row_id]})", path, line)
        seen[row_id] = line
        rows.append(PromptRow(row_id, obj["prompt"], _optional_text(obj.get("reference"), path, line, "reference")))
        if n is not None and len(rows) >= n:
            break
    if not rows:
        raise EvalInputError("no prompts", path)
    return rows


def read_generation_file(path: Path) -> list[GenerationRecord]:
    """Read one model's generation file, checking every line has the fields the judge needs."""
    records: list[GenerationRecord] = []
    seen: set[str] = set()
    for line, obj in _iter_json_objects(path):
        for key in ("model", "prompt_id", "prompt", "response"):
            if key not in obj:
                raise EvalInputError(f"missing '{key}' (is this a generation file?)", path, line)
        if not all(isinstance(obj[k], str) for k in ("model", "prompt", "response")):
            raise EvalInputError("'model', 'prompt' and 'response' must be strings", path, line)
        prompt_id = _id_value(obj["prompt_id"], path, line, "prompt_id")
        if prompt_id in seen:
            raise EvalInputError(f"duplicate prompt_id {prompt_id!r}", path, line)
        seen.add(prompt_id)
        settings = obj.get("settings", {})
        if not isinstance(settings, dict):
            raise EvalInputError("'settings' must be an object", path, line)
        records.append(
            GenerationRecord(
                model=obj["model"],
                prompt_id=prompt_id,
                prompt=obj["prompt"],
                response=obj["response"],
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
