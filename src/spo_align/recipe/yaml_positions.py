"""Read one YAML file into plain Python data plus the position of every key and item.

PyYAML's own loader silently keeps the last of two equal keys and loses line numbers; this module
composes the node tree itself so that duplicate keys, tabs, empty files and syntax errors are all
reported as `RecipeError`s with a line and column.

Numbers in exponent form without a dot or without an exponent sign (`5e-7`, `1.0e6`) are numbers, as in
YAML 1.2 and in editors; PyYAML's YAML 1.1 rules would read them as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from spo_align.recipe.errors import RecipeError

KeyPath = tuple[str | int, ...]
# libyaml's parser when PyYAML was built with it (10x faster); the pure-Python one otherwise.
_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc,valid-type]
    """The safe loader, plus YAML 1.2's exponent floats (a subclass: PyYAML's own loaders stay as they are)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
MAX_NODES = 20_000  # aliases can expand a small file into a huge tree ("billion laughs")


@dataclass(frozen=True)
class Loc:
    """Where a value came from: a file position, or a --set override (line None)."""

    file: str
    line: int | None
    col: int | None
    override: str | None = None


Positions = dict[KeyPath, Loc]


def dotted(path: KeyPath) -> str:
    return ".".join(str(part) for part in path)


class _Walker:
    def __init__(self, loader: Any, file: str):
        self.loader = loader
        self.file = file
        self.positions: Positions = {}
        self.errors: list[RecipeError] = []
        self.count = 0
        self.active: set[int] = set()

    def loc(self, node: yaml.Node) -> Loc:
        return Loc(self.file, node.start_mark.line + 1, node.start_mark.column + 1)

    def error(self, node: yaml.Node, path: KeyPath, message: str) -> None:
        loc = self.loc(node)
        self.errors.append(RecipeError(self.file, loc.line, loc.col, dotted(path), message))

    def walk(self, node: yaml.Node, path: KeyPath) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooLarge(node)
        if id(node) in self.active:
            self.error(node, path, "recursive YAML alias (a value that contains itself)")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                result = []
                for index, item in enumerate(node.value):
                    self.positions[path + (index,)] = self.loc(item)
                    result.append(self.walk(item, path + (index,)))
                return result
            try:
                return self.loader.construct_object(node, deep=True)
            except yaml.YAMLError as exc:
                self.error(node, path, f"cannot read this value: {_problem(exc)}")
                return None
        finally:
            self.active.discard(id(node))

    def mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = key_node.value
                if key in seen:
                    self.error(
                        key_node, path + (key,), f"duplicate key '{key}' (first given at line {seen[key]}); "
                        "YAML would silently keep only the last one"
                    )
                else:
                    seen[key] = key_node.start_mark.line + 1
        try:
            self.loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys
        except yaml.YAMLError as exc:
            self.error(node, path, f"cannot merge: {_problem(exc)}")
            return {}
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.error(key_node, path, "keys must be plain names, not lists or mappings")
                continue
            key = key_node.value
            self.positions[path + (key,)] = self.loc(key_node)
            result[key] = self.walk(value_node, path + (key,))
        return result


class _TooLarge(Exception):
    def __init__(self, node: yaml.Node):
        self.node = node


def _problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return f"{context}, {problem}" if context else str(problem)


def _tab_errors(text: str, file: str) -> list[RecipeError]:
    errors = []
    for number, line in enumerate(text.splitlines(), start=1):
        indent = line[: len(line) - len(line.lstrip(" \t"))]
        if "\t" in indent and line.strip() and not line.lstrip().startswith("#"):
            errors.append(
                RecipeError(file, number, indent.index("\t") + 1, "", "tab in indentation; YAML indents with spaces")
            )
    return errors


def _unclosed_bracket(text: str) -> tuple[int, int] | None:
    """Line and column of the last '[' or '{' left open at the end of its line (ignoring comments)."""
    found = None
    for number, line in enumerate(text.splitlines(), start=1):
        depth: list[int] = []
        for col, char in enumerate(line.split(" #")[0], start=1):
            if char in "[{":
                depth.append(col)
            elif char in "]}" and depth:
                depth.pop()
        if depth:
            found = (number, depth[0])
    return found


