"""The broken-recipe corpus: each file states, in `# expect: [FILE:]LINE: fragment` comments, where its
error must be reported and what it must say. Every file must fail with that location, exit 1 from the
CLI, and never show a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from recipe_paths import BROKEN
from typer.testing import CliRunner

from spo_align.cli import app
from spo_align.recipe.errors import RecipeErrors
from spo_align.recipe.load import load_recipe

EXPECT = re.compile(r"^# expect: (?:(?P<file>[^:\s]+):)?(?P<line>\d+): (?P<fragment>.+)$")
CASES = sorted(BROKEN.glob("*.yaml"))


def expectations(path: Path) -> list[tuple[Path, int, str]]:
    found = []
    for text in path.read_text(encoding="utf-8").splitlines():
        match = EXPECT.match(text)
        if match:
            file = (path.parent / match["file"]).resolve() if match["file"] else path.resolve()
            found.append((file, int(match["line"]), match["fragment"]))
    return found


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 25
    assert all(expectations(case) for case in CASES), "every broken recipe states its expected error"


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_broken_recipe_reports_expected_location_and_message(case: Path) -> None:
    with pytest.raises(RecipeErrors) as caught:
        load_recipe(case)
    errors = caught.value.errors
    for file, line, fragment in expectations(case):
        matching = [
            e for e in errors
            if Path(e.file).resolve() == file and e.line == line and fragment in f"{e.key_path}: {e.message}"
        ]
        assert matching, f"expected {file.name}:{line}: {fragment!r}; got:\n{caught.value.format()}"
    assert all(e.line is not None and e.col is not None for e in errors), caught.value.format()


def test_cli_exits_1_on_every_broken_recipe_without_traceback() -> None:
    result = CliRunner().invoke(app, ["validate", str(BROKEN)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    for case in CASES:
        for file, line, _ in expectations(case):
            assert f"{file.relative_to(Path.cwd()) if file.is_relative_to(Path.cwd()) else file}:{line}:" in result.output or f"{file}:{line}:" in result.output, (case, result.output)
