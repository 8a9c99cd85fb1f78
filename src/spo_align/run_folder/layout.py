"""What a run's output folder holds: the names of the files spo-align writes, which of them are its own, and the
one test of "is this run finished".

Layout: model or adapter + tokenizer (`from_pretrained`-loadable), `resolved_recipe.yaml`, `recipe_hash.json`,
`metrics.jsonl`, `metrics.png`, `run.json`, `README.md` (model card), sealed `checkpoint-N/` folders,
`runs/` (TensorBoard), `merged/` (LoRA merged into the base, if asked), `reference_logps/` (a cache that
outlives runs: its files are checked before use), `.spo-lock` while a run is live (`lock`), `COMPLETE`.

A folder holds a finished run exactly when its completion marker exists (`finished_at`): the marker is
written last, flushed to disk, after the model, tokenizer, run.json and model card (`lifecycle.complete`).
"""

from __future__ import annotations

import re
from pathlib import Path

from spo_align.run_folder.checkpoints import CHECKPOINT, TEMPORARY
from spo_align.run_folder.recipe_hash import HASH_FILE

COMPLETE_MARKER = "COMPLETE"
RUN_INFO = "run.json"
METRICS = "metrics.jsonl"
RESOLVED_RECIPE = "resolved_recipe.yaml"
MODEL_CARD = "README.md"
CURVES = "metrics.png"
REFERENCE_CACHE = "reference_logps"
LOCK = ".spo-lock"
"""The lock of the live run (`run_folder.lock`): never deleted by a run starting over, never counted as content."""
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
    TEMPORARY,  # checkpoints.write_durably
    re.compile(r"^.+\.tmp$"),  # recipe.load.save_resolved
    re.compile(r"^\.spo-lock(\.dead-.+)?$"),  # run_folder.lock (.dead-*: a lock moved aside by older versions)
)


def finished_at(output_dir: Path) -> float | None:
    """When the run in `output_dir` was marked finished (the marker's mtime), or None if it is not finished.

    The one test of "is this run finished", for `spo train` and `spo experiment` alike."""
    marker = Path(output_dir) / COMPLETE_MARKER
    try:
        return marker.stat().st_mtime if marker.is_file() else None
    except OSError:
        return None


def is_tool_file(path: Path) -> bool:
    """True for what spo-align or the Trainer writes into a run folder (deleted when a run starts over); never
    the reference cache, which outlives runs."""
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
