"""Where a bench run spends its time: one preference run under `torch.profiler`, top operators by self CPU time.

    python -m bench profile RUN [--size full|toy] [--rows 25] [--out FILE]

RUN is one of trl, spo-padded, spo-packed, spo-packed-precompute. The run is the bench's own job (same
model, pairs, settings), executed in this process with the profiler around the whole training call, so
the table explains the table of `python -m bench run` (profiling slows the run; its times are not figures).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bench.clock import set_threads
from bench.config import BenchConfig
from bench.suite import preference_jobs, prepare

logger = logging.getLogger(__name__)


def profile_run(config: BenchConfig, run: str, rows: int = 25) -> str:
    """Run one preference job under the profiler; return the operator table as text."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.worker import run_spec

    files = prepare(config)
    jobs = {job.name: job for job in preference_jobs(config, files)}
    if run not in jobs:
        raise ValueError(f"unknown run {run!r}; choose from {', '.join(jobs)}")
    job = jobs[run]
    set_threads(config.workload.threads)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        result: dict[str, Any] = run_spec({"task": job.task, **job.spec})
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    header = (
        f"profile of {run} ({config.name} size, {config.workload.threads} threads, torch {torch.__version__}): "
        f"{result['real_tokens']} real tokens, {result['steps']} steps, padding {100 * result['padding_share']:.1f}%, "
        f"loop {result['loop_s']:.1f} s under the profiler\n"
    )
    return header + table


def write_profile(text: str, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
