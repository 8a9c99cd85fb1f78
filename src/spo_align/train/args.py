"""The recipe's training section as Hugging Face `TrainingArguments` (or a TRL config subclass of it).

One function, so that SFT, KTO and the preference stage read the same numbers the same way and
`spo train --dry-run` can print exactly what a run would use.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan

logger = logging.getLogger(__name__)

T = TypeVar("T")


def report_to(plan: RunPlan) -> list[str]:
    """The recipe's loggers that are installed here (tensorboard only if importable; `none` wins)."""
    wanted = list(plan.recipe.output.report_to)
    if "none" in wanted:
        return []
    available: list[str] = []
    for name in wanted:
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
        if importlib.util.find_spec(module) is None:
            logger.info("output.report_to: %s is not installed; skipping it", name)
            continue
        available.append(name)
    return available


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def deepspeed_config(plan: RunPlan) -> dict[str, Any] | None:
    """The plan's DeepSpeed config; under ZeRO-3 the weights are gathered on save unless the config says not to,
    so the final folder holds a `from_pretrained`-loadable model rather than only sharded optimizer states."""
    if plan.deepspeed_config is None:
        return None
    config = copy.deepcopy(plan.deepspeed_config)
    zero = config.get("zero_optimization")
    if isinstance(zero, dict) and zero.get("stage") == 3:
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            logger.warning(
                "ZeRO-3 config sets stage3_gather_16bit_weights_on_model_save: false; the output folder will hold "
                "sharded weights (use zero_to_fp32.py there to recover a loadable model)"
            )
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    return config


def training_kwargs(plan: RunPlan, output_dir: Path | str) -> dict[str, Any]:
    """Keyword arguments for `TrainingArguments` from the resolved plan (no side effects)."""
    import torch

    from spo_align.train.model import fp32_master_weights, resolve_dtype

    t = plan.recipe.training
    cuda = on_cuda()
    dtype = resolve_dtype(plan)
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": t.per_device_batch_size,
        "per_device_eval_batch_size": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps in transformers 5
        "num_train_epochs": t.num_epochs,
        "max_steps": t.max_steps if t.max_steps is not None else -1,
        "optim": t.optimizer,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_strategy": "steps",
        "logging_steps": t.logging_steps,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "eval_strategy": "steps" if (t.eval_steps and plan.recipe.data.eval) else "no",
        "eval_steps": t.eval_steps,
        "report_to": report_to(plan) or "none",
        "disable_tqdm": True,  # one progress bar: callbacks.ProgressCallback
        "use_cpu": not cuda,
        # bfloat16 autocast on CUDA, and on any device over float32 master weights (model.fp32_master_weights)
        "bf16": dtype == torch.bfloat16 and (cuda or fp32_master_weights(plan)),
        "fp16": cuda and dtype == torch.float16,
        "deepspeed": deepspeed_config(plan),
        "ddp_backend": None if cuda else ("gloo" if plan.world_size > 1 else None),
        "save_only_model": False,
    }
    # Passed both ways: TRL's configs default it to True. Under its current name (transformers 5 renamed it
    # activation_checkpointing and keeps gradient_checkpointing as a deprecated alias, which TRL still reads).
    kwargs["activation_checkpointing"] = t.gradient_checkpointing
    if t.gradient_checkpointing:
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    return kwargs


def apply_threads(plan: RunPlan) -> None:
    """torch intra-op threads from training.cpu_threads (CPU runs only; torch's choice when unset)."""
    import torch

    threads = plan.recipe.training.cpu_threads
    if threads is not None and not on_cuda():
        torch.set_num_threads(threads)


def build_training_args(plan: RunPlan, output_dir: Path | str, cls: type[T] | None = None, **extra: Any) -> T:
    """`cls(**training_kwargs(plan, output_dir), **extra)`; `cls` defaults to `TrainingArguments`.

    `cls` is replaced by its one-device variant (`train/one_device.py`): a process never trains through
    `nn.DataParallel`, however many GPUs it sees. `extra` overrides or adds fields of the TRL config class
    (e.g. `max_length`, `beta`). Sets torch's thread count from training.cpu_threads as a side effect.
    """
    from spo_align.train.one_device import OneDeviceTrainingArguments, one_device_class

    chosen: Any = OneDeviceTrainingArguments if cls is None else one_device_class(cls)
    apply_threads(plan)
    kwargs = training_kwargs(plan, output_dir)
    kwargs.update(extra)
    return chosen(**kwargs)  # type: ignore[no-any-return]
