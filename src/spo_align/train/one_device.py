"""Trainer arguments under which one process trains on one device, never `nn.DataParallel`.

Without a distributed launcher, transformers' `TrainingArguments.n_gpu` counts every visible GPU, and
`Trainer` then wraps the model in `nn.DataParallel` and multiplies the micro-batch by that count. The
preference stage computes log-probs by swapping the causal LM's ``forward`` for the duration of a call
(`train/logps.py`); DataParallel's replicas copy that swapped ``forward`` and each computes the whole
batch on the original weights, so the chosen/rejected split of the gathered output pairs each sequence
with itself (margins exactly 0) or fails on a shape. TRL's SFT and KTO trainers refuse `n_gpu > 1`
instead. Here `n_gpu` is at most 1: an in-process run trains on ``cuda:0`` (the first visible GPU), and
several GPUs are used through ``distributed.num_processes`` (one process per GPU).

The classes live at module level so that the ``training_args.bin`` the Trainer pickles into every
checkpoint loads back.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from transformers import TrainingArguments
from trl import KTOConfig, SFTConfig

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _OneDevice:
    """Mixin for a `TrainingArguments` class: at most one GPU per process."""

    @property
    def n_gpu(self) -> int:
        return min(super().n_gpu, 1)  # type: ignore[misc]


class OneDeviceTrainingArguments(_OneDevice, TrainingArguments):
    """`TrainingArguments` for one device per process."""


class OneDeviceSFTConfig(_OneDevice, SFTConfig):
    """TRL's `SFTConfig` for one device per process."""


class OneDeviceKTOConfig(_OneDevice, KTOConfig):
    """TRL's `KTOConfig` for one device per process."""


_ONE_DEVICE: dict[type, type] = {
    TrainingArguments: OneDeviceTrainingArguments,
    SFTConfig: OneDeviceSFTConfig,
    KTOConfig: OneDeviceKTOConfig,
}


def one_device_class(cls: type[T]) -> type[T]:
    """The one-device variant of `TrainingArguments` or of a TRL config the stages use."""
    if issubclass(cls, _OneDevice):
        return cls
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
