"""The recipe schema: nested pydantic models, unknown keys refused everywhere, types strict.

Strict types (`spo_align.section.Section`): a value is taken only as what it is written as. A boolean is
never a number (`max_steps: true` is an error, not 1), a number is never text or a path (`revision: 1234567`
is an error: quote it), and a quoted number is never a number. An integer where a float is expected is taken
as that float. Each loss's section lives in its loss module (`spo_align.losses.<type>`).

This module imports pydantic, the standard library and the loss registry, all torch-free: validating a
recipe never needs torch.
Field descriptions feed `spo schema` (JSON Schema, editor autocompletion) and the docs.
Cross-field checks that involve more than one section live in `recipe/checks.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field

from spo_align.losses.registry import SECTIONS, TYPES
from spo_align.section import Section

# ---------------------------------------------------------------- model

Attention = Literal["auto", "flash_attention_2", "sdpa", "flex_attention", "eager"]
DType = Literal["auto", "bfloat16", "float16", "float32"]


class ModelSection(Section):
    name_or_path: str = Field(
        min_length=1,
        description="Hugging Face model id or local folder (an earlier stage's output folder is a local folder). "
        "Paths that start with ./ or ../ or contain outputs/ are local and, like output.dir, relative to the "
        "working directory at run time (not to the recipe file).",
    )
    tokenizer: str | None = Field(None, description="Tokenizer id or folder; defaults to the model's.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Off unless needed.")
    attention: Attention = Field(
        "auto",
        description="Attention kernel. auto: flash_attention_2 where flash-attn is importable on CUDA "
        "with bf16/fp16, else sdpa.",
    )
    dtype: DType = Field("auto", description="Weights/compute dtype. auto: bfloat16 on CUDA, float32 on CPU.")
    chat_template: str | None = Field(
        None, description="Jinja chat template that replaces the tokenizer's own (rarely needed)."
    )


# ---------------------------------------------------------------- data

DataFormat = Literal["auto", "messages", "ultrafeedback", "pairs", "kto"]
RowAction = Literal["drop", "truncate", "raise"]
DropOrRaise = Literal["drop", "raise"]
BoundaryAction = Literal["split", "drop", "raise"]


class ColumnMap(Section):
    """Which dataset columns hold what. Defaults match ultrachat_200k / ultrafeedback_binarized."""

    messages: str = Field("messages", description="SFT: list of {role, content} messages.")
    prompt: str = Field("prompt", description="Preference: prompt string or message list.")
    chosen: str = Field("chosen", description="Preference: chosen answer (string or message list).")
    rejected: str = Field("rejected", description="Preference: rejected answer (string or message list).")
    completion: str = Field("completion", description="KTO unpaired: the answer.")
    label: str = Field("label", description="KTO unpaired: true if the answer is desirable.")


class DatasetSource(Section):
    path: str = Field(
        min_length=1,
        description="Hub dataset id, local dataset folder, or a .jsonl/.json/.csv/.tsv/.parquet file (optionally "
        ".gz/.bz2/.xz). Local paths are relative to the recipe file that writes them.",
    )
    split: str = Field("train", description="Split to read (e.g. train_sft, train_prefs).")
    name: str | None = Field(None, description="Dataset configuration name, if the dataset has several.")
    revision: str | None = Field(None, description="Hub revision to pin.")
    format: DataFormat = Field(
        "auto",
        description="Row layout. auto: detect from the columns. messages: conversations (SFT). "
        "ultrafeedback: prompt string + chosen/rejected message lists repeating the user turn. "
        "pairs: prompt/chosen/rejected strings or message lists. kto: prompt/completion/label rows.",
    )
    columns: ColumnMap = Field(default_factory=ColumnMap, description="Column names, when they differ.")
    max_samples: int | None = Field(None, gt=0, description="Use only the first N rows (after shuffling).")


class RowPolicy(Section):
    """What to do with rows that cannot be trained on as they are. Counts are reported at run start."""

    too_long: RowAction = Field(
        "truncate",
        description="Rows longer than max_length: truncate the answer (prompt kept), drop, or raise.",
    )
    empty_prompt: DropOrRaise = Field(
        "drop", description="Rows whose prompt is blank (the turn the answer replies to; SFT: any user turn)."
    )
    empty_response: DropOrRaise = Field("drop", description="Rows whose answer is empty.")
    token_boundary: BoundaryAction = Field(
        "split",
        description="Rows whose answer's first tokens merge with the prompt's last ones when tokenized together "
        "(whitespace-merging tokenizers, answers that start with blank lines): split tokenizes the answer apart "
        "from the prompt, as the model generates it, and counts the row; drop; or raise. Rows whose chat template "
        "renders the prompt differently inside the conversation are dropped (raise: refused).",
    )
    identical_pair: DropOrRaise = Field("drop", description="Preference rows whose chosen equals rejected.")


class DataSection(Section):
    train: list[DatasetSource] = Field(min_length=1, description="Training datasets, concatenated.")
    eval: list[DatasetSource] = Field(default_factory=list, description="Evaluation datasets (optional).")
    max_length: int = Field(1024, gt=8, description="Maximum tokens per sequence (prompt + answer).")
    packing: bool = Field(
        False,
        description="SFT: pack conversations into rows (best-fit decreasing). Preference: pack chosen and "
        "rejected sequences of several pairs into rows; sequences never attend to each other.",
    )
    pack_length: int | None = Field(
        None,
        gt=8,
        description="Tokens per packed row. Default: max_length on CUDA; on CPU min(max_length, 1024), since "
        "CPU attention over a packed row costs its full square.",
    )
    shuffle: bool = Field(True, description="Shuffle training rows (seeded by training.seed).")
    policy: RowPolicy = Field(default_factory=RowPolicy, description="Handling of unusable rows.")
    num_proc: int | None = Field(None, gt=0, description="Worker processes for tokenization.")


# ---------------------------------------------------------------- losses
# Each loss's section lives in its own module of `spo_align.losses`, with its tensor function and its entry;
# the union below is built from the registry, so a new loss module is a new `loss.type` here.

Loss = Annotated[Union[SECTIONS], Field(discriminator="type")]  # type: ignore[valid-type]  # noqa: UP007


class ReferenceSection(Section):
    model: str | None = Field(
        None,
        min_length=1,
        description="Reference model; default: the starting model (with LoRA, the adapter is disabled "
        "instead of loading a second copy). Local paths (./, ../, outputs/) are relative to the working "
        "directory at run time. A reference-free loss (simpo) loads none and refuses this key.",
    )
    precompute: bool = Field(
        False,
        description="Compute every reference log-prob once before training and cache them under the "
        "output folder; training then holds no reference model. A reference-free loss (simpo) refuses it.",
    )


# ---------------------------------------------------------------- adapter


class LoRASection(Section):
    type: Literal["lora", "qlora"] = Field(
        "lora", description="lora: adapters on a full-precision base. qlora: 4-bit base (bitsandbytes, CUDA)."
    )
    r: int = Field(16, gt=0, description="Rank.")
    alpha: float = Field(32, gt=0, description="Scaling numerator (lora_alpha).")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear."
    )


# ---------------------------------------------------------------- training

Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "sgd"]


class TrainingSection(Section):
    learning_rate: float = Field(gt=0, description="Peak learning rate.")
    lr_scheduler: Scheduler = Field("cosine")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    num_epochs: float = Field(1.0, gt=0, description="Epochs over the training data (ignored if max_steps).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides num_epochs.")
    per_device_batch_size: int = Field(
        4, gt=0, description="Examples (pairs, for preference) per device per micro-step."
    )
    gradient_accumulation_steps: int = Field(1, gt=0)
    gradient_checkpointing: bool = Field(False)
    disable_dropout: bool | None = Field(
        None,
        description="Turn off the trained model's dropout (its attention and hidden dropout rates, every dropout "
        "layer, the LoRA dropout) for the run; the saved config keeps its rates. Default: on for preference "
        "stages (spo, dpo, ipo, kto), whose reference runs without dropout, so that the log-ratios start at "
        "exactly 0; off for sft.",
    )
    optimizer: Optimizer = Field("adamw_torch")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = Field(42)
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(500, gt=0, description="Checkpoint every N optimizer steps.")
    save_total_limit: int | None = Field(2, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    cpu_threads: int | None = Field(
        None, gt=0, description="torch threads on CPU runs (default: torch's choice)."
    )


# ---------------------------------------------------------------- distributed / output

Launcher = Literal["auto", "torchrun", "accelerate", "deepspeed"]


class DistributedSection(Section):
    num_processes: int = Field(1, gt=0, description="Processes (GPUs) per node.")
    num_nodes: int = Field(1, gt=0)
    # strict=False on paths: a path is written as text (strict would take only Path objects); numbers stay refused.
    deepspeed: Path | None = Field(
        None, strict=False, description="DeepSpeed JSON config, relative to the recipe file (see deepspeed_configs/)."
    )
    launcher: Launcher = Field(
        "auto",
        description="How the run is started. auto: in-process for one process without DeepSpeed, deepspeed if "
        "a config is set, else torchrun.",
    )
    hostfile: Path | None = Field(
        None, strict=False, description="DeepSpeed hostfile for multi-node runs, relative to the recipe file."
    )


ReportTo = Literal["tensorboard", "wandb", "none"]


class OutputSection(Section):
    dir: Path = Field(
        strict=False, description="Output folder (relative paths are relative to the working directory)."
    )
    report_to: list[ReportTo] = Field(
        default_factory=lambda: ["tensorboard"], description="Loggers besides metrics.jsonl."
    )
    save_merged: bool = Field(False, description="With LoRA, also save the base with the adapter merged.")


# ---------------------------------------------------------------- recipe

Stage = Literal["sft", "preference"]


class Recipe(Section):
    """A whole recipe. `stage: sft` takes no loss; `stage: preference` needs one."""

    extends: str | None = Field(
        None,
        description="Base recipe this one is deep-merged onto (path relative to this file): mappings merge key "
        "by key, lists and values replace. The base's own file paths stay relative to the base.",
    )
    description: str | None = Field(None, description="What this recipe is for.")
    stage: Stage
    model: ModelSection
    data: DataSection
    loss: Loss | None = Field(None, description=f"Preference loss ({', '.join(TYPES[:-1])} or {TYPES[-1]}).")
    reference: ReferenceSection = Field(default_factory=ReferenceSection)
    adapter: LoRASection | None = Field(None, description="LoRA/QLoRA; omit for full fine-tuning.")
    training: TrainingSection
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    output: OutputSection


# ---------------------------------------------------------------- JSON Schema

SCHEMA_ID = "https://github.com/spo-align/spo-align/blob/main/recipe.schema.json"


def recipe_json_schema() -> dict[str, object]:
    """The JSON Schema of a recipe file, as committed in recipe.schema.json (editor autocompletion)."""
    schema: dict[str, object] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
    }
    schema.update(Recipe.model_json_schema(mode="validation"))
    schema["title"] = "spo-align recipe"
    # A recipe that `extends` a base may leave out top-level sections the base provides.
    required = schema.pop("required", [])
    schema["if"] = {"required": ["extends"]}
    schema["else"] = {"required": required}
    return schema
