"""The recipe's training section as Hugging Face `TrainingArguments` (or a TRL config subclass of it), for one
device per process.

One function, so that SFT, KTO and the preference stage read the same numbers the same way and
`spo train --dry-run` can print exactly what a run would use.

One device per process: without a distributed launcher, transformers' `TrainingArguments.n_gpu` counts every
visible GPU, and `Trainer` then wraps the model in `nn.DataParallel` and multiplies the micro-batch by that
count. The
preference stage computes log-probs by swapping the causal LM's ``forward`` for the duration of a call
(`train/logps.py`); DataParallel's replicas copy that swapped ``forward`` and each computes the whole
batch on the original weights, so the chosen/rejected split of the gathered output pairs each sequence
with itself (margins exactly 0) or fails on a shape. TRL's SFT and KTO trainers refuse `n_gpu > 1`
instead. Here `n_gpu` is at most 1: an in-process run trains on ``cuda:0`` (the first visible GPU), and
several GPUs are used through ``distributed.num_processes`` (one process per GPU).

The classes live at module level so that the ``training_args.bin`` the Trainer pickles into every
checkpoint loads back; the TRL ones are made when first asked for (a module ``__getattr__``, which pickle goes
through too), so that a preference run, which does not use TRL, does not import it.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from transformers import TrainingArguments

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
        "disable_tqdm": True,  # one progress display: progress.ProgressCallback
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
    threads = plan.recipe.training.cpu_threads
    if threads is not None and not on_cuda():
        torch.set_num_threads(threads)


def build_training_args(plan: RunPlan, output_dir: Path | str, cls: type[T] | None = None, **extra: Any) -> T:
    """`cls(**training_kwargs(plan, output_dir), **extra)`; `cls` defaults to `TrainingArguments`.

    `cls` is replaced by its one-device variant (see the module doc): a process never trains through
    `nn.DataParallel`, however many GPUs it sees. `extra` overrides or adds fields of the TRL config class
    (e.g. `max_length`, `beta`). Sets torch's thread count from training.cpu_threads as a side effect.
    """
    chosen: Any = OneDeviceTrainingArguments if cls is None else one_device_class(cls)
    apply_threads(plan)
    kwargs = training_kwargs(plan, output_dir)
    kwargs.update(extra)
    return chosen(**kwargs)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- one device per process


class _OneDevice:
    """Mixin for a `TrainingArguments` class: at most one GPU per process."""

    @property
    def n_gpu(self) -> int:
        return min(super().n_gpu, 1)  # type: ignore[misc]


class OneDeviceTrainingArguments(_OneDevice, TrainingArguments):
    """`TrainingArguments` for one device per process."""


_TRL_CONFIGS = {"OneDeviceSFTConfig": "SFTConfig", "OneDeviceKTOConfig": "KTOConfig"}
"""The one-device variants of TRL's configs, by name: made on first use (`__getattr__`)."""

_ONE_DEVICE: dict[type, type] = {TrainingArguments: OneDeviceTrainingArguments}


def __getattr__(name: str) -> type:
    """`OneDeviceSFTConfig` / `OneDeviceKTOConfig`: TRL's config for one device per process, made once."""
    base_name = _TRL_CONFIGS.get(name)
    if base_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import trl

    base = getattr(trl, base_name)
    made = type(name, (_OneDevice, base), {
        "__module__": __name__, "__qualname__": name, "__doc__": f"TRL's `{base_name}` for one device per process.",
    })
    globals()[name] = made  # later look-ups find it without coming here
    _ONE_DEVICE[base] = made
    return made


def one_device_class(cls: type[T]) -> type[T]:
    """The one-device variant of `TrainingArguments` or of a TRL config the stages use."""
    if issubclass(cls, _OneDevice):
        return cls
    if cls not in _ONE_DEVICE and cls.__module__.split(".")[0] == "trl":
        for name in _TRL_CONFIGS:
            if name not in globals():
                __getattr__(name)  # makes the variant and registers it in _ONE_DEVICE
    try:
        return _ONE_DEVICE[cls]
    except KeyError:
        raise TypeError(f"no one-device variant of {cls.__name__}; add one to {__name__}") from None


def device_message(device: torch.device, visible_gpus: int, processes: int) -> str:
    """The log line that says where a process trains (and, when one process leaves GPUs idle, how to use them)."""
    if device.type == "cuda" and processes == 1 and visible_gpus > 1:
        return (
            f"training on {device} (1 of {visible_gpus} visible GPUs; use distributed.num_processes: "
            f"{visible_gpus} to use all)"
        )
    return f"training on {device}"


def device_info(args: Any, plan: RunPlan) -> dict[str, Any]:
    """Log the device this process trains on; returns it for run.json with the precision it trains in."""
    from spo_align.train.model import weights_dtype

    device = args.device
    visible = torch.cuda.device_count() if device.type == "cuda" else 0
    logger.info("%s", device_message(device, visible, plan.world_size))
    autocast = "bfloat16" if args.bf16 else "float16" if args.fp16 else None
    return {
        "device": str(device),
        "visible_gpus": visible,
        "processes": plan.world_size,
        "weights": str(weights_dtype(plan)).removeprefix("torch."),
        "autocast": autocast,
    }
