"""Where a recipe's paths point on this machine, and what `spo validate` and `spo train` say when they are missing.

Model, tokenizer, reference and output paths resolve against the working directory (where `spo train`
runs); dataset paths against the recipe file's folder, then the working directory, as the data loader
reads them. Hub ids (`owner/name`) and `tiny:<name>` models are not local paths. Environment variables
(`$VAR`, `${VAR}`) and `~` in the keys that hold paths are expanded when a recipe is read (`expand_path_keys`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from spo_align.os_errors import file_in_the_way
from spo_align.recipe.errors import Severity, did_you_mean
from spo_align.recipe.schema import Recipe

KeyPath = tuple[str | int, ...]
PathKind = Literal["model", "tokenizer", "reference model", "dataset"]
DATA_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".tsv")
_SAME_KIND = {".ndjson": ".jsonl"}  # newline-delimited JSON is JSON Lines by another name
COMPRESSION_SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}
"""Compressed data files read as they are (`pairs.jsonl.gz`), each suffix with its format's name."""
_NOT_READ = {".zst": "zstd", ".zstd": "zstd", ".lz4": "lz4", ".zip": "zip", ".tar": "tar", ".tgz": "tar", ".7z": "7z"}
_NAMES = (
    "a data file is named .jsonl (or .ndjson), .json, .csv, .tsv or .parquet, optionally compressed as "
    + ", ".join(COMPRESSION_SUFFIXES)
)
TINY_PREFIX = "tiny:"


# ---------------------------------------------------------------- environment variables in path keys

_VARIABLE = re.compile(r"\$(?:\{(?P<braced>[^}]*)(?P<closed>\}?)|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>.*))?", re.S)


class PathVariableError(ValueError):
    """A path names an environment variable that is not set, or writes one that is not a variable."""


