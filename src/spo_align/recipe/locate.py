"""Turn pydantic validation errors and check findings into located `RecipeError`s.

Pydantic's error locations name union members (`loss.spo.beta`, `target_modules.list[str]`) that are
not keys of the YAML file; they are stripped here so the key path is the one the user wrote, and the
line is taken from the nearest YAML node on that path.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ValidationError

from spo_align.recipe.errors import RecipeError, did_you_mean
from spo_align.recipe.schema import Recipe
from spo_align.recipe.yaml_positions import KeyPath, Loc, Positions, dotted


def locate(path: KeyPath, positions: Positions, fallback_file: str) -> Loc:
    """Position of `path`, or of its nearest ancestor that has one, or the top of the file."""
    for end in range(len(path), 0, -1):
        loc = positions.get(path[:end])
        if loc is not None:
            return loc
    return Loc(fallback_file, 1, 1)


def make_error(path: KeyPath, message: str, positions: Positions, fallback_file: str) -> RecipeError:
    loc = locate(path, positions, fallback_file)
    if loc.override is not None:
        message = f"{message} [from --set {loc.override}]"
    return RecipeError(loc.file, loc.line, loc.col, dotted(path), message)


# ---------------------------------------------------------------- schema walking (for did-you-mean)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """BaseModel classes an annotation can hold, looking through Optional, Union, Annotated, list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _type_tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("type")
    if field is None:
        return None
    args = typing.get_args(field.annotation)
    return args[0] if len(args) == 1 and isinstance(args[0], str) else None


def model_at(path: KeyPath, data: Any) -> type[BaseModel] | None:
    """The schema model that validates the mapping at `path` in `data` (None when unknown)."""
    model: type[BaseModel] = Recipe
    node = data
    for part in path:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and -len(node) <= part < len(node) else None
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        node = node.get(part) if isinstance(node, dict) else None
        candidates = _models_in(field.annotation)
        if not candidates:
            return None
        if len(candidates) > 1:
            tag = node.get("type") if isinstance(node, dict) else None
            tagged = [c for c in candidates if _type_tag(c) == tag]
            candidates = tagged or candidates
        model = candidates[0]
    return model


def _members_at(path: KeyPath, data: Any) -> list[type[BaseModel]]:
    """The models of the union that validates `path` (e.g. every loss section for `loss`)."""
    parent = model_at(path[:-1], data) if path else None
    field = parent.model_fields.get(str(path[-1])) if parent else None
    return _models_in(field.annotation) if field is not None else []


def _tags_at(path: KeyPath, data: Any) -> list[str]:
    """The `type` values a tagged union at `path` accepts (e.g. spo, dpo, ipo, kto for `loss`)."""
    return [tag for tag in (_type_tag(m) for m in _members_at(path, data)) if tag]


def _node_at(path: KeyPath, data: Any) -> Any:
    node = data
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and -len(node) <= part < len(node):
            node = node[part]
        else:
            return None
    return node


def _untagged(path: KeyPath, data: Any) -> list[tuple[KeyPath, str]]:
    """A tagged section without its `type`: each key no member knows is reported at its own line (a typo of
    `type` among them, with did-you-mean); the missing `type` itself only when no such typo explains it."""
    tags = _tags_at(path, data)
    valid = sorted({name for model in _members_at(path, data) for name in model.model_fields})
    node = _node_at(path, data)
    where = f"in '{dotted(path)}'" if path else "at the top level"
    found: list[tuple[KeyPath, str]] = []
    typo_of_type = False
    for key in node if isinstance(node, dict) else ():
        if key in valid:
            continue
        hint = did_you_mean(str(key), valid)
        if hint == " (did you mean 'type'?)":
            typo_of_type = True
            found.append((path + (key,), f"unknown key '{key}' {where}{hint}; 'type' is one of: {', '.join(tags)}"))
        else:
            found.append((path + (key,), f"unknown key '{key}' {where}{hint}; valid keys: {', '.join(valid)}"))
    if not typo_of_type:
        found.append((path, f"needs a 'type' key, one of: {', '.join(tags)}"))
    return found


# ---------------------------------------------------------------- pydantic errors


def _clean_loc(loc: tuple[Any, ...], data: Any) -> KeyPath:
    """Drop the parts of a pydantic location that are union-member labels, not keys of the data."""
    cleaned: list[str | int] = []
    node = data
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if isinstance(node, dict):
            if part in node:
                cleaned.append(part)
                node = node[part]
                continue
            if isinstance(part, str) and (part == node.get("type") or _looks_like_type_label(part)):
                continue
            cleaned.append(part)
            node = None
        elif isinstance(node, list) and isinstance(part, int):
            cleaned.append(part)
            node = node[part] if -len(node) <= part < len(node) else None
        elif isinstance(part, str) and _looks_like_type_label(part) and (not last or cleaned):
            continue
        else:
            cleaned.append(part)
            node = None
    return tuple(cleaned)


