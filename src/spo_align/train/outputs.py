"""The output folder's lifecycle: claim it, resume in it, finish it.

A folder holds a finished run exactly when its completion marker exists. The marker is written last,
atomically (temporary file + rename), after the model, tokenizer and run.json; so a run killed at any
point leaves a folder that is never mistaken for a finished one.

Layout: model or adapter + tokenizer (`from_pretrained`-loadable), `resolved_recipe.yaml`,
`metrics.jsonl`, `run.json`, `checkpoint-N/` (Trainer checkpoints), `runs/` (TensorBoard), `COMPLETE`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan
    from spo_align.train.context import RunContext

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
RUN_INFO = "run.json"
METRICS = "metrics.jsonl"
RESOLVED_RECIPE = "resolved_recipe.yaml"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
PACKAGES = (
    "spo-align", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "deepspeed",
    "flash-attn", "bitsandbytes",
)


class OutputFolderError(ValueError):
    """The output folder cannot be used as asked (finished run without --overwrite, unfinished without --resume)."""


def is_complete(output_dir: Path) -> bool:
    return (Path(output_dir) / COMPLETE_MARKER).is_file()


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest `checkpoint-N` whose trainer state was written (the Trainer writes it last), else None."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found: list[tuple[int, Path]] = []
    for child in output_dir.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def _has_progress(output_dir: Path) -> bool:
    """True if the folder holds a checkpoint or saved weights (work a restart would throw away)."""
    return any(
        _CHECKPOINT.match(child.name) or child.name.endswith((".safetensors", ".bin"))
        for child in output_dir.iterdir()
    )


def _clear(output_dir: Path) -> None:
    for child in output_dir.iterdir():
        if child.name == "reference_logps":
            continue  # precomputed reference log-probs: keyed by model/tokenizer/data/settings, safe to reuse
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def prepare_output_dir(output_dir: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Make `output_dir` ready for a run; return the checkpoint to resume from (or None).

    - finished run: refused unless `overwrite` (then emptied);
    - unfinished run (files, no marker): `resume` continues from its last checkpoint, `overwrite` empties it,
      neither is refused so that nothing is silently thrown away;
    - empty or missing: created; a folder with other files (not a run) is refused, never emptied.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputFolderError(f"output.dir {output_dir} exists and is not a folder")
    if is_complete(output_dir):
        if not overwrite:
            raise OutputFolderError(
                f"output.dir {output_dir} holds a finished run; pass --overwrite to replace it "
                "or set another output.dir (e.g. --set output.dir=...)"
            )
        logger.warning("--overwrite: removing the finished run in %s", output_dir)
        _clear(output_dir)
    elif output_dir.is_dir() and any(output_dir.iterdir()):
        if not (output_dir / RESOLVED_RECIPE).is_file():
            raise OutputFolderError(
                f"output.dir {output_dir} holds files that are not a spo-align run (no {RESOLVED_RECIPE}); "
                "choose a new or empty folder"
            )
        if overwrite or not _has_progress(output_dir):
            # Without a checkpoint or a saved model nothing would be lost: a run that failed while setting up.
            if overwrite:
                logger.warning("--overwrite: removing the unfinished run in %s", output_dir)
            _clear(output_dir)
        elif not resume:
            raise OutputFolderError(
                f"output.dir {output_dir} holds an unfinished run; pass --resume to continue it "
                "or --overwrite to start over"
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    if not resume or overwrite:
        return None
    checkpoint = last_checkpoint(output_dir)
    if checkpoint is None:
        logger.warning("--resume: no checkpoint in %s yet; starting from the beginning", output_dir)
    else:
        logger.info("resuming from %s", checkpoint)
    return checkpoint


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (a torn last line from a killed run is skipped)."""
    records: list[dict[str, Any]] = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping a torn line in %s", path)
    return records


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _git_revision() -> str | None:
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{out}{'+dirty' if dirty else ''}" if out else None


def package_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_run_info(output_dir: Path, plan: RunPlan, ctx: RunContext, *, started: str, finished: str | None) -> None:
    info = {
        "stage": plan.recipe.stage,
        "loss": plan.recipe.loss.type if plan.recipe.loss is not None else None,
        "recipe": str(plan.recipe_path),
        "started": started,
        "finished": finished,
        "resumed_from": ctx.resume_from_checkpoint,
        "git_revision": _git_revision(),
        "packages": package_versions(),
        "hardware": hardware(),
        "run_info": ctx.run_info,
    }
    atomic_write_text(Path(output_dir) / RUN_INFO, json.dumps(info, indent=2, default=str) + "\n")


def save_resolved_recipe(plan: RunPlan, output_dir: Path) -> Path:
    from spo_align.recipe.load import save_resolved

    path = Path(output_dir) / RESOLVED_RECIPE
    save_resolved(plan, path)
    return path


def make_save_final(plan: RunPlan, ctx: RunContext, *, started: str) -> Any:
    """The `RunContext.save_final` callable: model/adapter + tokenizer, run.json, then the marker."""

    def save_final(trainer: Any) -> None:
        output_dir = ctx.output_dir
        trainer.save_model(str(output_dir))  # every rank: ZeRO-3 gathers the shards here
        if not trainer.is_world_process_zero():
            return
        tokenizer = getattr(trainer, "processing_class", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(output_dir))
        if plan.recipe.adapter is not None and plan.recipe.output.save_merged:
            _save_merged(trainer, output_dir / "merged", tokenizer)
        write_run_info(output_dir, plan, ctx, started=started, finished=now())
        atomic_write_text(output_dir / COMPLETE_MARKER, now() + "\n")
        logger.info("finished: %s", output_dir)

    return save_final


def _save_merged(trainer: Any, path: Path, tokenizer: Any) -> None:
    import copy

    model = trainer.accelerator.unwrap_model(trainer.model)
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    logger.info("saved the merged model to %s", path)
