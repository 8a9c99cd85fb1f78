"""Derived values of a valid recipe: the `RunPlan` that `spo train` runs and `spo resolve` prints.

Every number a run uses that the recipe does not state directly (world size, global batch, IPO tau,
pack length, launcher, ZeRO stage) is computed here and only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from spo_align.losses.ipo import IPOLoss
from spo_align.losses.registry import loss_optimum, optimum_note
from spo_align.recipe.checks import DeepSpeedConfigError, read_deepspeed_config, zero_stage_of
from spo_align.recipe.errors import RecipeError, RecipeErrors
from spo_align.recipe.paths import model_location
from spo_align.recipe.schema import Recipe

Device = Literal["cpu", "cuda"]
LauncherKind = Literal["inprocess", "torchrun", "accelerate", "deepspeed"]
CPU_PACK_LENGTH_CAP = 1024


def default_pack_length(max_length: int, device: Device) -> int:
    return max_length if device == "cuda" else min(max_length, CPU_PACK_LENGTH_CAP)


class RunPlan(BaseModel):
    """A validated recipe plus everything derived from it. Frozen: downstream code only reads it."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    recipe: Recipe
    recipe_path: Path
    base_dir: Path
    device: Device | None
    world_size: int
    global_batch_size: int
    ipo_tau: float | None
    deepspeed_config: dict[str, Any] | None
    deepspeed_config_path: Path | None
    zero_stage: int | None
    launcher: LauncherKind
    pack_length: int | None
    output_dir: Path
    model_path: str
    reference_model_path: str | None

    @property
    def separate_reference(self) -> bool:
        """True when `reference.model` names a model other than the starting one (not the policy's own weights)."""
        return self.reference_model_path is not None and self.reference_model_path != self.model_path

    # ------------------------------------------------------------ views

    def derived(self) -> dict[str, Any]:
        """Derived values, JSON-ready. With no device and packing on, both pack-length defaults are shown."""
        values: dict[str, Any] = {
            "world_size": self.world_size,
            "global_batch_size": self.global_batch_size,
            "launcher": self.launcher,
            "zero_stage": self.zero_stage,
            "deepspeed_config_path": str(self.deepspeed_config_path) if self.deepspeed_config_path else None,
            "ipo_tau": self.ipo_tau,
            "loss_optimum": loss_optimum(self.recipe.loss),
            "pack_length": self.pack_length,
            "output_dir": str(self.output_dir),
            "model_path": self.model_path,
            "reference_model_path": self.reference_model_path,
        }
        data = self.recipe.data
        if data.packing and self.pack_length is None:
            values["pack_length"] = {
                "cuda": default_pack_length(data.max_length, "cuda"),
                "cpu": default_pack_length(data.max_length, "cpu"),
            }
        return values

    def recipe_dict(self) -> dict[str, Any]:
        """The recipe with defaults filled, `extends` dropped and paths made absolute: loadable anywhere."""
        out = self.recipe.model_dump(mode="json", exclude={"extends"})
        out["model"]["name_or_path"] = self.model_path
        out["reference"]["model"] = self.reference_model_path
        out["output"]["dir"] = str(self.output_dir)
        if self.deepspeed_config_path is not None:
            out["distributed"]["deepspeed"] = str(self.deepspeed_config_path)
        if self.recipe.distributed.hostfile is not None:
            out["distributed"]["hostfile"] = str((self.base_dir / self.recipe.distributed.hostfile).resolve())
        for split in ("train", "eval"):
            for source in out["data"][split]:
                local = self.base_dir / source["path"]
                if not Path(source["path"]).is_absolute() and local.exists():
                    source["path"] = str(local.resolve())
        if self.recipe.data.packing and self.pack_length is not None:
            out["data"]["pack_length"] = self.pack_length
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe_path": str(self.recipe_path),
            "device": self.device,
            "derived": self.derived(),
            "recipe": self.recipe_dict(),
        }

    def to_yaml(self) -> str:
        """The resolved recipe as YAML, derived values in a header comment (they are recomputed on load)."""
        lines = [
            f"# Resolved from {self.recipe_path}" + (f" for device {self.device}" if self.device else ""),
            "# Derived values (recomputed from the keys below whenever this file is loaded):",
        ]
        for key, value in self.derived().items():
            note = _NOTES.get(key, lambda plan: "")(self)
            rendered = yaml.safe_dump(value, default_flow_style=True, width=1000, sort_keys=False).strip().removesuffix("...").strip()
            lines.append(f"#   {key}: {rendered}" + (f"   # {note}" if note else ""))
        body = yaml.safe_dump(self.recipe_dict(), sort_keys=False, allow_unicode=True, width=100)
        return "\n".join(lines) + "\n" + body


