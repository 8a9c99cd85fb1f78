"""The judgments file: one JSON line per judgment, appended and fsynced as each one arrives.

A judgment is keyed by (prompt id, model shown as A, model shown as B, judge model, prompt
version); the pair of models and the order are both in (model_a, model_b). A rerun reads the file
and skips keys that already hold an `ok` judgment. A run killed mid-write leaves a truncated last
line (possibly cut inside a UTF-8 character): reading ignores it with a warning, and opening the
store for appending cuts it off first, so the file stays valid JSONL. A bad line anywhere else (not
UTF-8, not JSON, a field missing, null or of the wrong type) is corruption: an `EvalInputError`
naming the file, the line and the field.

A record's `reply` holds at most MAX_STORED_REPLY_CHARS characters and its `error` at most
MAX_ERROR_CHARS, both redacted of API keys before they are cut (see `judge._record`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from spo_align.eval.judge_parse import Verdict
from spo_align.eval.records import (
    EvalInputError,
    field_count,
    field_id,
    field_optional_text,
    field_text,
    json_kind,
)

logger = logging.getLogger(__name__)

MAX_STORED_REPLY_CHARS = 8000  # about 2,000 tokens: any judge reply written to the prompt's format
MAX_ERROR_CHARS = 300  # one line

Status = Literal["ok", "error"]
Source = Literal["judge", "identical"]


class JudgmentKey(NamedTuple):
    prompt_id: str
    model_a: str
    model_b: str
    judge_model: str
    prompt_version: str


@dataclass(frozen=True)
class JudgmentRecord:
    """One comparison in one order. `verdict` is None exactly when `status == "error"`.

    `source == "identical"` marks a tie recorded without a call because both answers were the same
    text. `error` holds a one-line reason (never the API key); `reply` holds the judge's text.
    """

    prompt_id: str
    model_a: str
    model_b: str
    judge_model: str
    prompt_version: str
    status: Status
    verdict: Verdict | None
    reply: str | None = None
    error: str | None = None
    attempts: int = 1
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    source: Source = "judge"

    @property
    def key(self) -> JudgmentKey:
        return JudgmentKey(self.prompt_id, self.model_a, self.model_b, self.judge_model, self.prompt_version)

    @property
    def winner(self) -> str | None:
        """The winning model's name, "tie", or None for an error."""
        if self.verdict is None:
            return None
        return {"A": self.model_a, "B": self.model_b, "C": "tie"}[self.verdict]

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "winner": self.winner}, ensure_ascii=False)

    @classmethod
    def from_json_obj(cls, obj: dict[str, Any], path: Path, line: int) -> JudgmentRecord:
        """The record on `line` of `path`, every field checked (an EvalInputError names the field)."""
        status = field_text(obj, "status", path, line)
        if status not in ("ok", "error"):
            raise EvalInputError(f"status must be 'ok' or 'error', got {status!r}", path, line)
        verdict = obj.get("verdict")
        if verdict not in (None, "A", "B", "C"):
            raise EvalInputError(f"'verdict' must be 'A', 'B', 'C' or null, got {verdict!r:.40}", path, line)
        if (status == "ok") != (verdict is not None):
            raise EvalInputError(f"status {status!r} with verdict {verdict!r}", path, line)
        source = field_optional_text(obj, "source", path, line) or "judge"
        if source not in ("judge", "identical"):
            raise EvalInputError(f"'source' must be 'judge' or 'identical', got {source!r}", path, line)
        record = cls(
            prompt_id=field_id(obj, "prompt_id", path, line),
            model_a=field_text(obj, "model_a", path, line, nonempty=True),
            model_b=field_text(obj, "model_b", path, line, nonempty=True),
            judge_model=field_text(obj, "judge_model", path, line, nonempty=True),
            prompt_version=field_text(obj, "prompt_version", path, line, nonempty=True),
            status=status,  # type: ignore[arg-type]
            verdict=verdict,
            reply=field_optional_text(obj, "reply", path, line),
            error=field_optional_text(obj, "error", path, line),
            attempts=field_count(obj, "attempts", path, line, default=1, nullable=False) or 0,
            prompt_tokens=field_count(obj, "prompt_tokens", path, line),
            completion_tokens=field_count(obj, "completion_tokens", path, line),
            source=source,  # type: ignore[arg-type]
        )
        if record.model_a == record.model_b:
            raise EvalInputError("model_a and model_b are the same model", path, line)
        return record


def _scan(path: Path) -> tuple[list[JudgmentRecord], int]:
    """All complete records, and the byte length of the file up to the end of the last good line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    records: list[JudgmentRecord] = []
    good_end = 0
    offset = 0
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        is_last = number == len(lines)
        end = offset + len(raw) + (0 if is_last else 1)
        if raw.strip():
            try:
                obj = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
                problem = None if isinstance(obj, dict) else f"{json_kind(obj)}, not an object"
            except UnicodeDecodeError as exc:
                problem = f"not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
            except (ValueError, RecursionError):
                problem = "not JSON"
            if problem is not None:
                if is_last:  # no newline after it: the write was cut off
                    logger.warning("%s:%d: ignoring a truncated last line (an interrupted run)", path, number)
                    break
                raise EvalInputError(f"not a valid judgment line ({problem})", path, number) from None
            records.append(JudgmentRecord.from_json_obj(obj, path, number))
        good_end = end
        offset = end
    return records, good_end


def read_judgments(path: Path) -> list[JudgmentRecord]:
    """Every complete record in the file, in file order (reading never modifies the file)."""
    if not Path(path).is_file():
        raise EvalInputError("judgments file not found", path)
    return _scan(Path(path))[0]


def latest_by_key(records: list[JudgmentRecord]) -> dict[JudgmentKey, JudgmentRecord]:
    """One record per key: the first `ok` one if any, else the last error."""
    out: dict[JudgmentKey, JudgmentRecord] = {}
    for record in records:
        held = out.get(record.key)
        if held is None or held.status == "error":
            out[record.key] = record
    return out


class JudgmentStore:
    """Appends judgments durably. Open with `with JudgmentStore(path) as store:`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records, good_end = _scan(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ends_with_newline = True
        if self.path.exists():
            with self.path.open("r+b") as fh:
                fh.truncate(good_end)  # drop a line cut off by a killed run
                if good_end:
                    fh.seek(good_end - 1)
                    ends_with_newline = fh.read(1) == b"\n"
        self._fh = self.path.open("ab")
        if not ends_with_newline:  # a complete last record written without its newline
            self._fh.write(b"\n")

    def append(self, record: JudgmentRecord) -> None:
        self._fh.write((record.to_json() + "\n").encode("utf-8"))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.records.append(record)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JudgmentStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