def parse_yaml(text: str, file: str) -> tuple[Any, Positions, list[RecipeError]]:
    """Data, positions and errors of one YAML document. Data is None when errors prevent reading it."""
    errors = _tab_errors(text, file)
    if errors:
        return None, {}, errors
    if not text.strip() or all(not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()):
        return None, {}, [RecipeError(file, 1, 1, "", "the file is empty (a recipe is a YAML mapping)")]
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            message = f"YAML syntax error: {_problem(exc)}"
            line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
            opened = _unclosed_bracket(text) if mark is not None and mark.index >= len(text.rstrip()) else None
            if opened is not None:
                # The file ended inside a bracket: point at where it was opened.
                line, col = opened
                message += " (a bracket opened here is never closed)"
            return None, {}, [RecipeError(file, line, col, "", message)]
        except yaml.YAMLError as exc:
            return None, {}, [RecipeError(file, None, None, "", f"YAML error: {_problem(exc)}")]
        if node is None:
            return None, {}, [RecipeError(file, 1, 1, "", "the file is empty (a recipe is a YAML mapping)")]
        if not isinstance(node, yaml.MappingNode):
            line, col = node.start_mark.line + 1, node.start_mark.column + 1
            return None, {}, [RecipeError(file, line, col, "", "a recipe must be a YAML mapping of sections")]
        walker = _Walker(loader, file)
        try:
            data = walker.walk(node, ())
        except _TooLarge as too_large:
            mark = too_large.node.start_mark
            return None, {}, [
                RecipeError(file, mark.line + 1, mark.column + 1, "", f"document expands to over {MAX_NODES} values")
            ]
        except RecursionError:
            return None, {}, [RecipeError(file, None, None, "", "the YAML document is nested too deeply")]
        return data, walker.positions, walker.errors
    finally:
        loader.dispose()


class SetValueError(ValueError):
    """A `--set` value that cannot be read as one value (the message says why and what to write)."""


def _whole_node(text: str) -> yaml.Node | None:
    """The YAML node of `text` when `text` is exactly one node and nothing else (no comment, no second
    value after it); None otherwise."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError:
        return None
    finally:
        loader.dispose()
    if node is None or node.end_mark.index != len(text):
        return None
    return node


def parse_yaml_value(text: str) -> Any:
    """One `--set` value. The whole text is one value: it is never cut at ` #` (a YAML comment in a file) nor
    read as a mapping because it holds `: `. Text that is wholly a quoted string or wholly a flow list or
    mapping (`[0, 1]`, `{type: dpo}`) is read as YAML; any other text is one scalar, typed as a bare scalar in
    a recipe file is (`0.3`, `5e-7`, `true`, `null`), else kept as text. Empty text is null. Raises
    `SetValueError` for a YAML tag (`!!str 5`), which a single value cannot apply."""
    text = text.strip()
    if not text:
        return None
    if text[0] in "'\"[{":
        node = _whole_node(text)
        whole = node is not None and (
            isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) or node.style in ("'", '"')
        )
        if whole:
            loader = _Loader("")
            try:
                walker = _Walker(loader, "--set")
                value = walker.walk(node, ())
                if walker.errors:
                    raise SetValueError(walker.errors[0].message)
                return value
            finally:
                loader.dispose()
    if text[0] == "!":
        raise SetValueError(
            "a YAML tag is not read in a --set value; write the value itself, in quotes for text ('1234567')"
        )
    loader = _Loader("")
    try:
        tag = loader.resolve(yaml.ScalarNode, text, (True, False))
        return loader.construct_object(yaml.ScalarNode(tag, text), deep=True)
    finally:
        loader.dispose()


def read_yaml_file(path: Path) -> tuple[Any, Positions, list[RecipeError]]:
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, {}, [RecipeError(file, None, None, "", "file not found")]
    except IsADirectoryError:
        return None, {}, [RecipeError(file, None, None, "", "is a folder, not a recipe file")]
    except UnicodeDecodeError as exc:
        return None, {}, [RecipeError(file, None, None, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})")]
    except OSError as exc:
        return None, {}, [RecipeError(file, None, None, "", f"cannot read: {exc.strerror or exc}")]
    return parse_yaml(text, file)
