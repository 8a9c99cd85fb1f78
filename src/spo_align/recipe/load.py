"""Load a recipe: YAML with positions, `extends` deep merge, `--set` overrides, schema, cross-field checks.

`load_recipe` either returns a valid, frozen `Recipe` or raises `RecipeErrors` holding every error it
found, each with the file, line and column of the YAML node it concerns.

Paths inside a recipe are relative to the file that writes them; `$VAR`, `${VAR}` and a leading `~` in a key
that holds a path are expanded when the file (or the `--set`) is read (`paths.expand_path`). When a recipe
`extends` a base in another folder, the base's DeepSpeed/hostfile paths and local dataset paths are rewritten
relative to the extending recipe, so the merged recipe reads them relative to its own folder. An experiment
file or a DeepSpeed config given as a recipe is one error naming it (`file_kinds`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from spo_align.recipe.checks import check_recipe
from spo_align.recipe.errors import RecipeError, RecipeErrors, sorted_errors
from spo_align.recipe.file_kinds import not_a_recipe
from spo_align.recipe.locate import findings_to_errors, make_error, validation_errors
from spo_align.recipe.paths import (
    expand_path_keys,
    looks_like_local_data,
    missing_path_findings,
    output_dir,
    recipe_path_keys,
)
from spo_align.recipe.schema import Recipe
from spo_align.recipe.yaml_positions import KeyPath, Loc, Positions, dotted, parse_yaml_value, read_yaml_file

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan

logger = logging.getLogger(__name__)

RECIPE_SUFFIXES = (".yaml", ".yml")


# ---------------------------------------------------------------- extends


def _deep_merge(base: Any, child: Any, base_pos: Positions, child_pos: Positions, at: KeyPath) -> Any:
    """Child wins; mappings merge key by key; lists and scalars replace (with their positions)."""
    if isinstance(base, dict) and isinstance(child, dict):
        merged = dict(base)
        for key, value in child.items():
            if key in base:
                merged[key] = _deep_merge(base[key], value, base_pos, child_pos, at + (key,))
            else:
                merged[key] = value
        return merged
    for path in [p for p in base_pos if p[: len(at)] == at and len(p) > len(at)]:
        del base_pos[path]
    return child


def _rebase(value: Any, from_dir: Path, to_dir: Path, must_exist: bool) -> Any:
    """`value` relative to `to_dir`; with `must_exist`, only a path that exists or can only be local (a hub
    dataset id stays as it is)."""
    if not isinstance(value, str) or not value or os.path.isabs(value) or value.startswith("~"):
        return value
    target = from_dir / value
    if must_exist and not target.exists() and not looks_like_local_data(value):
        return value
    return os.path.relpath(target, to_dir)


def _rebase_paths(data: dict[str, Any], from_dir: Path, to_dir: Path) -> None:
    """Rewrite a base recipe's file paths so they stay correct when read from `to_dir`."""
    if from_dir.resolve() == to_dir.resolve():
        return
    distributed = data.get("distributed")
    if isinstance(distributed, dict):
        for key in ("deepspeed", "hostfile"):
            distributed[key] = _rebase(distributed.get(key), from_dir, to_dir, must_exist=False)
            if distributed[key] is None:
                del distributed[key]
    section = data.get("data")
    if isinstance(section, dict):
        for split in ("train", "eval"):
            sources = section.get(split)
            if isinstance(sources, list):
                for source in sources:
                    if isinstance(source, dict) and "path" in source:
                        source["path"] = _rebase(source["path"], from_dir, to_dir, must_exist=True)


def _expand(data: dict[str, Any], positions: Positions, file: str, keys: Iterable[KeyPath]) -> list[RecipeError]:
    """Environment variables and `~` expanded in the path keys among `keys` (`paths.expand_path`)."""
    return [make_error(key, message, positions, file) for key, message in expand_path_keys(data, keys)]


def _from_override(key: KeyPath, positions: Positions) -> bool:
    """True when a `--set` wrote `key` or a section holding it."""
    return any((loc := positions.get(key[:n])) is not None and loc.override is not None for n in range(1, len(key) + 1))


