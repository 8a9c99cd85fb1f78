"""The output folder's lifecycle: claim it, continue a run in it, start it over, tell whether it is finished.

A folder holds a finished run exactly when its completion marker exists (`finished_at`). The marker is
written last, flushed to disk, after the model, tokenizer, run.json and model card; it is removed first,
before anything else, when a run is replaced. So a folder is never taken as finished without its model.

Layout: model or adapter + tokenizer (`from_pretrained`-loadable), `resolved_recipe.yaml`, `recipe_hash.json`,
`metrics.jsonl`, `metrics.png`, `run.json`, `README.md` (model card), sealed `checkpoint-N/` folders,
`runs/` (TensorBoard), `merged/` (LoRA merged into the base, if asked), `reference_logps/` (a cache that
outlives runs: its files are checked before use), `COMPLETE`.

Starting a run over deletes only what spo-align (or the Trainer it drives) writes: the names above and the
Trainer's model, adapter and tokenizer files. Anything else in the folder stays, and is named in the log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo_align.os_errors import reason
from spo_align.train.checkpoints import (
    CHECKPOINT,
    checkpoint_folders,
    fsync_dir,
    is_sealed,
    last_checkpoint,
    remove_checkpoint,
    rotate,
)
from spo_align.train.recipe_hash import HASH_FILE, RecipeHashError, RecipeSettings, differences

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
RUN_INFO = "run.json"
METRICS = "metrics.jsonl"
RESOLVED_RECIPE = "resolved_recipe.yaml"
MODEL_CARD = "README.md"
CURVES = "metrics.png"
REFERENCE_CACHE = "reference_logps"
CARD_MARK = "<!-- model card written by spo-align -->"
"""The line that tells a README.md spo-align wrote from one a person put in the folder."""

_TOOL_NAMES = frozenset({
    COMPLETE_MARKER, RUN_INFO, METRICS, RESOLVED_RECIPE, HASH_FILE, CURVES, "runs", "merged",
    # what Trainer.save_model and save_pretrained write for a model, an adapter and a tokenizer
    "config.json", "generation_config.json", "training_args.bin", "model.safetensors", "pytorch_model.bin",
    "model.safetensors.index.json", "pytorch_model.bin.index.json", "adapter_config.json",
    "adapter_model.safetensors", "adapter_model.bin", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json",
    "merges.txt", "tokenizer.model",
})
_TOOL_PATTERNS = (
    CHECKPOINT,
    re.compile(r"^model-\d+-of-\d+\.safetensors$"),
    re.compile(r"^pytorch_model-\d+-of-\d+\.bin$"),
    re.compile(r"^\..+\.tmp-\d+$"),  # checkpoints.write_durably
    re.compile(r"^.+\.tmp$"),  # recipe.load.save_resolved
)


class OutputFolderError(ValueError):
    """The output folder cannot be used as asked (finished run without --overwrite, another recipe, not writable)."""


def finished_at(output_dir: Path) -> float | None:
    """When the run in `output_dir` was marked finished (the marker's mtime), or None if it is not finished.

    The one test of "is this run finished", for `spo train` and `spo experiment` alike."""
    marker = Path(output_dir) / COMPLETE_MARKER
    try:
        return marker.stat().st_mtime if marker.is_file() else None
    except OSError:
        return None


def unfinished_run_problem(folder: Path) -> str | None:
    """Why `folder` cannot be used as a model: it is a spo-align run without its completion marker (its model may
    be missing or half-written), or a checkpoint of one that was never sealed. None for anything else (a
    finished run, a sealed checkpoint, a folder spo-align did not write)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if folder.name == "merged" and _has_recipe(folder.parent) and finished_at(folder.parent) is None:
        return (
            f"{folder} is the merged model of an unfinished spo-align run (no {COMPLETE_MARKER} marker in "
            f"{folder.parent}: it may be half-written); finish the run by running its spo train command again"
        )
    if CHECKPOINT.match(folder.name) and _has_recipe(folder.parent):
        if is_sealed(folder):
            return None
        return (
            f"{folder} is a checkpoint that was never completely written (no valid seal): use a sealed "
            "checkpoint-N of the run, or the finished run"
        )
    if finished_at(folder) is not None or not (_has_recipe(folder) or (folder / RUN_INFO).is_file()):
        return None
    return (
        f"{folder} is an unfinished spo-align run (no {COMPLETE_MARKER} marker: its model may be missing or "
        "half-written); finish it by running its spo train command again, or use one of its sealed "
        "checkpoint-N folders"
    )


def _is_tool_file(path: Path) -> bool:
    if path.name == REFERENCE_CACHE:
        return False
    if path.name in _TOOL_NAMES or any(p.match(path.name) for p in _TOOL_PATTERNS):
        return True
    if path.name == MODEL_CARD and path.is_file():
        try:
            with path.open(encoding="utf-8", errors="replace") as handle:
                return CARD_MARK in handle.read(65536)
        except OSError:
            return False
    return False


def _has_recipe(output_dir: Path) -> bool:
    return (output_dir / RESOLVED_RECIPE).is_file() or (output_dir / HASH_FILE).is_file()


def _only_tool_files(output_dir: Path) -> bool:
    return all(_is_tool_file(child) or child.name == REFERENCE_CACHE for child in output_dir.iterdir())


def clear_run(output_dir: Path) -> list[str]:
    """Delete the run in `output_dir`: the marker first (flushed), then every file spo-align or the Trainer
    writes. The reference cache and anything else stay; returns the names of what was kept."""
    output_dir = Path(output_dir)
    marker = output_dir / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()
        fsync_dir(output_dir)
    kept = []
    for child in sorted(output_dir.iterdir()):
        if not _is_tool_file(child):
            kept.append(child.name)
        elif CHECKPOINT.match(child.name) and child.is_dir() and not child.is_symlink():
            remove_checkpoint(child)
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    others = [name for name in kept if name != REFERENCE_CACHE]
    if others:
        logger.warning("kept in %s what spo-align did not write: %s", output_dir, ", ".join(others))
    return kept


@dataclass(frozen=True)
class Claim:
    """What `claim_folder` decided."""

    checkpoint: Path | None
    """The sealed checkpoint to continue from, or None to train from the start."""
    continued: bool
    """True when an unfinished run of the same recipe is continued from `checkpoint`."""


def _ensure_folder(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFolderError(f"output.dir {output_dir} cannot be created: {reason(exc)}") from None
    probe = output_dir / f".spo-write-test-{os.getpid()}.tmp"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputFolderError(f"output.dir {output_dir} is not writable: {reason(exc)}") from None


_SHOWN_KEYS = 12


def _other_recipe(output_dir: Path, settings: RecipeSettings) -> str | None:
    """`key: old -> new; ...` when the folder's run was of other settings (None when the same); raises
    `RecipeHashError` when its recorded settings cannot be read."""
    recorded = RecipeSettings.read(output_dir, output_dir / RESOLVED_RECIPE)
    changed = differences(recorded, settings)
    if not changed:
        return None
    more = f"; and {len(changed) - _SHOWN_KEYS} more" if len(changed) > _SHOWN_KEYS else ""
    return "; ".join(changed[:_SHOWN_KEYS]) + more


def claim_folder(
    output_dir: Path, settings: RecipeSettings, *, resume: bool, overwrite: bool, primary: bool = True
) -> Claim:
    """Make `output_dir` ready for a run of `settings`; say where it starts.

    - finished run: refused unless `overwrite` (then deleted, marker first);
    - unfinished run of the same settings (equal recipe hash): continued from its newest sealed checkpoint;
    - unfinished run of other settings, with a sealed checkpoint: refused, naming the keys that differ,
      unless `overwrite`;
    - unfinished run without a sealed checkpoint (it failed or was stopped before its first one): started
      over, its files deleted, whatever its settings; `resume` refuses it;
    - a folder of other files only: refused, never emptied; missing or empty: created (`resume` refuses).

    `primary` False (a second node of a multi-node launch) decides the same way and changes nothing.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputFolderError(f"output.dir {output_dir} exists and is not a folder")
    occupied = output_dir.is_dir() and any(output_dir.iterdir())
    if finished_at(output_dir) is not None:
        if not overwrite:
            raise OutputFolderError(
                f"output.dir {output_dir} holds a finished run; pass --overwrite to replace it "
                "or set another output.dir (e.g. --set output.dir=...)"
            )
        if primary:
            logger.warning("--overwrite: removing the finished run in %s", output_dir)
            clear_run(output_dir)
    elif occupied and not _has_recipe(output_dir) and _only_tool_files(output_dir):
        if resume:  # leftovers with no recorded recipe (a cache, a log): nothing to continue
            raise OutputFolderError(f"output.dir {output_dir} holds no run to resume; run without --resume to start one")
        if primary:
            clear_run(output_dir)
    elif occupied and not _has_recipe(output_dir):
        raise OutputFolderError(
            f"output.dir {output_dir} holds files that are not a spo-align run (no {RESOLVED_RECIPE}); "
            "choose a new or empty folder"
        )
    elif occupied and overwrite:
        if primary:
            logger.warning("--overwrite: removing the unfinished run in %s", output_dir)
            clear_run(output_dir)
    elif occupied:
        checkpoint = last_checkpoint(output_dir)
        try:
            other = _other_recipe(output_dir, settings)
        except RecipeHashError as exc:
            if checkpoint is not None:
                raise OutputFolderError(f"{exc}; pass --overwrite to start the run over") from None
            other = str(exc)
        if checkpoint is not None and other is not None:
            raise OutputFolderError(
                f"output.dir {output_dir} holds an unfinished run of another recipe ({other}); run the same recipe "
                "to continue it, pass --overwrite to start over, or set another output.dir"
            )
        if checkpoint is not None:
            if primary:
                _drop_unsealed(output_dir, checkpoint)
            logger.info("continuing the unfinished run in %s from %s", output_dir, checkpoint.name)
            return Claim(checkpoint, continued=True)
        if resume:
            raise OutputFolderError(
                f"output.dir {output_dir} holds no complete checkpoint to resume from; run without --resume "
                "to start the run over"
            )
        if primary:  # nothing to continue, so nothing to protect: a run that failed before its first checkpoint
            logger.warning(
                "no complete checkpoint in %s: starting the unfinished run over%s", output_dir,
                f" with the changed recipe ({other})" if other else "",
            )
            clear_run(output_dir)
    elif resume:
        raise OutputFolderError(f"output.dir {output_dir} holds no run to resume; run without --resume to start one")
    if primary:
        _ensure_folder(output_dir)
    return Claim(None, continued=False)


def _drop_unsealed(output_dir: Path, checkpoint: Path) -> None:
    """Remove checkpoint folders an interrupted save left (unsealed, or newer than the one continued from)."""
    step = int(CHECKPOINT.match(checkpoint.name).group(1))  # type: ignore[union-attr]
    for other_step, folder in checkpoint_folders(output_dir):
        if other_step > step:
            logger.warning("removing %s: an interrupted save left it incomplete", folder)
            remove_checkpoint(folder)
    rotate(output_dir, None)


def metric_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, record) for every non-blank line of a metrics.jsonl file, or (line number, why the line is
    no record): torn by a killed run, not UTF-8, not JSON, or not a JSON object."""
    for number, raw in enumerate(Path(path).read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield number, "not UTF-8"
            continue
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            yield number, "not JSON: a torn line?"
            continue
        yield number, value if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl file. A line that cannot be a record (`metric_lines`) is skipped, and one
    warning names the file and those lines."""
    path = Path(path)
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    skipped: list[int] = []
    for number, record in metric_lines(path):
        if isinstance(record, str):
            skipped.append(number)
        else:
            records.append(record)
    if skipped:
        shown = ", ".join(str(n) for n in skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        logger.warning("%s: skipped %d line(s) that are not metric records (line %s)", path, len(skipped), shown)
    return records


def record_step(record: dict[str, Any]) -> int | None:
    """The record's `step` as a whole number >= 0, or None when it has none that is."""
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step != step or step < 0:
        return None
    return int(step) if float(step).is_integer() else None
