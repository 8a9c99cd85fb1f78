"""Run each bench job in a fresh Python process, watch its memory from outside, collect its result.

A job is a JSON spec; the child (`python -m bench worker SPEC OUT`) sets its thread count, does the work,
and writes its figures to OUT. The parent samples the child's resident set every few milliseconds as a
cross-check of the child's own high-water mark (`ru_maxrss`), and keeps the child's log beside the result.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_EVERY_S = 0.1
MIN_JOB_S = 60.0
"""A job is not started with less time than this left before the deadline."""


class BenchJobError(RuntimeError):
    """A worker process failed; the message ends with the tail of its log."""


@dataclass(frozen=True)
class Job:
    name: str
    """Row label, e.g. 'trl' or 'spo-packed'."""
    task: str
    """Worker task: trl | spo | sft | logp."""
    spec: dict[str, Any]
    timeout_s: float | None = None
    """This job's own time cap (process start included); None: the caller's."""


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        OPENBLAS_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_DISABLED="true",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
    )
    return env


def rss_mb(pid: int) -> float | None:
    """Current resident set of `pid` in MB (10^6 bytes), from /proc; None where /proc is not available."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def run_job(job: Job, work_dir: Path, threads: int, timeout_s: float) -> dict[str, Any]:
    """Run one job in a fresh process; return the worker's figures plus wall time and sampled peak RSS."""
    work_dir = Path(work_dir)
    jobs_dir = work_dir / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{job.name}-{time.strftime('%H%M%S')}-{os.getpid()}-{time.perf_counter_ns() % 1_000_000}"
    spec_path = jobs_dir / f"{stamp}.spec.json"
    out_path = jobs_dir / f"{stamp}.result.json"
    log_path = jobs_dir / f"{stamp}.log"
    spec_path.write_text(json.dumps({"task": job.task, **job.spec}, indent=1), encoding="utf-8")
    command = [sys.executable, "-m", "bench", "worker", str(spec_path), str(out_path)]
    started = time.perf_counter()
    sampled_peak = 0.0
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env(threads), cwd=REPO_ROOT)
        try:
            while proc.poll() is None:
                if time.perf_counter() - started > timeout_s:
                    proc.kill()
                    proc.wait()
                    raise BenchJobError(f"{job.name}: killed after {timeout_s:.0f} s\n{_tail(log_path)}")
                current = rss_mb(proc.pid)
                if current is not None:
                    sampled_peak = max(sampled_peak, current)
                time.sleep(SAMPLE_EVERY_S)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
    wall_s = time.perf_counter() - started
    if proc.returncode != 0 or not out_path.exists():
        raise BenchJobError(f"{job.name}: worker exited with code {proc.returncode}\n{_tail(log_path)}")
    result = json.loads(out_path.read_text(encoding="utf-8"))
    result.update(name=job.name, task=job.task, wall_s=wall_s, sampled_peak_rss_mb=sampled_peak or None, log=str(log_path))
    return result


def _tail(path: Path, lines: int = 40) -> str:
    text = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


def run_rounds(
    jobs: list[Job],
    rounds: int,
    work_dir: Path,
    threads: int,
    timeout_s: float,
    *,
    keep_going: bool = False,
    deadline: float | None = None,
    on_result: Callable[[dict[str, list[dict[str, Any]]]], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every job once per round, rounds interleaved (a, b, c, a, b, c, ...) so that drifting machine load
    touches every job alike. Returns each job's results in round order. With `keep_going`, a failed job
    is recorded as ``{"error": ...}`` (the report shows it) and the others still run. `deadline`
    (a `time.monotonic()` value) caps each job's timeout; jobs that would start after it are recorded as
    skipped, so a time-boxed run still ends with a report. `on_result` sees the results so far after
    every job (the bench rewrites its report then, so an interrupted run keeps what it measured)."""
    results: dict[str, list[dict[str, Any]]] = {job.name: [] for job in jobs}
    for round_index in range(rounds):
        for job in jobs:
            cap = job.timeout_s if job.timeout_s is not None else timeout_s
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left < min(MIN_JOB_S, cap):
                results[job.name].append(
                    {"name": job.name, "task": job.task, "round": round_index + 1, "error": "skipped: time budget spent"}
                )
                if on_result is not None:
                    on_result(results)
                continue
            logger.info("round %d/%d: %s", round_index + 1, rounds, job.name)
            capped = left is not None and left < cap
            try:
                result = run_job(job, work_dir, threads, cap if left is None else min(cap, left))
            except BenchJobError as exc:
                if not keep_going:
                    raise
                logger.error("%s", exc)
                first = str(exc).splitlines()[0]
                if capped and "killed after" in first:
                    first = f"skipped: time budget spent ({first})"
                result = {"name": job.name, "task": job.task, "error": first, "detail": str(exc)}
            result["round"] = round_index + 1
            results[job.name].append(result)
            if on_result is not None:
                on_result(results)
    return results


def median_of(results: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None
