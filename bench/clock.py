"""What every bench worker process shares: thread set-up, the training-loop clock, and its own peak RSS."""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any


def set_threads(threads: int) -> None:
    """Pin torch (and the BLAS/OpenMP pools it starts) to `threads` threads before any work runs."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def device_facts() -> dict[str, Any]:
    """On CUDA: the card's name and this process's peak allocated and reserved memory (MB); on CPU: nothing."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        "device_name": torch.cuda.get_device_name(),
        "cuda_peak_allocated_mb": torch.cuda.max_memory_allocated() / 1e6,
        "cuda_peak_reserved_mb": torch.cuda.max_memory_reserved() / 1e6,
    }


def sync_device() -> None:
    """Wait for queued CUDA work, so a host clock read after it times the work (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (the kernel's high-water mark), in MB (10^6 bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def batch_tokens(batch: Any) -> tuple[int, int]:
    """(real tokens, token slots the forward processes) of one collated batch, whatever its layout.

    Padded batches carry an attention mask: real = its sum, slots = its size. Packed batches (position_ids,
    no mask) hold no padding unless the collator says otherwise through ``num_real_tokens``.
    """
    ids = batch["input_ids"]
    slots = int(ids.numel())
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum()), slots
    if "num_real_tokens" in batch:
        return int(batch["num_real_tokens"]), slots
    return slots, slots


def batch_work(batch: Any) -> tuple[int, int]:
    """(labelled tokens, attention score entries per head and layer) of one collated batch, for counting
    executed FLOPs. Labelled = positions whose label is scored (no labels: every slot). Score entries: a
    padded batch (a mask is given, the kernel computes it whole) costs rows x width^2; packed rows cost
    each sequence's causal triangle s(s+1)/2, as per-sequence attention (`sdpa_segments`) computes them."""
    ids = batch["input_ids"]
    labels = batch.get("labels")
    labelled = int((labels != -100).sum()) if labels is not None else int(ids.numel())
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        rows, width = ids.shape
        return labelled, int(rows) * int(width) ** 2
    positions = batch.get("position_ids")
    if positions is None:
        rows, width = ids.shape
        return labelled, int(rows) * int(width) * (int(width) + 1) // 2
    entries = 0
    for row in positions.reshape(-1, positions.shape[-1]):
        starts = [0, *((row[1:] != row[:-1] + 1).nonzero().flatten() + 1).tolist(), int(row.numel())]
        entries += sum((b - a) * (b - a + 1) // 2 for a, b in zip(starts[:-1], starts[1:]))
    return labelled, entries


@dataclass
class LoopTimes:
    """What a Trainer's loop did: wall-clock marks (start, end of each optimizer step, end) and, per
    collated batch in order, its real tokens and token slots."""

    begin: float | None = None
    first_fetch: float | None = None
    first_fetch_cpu: float | None = None
    """When the first training batch began to be collated: the loop proper starts here, after whatever
    the engine runs at train begin (e.g. a reference precompute pass)."""
    step_ends: list[float] = field(default_factory=list)
    end: float | None = None
    end_cpu: float | None = None
    n_params: int | None = None
    """Distinct parameters of the trained model (tied embeddings counted once), for MFU."""
    batch_real: list[int] = field(default_factory=list)
    batch_slots: list[int] = field(default_factory=list)
    batch_labelled: list[int] = field(default_factory=list)
    batch_score_entries: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    """The training loss of every logged step, as the Trainer logged it."""

    @property
    def loop_s(self) -> float:
        """From the first batch's collation to the end of training: every step, data loading included."""
        if self.first_fetch is None or self.end is None:
            raise RuntimeError("the training loop did not run to its end")
        return self.end - self.first_fetch

    @property
    def pre_loop_s(self) -> float:
        """From the Trainer's train-begin event to the first batch (a reference precompute runs here)."""
        if self.begin is None or self.first_fetch is None:
            raise RuntimeError("the training loop did not start")
        return self.first_fetch - self.begin

    @property
    def steady_s(self) -> float | None:
        """Seconds from the end of step 1 to the end of the last step (None with fewer than 2 steps)."""
        if len(self.step_ends) < 2:
            return None
        return self.step_ends[-1] - self.step_ends[0]

    def summary(self, micro_batches_per_step: int = 1) -> dict[str, Any]:
        """Tokens and times of the steps that ran. The dataloader may fetch a batch ahead of the step it
        feeds, so only the first steps x micro_batches_per_step batches count."""
        steps = len(self.step_ends)
        used = steps * micro_batches_per_step
        real, slots = sum(self.batch_real[:used]), sum(self.batch_slots[:used])
        if len(self.batch_real) < used:
            raise RuntimeError(f"saw {len(self.batch_real)} batches for {steps} steps: the collator was not tracked")
        starts = [self.first_fetch, *self.step_ends[:-1]]
        return {
            "steps": steps,
            "real_tokens": real,
            "token_slots": slots,
            "padding_share": 1.0 - real / slots if slots else 0.0,
            "loop_s": self.loop_s,
            "pre_loop_s": self.pre_loop_s,
            # CPU seconds of this process over the loop: unlike wall time, barely moved by other processes
            # competing for the cores (a cross-check when the machine is shared).
            "loop_cpu_s": (self.end_cpu - self.first_fetch_cpu)
            if self.end_cpu is not None and self.first_fetch_cpu is not None
            else None,
            "steady_s": self.steady_s,
            "steady_real_tokens": sum(self.batch_real[micro_batches_per_step:used]),
            "n_params": self.n_params,
            # Per optimizer step (the first one is the warm-up): seconds and the real tokens it trained on.
            "step_seconds": [end - start for start, end in zip(starts, self.step_ends)],
            "step_real_tokens": [
                sum(self.batch_real[i * micro_batches_per_step : (i + 1) * micro_batches_per_step]) for i in range(steps)
            ],
            "losses": list(self.losses),
            # For executed-FLOP counts (bench/flops.py): labelled tokens and attention score entries trained on.
            "labelled_tokens": sum(self.batch_labelled[:used]),
            "score_entries": sum(self.batch_score_entries[:used]),
        }


def step_clock(times: LoopTimes) -> Any:
    """A `TrainerCallback` that fills `times` (built lazily so importing this module needs no transformers).

    At the start of training it wraps the train dataloader's `collate_fn` (the engine's own collator,
    called unchanged) to count each batch's tokens; the iterator that reads it is made after this point.
    On CUDA it waits for the device at the end of every step, so each step's time is its own work.
    """
    from transformers import TrainerCallback

    class _StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, model=None, **kwargs):  # noqa: ANN001
            if model is not None:
                times.n_params = sum(p.numel() for p in model.parameters())
            if train_dataloader is None:
                raise RuntimeError("the Trainer passed no train_dataloader to its callbacks")
            # accelerate's DataLoaderShard iterates its `base_dataloader`: wrap the loader that collates.
            loader = train_dataloader
            while getattr(loader, "base_dataloader", None) is not None:
                loader = loader.base_dataloader
            inner = loader.collate_fn

            def counting_collate(features: Any) -> Any:
                if times.first_fetch is None:
                    times.first_fetch = time.perf_counter()
                    times.first_fetch_cpu = time.process_time()
                batch = inner(features)
                real, slots = batch_tokens(batch)
                times.batch_real.append(real)
                times.batch_slots.append(slots)
                labelled, entries = batch_work(batch)
                times.batch_labelled.append(labelled)
                times.batch_score_entries.append(entries)
                return batch

            loader.collate_fn = counting_collate
            times.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            sync_device()
            times.step_ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs:
                times.losses.append(float(logs["loss"]))

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            sync_device()
            times.end = time.perf_counter()
            times.end_cpu = time.process_time()

    return _StepClock()
