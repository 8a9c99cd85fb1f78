"""The output folder's lifecycle: claim it, continue a run in it, start it over, mark it complete.

`claim` decides where a run starts (`claim_folder`: continue, start over, or refuse) and records it in the
folder: the resolved recipe, its hash and run.json. `complete` ends it: run.json's final facts, the model card,
every file flushed, and the completion marker last (`layout.finished_at` is the test of a finished run). The
marker is removed first, before anything else, when a run is replaced. So a folder is never taken as finished
without its model.

Starting a run over deletes only what spo-align (or the Trainer it drives) writes: the names above and the
Trainer's model, adapter and tokenizer files. Anything else in the folder stays, and is named in the log.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spo_align.os_errors import reason
from spo_align.run_folder.checkpoints import (
    CHECKPOINT,
    checkpoint_folders,
    damage,
    fsync_dir,
    fsync_tree,
    has_seal,
    is_sealed,
    remove_checkpoint,
    rotate,
    write_durably,
)
from spo_align.run_folder.layout import (
    COMPLETE_MARKER,
    LOCK,
    METRICS,
    MODEL_CARD,
    REFERENCE_CACHE,
    RESOLVED_RECIPE,
    RUN_INFO,
    finished_at,
    is_tool_file,
)
from spo_align.run_folder.recipe_hash import (
    HASH_FILE,
    RecipeHashError,
    RecipeSettings,
    changed_keys,
    differences,
)

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan

logger = logging.getLogger(__name__)


class OutputFolderError(ValueError):
    """The output folder cannot be used as asked (finished run without --overwrite, another recipe, not writable)."""


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


def _has_recipe(output_dir: Path) -> bool:
    return (output_dir / RESOLVED_RECIPE).is_file() or (output_dir / HASH_FILE).is_file()


def _contents(output_dir: Path) -> list[Path]:
    """What the folder holds, less the live run's lock (`lock.py`)."""
    return [child for child in output_dir.iterdir() if child.name != LOCK]


def _only_tool_files(output_dir: Path) -> bool:
    return all(is_tool_file(child) or child.name == REFERENCE_CACHE for child in _contents(output_dir))


def clear_run(output_dir: Path) -> list[str]:
    """Delete the run in `output_dir`: the marker first (flushed), then every file spo-align or the Trainer
    writes. The reference cache and anything else stay; returns the names of what was kept."""
    output_dir = Path(output_dir)
    marker = output_dir / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()
        fsync_dir(output_dir)
    kept = []
    for child in sorted(_contents(output_dir)):
        if not is_tool_file(child):
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
    data_changed: tuple[str, ...] = ()
    """The data sources that changed since the run started, continued on with `accept_data_change`."""


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


def recipe_changes(output_dir: Path, plan: RunPlan) -> list[str]:
    """`key: old -> new` for every setting that decides a run (`recipe_hash`) that `plan` changes from the run in
    `output_dir` (empty when the same: `spo train` would continue it, `spo experiment` skip it when finished).
    Raises `OutputFolderError` when the folder's recorded settings cannot be read."""
    try:
        recorded = RecipeSettings.read(Path(output_dir), Path(output_dir) / RESOLVED_RECIPE)
    except RecipeHashError as exc:
        raise OutputFolderError(str(exc)) from None
    return differences(recorded, RecipeSettings.from_plan(plan))


