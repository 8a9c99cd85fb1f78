"""Every cross-field check of a recipe, in one place.

The schema (schema.py) checks each value on its own: types, ranges, closed sets. The checks here need
more than one value, or a file on disk. Each returns findings `(key path, message)`; `load.py` turns
them into errors located at the YAML line of that key. A message says what is wrong and what to do.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from spo_align.losses.registry import CATALOGUE, TYPES, loss_entry
from spo_align.recipe.paths import is_local_model_path, overlap_findings
from spo_align.recipe.schema import Recipe
from spo_align.section import Finding

Check = Callable[[Recipe, Path], Iterator[Finding]]


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config file that is missing or is not a JSON object."""


def read_deepspeed_config(path: Path) -> dict[str, Any]:
    """Parse a DeepSpeed JSON config; raise `DeepSpeedConfigError` with a message a person can act on."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DeepSpeedConfigError(f"DeepSpeed config {path} not found (paths are relative to the recipe file)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DeepSpeedConfigError(f"cannot read DeepSpeed config {path}: {exc}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(
            f"DeepSpeed config {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"DeepSpeed config {path} must be a JSON object")
    return config


def zero_stage_of(config: dict[str, Any]) -> int:
    section = config.get("zero_optimization")
    stage = section.get("stage", 0) if isinstance(section, dict) else 0
    return stage if isinstance(stage, int) else -1


def _deepspeed(recipe: Recipe, base_dir: Path) -> dict[str, Any] | None:
    if recipe.distributed.deepspeed is None:
        return None
    try:
        return read_deepspeed_config(base_dir / recipe.distributed.deepspeed)
    except DeepSpeedConfigError:
        return None


# ---------------------------------------------------------------- stage and loss


def stage_and_loss(recipe: Recipe, base_dir: Path) -> Iterator[Finding]:
    if recipe.stage == "sft" and recipe.loss is not None:
        yield ("loss",), "stage 'sft' takes no loss; remove 'loss' or set 'stage: preference'"
    if recipe.stage == "preference" and recipe.loss is None:
        yield ("stage",), f"stage 'preference' needs a 'loss' section (type: {', '.join(TYPES[:-1])} or {TYPES[-1]})"
    if recipe.stage == "sft" and recipe.reference.precompute:
        yield ("reference", "precompute"), "SFT has no reference model; precompute applies to preference stages"
    if recipe.stage == "sft" and recipe.reference.model is not None:
        yield ("reference", "model"), "SFT has no reference model; remove 'reference.model'"


def data_formats(recipe: Recipe, base_dir: Path) -> Iterator[Finding]:
    unpaired = recipe.loss is not None and loss_entry(recipe.loss).reads_unpaired_rows
    unpaired_types = " or ".join(f"'{t}'" for t, entry in CATALOGUE.items() if entry.reads_unpaired_rows)
    for split in ("train", "eval"):
        for index, source in enumerate(getattr(recipe.data, split)):
            where = ("data", split, index, "format")
            if recipe.stage == "sft" and source.format not in ("auto", "messages"):
                yield where, f"SFT reads conversations; format '{source.format}' holds preference rows (use 'messages')"
            if recipe.stage == "preference" and source.format == "messages":
                yield where, "a preference stage needs prompt/chosen/rejected rows, not 'messages' conversations"
            if source.format == "kto" and not unpaired:
                yield where, f"unpaired 'kto' rows (prompt/completion/label) can only train loss type {unpaired_types}"


def loss_specific(recipe: Recipe, base_dir: Path) -> Iterator[Finding]:
    """The checks the loss's catalogue entry brings (KTO's batch size and packing, for example)."""
    if recipe.loss is not None:
        yield from loss_entry(recipe.loss).checks(recipe)


def reference_use(recipe: Recipe, base_dir: Path) -> Iterator[Finding]:
    """A reference-free loss (SimPO) loads, precomputes and runs no reference: its reference keys would do nothing."""
    if recipe.loss is None or loss_entry(recipe.loss).needs_reference:
        return
    loss_type = recipe.loss.type
    if recipe.reference.precompute:
        yield ("reference", "precompute"), (
            f"loss '{loss_type}' uses no reference model, so there are no reference log-probs to precompute; "
            "remove 'reference.precompute'"
        )
    if recipe.reference.model is not None:
        yield ("reference", "model"), f"loss '{loss_type}' uses no reference model; remove 'reference.model'"


def packing(recipe: Recipe, base_dir: Path) -> Iterator[Finding]:
    data = recipe.data
    if data.pack_length is not None and not data.packing:
        yield ("data", "pack_length"), "pack_length has no effect without 'packing: true'"
    if data.packing and data.pack_length is not None and data.pack_length < data.max_length:
        yield ("data", "pack_length"), (
            f"pack_length {data.pack_length} is below max_length {data.max_length}: a full-length "
            "sequence would not fit a packed row"
        )


def evaluation(recipe: Recipe, base_dir: Path) -> Iterator[Finding]:
    if recipe.training.eval_steps is not None and not recipe.data.eval:
        yield ("training", "eval_steps"), "eval_steps is set but data.eval lists no dataset"


# ---------------------------------------------------------------- model, adapter, precision


def precision(recipe: Recipe, base_dir: Path) -> Iterator[Finding]:
    model = recipe.model
    if model.attention == "flash_attention_2" and model.dtype == "float32":
        yield ("model", "attention"), (
            "flash_attention_2 runs only in bfloat16/float16; use dtype bfloat16 or attention sdpa"
        )
    if recipe.adapter is not None and recipe.adapter.type == "qlora" and model.dtype == "float32":
        yield ("model", "dtype"), "QLoRA computes in bfloat16/float16 over a 4-bit base; float32 is not supported"
    if model.dtype == "float16" and recipe.adapter is None and recipe.distributed.deepspeed is None:
        # The fp16 gradient scaler refuses float16 weights at the first clip ("Attempting to unscale FP16
        # gradients"). LoRA trains float32 adapter weights (peft upcasts them); DeepSpeed keeps float32 masters.
        yield ("model", "dtype"), (
            "float16 full fine-tuning cannot train: on CUDA the fp16 gradient scaler stops at the first step "
            "(\"Attempting to unscale FP16 gradients\"), and without it float16 weights and optimizer states "
            "underflow. Use dtype bfloat16, or a LoRA adapter (its weights train in float32), or a DeepSpeed "
            'config with fp16 "enabled": "auto" (it keeps float32 master weights)'
        )


def adapter(recipe: Recipe, base_dir: Path) -> Iterator[Finding]:
    lora = recipe.adapter
    if lora is None:
        if recipe.output.save_merged:
            yield ("output", "save_merged"), "save_merged needs an adapter (there is nothing to merge)"
        return
    if isinstance(lora.target_modules, list) and not lora.target_modules:
        yield ("adapter", "target_modules"), "target_modules is empty; list module names or use 'all-linear'"
    if lora.type == "qlora":
        stage = zero_stage_of(_deepspeed(recipe, base_dir) or {})
        if stage == 3:
            yield ("adapter", "type"), (
                "QLoRA with ZeRO-3 is refused: ZeRO-3 partitions every parameter across GPUs, and this "
                "runner loads the 4-bit bitsandbytes base unpartitioned; use ZeRO-2 "
                "(deepspeed_configs/zero2.json) with QLoRA, or plain LoRA with ZeRO-3"
            )


def model_revision(recipe: Recipe, base_dir: Path) -> Iterator[Finding]:
    """model.revision pins the starting model, and with it every reference that is the starting model (no
    reference.model, or one naming the same model); a local folder or tiny: model has no revisions to pin."""
    name = recipe.model.name_or_path
    if recipe.model.revision is not None and (name.startswith("tiny:") or is_local_model_path(name)):
        yield ("model", "revision"), (
            f"{name} is a local model, which has no revisions, so model.revision would be ignored: remove it, "
            "or name the Hub model it pins"
        )


# ---------------------------------------------------------------- distributed


def _is_auto(value: Any) -> bool:
    return value == "auto"


def distributed(recipe: Recipe, base_dir: Path) -> Iterator[Finding]:
    dist = recipe.distributed
    if dist.deepspeed is not None:
        try:
            config = read_deepspeed_config(base_dir / dist.deepspeed)
        except DeepSpeedConfigError as exc:
            yield ("distributed", "deepspeed"), str(exc)
            config = None
        if config is not None:
            yield from _deepspeed_agrees(recipe, config)
    elif dist.launcher == "deepspeed":
        yield ("distributed", "launcher"), "launcher 'deepspeed' needs a DeepSpeed config in 'distributed.deepspeed'"
    if dist.hostfile is not None:
        if dist.num_nodes == 1:
            yield ("distributed", "hostfile"), "a hostfile is for multi-node runs; set num_nodes or remove it"
        elif not (base_dir / dist.hostfile).is_file():
            yield ("distributed", "hostfile"), f"hostfile {base_dir / dist.hostfile} not found"
    uses_deepspeed = dist.launcher == "deepspeed" or (dist.launcher == "auto" and dist.deepspeed is not None)
    if dist.num_nodes > 1 and uses_deepspeed and dist.hostfile is None:
        yield ("distributed", "num_nodes"), "a multi-node DeepSpeed launch needs 'distributed.hostfile'"


def _deepspeed_agrees(recipe: Recipe, config: dict[str, Any]) -> Iterator[Finding]:
    """Numbers the DeepSpeed file fixes must match the recipe's (the recipe is their one source)."""
    training = recipe.training
    where = ("distributed", "deepspeed")
    micro = config.get("train_micro_batch_size_per_gpu")
    if micro is not None and not _is_auto(micro) and micro != training.per_device_batch_size:
        yield where, (
            f"the DeepSpeed config fixes train_micro_batch_size_per_gpu={micro} but "
            f"training.per_device_batch_size is {training.per_device_batch_size}; set it to \"auto\""
        )
    accum = config.get("gradient_accumulation_steps")
    if accum is not None and not _is_auto(accum) and accum != training.gradient_accumulation_steps:
        yield where, (
            f"the DeepSpeed config fixes gradient_accumulation_steps={accum} but the recipe says "
            f"{training.gradient_accumulation_steps}; set it to \"auto\""
        )
    dtype = recipe.model.dtype
    for key, wrong in (("fp16", "bfloat16"), ("bf16", "float16")):
        section = config.get(key)
        if isinstance(section, dict) and section.get("enabled") is True and dtype == wrong:
            yield where, f"the DeepSpeed config enables {key} but model.dtype is {dtype}; use \"enabled\": \"auto\""
    fp16 = config.get("fp16")
    if dtype == "float16" and isinstance(fp16, dict) and "enabled" in fp16 and fp16["enabled"] not in (True, "auto"):
        # transformers refuses a DeepSpeed fp16 setting that contradicts its fp16 flag (set by float16 on CUDA).
        yield where, 'the DeepSpeed config disables fp16 but model.dtype is float16; use "enabled": "auto"'
    if zero_stage_of(config) not in (0, 1, 2, 3):
        yield where, "zero_optimization.stage must be 0, 1, 2 or 3"


def output(recipe: Recipe, base_dir: Path) -> Iterator[Finding]:
    yield from overlap_findings(recipe, base_dir)
    report = recipe.output.report_to
    if "none" in report and len(report) > 1:
        yield ("output", "report_to"), "'none' cannot be combined with other loggers"
    if len(set(report)) != len(report):
        yield ("output", "report_to"), "a logger is listed twice"


CHECKS: tuple[Check, ...] = (
    stage_and_loss,
    data_formats,
    loss_specific,
    reference_use,
    packing,
    evaluation,
    precision,
    model_revision,
    adapter,
    distributed,
    output,
)


def check_recipe(recipe: Recipe, base_dir: Path) -> list[Finding]:
    """Run every check; `base_dir` is the recipe file's folder (DeepSpeed and hostfile paths are relative to it)."""
    return [finding for check in CHECKS for finding in check(recipe, base_dir)]
