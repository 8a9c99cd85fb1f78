"""Dataset columns a stage needs, checked against the recipe with the recipe line in the message."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from spo_align.data.errors import DataSourceError
from spo_align.data.sources import data_columns

if TYPE_CHECKING:
    import datasets

    from spo_align.recipe.resolve import RunPlan

Split = Literal["train", "eval"]


class MissingColumnError(DataSourceError):
    """A dataset lacks a column the recipe (or its defaults) says it holds."""


def recipe_location(recipe_path: Path, key_path: tuple[str | int, ...]) -> str:
    """`file:line` of `key_path` in the recipe or the base it `extends` (where the key is written), or of
    its nearest ancestor written there (else the file)."""
    from spo_align.recipe.load import load_positions
    from spo_align.recipe.locate import locate

    loc = locate(key_path, load_positions(Path(recipe_path)), str(recipe_path))
    return f"{loc.file}:{loc.line}" if loc.line is not None else f"{loc.file} (--set {loc.override})"


def require_columns(
    plan: RunPlan, split: Split, index: int, ds: datasets.Dataset, fields: Sequence[str]
) -> None:
    """Raise `MissingColumnError` naming the column, the recipe key and its line if a mapped column is absent."""
    source = getattr(plan.recipe.data, split)[index]
    for field in fields:
        column = getattr(source.columns, field)
        if column in data_columns(ds):
            continue
        key = ("data", split, index, "columns", field)
        where = recipe_location(plan.recipe_path, key)
        raise MissingColumnError(
            f"{where}: data.{split}[{index}].columns.{field}: dataset {source.path!r} (split {source.split!r}) "
            f"has no column {column!r}; its columns are {data_columns(ds)}. Map the right one with "
            f"columns: {{{field}: <column>}}"
        )
