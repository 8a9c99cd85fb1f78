"""Trainer checkpoints that are never resumed from half-written.

The Hugging Face Trainer writes `checkpoint-N/` in place (weights, optimizer, scheduler, RNG states, then
`trainer_state.json`) and deletes old checkpoints before it returns; nothing marks the folder as whole, and
nothing is flushed to disk. A run killed or a machine lost during a save can leave a folder with a torn or
missing file. So every checkpoint is sealed after the Trainer wrote it: every rank's files are on disk
(all ranks wait for each other, then rank 0 fsyncs every file), and rank 0 writes `spo_checkpoint.json`
(each file's size) atomically. Only a sealed checkpoint whose files still have their recorded sizes is
resumed from. Old checkpoints are deleted after the new one is sealed (the Trainer's own rotation is
switched off, since it deletes before), each losing its seal first. The callback that does both is
`train/callbacks.CheckpointSealCallback`; this module imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

SEAL = "spo_checkpoint.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """Every `checkpoint-N` folder, oldest step first, sealed or not."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT.match(child.name)
        if match and child.is_dir() and not child.is_symlink():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _files(folder: Path) -> dict[str, int]:
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != SEAL
    }


def is_sealed(folder: Path) -> bool:
    """True when `folder` carries a seal for its own step and every file it lists has its recorded size."""
    folder = Path(folder)
    match = CHECKPOINT.match(folder.name)
    try:
        seal = json.loads((folder / SEAL).read_text(encoding="utf-8"))
        if not match or seal.get("step") != int(match.group(1)):
            return False
        files = seal["files"]
        return bool(files) and all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest sealed checkpoint, else None."""
    for _, folder in reversed(checkpoint_folders(output_dir)):
        if is_sealed(folder):
            return folder
    return None


def checkpoint_step(folder: Path) -> tuple[int, int | None]:
    """(global_step, max_steps) from a checkpoint's trainer state; max_steps None when it was not recorded."""
    state = json.loads((Path(folder) / "trainer_state.json").read_text(encoding="utf-8"))
    max_steps = state.get("max_steps")
    return int(state["global_step"]), int(max_steps) if isinstance(max_steps, int) and max_steps > 0 else None


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folders themselves, to the disk."""
    folders = [Path(folder)]
    for path in sorted(Path(folder).rglob("*")):
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in folders:
        fsync_dir(path)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory; the files themselves were synced
        pass
    finally:
        os.close(fd)


def write_durably(path: Path, text: str) -> None:
    """Write `path` as a whole or not at all: a flushed temporary file renamed over it, the folder flushed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def seal(folder: Path) -> None:
    """Flush `folder` to disk and write its seal (the step and every file's size)."""
    folder = Path(folder)
    match = CHECKPOINT.match(folder.name)
    if not match:
        raise ValueError(f"{folder} is not a checkpoint-N folder")
    fsync_tree(folder)
    body = {"step": int(match.group(1)), "files": _files(folder)}
    write_durably(folder / SEAL, json.dumps(body, indent=1) + "\n")


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint, its seal first, so that a half-deleted one is never taken as whole."""
    (Path(folder) / SEAL).unlink(missing_ok=True)
    fsync_dir(Path(folder))
    shutil.rmtree(folder, ignore_errors=True)


def rotate(output_dir: Path, keep: int | None) -> None:
    """Keep the newest `keep` sealed checkpoints (all when None); unsealed ones older than the newest are
    leftovers of an interrupted save and go too."""
    folders = checkpoint_folders(output_dir)
    sealed = [(step, folder) for step, folder in folders if is_sealed(folder)]
    if not sealed:
        return
    newest = sealed[-1][0]
    kept = {folder for _, folder in (sealed[-keep:] if keep else sealed)}
    for step, folder in folders:
        if folder in kept or step > newest:
            continue
        logger.info("removing old checkpoint %s", folder)
        remove_checkpoint(folder)
