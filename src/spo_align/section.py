"""What every recipe section shares: the strict pydantic base, and the finding a cross-field check yields.

The bottom of the package: the loss modules (`spo_align.losses`) define their own recipe sections on this
base, and `spo_align.recipe` builds the whole recipe on it, so neither has to import the other to agree on
what a section is. Only pydantic and the standard library are imported here.

Strict types: a value is taken only as what it is written as. A boolean is never a number (`max_steps:
true` is an error, not 1), a number is never text or a path (`revision: 1234567` is an error: quote it),
and a quoted number is never a number. An integer where a float is expected is taken as that float.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

KeyPath = tuple[str | int, ...]
"""Where a key sits in a recipe: ("loss", "beta"), ("data", "train", 0, "path")."""

Finding = tuple[KeyPath, str]
"""(key path, message): what a cross-field check yields; `recipe/load.py` locates it at the key's YAML line."""


class Section(BaseModel):
    """Base of every recipe section: frozen, unknown keys refused, no type coercion (see the module doc)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False, strict=True
    )
