"""Runs (b)-(d) and the SFT packing runs: `spo train` on the bench workload, through the project's recipe.

Each run writes an ordinary recipe file, loads and resolves it as `spo train` does, and runs its stage in
this process; the bench adds one callback (the clock and token counter) to the callbacks the runner
attaches. On the CPU bench the loss is DPO's sigmoid with label_smoothing 0, the loss TRL's DPOTrainer runs
in run (a); the GPU check trains SPO (same cost per token), and also a LoRA run whose reference is the
policy with its adapter disabled; that run checks that its first step changes the adapter and nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from bench.clock import LoopTimes, device_facts, peak_rss_mb, step_clock
from bench.config import Workload

logger = logging.getLogger(__name__)

Variant = Literal["padded", "packed", "packed_precompute", "lora_packed"]
VARIANTS: tuple[Variant, ...] = ("padded", "packed", "packed_precompute", "lora_packed")


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    learning_rate: float


def _training(work: Workload, batch: int, accum: int) -> dict[str, Any]:
    return {
        "learning_rate": work.learning_rate,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "num_epochs": 1,
        "per_device_batch_size": batch,
        "gradient_accumulation_steps": accum,
        "optimizer": "adamw_torch",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seed": work.seed,
        "logging_steps": 1,
        "save_steps": 1_000_000,
        "save_total_limit": 1,
        "cpu_threads": work.threads,
        "gradient_checkpointing": work.gradient_checkpointing,
    }


def _model(work: Workload, model_dir: Path) -> dict[str, Any]:
    return {"name_or_path": str(Path(model_dir).resolve()), "attention": work.attention, "dtype": work.dtype}


def _data(work: Workload, path: Path, fmt: str, *, packing: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "train": [{"path": str(Path(path).resolve()), "format": fmt}],
        "max_length": work.lengths.max_length,
        "packing": packing,
        "shuffle": True,
    }
    if packing and work.pack_length is not None:
        data["pack_length"] = work.pack_length
    return data


def _loss(work: Workload) -> dict[str, Any]:
    if work.loss == "dpo":
        return {"type": "dpo", "beta": work.beta, "label_smoothing": 0.0}
    if work.loss == "spo":
        return {"type": "spo", "beta": work.beta}
    raise ValueError(f"bench loss must be dpo or spo, got {work.loss!r}")


def preference_recipe(
    work: Workload,
    variant: Variant,
    model_dir: Path,
    pairs_path: Path,
    out_dir: Path,
    lora: LoraSettings | None = None,
) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "description": f"bench run: {work.loss}, {variant}, {work.attention}",
        "stage": "preference",
        "model": _model(work, model_dir),
        "data": _data(work, pairs_path, "pairs", packing=variant != "padded"),
        "loss": _loss(work),
        "reference": {"precompute": variant == "packed_precompute"},
        "training": _training(work, work.pairs_per_device, work.grad_accum),
        "output": {"dir": str(Path(out_dir).resolve()), "report_to": ["none"]},
    }
    if work.lora_r is not None:
        recipe["adapter"] = {"type": "lora", "r": work.lora_r, "alpha": work.lora_alpha, "dropout": 0.0, "target_modules": "all-linear"}
    if variant == "lora_packed":
        if lora is None:
            raise ValueError("the lora_packed variant needs LoRA settings")
        recipe["adapter"] = {"type": "lora", "r": lora.r, "alpha": lora.alpha, "target_modules": "all-linear"}
        recipe["training"]["learning_rate"] = lora.learning_rate
    return recipe


def sft_recipe(work: Workload, packing: bool, batch: int, model_dir: Path, rows_path: Path, out_dir: Path) -> dict[str, Any]:
    return {
        "description": f"bench run: SFT, packing {'on' if packing else 'off'}",
        "stage": "sft",
        "model": _model(work, model_dir),
        "data": _data(work, rows_path, "messages", packing=packing),
        "training": _training(work, batch, 1),
        "output": {"dir": str(Path(out_dir).resolve()), "report_to": ["none"]},
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_recipe(
    recipe: dict[str, Any], recipe_path: Path, extra_callbacks: tuple[Any, ...] = ()
) -> tuple[LoopTimes, dict[str, Any], float]:
    """Load, resolve and run one recipe in this process with the bench's clock (and `extra_callbacks`) attached.

    Returns the loop times, the run's run.json, and the seconds spent before the training loop began.
    """
    from spo_align.recipe.load import load_recipe
    from spo_align.recipe.resolve import resolve
    from spo_align.run_folder import RUN_INFO
    from spo_align.train.run import run

    started = time.perf_counter()
    recipe_path = Path(recipe_path)
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    plan = resolve(load_recipe(recipe_path), recipe_path, device="cuda" if _cuda() else "cpu")
    times = LoopTimes()
    run(plan, resume=False, overwrite=True, extra_callbacks=(step_clock(times), *extra_callbacks))
    info_path = Path(plan.output_dir) / RUN_INFO
    run_info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    if times.begin is None:
        raise RuntimeError(f"{recipe_path}: the stage ran no training loop")
    return times, run_info, times.begin - started


def adapter_probe(record: dict[str, Any]) -> Any:
    """A `TrainerCallback` that snapshots the trainable (adapter) weights and one frozen base weight at train
    begin and, after the first optimizer step, records how far each moved into `record`."""
    from transformers import TrainerCallback

    class _AdapterProbe(TrainerCallback):
        def __init__(self) -> None:
            self.before: dict[str, Any] = {}
            self.frozen: tuple[str, Any] | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            if model is None:
                raise RuntimeError("the Trainer passed no model to its callbacks")
            for name, param in model.named_parameters():
                if param.requires_grad:
                    self.before[name] = param.detach().clone()
                elif self.frozen is None and param.dim() == 2:
                    self.frozen = (name, param.detach().clone())
            record["trainable_tensors"] = len(self.before)
            record["trainable_params"] = sum(t.numel() for t in self.before.values())

        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            if "changed_tensors" in record or model is None:
                return
            params = dict(model.named_parameters())
            moved = [float((params[name].detach() - value).abs().max()) for name, value in self.before.items()]
            record["changed_tensors"] = sum(1 for m in moved if m > 0)
            record["max_abs_change"] = max(moved, default=0.0)
            if self.frozen is not None:
                name, value = self.frozen
                record["frozen_checked"] = name
                record["frozen_max_abs_change"] = float((params[name].detach() - value).abs().max())
            self.before.clear()

    return _AdapterProbe()


def run_spo(
    work: Workload, variant: Variant, model_dir: Path, pairs_path: Path, out_dir: Path, lora: LoraSettings | None = None
) -> dict[str, Any]:
    out_dir = Path(out_dir)
    # A cold start every time: `--overwrite` keeps a folder's cached reference log-probs (by design, for
    # users), which would let later rounds of (d) skip the precompute pass the bench reports.
    shutil.rmtree(out_dir / "run", ignore_errors=True)
    recipe = preference_recipe(work, variant, model_dir, pairs_path, out_dir / "run", lora)
    probe: dict[str, Any] = {}
    extra = (adapter_probe(probe),) if variant == "lora_packed" else ()
    times, run_info, setup_s = run_recipe(recipe, out_dir / "recipe.yaml", extra)
    summary = times.summary(micro_batches_per_step=work.grad_accum)
    return {
        "engine": "spo",
        "variant": variant,
        **summary,
        "loss_finite": bool(summary["losses"]) and all(math.isfinite(x) for x in summary["losses"]),
        **({"adapter": probe} if probe else {}),
        **device_facts(),
        "attention": work.attention,
        "loss": work.loss,
        "setup_s": setup_s,
        # The precomputed-reference pass runs at train begin, before the first batch.
        "precompute_s": times.pre_loop_s if variant == "packed_precompute" else None,
        "has_reference_model": variant != "packed_precompute" and work.lora_r is None,
        "lora_r": work.lora_r,
        "gradient_checkpointing": work.gradient_checkpointing,
        "peak_rss_mb": peak_rss_mb(),
        "run_info": _reported(run_info),
    }


def run_sft(work: Workload, packing: bool, batch: int, model_dir: Path, rows_path: Path, out_dir: Path) -> dict[str, Any]:
    """One epoch of SFT; `batch` is conversations per step without packing, packed rows per step with it."""
    out_dir = Path(out_dir)
    recipe = sft_recipe(work, packing, batch, model_dir, rows_path, out_dir / "run")
    times, run_info, setup_s = run_recipe(recipe, out_dir / "recipe.yaml")
    return {
        "engine": "spo-sft",
        "variant": "packed" if packing else "padded",
        "batch": batch,
        **times.summary(),
        **device_facts(),
        "setup_s": setup_s,
        "peak_rss_mb": peak_rss_mb(),
        "run_info": _reported(run_info),
    }


def _reported(run_info: dict[str, Any]) -> dict[str, Any]:
    """The run.json facts worth keeping beside the bench's own measurements (tokens, padding, timing)."""
    keep = {}
    for key, value in run_info.items():
        lowered = key.lower()
        if any(word in lowered for word in ("token", "padding", "layout", "pack", "precompute", "reference")):
            keep[key] = value
    return keep