def _load_tree(path: Path, chain: tuple[Path, ...]) -> tuple[Any, Positions, list[RecipeError]]:
    data, positions, errors = read_yaml_file(path)
    if not isinstance(data, dict):
        return data, positions, errors
    # Each file's own paths, before a base's are rebased onto the extending recipe's folder.
    errors = errors + _expand(data, positions, str(path), list(recipe_path_keys(data)))
    parent = data.get("extends")
    if parent is None:
        return data, positions, errors
    file = str(path)
    # A base that cannot be found or read stops here: validating half a recipe would only add noise.
    if not isinstance(parent, str) or not parent.strip():
        return None, positions, errors + [make_error(("extends",), "extends must be a path to another recipe", positions, file)]
    base_path = Path(os.path.normpath(path.parent / parent))
    if base_path.resolve() in chain or base_path.resolve() == path.resolve():
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve(), base_path.resolve()))
        return None, positions, errors + [make_error(("extends",), f"extends cycle: {cycle}", positions, file)]
    if not base_path.is_file():
        message = f"base recipe {parent!r} not found ({base_path.resolve()})"
        return None, positions, errors + [make_error(("extends",), message, positions, file)]
    base, base_positions, base_errors = _load_tree(base_path, (*chain, path.resolve()))
    if not isinstance(base, dict):
        if not base_errors:
            base_errors = [make_error(("extends",), f"base recipe {parent!r} is not a mapping", positions, file)]
        return None, positions, errors + base_errors
    base = copy.deepcopy(base)
    _rebase_paths(base, base_path.parent, path.parent)
    merged = _deep_merge(base, data, base_positions, positions, ())
    return merged, {**base_positions, **positions}, errors + base_errors


# ---------------------------------------------------------------- --set overrides


def _parse_override(raw: str) -> tuple[list[str], Any]:
    key, sep, value = raw.partition("=")
    if not sep or not key.strip():
        raise ValueError("expected key.path=value")
    parts = key.strip().split(".")
    if any(not part for part in parts):
        raise ValueError(f"bad key path {key.strip()!r}")
    try:
        parsed = parse_yaml_value(value)
    except yaml.YAMLError as exc:
        raise ValueError(f"cannot read value {value!r}: {getattr(exc, 'problem', exc)}") from None
    return parts, parsed


def apply_overrides(data: dict[str, Any], positions: Positions, overrides: Sequence[str], file: str) -> list[RecipeError]:
    """Set each `key.path=value` in place (the value is one value: `parse_yaml_value`); the schema then checks
    it like any key."""
    errors: list[RecipeError] = []
    for raw in overrides:
        try:
            parts, value = _parse_override(raw)
        except ValueError as exc:
            errors.append(RecipeError(file, None, None, "", f"--set {raw!r}: {exc}"))
            continue
        node: Any = data
        path: KeyPath = ()
        failed = None
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            key: str | int = part
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    failed = f"'{dotted(path)}' is a list of {len(node)}; '{part}' is not an index in it"
                    break
                key = int(part) % len(node)
            elif not isinstance(node, dict):
                failed = f"'{dotted(path)}' is a single value, it has no key '{part}'"
                break
            path = path + (key,)
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                    positions[path] = Loc(file, None, None, override=raw)
                node = node[key]
        if failed:
            errors.append(RecipeError(file, None, None, ".".join(parts), f"--set {raw!r}: {failed}"))
            continue
        for stale in [p for p in positions if p[: len(path)] == path]:
            del positions[stale]
        positions[path] = Loc(file, None, None, override=raw)
    return errors


# ---------------------------------------------------------------- public API


def _load(path: Path, overrides: Sequence[str]) -> tuple[Recipe | None, list[RecipeError], Positions]:
    """The recipe (None when the schema refuses it), every error found, and where each key is written."""
    file = str(path)
    data, positions, errors = _load_tree(path, ())
    if not isinstance(data, dict):
        return None, errors, positions
    other = not_a_recipe(data, file)
    if other is not None:
        return None, [RecipeError(file, 1, 1, "", other)], positions
    errors += apply_overrides(data, positions, overrides, file)
    set_paths = [key for key in recipe_path_keys(data) if _from_override(key, positions)]
    errors += _expand(data, positions, file, set_paths)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        return None, errors + validation_errors(exc, data, positions, file), positions
    errors += findings_to_errors(check_recipe(recipe, path.resolve().parent), positions, file)
    return recipe, errors, positions


