"""Where a bench run spends its time and memory: one preference run under `torch.profiler`.

    python -m bench profile RUN [--size real|full|toy] [--steps N] [--rows 25] [--out FILE]

RUN is one of the size's runs (trl, spo-padded, spo-packed, ...). The run is the bench's own job (same
model, pairs, settings; `--steps` keeps only the first N optimizer steps' pairs), executed in this process
with the profiler around the whole training call. For spo runs the phases of a step are labelled
(`record_function`): the policy's decoder forwards, the chunked LM head, the reference log-probs, the
loss's forward as a whole, and the backward; the report gives each phase's wall time and call count, then the
top operators by self CPU time and by memory allocated. Profiling slows the run: its times explain the
bench's table, they are not figures of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.clock import peak_rss_mb, set_threads
from bench.config import BenchConfig
from bench.suite import preference_jobs, prepare

logger = logging.getLogger(__name__)

PHASES = (
    ("spo_align.train.logps", "_hidden", "decoder forward"),
    ("spo_align.train.logps", "head_logps", "LM head (chunked log-probs)"),
    ("spo_align.train.preference_trainer", "PreferenceTrainer.reference_logps", "reference log-probs (forward)"),
    ("spo_align.train.preference_trainer", "PreferenceTrainer.compute_loss", "loss forward (policy + reference)"),
    ("transformers", "Trainer.training_step", "training step (forward + backward)"),
    ("transformers", "Trainer._inner_training_loop", "whole training loop"),
)


def current_rss_mb() -> float:
    """This process's resident set now, in MB (10^6 bytes), from /proc (0 where it cannot be read)."""
    from bench.harness import rss_mb

    return rss_mb(os.getpid()) or 0.0


@contextlib.contextmanager
def labelled_phases(clock: dict[str, list[float]], resident: dict[str, float]) -> Iterator[None]:
    """Wrap the phase functions with `record_function` labels, a wall clock and the resident set at each
    phase's end (largest over its calls), restored afterwards."""
    import importlib

    from torch.profiler import record_function

    undo = []
    for module_name, dotted, label in PHASES:
        module = importlib.import_module(module_name)
        owner_name, _, attr = dotted.rpartition(".")
        owner = getattr(module, owner_name) if owner_name else module
        original = getattr(owner, attr)

        def wrapped(*args: Any, __original=original, __label=label, **kwargs: Any) -> Any:
            began = time.perf_counter()
            with record_function("phase: " + __label):
                try:
                    return __original(*args, **kwargs)
                finally:
                    clock[__label].append(time.perf_counter() - began)
                    resident[__label] = max(resident.get(__label, 0.0), current_rss_mb())

        setattr(owner, attr, functools.wraps(original)(wrapped))
        undo.append((owner, attr, original))
    try:
        yield
    finally:
        for owner, attr, original in reversed(undo):
            setattr(owner, attr, original)


def profile_run(
    config: BenchConfig, run: str, rows: int = 25, steps: int | None = None, memory: bool = False
) -> str:
    """Run one preference job under the profiler; return the phase table and the operator tables as text."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.worker import run_spec

    if steps is not None:
        work = config.workload
        config = dataclasses.replace(config, workload=dataclasses.replace(work, n_pairs=steps * work.pairs_per_step))
    files = prepare(config)
    jobs = {job.name: job for job in preference_jobs(config, files)}
    if run not in jobs:
        raise ValueError(f"unknown run {run!r}; choose from {', '.join(jobs)}")
    job = jobs[run]
    set_threads(config.workload.threads)
    clock: dict[str, list[float]] = defaultdict(list)
    resident: dict[str, float] = {}
    with labelled_phases(clock, resident), profile(activities=[ProfilerActivity.CPU], profile_memory=memory) as prof:
        result: dict[str, Any] = run_spec({"task": job.task, **job.spec})
    averages = prof.key_averages()
    header = (
        f"profile of {run} ({config.name} size, {config.workload.threads} threads, torch {torch.__version__}): "
        f"{result['real_tokens']} real tokens, {result['steps']} steps, padding {100 * result['padding_share']:.1f}%, "
        f"loop {result['loop_s']:.1f} s under the profiler, peak RSS {peak_rss_mb():,.0f} MB\n"
    )
    phase_lines = ["", "Phases (wall seconds under the profiler; nested: the loss forward holds decoder, head and reference):", ""]
    phase_lines += [
        "| phase | calls | calls per step | seconds | per step | largest RSS at its end (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    steps_run = max(1, result["steps"])
    for _, _, label in PHASES:
        values = clock.get(label, [])
        if values:
            phase_lines.append(
                f"| {label} | {len(values)} | {len(values) / steps_run:g} | {sum(values):.2f} | "
                f"{sum(values) / steps_run:.2f} | {resident.get(label, 0.0):,.0f} |"
            )
    by_time = averages.table(sort_by="self_cpu_time_total", row_limit=rows)
    tables = [header, *phase_lines, "", "Top operators by self CPU time:", by_time]
    if memory:
        tables += ["", "Top operators by memory allocated:", averages.table(sort_by="self_cpu_memory_usage", row_limit=rows)]
    return "\n".join(tables)


def write_profile(text: str, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
