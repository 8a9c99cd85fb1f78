"""Property test: mutated recipes (deleted keys, renamed keys, wrong types, out-of-range numbers, random
YAML, random --set) either load or fail with a clean list of located errors. Nothing else may escape."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recipe_paths import repo_recipes

from spo_align.recipe.errors import RecipeErrors
from spo_align.recipe.load import load_recipe
from spo_align.recipe.resolve import resolve

SETTINGS = settings(
    max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
WORKDIR = Path(tempfile.mkdtemp(prefix="spo-mutations-"))


def _bases() -> list[dict[str, Any]]:
    """Every repo recipe, resolved (defaults filled, paths absolute so the copies still find their files)."""
    bases = []
    for path in repo_recipes():
        bases.append(resolve(load_recipe(path), path).recipe_dict())
    return bases


BASES = _bases()


def leaf_paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from leaf_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield prefix + (index,)
            yield from leaf_paths(value, prefix + (index,))


def parent_of(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        data = data[part]
    return data


def check(text: str, overrides: tuple[str, ...] = ()) -> None:
    """The invariant: a Recipe, or RecipeErrors whose every error names a file and (for file errors) a line."""
    path = WORKDIR / "mutant.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path, overrides)
    except RecipeErrors as exc:
        assert exc.errors
        for error in exc.errors:
            assert error.file and error.message
            from_set = error.line is None and "--set" in error.message
            assert from_set or (isinstance(error.line, int) and error.line >= 1), error
        exc.format("text")
        exc.format("github")


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False, allow_unicode=True)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


@st.composite
def mutated(draw: st.DrawFn, mode: str) -> str:
    data = copy.deepcopy(draw(st.sampled_from(BASES)))
    paths = list(leaf_paths(data))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(paths))
        try:
            parent = parent_of(data, path)
            key = path[-1]
            if mode == "delete":
                del parent[key]
            elif mode == "rename":
                new_key = draw(st.text(min_size=1, max_size=12))
                if isinstance(parent, dict):
                    parent[new_key] = parent.pop(key)
                else:
                    parent[key] = {new_key: parent[key]}
            elif mode == "wrong_type":
                parent[key] = draw(values)
            elif mode == "numbers":
                parent[key] = draw(
                    st.one_of(
                        st.integers(min_value=-5, max_value=5),
                        st.floats(min_value=-2.0, max_value=2.0),
                        st.sampled_from([0, -1, 10**9, 1e-30, float("inf"), 0.5, 1.0]),
                    )
                )
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    return dump(data)


@SETTINGS
@given(mutated("delete"))
def test_deleted_keys(text: str) -> None:
    check(text)


@SETTINGS
@given(mutated("rename"))
def test_renamed_keys(text: str) -> None:
    check(text)


@SETTINGS
@given(mutated("wrong_type"))
def test_wrong_types(text: str) -> None:
    check(text)


@SETTINGS
@given(mutated("numbers"))
def test_out_of_range_numbers(text: str) -> None:
    check(text)


YAML_CHARS = st.sampled_from(list("abc:-_ \n\t[]{}&*!#'\"|>%@,?.01") + ["  ", "\n  ", "- ", ": ", "<<: "])


@SETTINGS
@given(st.lists(YAML_CHARS, max_size=80).map("".join))
def test_random_yaml(text: str) -> None:
    check(text)


@SETTINGS
@given(st.sampled_from(BASES), st.integers(min_value=0, max_value=10**6), st.lists(YAML_CHARS, min_size=1, max_size=6))
def test_spliced_yaml(base: dict[str, Any], where: int, insert: list[str]) -> None:
    text = dump(base)
    at = where % (len(text) + 1)
    check(text[:at] + "".join(insert) + text[at:])


override_keys = st.sampled_from(["loss.beta", "loss", "data.train.0.path", "data.train.9.x", "training", "x.y", "stage", "model.name_or_path", "", "."])


@SETTINGS
@given(st.sampled_from(BASES), st.lists(st.tuples(override_keys, st.text(max_size=10)), max_size=3))
def test_random_set_overrides(base: dict[str, Any], pairs: list[tuple[str, str]]) -> None:
    check(dump(base), tuple(f"{key}={value}" for key, value in pairs))
