"""Trainer checkpoints that are never resumed from half-written.

The Hugging Face Trainer writes `checkpoint-N/` in place (weights, optimizer, scheduler, RNG states, then
`trainer_state.json`) and deletes old checkpoints before it returns; nothing marks the folder as whole, and
nothing is flushed to disk. A run killed or a machine lost during a save can leave a folder with a torn or
missing file. So every checkpoint is sealed after the Trainer wrote it: each rank flushes the files it wrote
itself and takes its checksum (in parallel; a file's writer is told by its name, below; `checksums.py`), all
ranks wait for each other, and rank 0 flushes the folders and writes `spo_checkpoint.json` (each file's size and
checksum, and how long writing and sealing took) atomically. `is_sealed` (cheap: sizes only) tells a whole
checkpoint from an interrupted save; `damage` (every file read back) is checked before a run continues from one,
so a file deleted, cut or overwritten after the seal is named and never resumed from. Old checkpoints are deleted after the new one is sealed (the Trainer's own rotation is
switched off, since it deletes before), each losing its seal first. The callback that does both is
`train/callbacks.CheckpointSealCallback`; this module imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SEAL = "spo_checkpoint.json"
SUMS = ".spo-sums-{rank}.json"
"""The checksums one rank took of the files it wrote, read into the seal by rank 0 and then deleted."""
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


TEMPORARY = re.compile(r"^\..+\.tmp-\d+$")
"""A file `write_durably` is writing (renamed over its target when whole): never part of a checkpoint."""


def _files(folder: Path) -> dict[str, int]:
    """Each file of checkpoint `folder` and its size, without the seal, the sums and files still being written.

    Ranks list the folder while the other ranks may still write theirs (`flush_own_files`): a temporary file another
    rank renames away between the listing and its `stat` is skipped, not an error."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.name == SEAL or ".spo-sums-" in path.name or TEMPORARY.match(path.name):
            continue
        try:
            if path.is_file():
                files[str(path.relative_to(folder))] = path.stat().st_size
        except FileNotFoundError:
            continue
    return files


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


def checkpoint_cost(folder: Path) -> tuple[int | None, float | None]:
    """(bytes, seconds to write and seal it) as recorded in a checkpoint's seal; None for what is not recorded."""
    try:
        body = json.loads((Path(folder) / SEAL).read_text(encoding="utf-8"))
        files = body["files"]
        size = sum(int(n) for n in files.values()) if isinstance(files, dict) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None
    times = [body.get("write_s"), body.get("seal_s")]
    seconds = sum(times) if all(isinstance(t, int | float) for t in times) else None
    return size, seconds


def checkpoint_step(folder: Path) -> tuple[int, int | None]:
    """(global_step, max_steps) from a checkpoint's trainer state; max_steps None when it was not recorded."""
    state = json.loads((Path(folder) / "trainer_state.json").read_text(encoding="utf-8"))
    max_steps = state.get("max_steps")
    return int(state["global_step"]), int(max_steps) if isinstance(max_steps, int) and max_steps > 0 else None


# The files one rank writes carry its number: the Trainer's `rng_state_{process_index}.pth` and DeepSpeed's
# `[bf16_]zero_pp_rank_{dp_rank}_mp_rank_XX_{model,optim}_states.pt` (data parallel only: dp rank = global rank),
# and spo-align's `logging_window_{process_index}.json` (train/callbacks.py).
# Every other file of a checkpoint (weights, trainer state, scheduler, tokenizer, DeepSpeed's `latest` and
# `mp_rank_00_model_states.pt`) is written by the main process alone.
RANK_FILE = re.compile(r"(?:^|_)(?:rng_state|zero_pp_rank|logging_window)_(\d+)[._]")


def file_writer(name: str, world_size: int) -> int:
    """The rank that writes the checkpoint file called `name` (0 for a name without a rank below `world_size`)."""
    match = RANK_FILE.search(name)
    rank = int(match.group(1)) if match else 0
    return rank if rank < world_size else 0


def flush_own_files(folder: Path, rank: int, world_size: int) -> None:
    """Flush to disk the files of checkpoint `folder` that rank `rank` wrote (the other ranks do theirs), and
    write their checksums to `SUMS` for the seal."""
    from spo_align.run_folder.checksums import default_algorithm, file_checksum

    folder = Path(folder)
    algorithm = default_algorithm()
    sums = {}
    for name in _files(folder):
        if file_writer(Path(name).name, world_size) == rank:
            sums[name] = file_checksum(folder / name, algorithm)
            fsync_file(folder / name)
    write_durably(folder / SUMS.format(rank=rank), json.dumps({"algorithm": algorithm, "checksums": sums}) + "\n")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path, *, files: bool = True) -> None:
    """Flush every file under `folder` (unless `files` is False: flushed already), then the folders themselves."""
    folders = [Path(folder)]
    for path in sorted(Path(folder).rglob("*")):
        if path.is_dir():
            folders.append(path)
        elif files and path.is_file():
            fsync_file(path)
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


