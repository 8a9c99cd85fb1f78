"""What decides a run's result, and its hash: the test of "the same run" when a folder is continued.

The settings are the resolved recipe (`RunPlan.recipe_dict`: defaults filled, paths absolute, the pack
length resolved for the device) flattened to `--set`-style keys (`loss.beta`, `data.train.0.path`), plus
the DeepSpeed config's content under `deepspeed_config.` (the recipe only names its file), less the keys in
`NOT_DECIDING`, which change where and how a run reports or saves, never the weights it trains. Their hash
is written to `recipe_hash.json` when a run claims its folder; a later run in that folder continues it only
when its own hash is equal, and is otherwise refused with the keys that differ (old -> new).

A key the recorded settings lack (the run started on a version of spo-align without it) whose value now is its
schema default is no change: a default that did not exist when the run started changes nothing the run did
(`schema_defaults`). A default that changed between versions is a change, named like any other.

Not covered: the contents of data files and of hub datasets (a path or dataset name is compared, not
what it holds), and the model's files behind its name or path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan

HASH_FILE = "recipe_hash.json"

NOT_DECIDING: tuple[str, ...] = (
    "description",
    "output.dir",  # the folder itself: a folder moved to another mount continues
    "output.report_to",
    "output.save_merged",  # an extra copy written at the end
    "training.logging_steps",
    "training.save_steps",
    "training.save_total_limit",
    "training.cpu_threads",
    "data.num_proc",
    "distributed.launcher",  # which program starts the same ranks
    "distributed.hostfile",  # which machines run them
)
"""Keys that cannot change the trained weights; they may differ when a run is continued."""


class RecipeHashError(ValueError):
    """The folder's recorded settings cannot be read."""


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            _flatten(item, f"{prefix}.{index}", out)
    else:
        out[prefix] = value


def _deciding(flat: dict[str, Any]) -> dict[str, Any]:
    return {
        key: value
        for key, value in flat.items()
        if not any(key == skip or key.startswith(skip + ".") for skip in NOT_DECIDING)
    }


def schema_defaults(model: Any, prefix: str = "") -> dict[str, Any]:
    """Every key of a recipe model (a pydantic model, sections nested) that has a default, flattened like the
    settings, with that default as JSON would hold it."""
    from pydantic import BaseModel
    from pydantic_core import to_jsonable_python

    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        value = getattr(model, name, None)
        if isinstance(value, BaseModel):
            out.update(schema_defaults(value, key))
        elif isinstance(value, list | tuple) and value and all(isinstance(item, BaseModel) for item in value):
            for index, item in enumerate(value):
                out.update(schema_defaults(item, f"{key}.{index}"))
        elif not info.is_required():
            _flatten(to_jsonable_python(info.get_default(call_default_factory=True)), key, out)
    return out


@dataclass(frozen=True)
class RecipeSettings:
    """The settings that decide a run, flattened, and their hash; `defaults`: the schema's default of every key
    that has one (`schema_defaults`), not part of the hash."""

    values: dict[str, Any]
    defaults: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.values, sort_keys=True, default=str).encode()).hexdigest()

    @classmethod
    def from_recipe_dict(cls, recipe: Mapping[str, Any], deepspeed_config: Mapping[str, Any] | None) -> RecipeSettings:
        flat: dict[str, Any] = {}
        _flatten(dict(recipe), "", flat)
        if deepspeed_config:
            _flatten(dict(deepspeed_config), "deepspeed_config", flat)
        return cls(_deciding(flat))

    @classmethod
    def from_plan(cls, plan: RunPlan) -> RecipeSettings:
        values = cls.from_recipe_dict(plan.recipe_dict(), plan.deepspeed_config).values
        return cls(values, schema_defaults(plan.recipe))

    def write(self, folder: Path) -> None:
        from spo_align.run_folder.checkpoints import write_durably

        body = {"recipe_hash": self.hash, "not_deciding": list(NOT_DECIDING), "settings": self.values}
        write_durably(Path(folder) / HASH_FILE, json.dumps(body, indent=1, default=str) + "\n")

    @classmethod
    def read(cls, folder: Path, resolved_recipe: Path) -> RecipeSettings:
        """The settings recorded in `folder` (from a resolved recipe alone for a folder that has no hash file)."""
        path = Path(folder) / HASH_FILE
        try:
            if path.is_file():
                return cls(_deciding(dict(json.loads(path.read_text(encoding="utf-8"))["settings"])))
            return cls._from_resolved_recipe(Path(resolved_recipe))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RecipeHashError(f"cannot read the recorded settings of the run in {folder}: {exc}") from None

    @classmethod
    def _from_resolved_recipe(cls, path: Path) -> RecipeSettings:
        import yaml

        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(recipe, dict):
            raise ValueError(f"{path} is not a mapping")
        deepspeed: dict[str, Any] | None = None
        ds_path = (recipe.get("distributed") or {}).get("deepspeed")
        if ds_path:
            from spo_align.recipe.checks import read_deepspeed_config

            deepspeed = read_deepspeed_config(Path(ds_path))
        return cls.from_recipe_dict(recipe, deepspeed)


def changed_keys(old_recipe: Mapping[str, Any], new_recipe: Mapping[str, Any]) -> list[str]:
    """`key: old -> new` for every key of two resolved recipes that differs (deciding or not)."""
    old_flat: dict[str, Any] = {}
    new_flat: dict[str, Any] = {}
    _flatten(dict(old_recipe), "", old_flat)
    _flatten(dict(new_recipe), "", new_flat)
    return differences(RecipeSettings(old_flat), RecipeSettings(new_flat))


def _show(value: Any) -> str:
    return json.dumps(value, default=str)


def differences(old: RecipeSettings, new: RecipeSettings) -> list[str]:
    """`key: old -> new` for every deciding key that differs (`(unset)` where one side lacks it); a key `old`
    lacks whose new value is its schema default (`new.defaults`) is no difference: a newer version's key."""
    lines = []
    for key in sorted(set(old.values) | set(new.values)):
        before, after = old.values.get(key, _UNSET), new.values.get(key, _UNSET)
        if before is _UNSET and key in new.defaults and new.defaults[key] == after:
            continue
        if before != after:
            lines.append(f"{key}: {_describe(before)} -> {_describe(after)}")
    return lines


_UNSET = object()


def _describe(value: Any) -> str:
    return "(unset)" if value is _UNSET else _show(value)
