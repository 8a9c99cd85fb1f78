"""`spo validate`, `spo resolve`, `spo schema`, `spo new`: recipe commands that never import torch.

Exit codes: 0 success, 1 invalid recipe(s), 2 usage error (missing path, bad option, taken destination).
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from spo_align.recipe.memory_report import Card

DEFAULT_ROOTS = (Path("recipes"), Path("spo_recipes"))


class ErrorFormatOption(str, enum.Enum):
    text = "text"
    github = "github"


class DeviceOption(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"


class ResolveFormat(str, enum.Enum):
    yaml = "yaml"
    json = "json"


def _usage_error(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


GPU_MEMORY_HELP = (
    "GiB per GPU (e.g. 80) or a card name (a10g, l40s, a100-40gb, a100-80gb, h100, h200): estimate whether the "
    "recipe fits (docs/memory.md)."
)


def _card(text: str | None) -> Card | None:
    from spo_align.recipe.memory_report import parse_card

    try:
        return None if text is None else parse_card(text)
    except ValueError as exc:
        raise _usage_error(str(exc)) from None


def validate(
    paths: list[Path] | None = typer.Argument(
        None, help="Recipe files or folders (searched recursively for *.yaml, *.yml). Default: recipes/ spo_recipes/."
    ),
    fmt: ErrorFormatOption = typer.Option(
        ErrorFormatOption.text, "--format", help="text: path:line:col: key: message. github: ::error annotations."
    ),
    strict: bool = typer.Option(
        False,
        "--strict",
        help="Every local model, tokenizer, reference and dataset path must exist now (as `spo train` needs); "
        "without it, a model folder that an earlier stage writes may be missing.",
    ),
    gpu_memory: str | None = typer.Option(None, "--gpu-memory", help=GPU_MEMORY_HELP + " Warns for every recipe over it."),
) -> None:
    """Check recipes: schema, cross-field checks, referenced files. Prints every error and warning of every file.

    A local model folder that does not exist is not reported when a recipe validated alongside writes it
    (its output.dir), is a warning when it lies under an outputs/ folder, and is an error otherwise."""
    from spo_align.recipe.load import find_recipe_files, validate_files

    roots = list(paths) if paths else [root for root in DEFAULT_ROOTS if root.exists()]
    if not roots:
        raise _usage_error("no paths given and neither recipes/ nor spo_recipes/ exists here")
    files, missing = find_recipe_files(roots)
    if missing:
        raise _usage_error("no such file or folder: " + ", ".join(str(m) for m in missing))
    if not files:
        raise _usage_error("no *.yaml or *.yml recipe found under " + ", ".join(str(r) for r in roots))
    card = _card(gpu_memory)
    valid, findings = validate_files(files, strict=strict)
    if card is not None:
        from spo_align.recipe.errors import sorted_errors
        from spo_align.recipe.memory_report import memory_findings

        findings = sorted_errors([*findings, *memory_findings(files, card)])
    for finding in findings:
        typer.echo(finding.format(fmt.value))
    errors = sum(1 for finding in findings if finding.severity == "error")
    warnings = len(findings) - errors
    noted = f", {warnings} warning(s)" if warnings else ""
    invalid = len(files) - valid
    if invalid:
        typer.echo(f"{invalid} of {len(files)} recipe(s) invalid, {errors} error(s){noted}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"{len(files)} recipe(s) valid{noted}", err=True)


def resolve(
    recipe: Path = typer.Argument(..., help="Recipe file."),
    overrides: list[str] = typer.Option([], "--set", help="Override a key: --set loss.beta=0.2 (repeatable)."),
    device: DeviceOption | None = typer.Option(
        None, "--device", help="Resolve device-dependent defaults (pack length) for cpu or cuda; default shows both."
    ),
    fmt: ResolveFormat = typer.Option(ResolveFormat.yaml, "--format", help="yaml (with derived values) or json."),
    error_format: ErrorFormatOption = typer.Option(ErrorFormatOption.text, "--error-format"),
    gpu_memory: str | None = typer.Option(None, "--gpu-memory", help=GPU_MEMORY_HELP),
) -> None:
    """Print the fully resolved recipe: defaults filled, derived values (IPO tau, global batch, pack length), and
    an estimated per-GPU memory breakdown (as comments; under "memory" in JSON)."""
    from spo_align.recipe.errors import RecipeErrors
    from spo_align.recipe.load import load_recipe
    from spo_align.recipe.memory_report import report, table_lines
    from spo_align.recipe.resolve import resolve as resolve_plan

    if not recipe.is_file():
        raise _usage_error(f"{recipe}: no such recipe file")
    card = _card(gpu_memory)
    try:
        plan = resolve_plan(load_recipe(recipe, overrides), recipe, device.value if device else None)
    except RecipeErrors as exc:
        typer.echo(exc.format(error_format.value))
        raise typer.Exit(code=1) from None
    memory = report(plan, card)
    if fmt is ResolveFormat.json:
        typer.echo(json.dumps({**plan.to_dict(), "memory": memory.to_dict()}, indent=2))
    else:
        typer.echo(plan.to_yaml() + "".join(f"# {line}\n" for line in table_lines(memory)), nl=False)


def schema(
    output: Path | None = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
) -> None:
    """Print the recipe JSON Schema (the committed recipe.schema.json; editors use it to autocomplete)."""
    from spo_align.recipe.schema import recipe_json_schema

    text = json.dumps(recipe_json_schema(), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            from spo_align.os_errors import reason

            raise _usage_error(f"cannot write {output}: {reason(exc)}") from None


def new(
    src: Path = typer.Argument(..., help="Recipe to start from."),
    dest: Path = typer.Argument(..., help="New recipe file (or a folder to copy into)."),
    force: bool = typer.Option(False, "--force", help="Overwrite DEST if it exists."),
) -> None:
    """Copy a recipe for editing; relative paths in it (extends, deepspeed, local data) are rewritten to stay right."""
    from spo_align.recipe.errors import RecipeErrors
    from spo_align.recipe.load import load_recipe
    from spo_align.recipe.new import CopyRecipeError, copy_recipe

    try:
        written = copy_recipe(src, dest, overwrite=force)
    except CopyRecipeError as exc:
        raise _usage_error(str(exc)) from None
    except OSError as exc:
        from spo_align.os_errors import reason

        raise _usage_error(f"cannot copy {src} to {dest}: {reason(exc)}") from None
    typer.echo(f"wrote {written}")
    try:
        load_recipe(written)
    except RecipeErrors as exc:
        typer.echo(exc.format("text"))
        typer.echo(f"{written} is not valid yet (copied from an invalid recipe)", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(f"next: edit it, then `spo validate {written}` and `spo train {written}`", err=True)


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
    app.command("resolve")(resolve)
    app.command("schema")(schema)
    app.command("new")(new)