_NOTES = {
    "world_size": lambda p: f"num_processes {p.recipe.distributed.num_processes} x num_nodes {p.recipe.distributed.num_nodes}",
    "global_batch_size": lambda p: (
        f"per_device_batch_size {p.recipe.training.per_device_batch_size} x gradient_accumulation_steps "
        f"{p.recipe.training.gradient_accumulation_steps} x world_size {p.world_size}"
    ),
    "ipo_tau": lambda p: (
        f"match_spo_beta {p.recipe.loss.match_spo_beta} / 2: IPO optimum 1/(2 tau) = SPO's 1/beta"
        if isinstance(p.recipe.loss, IPOLoss) and p.recipe.loss.match_spo_beta is not None
        else ""
    ),
    "loss_optimum": lambda p: optimum_note(p.recipe.loss),
    "pack_length": lambda p: (
        "data.pack_length, else max_length on cuda and min(max_length, 1024) on cpu" if p.recipe.data.packing else "packing off"
    ),
    "launcher": lambda p: f"distributed.launcher {p.recipe.distributed.launcher}",
}


def resolve(recipe: Recipe, recipe_path: Path, device: Device | None = None) -> RunPlan:
    """Derive a `RunPlan`. Model and output paths resolve against the working directory, files against the recipe."""
    recipe_path = Path(recipe_path).resolve()
    base_dir = recipe_path.parent
    dist = recipe.distributed
    world_size = dist.num_processes * dist.num_nodes
    training = recipe.training

    ds_path: Path | None = None
    ds_config: dict[str, Any] | None = None
    zero_stage: int | None = None
    if dist.deepspeed is not None:
        ds_path = (base_dir / dist.deepspeed).resolve()
        try:
            ds_config = read_deepspeed_config(ds_path)
        except DeepSpeedConfigError as exc:
            raise RecipeErrors([RecipeError(str(recipe_path), None, None, "distributed.deepspeed", str(exc))]) from None
        zero_stage = zero_stage_of(ds_config)

    launcher: LauncherKind
    if dist.launcher != "auto":
        launcher = dist.launcher
    elif ds_config is not None:
        launcher = "deepspeed"
    elif world_size == 1:
        launcher = "inprocess"
    else:
        launcher = "torchrun"

    data = recipe.data
    pack_length: int | None = None
    if data.packing:
        if data.pack_length is not None:
            pack_length = data.pack_length
        elif device is not None:
            pack_length = default_pack_length(data.max_length, device)

    reference = recipe.reference.model
    return RunPlan(
        recipe=recipe,
        recipe_path=recipe_path,
        base_dir=base_dir,
        device=device,
        world_size=world_size,
        global_batch_size=training.per_device_batch_size * training.gradient_accumulation_steps * world_size,
        ipo_tau=recipe.loss.resolved_tau if isinstance(recipe.loss, IPOLoss) else None,
        deepspeed_config=ds_config,
        deepspeed_config_path=ds_path,
        zero_stage=zero_stage,
        launcher=launcher,
        pack_length=pack_length,
        output_dir=Path(recipe.output.dir).expanduser().resolve(),
        model_path=model_location(recipe.model.name_or_path),
        reference_model_path=model_location(reference) if reference is not None else None,
    )