def seal(
    folder: Path, *, files_flushed: bool = False, write_s: float | None = None, started: float | None = None
) -> None:
    """Flush `folder` to disk (its folders only when every rank flushed its files: `files_flushed`) and write its
    seal (the step and every file's size; with `write_s`, the seconds the checkpoint took to write, and the
    seconds sealing took from `started`, a `time.monotonic()`)."""
    folder = Path(folder)
    match = CHECKPOINT.match(folder.name)
    if not match:
        raise ValueError(f"{folder} is not a checkpoint-N folder")
    fsync_tree(folder, files=not files_flushed)
    files = _files(folder)
    algorithm, sums = _gather_sums(folder)
    from spo_align.run_folder.checksums import file_checksum

    for name in files:
        if name not in sums:  # not summed by a rank (a seal without the callback): summed here
            sums[name] = file_checksum(folder / name, algorithm)
    body: dict[str, object] = {
        "step": int(match.group(1)), "files": files, "checksum": algorithm,
        "checksums": {name: sums[name] for name in files},
    }
    if write_s is not None and started is not None:
        body["write_s"] = round(write_s, 3)
        body["seal_s"] = round(time.monotonic() - started, 3)
    write_durably(folder / SEAL, json.dumps(body, indent=1) + "\n")
    for path in folder.glob(".spo-sums-*.json"):
        path.unlink(missing_ok=True)


def _gather_sums(folder: Path) -> tuple[str, dict[str, str]]:
    """The checksums the ranks wrote for `folder` (`SUMS`), and their algorithm."""
    from spo_align.run_folder.checksums import available, default_algorithm

    algorithm, sums = default_algorithm(), {}
    for path in sorted(folder.glob(".spo-sums-*.json")):
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # summed again below
        if isinstance(body, dict) and available(str(body.get("algorithm"))) and isinstance(body.get("checksums"), dict):
            algorithm = str(body["algorithm"])
            sums.update(body["checksums"])
    return algorithm, sums


def has_seal(folder: Path) -> bool:
    """True when `folder` carries a readable seal for its own step: it was written whole once (an interrupted
    save has none), whatever happened to its files since."""
    match = CHECKPOINT.match(Path(folder).name)
    try:
        body = json.loads((Path(folder) / SEAL).read_text(encoding="utf-8"))
        return bool(match) and body.get("step") == int(match.group(1)) and bool(body["files"])  # type: ignore[union-attr]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def damage(folder: Path) -> str | None:
    """What is wrong with sealed checkpoint `folder`, in one phrase naming the file (`optimizer.pt missing`,
    `model.safetensors checksum mismatch`), or None when every file has its sealed size and checksum. Every file
    is read (about 10 GB/s with xxh3 from the page cache, the disk's speed otherwise); a seal older than
    checksums is checked by size only."""
    from spo_align.run_folder.checksums import available, file_checksum

    folder = Path(folder)
    try:
        body = json.loads((folder / SEAL).read_text(encoding="utf-8"))
        files, sums = dict(body["files"]), dict(body.get("checksums") or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its seal {SEAL} is missing or unreadable"
    algorithm = str(body.get("checksum", ""))
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, sealed with {size}"
    if sums and not available(algorithm):
        return f"its checksums are {algorithm}, which this installation cannot compute (pip install xxhash)"
    for name in files:
        if name in sums and file_checksum(folder / name, algorithm) != sums[name]:
            return f"{name} checksum mismatch"
    return None


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint, its seal first, so that a half-deleted one is never taken as whole."""
    (Path(folder) / SEAL).unlink(missing_ok=True)
    fsync_dir(Path(folder))
    shutil.rmtree(folder, ignore_errors=True)


def rotate(output_dir: Path, keep: int | None) -> None:
    """Keep the newest `keep` sealed checkpoints (all when None); unsealed ones older than the newest are
    leftovers of an interrupted save and go too. A sealed checkpoint damaged since is no leftover: it counts
    as sealed, and is deleted only as one of the oldest."""
    folders = checkpoint_folders(output_dir)
    sealed = [(step, folder) for step, folder in folders if has_seal(folder)]
    if not sealed:
        return
    newest = sealed[-1][0]
    kept = {folder for _, folder in (sealed[-keep:] if keep else sealed)}
    for step, folder in folders:
        if folder in kept or step > newest:
            continue
        logger.info("removing old checkpoint %s", folder)
        remove_checkpoint(folder)
