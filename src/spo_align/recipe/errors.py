"""Recipe errors as values with a location: `file:line:col: key.path: message`.

A finding is an error (the recipe is invalid) or a warning (the recipe is valid, but something will have
to change before it can run, such as a local model folder an earlier stage has not written yet).
Nothing here imports more than the standard library. The CLI prints these; the library never exits.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

ErrorFormat = Literal["text", "github"]
Severity = Literal["error", "warning"]


@dataclass(frozen=True, order=True)
class RecipeError:
    """One problem in one recipe. `line`/`col` are 1-based; None where no YAML node exists (--set)."""

    file: str
    line: int | None
    col: int | None
    key_path: str
    message: str
    severity: Severity = "error"

    def format(self, fmt: ErrorFormat = "text") -> str:
        if fmt == "github":
            return _github_line(self)
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.col is not None:
                where += f":{self.col}"
        key = f" {self.key_path}:" if self.key_path else ""
        label = " warning:" if self.severity == "warning" else ""
        return f"{where}:{key}{label} {self.message}"


def _escape_github_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_github_property(text: str) -> str:
    return _escape_github_data(text).replace(":", "%3A").replace(",", "%2C")


def _github_line(error: RecipeError) -> str:
    props = [f"file={_escape_github_property(error.file)}"]
    if error.line is not None:
        props.append(f"line={error.line}")
        if error.col is not None:
            props.append(f"col={error.col}")
    props.append(f"title={_escape_github_property('recipe ' + (error.key_path or 'error'))}")
    message = f"{error.key_path}: {error.message}" if error.key_path else error.message
    return f"::{error.severity} {','.join(props)}::{_escape_github_data(message)}"


class RecipeErrors(Exception):
    """Every error found in one or more recipes, sorted by file and line."""

    def __init__(self, errors: Iterable[RecipeError]):
        self.errors: list[RecipeError] = sorted_errors(errors)
        if not self.errors:
            raise ValueError("RecipeErrors needs at least one error")
        super().__init__(self.format("text"))

    def format(self, fmt: ErrorFormat = "text") -> str:
        return "\n".join(error.format(fmt) for error in self.errors)

    def __len__(self) -> int:
        return len(self.errors)

    def __iter__(self) -> Iterator[RecipeError]:
        return iter(self.errors)


def sorted_errors(errors: Iterable[RecipeError]) -> list[RecipeError]:
    """Without repeats, by file, line, column and key."""
    return sorted(set(errors), key=_sort_key)


def _sort_key(error: RecipeError) -> tuple[str, int, int, str, str]:
    return (error.file, error.line or 0, error.col or 0, error.key_path, error.message)


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """` (did you mean 'x'?)` for the closest valid choice, or '' when nothing is close."""
    lowered = {choice.lower(): choice for choice in choices}
    matches = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    if not matches:
        # A prefix match catches abbreviations and overlong names ('gradient_accumulation' -> '..._steps').
        partial = [c for c in choices if len(word) >= 4 and len(c) >= 4 and (c.startswith(word) or word.startswith(c))]
        if len(partial) == 1:
            return f" (did you mean '{partial[0]}'?)"
        return ""
    return f" (did you mean '{lowered[matches[0]]}'?)"