def expand_path(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`text` with `$NAME` and `${NAME}` replaced by the environment's values, then a leading `~` by the home
    folder. `${NAME:-default}` gives `default` when NAME is unset or empty, `${NAME-default}` when it is unset.
    A `$` followed by anything else (`$5`, a lone `$`) stays as it is. Raises `PathVariableError` for an unset
    or empty variable without a default (an empty one would turn `$RUNS/x` into `/x`) or a malformed `${...}`."""
    env = os.environ if environ is None else environ

    def value(match: re.Match[str]) -> str:
        name = match.group("bare")
        if name is None:
            braced = match.group("braced")
            if not match.group("closed"):
                raise PathVariableError(f"'${{' with no closing '}}' in {text!r}")
            if not braced:
                raise PathVariableError(f"'${{}}' is empty: it names no variable (in {text!r})")
            parts = _BRACED.fullmatch(braced)
            if parts is None:
                raise PathVariableError(f"'${{{braced}}}' is not a variable name (letters, digits, _)")
            name = parts.group("name")
            if parts.group("op") == ":-" and not env.get(name):
                return parts.group("default")
            if parts.group("op") == "-" and name not in env:
                return parts.group("default")
        if name not in env:
            raise PathVariableError(f"environment variable ${name} is not set (in {text!r})")
        if not env[name]:
            raise PathVariableError(f"environment variable ${name} is empty (in {text!r})")
        return env[name]

    expanded = _VARIABLE.sub(value, text)
    return os.path.expanduser(expanded) if expanded.startswith("~") else expanded


RECIPE_PATH_KEYS: tuple[KeyPath, ...] = (
    ("extends",), ("model", "name_or_path"), ("model", "tokenizer"), ("reference", "model"), ("output", "dir"),
    ("distributed", "deepspeed"), ("distributed", "hostfile"),
)


def recipe_path_keys(data: Mapping[str, Any]) -> Iterator[KeyPath]:
    """The keys of a recipe's raw data that hold paths (and exist in it): models, datasets, configs, output."""
    yield from RECIPE_PATH_KEYS
    section = data.get("data")
    if isinstance(section, dict):
        for split in ("train", "eval"):
            sources = section.get(split)
            if isinstance(sources, list):
                yield from (("data", split, index, "path") for index in range(len(sources)))


def _parent(data: Any, key: KeyPath) -> Any:
    node = data
    for part in key[:-1]:
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return None
    return node


def expand_path_keys(data: Any, keys: Iterable[KeyPath]) -> list[tuple[KeyPath, str]]:
    """Expand `expand_path` in place in each of `keys` that holds text in `data`; returns (key, why) for each
    that cannot be expanded (left as written)."""
    problems: list[tuple[KeyPath, str]] = []
    for key in keys:
        node = _parent(data, key)
        last = key[-1]
        if isinstance(node, dict) and isinstance(node.get(last), str):
            try:
                node[last] = expand_path(node[last])
            except PathVariableError as exc:
                problems.append((key, str(exc)))
    return problems


def is_local_model_path(name_or_path: str) -> bool:
    """True for model paths that name a local folder relative to the working directory (not a hub id)."""
    if name_or_path.startswith(TINY_PREFIX):
        return False
    return name_or_path.startswith(("./", "../", "~")) or "outputs/" in name_or_path or Path(name_or_path).is_absolute()


def model_location(name_or_path: str) -> str:
    """Absolute folder for local-looking model paths (relative to the working directory), else the hub id."""
    if is_local_model_path(name_or_path):
        return str(Path(name_or_path).expanduser().resolve())
    return name_or_path


@dataclass(frozen=True)
class DataFileName:
    """What a data file's name says it holds: `kind` (`.jsonl`, ...) and its compression suffix, if any."""

    kind: str | None
    compression: str | None


def data_file_name(name: str) -> DataFileName:
    """`pairs.jsonl.gz` -> (.jsonl, .gz); an unknown or unread last suffix keeps `kind` None or names it."""
    lower = name.lower()
    compression = next((s for s in (*COMPRESSION_SUFFIXES, *_NOT_READ) if lower.endswith(s)), None)
    stem = lower[: -len(compression)] if compression else lower
    kind = next((k for k in DATA_FILE_SUFFIXES if stem.endswith(k)), None)
    return DataFileName(_SAME_KIND.get(kind, kind) if kind else None, compression)


def data_file_problem(name: str) -> str | None:
    """Why a local file of this name cannot be read as a dataset (None: it can)."""
    found = data_file_name(name)
    if found.compression in _NOT_READ:
        kind = _NOT_READ[found.compression]
        if kind in ("zip", "tar", "7z"):
            return f"a {kind} archive is not read; unpack it; {_NAMES}"
        return f"{kind}-compressed files are not read; decompress it, or compress it as .gz, .bz2 or .xz"
    if found.kind is None:
        return f"cannot tell what this file holds from its name; {_NAMES}"
    return None


def looks_like_local_data(path: str) -> bool:
    """A dataset path that can only mean a local file or folder (never a hub id)."""
    name = data_file_name(path)
    return (
        path.startswith(("./", "../", "~", "/")) or Path(path).is_absolute() or name.kind is not None
        or name.compression is not None
    )


def data_location(path: str, base_dir: Path) -> Path | None:
    """The local file or folder a dataset path names: where it exists (beside the recipe, else in the working
    directory), or beside the recipe when it looks local but exists nowhere; None for a hub id."""
    raw = Path(path).expanduser()
    candidates = [raw] if raw.is_absolute() else [base_dir / raw, raw]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    return candidates[0].resolve() if looks_like_local_data(path) else None


@dataclass(frozen=True)
class LocalPath:
    """A path the recipe reads from this machine: the key that writes it, as written, and where it points."""

    key: KeyPath
    written: str
    location: Path
    kind: PathKind


def local_paths(recipe: Recipe, base_dir: Path) -> list[LocalPath]:
    """Every local path a run of `recipe` reads. A model id that exists as a local folder counts: the
    runner loads it from there."""
    found: list[LocalPath] = []
    models: list[tuple[KeyPath, str | None, PathKind]] = [
        (("model", "name_or_path"), recipe.model.name_or_path, "model"),
        (("model", "tokenizer"), recipe.model.tokenizer, "tokenizer"),
        (("reference", "model"), recipe.reference.model, "reference model"),
    ]
    for key, value, kind in models:
        if value is None or value.startswith(TINY_PREFIX):
            continue
        if is_local_model_path(value) or Path(value).expanduser().exists():
            found.append(LocalPath(key, value, Path(value).expanduser().resolve(), kind))
    for split in ("train", "eval"):
        for index, source in enumerate(getattr(recipe.data, split)):
            location = data_location(source.path, base_dir)
            if location is not None:
                found.append(LocalPath(("data", split, index, "path"), source.path, location, "dataset"))
    return found


def output_dir(recipe: Recipe) -> Path:
    """The run's output folder, absolute (relative to the working directory)."""
    return Path(recipe.output.dir).expanduser().resolve()


# ---------------------------------------------------------------- paths that do not exist


def _nearby(location: Path) -> str:
    """`: <file> is a file, not a folder` when a file stands where a parent folder should be; else
    ` (did you mean 'x'?)` for a sibling with a close name, when the parent folder exists."""
    blocker = file_in_the_way(location)
    if blocker is not None:
        return f": {blocker} is a file, not a folder"
    try:
        siblings = [entry.name for entry in location.parent.iterdir()]
    except OSError:
        return ""
    return did_you_mean(location.name, siblings)


def _written_by_a_run(location: Path, outputs: Collection[Path]) -> bool:
    """True when `location` is, or lies in, one of the output folders (an earlier stage's output or checkpoint)."""
    return any(location == out or out in location.parents for out in outputs)


def missing_path_findings(
    recipe: Recipe, base_dir: Path, other_outputs: Collection[Path] | None
) -> list[tuple[KeyPath, str, Severity]]:
    """Local paths that do not exist (or are not what the key needs), as `(key, message, severity)`.

    `other_outputs=None` (`spo train`, `spo validate --strict`): every missing path is an error, the run is
    about to read it. Otherwise (`spo validate`, with the output folders of the other recipes it knows): a
    model, tokenizer or reference folder in one of them is an earlier stage's output and is not reported;
    one under an `outputs/` folder is a warning (probably an earlier run's output); any other missing local
    path is an error. A dataset is never a run's output: missing, it is always an error.
    """
    findings: list[tuple[KeyPath, str, Severity]] = []
    out = output_dir(recipe)
    blocker = out if out.exists() and not out.is_dir() else file_in_the_way(out)
    if blocker is not None:
        message = f"output.dir '{recipe.output.dir}' cannot be created: {blocker} is a file, not a folder"
        findings.append((("output", "dir"), message, "error"))
    for path in local_paths(recipe, base_dir):
        if path.kind == "dataset":
            if not path.location.exists():
                message = (
                    f"dataset '{path.written}' not found{_nearby(path.location)} (looked for {path.location}: "
                    "dataset paths are relative to the recipe file)"
                )
                findings.append((path.key, message, "error"))
            elif path.location.is_file() and (problem := data_file_problem(path.location.name)) is not None:
                findings.append((path.key, f"dataset '{path.written}': {problem}", "error"))
            continue
        if path.location.exists():
            if not path.location.is_dir():
                findings.append((path.key, f"{path.kind} '{path.written}' is a file, not a model folder", "error"))
            continue
        if other_outputs is not None and _written_by_a_run(path.location, other_outputs):
            continue
        where = f"{path.location}: local model paths are relative to the working directory"
        under_outputs = "outputs" in Path(path.written).parts
        if other_outputs is not None and under_outputs:
            message = (
                f"{path.kind} folder '{path.written}' does not exist yet ({where}); if an earlier stage writes "
                "it, run that stage first"
            )
            findings.append((path.key, message, "warning"))
            continue
        if other_outputs is not None:
            advice = "; if another recipe writes it, validate that recipe together with this one"
        else:
            advice = "; run the stage that writes it first" if under_outputs else ""
        message = f"{path.kind} folder '{path.written}' does not exist{_nearby(path.location)} ({where}){advice}"
        findings.append((path.key, message, "error"))
    return findings


_READS = {
    "model": "the model the run starts from",
    "tokenizer": "the tokenizer the run reads",
    "reference model": "the reference model the run reads",
    "dataset": "a dataset the run reads",
}


def overlap_findings(recipe: Recipe, base_dir: Path) -> list[tuple[KeyPath, str]]:
    """output.dir equal to, holding, or inside a path the run reads: the run (or --overwrite) would destroy it,
    or write a run into a model's folder."""
    out = output_dir(recipe)
    findings: list[tuple[KeyPath, str]] = []
    for path in local_paths(recipe, base_dir):
        read = f"{_READS[path.kind]} ({'.'.join(map(str, path.key))}: {path.written})"
        if path.location == out:
            problem = f"output.dir is {read}; the run would overwrite it"
        elif out in path.location.parents:
            problem = f"output.dir holds {read}; the run (or --overwrite) would delete it"
        elif path.location in out.parents:
            problem = f"output.dir is inside {read}; a run is not written into another one's folder"
        else:
            continue
        findings.append((("output", "dir"), problem + ". Give this run its own folder"))
    return findings
