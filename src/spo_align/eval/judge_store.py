"""The judgments file: one JSON line per judgment, appended and fsynced as each one arrives.

A judgment is keyed by (prompt id, model shown as A, model shown as B, judge model, prompt
version); the pair of models and the order are both in (model_a, model_b). A rerun reads the file
and skips keys that already hold an `ok` judgment. A run killed mid-write leaves a truncated last
line: reading ignores it, and opening the store for appending cuts it off first, so the file stays
valid JSONL. A bad line anywhere else is corruption and is reported with its line number.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from spo_align.eval.judge_parse import Verdict
from spo_align.eval.records import EvalInputError

logger = logging.getLogger(__name__)

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
        try:
            record = cls(
                prompt_id=str(obj["prompt_id"]),
                model_a=obj["model_a"],
                model_b=obj["model_b"],
                judge_model=obj["judge_model"],
                prompt_version=obj["prompt_version"],
                status=obj["status"],
                verdict=obj.get("verdict"),
                reply=obj.get("reply"),
                error=obj.get("error"),
                attempts=int(obj.get("attempts", 1)),
                prompt_tokens=obj.get("prompt_tokens"),
                completion_tokens=obj.get("completion_tokens"),
                source=obj.get("source", "judge"),
            )
        except KeyError as exc:
            raise EvalInputError(f"judgment lacks field {exc.args[0]!r}", path, line) from None
        except (TypeError, ValueError) as exc:
            raise EvalInputError(f"bad judgment: {exc}", path, line) from None
        if record.status not in ("ok", "error"):
            raise EvalInputError(f"status must be 'ok' or 'error', got {record.status!r}", path, line)
        if (record.status == "ok") != (record.verdict in ("A", "B", "C")):
            raise EvalInputError(f"status {record.status!r} with verdict {record.verdict!r}", path, line)
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
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
            except ValueError:
                if is_last:  # no newline after it: the write was cut off
                    logger.warning("%s:%d: ignoring a truncated last line (an interrupted run)", path, number)
                    break
                raise EvalInputError("not a valid judgment line", path, number) from None
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