_TYPE_LABELS = {"str", "int", "float", "bool", "none", "list", "dict", "path"}


def _looks_like_type_label(part: str) -> bool:
    return "[" in part or part.lower() in _TYPE_LABELS or part.startswith(("function-", "lax-", "json-or-"))


def _short(value: Any) -> str:
    text = {True: "true", False: "false", None: "null"}.get(value, repr(value)) if _is_const(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_const(value: Any) -> bool:
    return value is None or isinstance(value, bool)


def _type_hint(kind: str, given: Any) -> str:
    """Why a value of the wrong type is refused rather than converted (the schema's types are strict)."""
    number = isinstance(given, (int, float)) and not isinstance(given, bool)
    if kind in ("int_type", "float_type") and isinstance(given, bool):
        return ", a boolean: booleans are not numbers"
    if kind in ("int_type", "float_type") and isinstance(given, str):
        try:
            float(given)
        except ValueError:
            return ", text, not a number"
        return ", quoted text: write the number without quotes"
    if kind == "int_type" and isinstance(given, float):
        return ": write a whole number without a decimal point"
    if kind == "bool_type":
        return ": write true or false"
    if kind in ("string_type", "path_type") and (number or isinstance(given, bool)):
        return f", a {'number' if number else 'boolean'}: put it in quotes if you mean the text"
    return ""


def _message(err: dict[str, Any], path: KeyPath, data: Any) -> tuple[KeyPath, str]:
    kind = err["type"]
    given = err.get("input")
    if kind == "extra_forbidden":
        parent = model_at(path[:-1], data)
        valid = sorted(f.alias or n for n, f in parent.model_fields.items()) if parent else []  # keys as written
        hint = did_you_mean(str(path[-1]), valid)
        where = f"in '{dotted(path[:-1])}'" if path[:-1] else "at the top level"
        return path, f"unknown key '{path[-1]}' {where}{hint}; valid keys: {', '.join(valid)}"
    if kind == "missing":
        return path, f"required key '{path[-1]}' is missing"
    if kind == "union_tag_invalid":
        tags = err.get("ctx", {}).get("expected_tags", "")
        tag = err.get("ctx", {}).get("tag", "")
        hint = did_you_mean(str(tag), [t.strip(" '") for t in str(tags).split(",")])
        return path + ("type",), f"unknown type '{tag}'{hint}; expected one of: {tags}"
    if kind == "model_type" or kind == "model_attributes_type" or kind == "dict_type":
        return path, f"expected a mapping of keys, got {_short(given)}"
    message = str(err["msg"])
    message = message.removeprefix("Value error, ")
    if kind == "path_type":
        message = "Input should be a path, written as text"
    if kind == "literal_error" and isinstance(given, str):
        expected = err.get("ctx", {}).get("expected", "")
        choices = [c.strip(" '") for c in str(expected).replace(" or ", ",").split(",") if c.strip(" '")]
        message += did_you_mean(given, choices)
    if kind != "value_error" and not isinstance(given, (dict, list)) and "input" in err:
        message += f" (got {_short(given)}{_type_hint(kind, given)})"
    return path, message


def validation_errors(
    exc: ValidationError, data: Any, positions: Positions, fallback_file: str
) -> list[RecipeError]:
    merged: dict[KeyPath, list[str]] = {}
    for err in exc.errors(include_url=False):
        path = _clean_loc(tuple(err["loc"]), data)
        found = _untagged(path, data) if err["type"] == "union_tag_not_found" else [_message(dict(err), path, data)]
        for where, message in found:
            merged.setdefault(where, [])
            if message not in merged[where]:
                merged[where].append(message)
    return [make_error(path, _join_alternatives(messages), positions, fallback_file) for path, messages in merged.items()]


def _join_alternatives(messages: list[str]) -> str:
    """Union members each report a message; say the shared '(got ...)' once and drop repeated 'Input should be'."""
    if len(messages) == 1:
        return messages[0]
    suffixes = {m[m.rfind(" (got ") :] if " (got " in m else "" for m in messages}
    suffix = suffixes.pop() if len(suffixes) == 1 else ""
    bodies = [m[: len(m) - len(suffix)] if suffix else m for m in messages]
    prefix = "Input should be "
    if all(b.startswith(prefix) for b in bodies):
        bodies = [bodies[0]] + [b[len(prefix) :] for b in bodies[1:]]
    return " or ".join(bodies) + suffix


def findings_to_errors(
    findings: Iterable[tuple[KeyPath, str]], positions: Positions, fallback_file: str
) -> list[RecipeError]:
    return [make_error(path, message, positions, fallback_file) for path, message in findings]