def _path_findings(
    recipe: Recipe, path: Path, positions: Positions, other_outputs: Collection[Path] | None
) -> list[RecipeError]:
    found = missing_path_findings(recipe, path.resolve().parent, other_outputs)
    return [
        dataclasses.replace(make_error(key, message, positions, str(path)), severity=severity)
        for key, message, severity in found
    ]


def load_recipe(path: Path, overrides: Sequence[str] = (), *, require_local_paths: bool = False) -> Recipe:
    """Read, merge, override, validate and check one recipe; raise `RecipeErrors` with every error.

    `require_local_paths`: every local model, tokenizer, reference and dataset path must exist now (what
    `spo train` needs before it loads anything). Off by default: a recipe may start from an earlier
    stage's output that does not exist yet.
    """
    path = Path(path)
    recipe, errors, positions = _load(path, overrides)
    if recipe is not None and require_local_paths:
        errors += _path_findings(recipe, path, positions, None)
    if recipe is None or errors:
        raise RecipeErrors(errors)
    return recipe


def load_positions(path: Path) -> Positions:
    """Where each key of a recipe (after `extends`) is written: for errors found after loading, e.g. a
    dataset column the recipe names but the dataset lacks. Empty when the file cannot be read."""
    data, positions, _ = _load_tree(Path(path), ())
    return positions if isinstance(data, dict) else {}


def find_recipe_files(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """Recipe files under `paths` (folders searched recursively), and the paths that do not exist."""
    found: list[Path] = []
    missing: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.suffix in RECIPE_SUFFIXES
                    and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            )
        elif path.is_file():
            found.append(path)
        else:
            missing.append(path)
    return list(dict.fromkeys(found)), missing


def _writers(files: Sequence[Path], loaded: dict[Path, Recipe | None]) -> list[tuple[Path, Path]]:
    """(output folder, recipe file) of every valid recipe among `files` and in their folders: a chain's stages
    usually sit side by side, and a pre-commit hook passes only the files that changed."""
    candidates = list(files)
    for folder in dict.fromkeys(file.parent for file in files):
        candidates += sorted(p for p in folder.glob("*") if p.suffix in RECIPE_SUFFIXES and p.is_file())
    writers = []
    for file in dict.fromkeys(candidates):
        if file not in loaded:
            loaded[file] = _load(file, ())[0]
        recipe = loaded[file]
        if recipe is not None:
            writers.append((output_dir(recipe), file))
    return writers


def validate_files(files: Iterable[Path], *, strict: bool = False) -> tuple[int, list[RecipeError]]:
    """Load every file and check its local paths; return how many were valid and every finding, errors and
    warnings (`RecipeError.severity`), in file order.

    A local model folder that another recipe writes (its output.dir), among `files` or beside them, is an
    earlier stage's output and is not reported. `strict`: every local path must exist now, as for `spo train`.
    """
    files = [Path(file) for file in files]
    results = {file: _load(file, ()) for file in files}
    writers = [] if strict else _writers(files, {file: recipe for file, (recipe, _, _) in results.items()})
    valid = 0
    findings: list[RecipeError] = []
    for file in files:
        recipe, errors, positions = results[file]
        if recipe is not None:
            others = None if strict else [out for out, other in writers if other != file]
            errors = errors + _path_findings(recipe, file, positions, others)
        if not any(error.severity == "error" for error in errors):
            valid += 1
        findings.extend(sorted_errors(errors))
    return valid, findings


def save_resolved(plan: RunPlan, path: Path) -> None:
    """Write the resolved recipe (loadable again with `load_recipe`) beside a run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(plan.to_yaml(), encoding="utf-8")
    tmp.replace(path)
