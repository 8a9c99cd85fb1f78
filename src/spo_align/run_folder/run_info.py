"""run.json: what ran, how it was started, on what, and what it reported.

Written when the folder is claimed (`finished: null`, the command, the recipe hash, one entry per session:
a continued run adds one) and again when the run finishes (the stage's facts, packages, hardware,
`finished`). Every value the model card shows about the run comes from this file.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spo_align.run_folder.checkpoints import write_durably
from spo_align.run_folder.layout import RUN_INFO

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan

logger = logging.getLogger(__name__)

PACKAGES = (
    "spo-align", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "deepspeed",
    "flash-attn", "bitsandbytes",
)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_run_info(output_dir: Path) -> dict[str, Any]:
    """run.json as written, or {} when it is missing or unreadable (a run killed before writing it)."""
    try:
        info = json.loads((Path(output_dir) / RUN_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


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


def _write(output_dir: Path, info: dict[str, Any]) -> None:
    write_durably(Path(output_dir) / RUN_INFO, json.dumps(info, indent=2, default=str) + "\n")


def write_claim_info(
    output_dir: Path,
    plan: RunPlan,
    *,
    command: str,
    recipe_hash: str,
    resumed_from: Path | None,
    continued: bool,
    changed: list[str] | None = None,
    data_sources: dict[str, Any] | None = None,
    data_changed: list[str] | None = None,
) -> None:
    """run.json as a run (or a continuation of one) starts: `finished` is null until it ends; `data_sources`:
    what each source held now (`data_sources.fingerprint`), `data_changed`: how it differs from the record a
    continued run was accepted with (`--accept-data-change`)."""
    previous = read_run_info(output_dir) if continued else {}
    started = now()
    session: dict[str, Any] = {
        "started": started, "command": command, "resumed_from": str(resumed_from) if resumed_from else None,
    }
    if changed:
        session["changed"] = changed  # keys that cannot change the weights, changed for this session
    if data_changed:
        session["data_changed"] = data_changed  # accepted with --accept-data-change
    info = {
        "stage": plan.recipe.stage,
        "loss": plan.recipe.loss.type if plan.recipe.loss is not None else None,
        "recipe": str(plan.recipe_path),
        "recipe_hash": recipe_hash,
        "command": previous.get("command", command),
        "started": previous.get("started", started),
        "finished": None,
        "resumed_from": session["resumed_from"],
        "sessions": [*previous.get("sessions", []), session],
    }
    if data_sources is not None:
        info["data_sources"] = data_sources
    _write(output_dir, info)


def write_final_info(
    output_dir: Path, plan: RunPlan, *, resumed_from: str | None, facts: dict[str, Any]
) -> dict[str, Any]:
    """run.json of a finished run: what the claim wrote, plus the stage's facts (`facts`, written as `run_info`)
    and where it ran."""
    info = read_run_info(output_dir)
    info.update({
        "stage": plan.recipe.stage,
        "loss": plan.recipe.loss.type if plan.recipe.loss is not None else None,
        "recipe": info.get("recipe", str(plan.recipe_path)),
        "started": info.get("started", now()),
        "finished": now(),
        "resumed_from": resumed_from,
        "git_revision": _git_revision(),
        "packages": package_versions(),
        "hardware": hardware(),
        "run_info": facts,
    })
    _write(output_dir, info)
    return info
