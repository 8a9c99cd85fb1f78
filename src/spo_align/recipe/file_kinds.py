"""Telling a recipe from the other YAML/JSON files spo-align reads: an experiment file, a DeepSpeed config.

Given to the wrong command, such a file would be reported as a dozen unknown keys; instead it is named for what
it is, with the command that reads it, in one error.
"""

from __future__ import annotations

from typing import Any

_EXPERIMENT_KEYS = ("sft", "start", "preference", "seeds", "recipe_set")
_DEEPSPEED_KEYS = ("zero_optimization", "train_micro_batch_size_per_gpu", "train_batch_size", "gradient_clipping")


def _found(data: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if key in data]


def not_a_recipe(data: Any, file: str) -> str | None:
    """Why a file given as a recipe is another kind of file (None: it may be a recipe, right or wrong)."""
    if not isinstance(data, dict) or "stage" in data or "model" in data:
        return None
    experiment = _found(data, _EXPERIMENT_KEYS)
    if {"sft", "preference"} & set(experiment):
        return (
            f"this is an experiment file (it has {', '.join(experiment)}), not a recipe: check it with "
            f"`spo experiment {file} --dry-run`, run it with `spo experiment {file}`"
        )
    deepspeed = _found(data, _DEEPSPEED_KEYS)
    if deepspeed:
        return (
            f"this is a DeepSpeed config (it has {', '.join(deepspeed)}), not a recipe: name it in a recipe as "
            "distributed.deepspeed"
        )
    return None


def not_an_experiment(data: Any, file: str) -> str | None:
    """Why a file given as an experiment is a recipe (None: it may be an experiment, right or wrong)."""
    if not isinstance(data, dict) or "stage" not in data or {"sft", "preference"} & set(data):
        return None
    return (
        f"this is a recipe (stage: {data['stage']}), not an experiment file: check it with `spo validate {file}`, "
        f"train it with `spo train {file}`"
    )
