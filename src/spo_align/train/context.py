"""What the runner hands to a stage: where to write, whether to resume, which callbacks to attach.

`train/run.py` builds one `RunContext` per run and calls exactly one stage function
(`run_sft`, `run_preference`, `run_kto`) with the resolved plan and this context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunContext:
    output_dir: Path
    """Final output folder (model/adapter, tokenizer, resolved recipe, metrics.jsonl, run.json)."""
    resume_from_checkpoint: str | None = None
    """Checkpoint folder to resume from, or None for a fresh run."""
    callbacks: list[Any] = field(default_factory=list)
    """transformers.TrainerCallback instances every stage attaches (metrics.jsonl, progress bar, ...)."""
    save_final: Callable[[Any], None] | None = None
    """Called with the finished Trainer: saves model/adapter + tokenizer and marks the run complete."""
    run_info: dict[str, Any] = field(default_factory=dict)
    """Facts a stage adds for run.json (row-policy counts, padding share, real tokens/s, ...)."""