def claim_folder(
    output_dir: Path,
    settings: RecipeSettings,
    *,
    resume: bool,
    overwrite: bool,
    primary: bool = True,
    sources: dict[str, dict[str, Any]] | None = None,
    accept_data_change: bool = False,
) -> Claim:
    """Make `output_dir` ready for a run of `settings`; say where it starts.

    - finished run: refused unless `overwrite` (then deleted, marker first);
    - unfinished run of the same settings (equal recipe hash): continued from its newest sealed checkpoint;
    - unfinished run of other settings, with a sealed checkpoint: refused, naming the keys that differ,
      unless `overwrite`;
    - unfinished run without a sealed checkpoint (it failed or was stopped before its first one): started
      over, its files deleted, whatever its settings; `resume` refuses it;
    - a folder of other files only: refused, never emptied; missing or empty: created (`resume` refuses).

    A run continued is refused when its newest sealed checkpoint is damaged (`_intact`), and when `sources` (the
    data as it is now, `data_sources.fingerprint`) differ from what run.json recorded, unless `accept_data_change`.

    `primary` False (a second node of a multi-node launch) decides the same way and changes nothing.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputFolderError(f"output.dir {output_dir} exists and is not a folder")
    occupied = output_dir.is_dir() and bool(_contents(output_dir))
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
        sealed = [folder for _, folder in reversed(checkpoint_folders(output_dir)) if has_seal(folder)]
        checkpoint = sealed[0] if sealed else None
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
            data_changed: list[str] = []
            if primary:  # every file read back against its seal; the other nodes find the same checkpoint
                checkpoint = _intact(output_dir, sealed)
                data_changed = _data_changes(output_dir, sources, accept_data_change)
                _drop_unsealed(output_dir, checkpoint)
            logger.info("continuing the unfinished run in %s from %s", output_dir, checkpoint.name)
            return Claim(checkpoint, continued=True, data_changed=tuple(data_changed))
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


def _intact(output_dir: Path, sealed: list[Path]) -> Path:
    """The newest of the sealed checkpoints `sealed` (newest first) if its files match their seal; otherwise
    `OutputFolderError` naming what is damaged, keeping it, and saying how to go on (start over, or move it
    away to continue from the newest intact one)."""
    import time

    damaged: list[str] = []
    intact = None
    for folder in sealed:
        started = time.monotonic()
        problem = damage(folder)
        if problem is None:
            intact = folder
            logger.info("%s matches its seal (checked in %.1f s)", folder.name, time.monotonic() - started)
            break
        damaged.append(f"{folder.name}: {problem}")
    if not damaged and intact is not None:
        return intact
    newest = sealed[0].name
    older = (
        f", or move {newest} out of the folder to continue from {intact.name}, the newest intact checkpoint"
        if intact is not None and len(damaged) == 1 else ""
    )
    raise OutputFolderError(
        f"output.dir {output_dir} holds a damaged checkpoint ({'; '.join(damaged)}); nothing was deleted. Pass "
        f"--overwrite to start the run over{older}"
    )


def _data_changes(output_dir: Path, sources: dict[str, dict[str, Any]] | None, accept: bool) -> list[str]:
    """The data sources that changed since the run in `output_dir` started; refused unless `accept`."""
    from spo_align.run_folder.data_sources import changes
    from spo_align.run_folder.run_info import read_run_info

    if sources is None:
        return []
    changed = changes(read_run_info(output_dir).get("data_sources"), sources)
    if changed and not accept:
        raise OutputFolderError(
            f"output.dir {output_dir}: the data changed since this run started ({'; '.join(changed)}); the rest "
            "of the run would train on other data. Put the data back, pass --accept-data-change to continue on "
            "it, or --overwrite to start over"
        )
    if changed:
        logger.warning("--accept-data-change: continuing on changed data: %s", "; ".join(changed))
    return changed


def _drop_unsealed(output_dir: Path, checkpoint: Path) -> None:
    """Remove checkpoint folders an interrupted save left (unsealed, or newer than the one continued from)."""
    step = int(CHECKPOINT.match(checkpoint.name).group(1))  # type: ignore[union-attr]
    for other_step, folder in checkpoint_folders(output_dir):
        if other_step > step:
            logger.warning("removing %s: an interrupted save left it incomplete", folder)
            remove_checkpoint(folder)
    rotate(output_dir, None)


# ---------------------------------------------------------------- a run's start and end


def claim(
    plan: RunPlan, *, resume: bool, overwrite: bool, command: str, primary: bool = True,
    accept_data_change: bool = False,
) -> str | None:
    """Claim `plan.output_dir` for the plan (see `claim_folder`) and record the run in it: the resolved recipe,
    its hash, and run.json with what each data source held (`data_sources`; `command` is the `spo train` line
    that runs it again). Returns the checkpoint to continue from, or None. `primary` False (another node of the
    same launch) reads and records nothing."""
    from spo_align.recipe.load import save_resolved
    from spo_align.run_folder.data_sources import fingerprint
    from spo_align.run_folder.run_info import write_claim_info

    output_dir = Path(plan.output_dir)
    settings = RecipeSettings.from_plan(plan)
    sources = fingerprint(plan) if primary else None  # an unreadable source stops here, before the folder changes
    claimed = claim_folder(
        output_dir, settings, resume=resume, overwrite=overwrite, primary=primary, sources=sources,
        accept_data_change=accept_data_change,
    )
    if primary:
        changed = _changed_since(output_dir / RESOLVED_RECIPE, plan) if claimed.continued else []
        if changed:
            logger.info("continuing with keys that do not change the weights changed: %s", "; ".join(changed))
        save_resolved(plan, output_dir / RESOLVED_RECIPE)
        settings.write(output_dir)
        write_claim_info(
            output_dir, plan, command=command, recipe_hash=settings.hash,
            resumed_from=claimed.checkpoint, continued=claimed.continued, changed=changed,
            data_sources=sources, data_changed=list(claimed.data_changed),
        )
    return str(claimed.checkpoint) if claimed.checkpoint is not None else None


def _changed_since(resolved: Path, plan: RunPlan) -> list[str]:
    """Keys of the folder's resolved recipe that this continuation changes (only non-deciding ones can)."""
    import yaml

    try:
        old = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    return changed_keys(old, plan.recipe_dict()) if isinstance(old, dict) else []


def complete(
    output_dir: Path, plan: RunPlan, *, resumed_from: str | None, facts: dict[str, Any], curves_error: str | None
) -> dict[str, Any]:
    """Mark the run in `output_dir` finished, once its model and tokenizer are saved and its curves drawn:
    run.json's final facts (`facts`: what the stage reported), the model card, every file flushed, then the
    completion marker, flushed too. A machine lost at any moment leaves either a finished run whole or a folder
    that is not marked finished. Returns run.json as written."""
    from spo_align.run_folder.card import render
    from spo_align.run_folder.metrics_file import read_metrics
    from spo_align.run_folder.run_info import now, write_final_info

    output_dir = Path(output_dir)
    info = write_final_info(output_dir, plan, resumed_from=resumed_from, facts=facts)
    write_durably(output_dir / MODEL_CARD, render(output_dir, plan, info, read_metrics(output_dir / METRICS), curves_error))
    _flush_outputs(output_dir)
    write_durably(output_dir / COMPLETE_MARKER, now() + "\n")
    logger.info("finished: %s", output_dir)
    return info


def _flush_outputs(output_dir: Path) -> None:
    """Flush the folder's own files and merged/ (checkpoints were flushed when they were sealed)."""
    for child in _contents(Path(output_dir)):
        if child.is_file() and not child.name.startswith(LOCK):
            with child.open("rb") as handle:
                os.fsync(handle.fileno())
    merged = Path(output_dir) / "merged"
    if merged.is_dir():
        fsync_tree(merged)
    fsync_dir(Path(output_dir))
