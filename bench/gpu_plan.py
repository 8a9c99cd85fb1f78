"""The GPU check's bench part: which runs, in which order, under which time caps.

    python -m bench run --size gpu       (bench/gpu_check.sh calls it; --size gpu-cpu: the same on a CPU, toy size)

Every run is a fresh process with its own time cap (`GpuCheck.caps`), so a kernel that fails or hangs costs
its own cap and no more, and is recorded with its error. The runs go in order of what the check needs most,
so a spent budget cuts the least needed (they are recorded as skipped):

1. peak: the card's measured dense matrix-product rate (the MFU denominator);
2. trl: TRL's DPOTrainer, sigmoid loss, live reference (TRL 1.16's padding-free mode is disabled, so it pads);
3. spo-packed-sdpa, spo-packed-precompute-sdpa, spo-lora-packed-sdpa: packed SPO with a live reference,
   with precomputed reference log-probs, and LoRA (the reference is the policy with its adapter off);
4. check-sdpa: packed against padded log-probs on the device, per sequence, with the leaking control that
   must fail (bench/logp_check.py);
5. generate: `spo eval generate` speed;
6. packed SPO and its log-prob check under every other kernel that imports (flex_attention, whose kernels
   torch compiles on first use; flash_attention_2 where flash-attn is installed);
7. trl-precompute: TRL with its own `precompute_ref_log_probs`, the like-for-like baseline of (3)'s precompute run.

After every run the raw results are saved (`raw.json` in the work folder) and the report rewritten.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.config import BenchConfig, GpuCheck
from bench.harness import Job, run_rounds
from bench.suite import prepare

logger = logging.getLogger(__name__)

RAW_FILE = "raw.json"
COMPILED_KERNELS = ("flex_attention",)
"""Kernels torch compiles on first use: their runs get the longer caps."""


@dataclass(frozen=True)
class NotRun:
    name: str
    reason: str


def kernel_missing(attention: str) -> str | None:
    """Why `attention` cannot run here, or None: flash_attention_2 needs flash-attn, flex_attention torch's."""
    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed here (the package index has its source only; see docs/performance.md)"
    if attention == "flex_attention" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return "this torch has no torch.nn.attention.flex_attention"
    return None


def gpu_jobs(config: BenchConfig, model_dir: Path, pairs: Path) -> tuple[list[Job], list[NotRun]]:
    """The check's runs in priority order, and the kernels left out with the reason."""
    check = config.gpu
    if check is None:
        raise ValueError(f"bench size {config.name!r} is not a GPU check size")
    root = Path(config.work_dir).resolve() / "runs"
    base = config.workload
    common = {"model_dir": str(model_dir), "pairs": str(pairs), "check": check.to_json()}

    def job(name: str, task: str, kind: str, attention: str = "sdpa", **extra: Any) -> Job:
        work = replace(base, attention=attention)
        spec = {"workload": work.to_json(), **common, "out_dir": str(root / name), **extra}
        return Job(name, task, spec, timeout_s=check.cap(kind))

    lora = {"r": check.lora_r, "alpha": check.lora_alpha, "learning_rate": check.lora_learning_rate}
    jobs = [
        Job("peak", "peak", {"size": check.peak_size, "repeats": check.peak_repeats, "dtype": check.peak_dtype},
            timeout_s=check.cap("peak")),
        job("trl", "trl", "trl"),
        job("spo-packed-sdpa", "spo", "spo", variant="packed"),
        job("spo-packed-precompute-sdpa", "spo", "spo", variant="packed_precompute"),
        job("spo-lora-packed-sdpa", "spo", "spo", variant="lora_packed", lora=lora),
        job("check-sdpa", "logp_check", "check"),
        job("generate", "generate", "generate"),
    ]
    not_run: list[NotRun] = []
    for attention in check.attentions:
        if attention == "sdpa":
            continue
        missing = kernel_missing(attention)
        if missing:
            not_run.append(NotRun(f"{attention} (packed spo run and its log-prob check)", f"not measured: {missing}"))
            continue
        compiled = "-compiled" if attention in COMPILED_KERNELS else ""
        jobs.append(job(f"spo-packed-{attention}", "spo", "spo" + compiled, attention, variant="packed"))
        jobs.append(job(f"check-{attention}", "logp_check", "check" + compiled, attention))
    jobs.append(job("trl-precompute", "trl", "trl", precompute=True))
    return jobs, not_run


def describe(job: Job) -> dict[str, Any]:
    """What the report needs to know of a planned run, whether or not it ran."""
    work = job.spec.get("workload", {})
    return {
        "name": job.name,
        "task": job.task,
        "attention": work.get("attention"),
        "variant": job.spec.get("variant") or ("precompute" if job.spec.get("precompute") else None),
        "timeout_s": job.timeout_s,
    }


def run_gpu_bench(
    config: BenchConfig, budget_s: float | None, on_progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Prepare the workload, run the plan, save raw results after every run; returns them."""
    check: GpuCheck | None = config.gpu
    if check is None:
        raise ValueError(f"bench size {config.name!r} is not a GPU check size")
    started = time.time()
    deadline = None if budget_s is None else time.monotonic() + budget_s
    work_dir = Path(config.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    raw: dict[str, Any] = {"started": started, "seconds": 0.0, "plan": [], "not_run": [], "results": {}}

    def save() -> None:
        raw["seconds"] = time.time() - started
        (work_dir / RAW_FILE).write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")
        if on_progress is not None:
            on_progress(raw)

    prepare_began = time.perf_counter()
    try:
        files = prepare(config)
    except Exception as exc:  # recorded in the report: the shell script still writes what it has
        raw["prepare_error"] = f"{type(exc).__name__}: {exc}"
        save()
        raise
    raw["prepare_s"] = time.perf_counter() - prepare_began
    raw["pair_tokens"] = files.pair_tokens
    jobs, not_run = gpu_jobs(config, files.model_dir, files.pairs)
    raw["plan"] = [describe(job) for job in jobs]
    raw["not_run"] = [{"name": n.name, "reason": n.reason} for n in not_run]
    save()

    def seen(results: dict[str, list[dict[str, Any]]]) -> None:
        raw["results"] = results
        save()

    run_rounds(
        jobs,
        config.rounds,
        work_dir,
        config.workload.threads,
        config.job_timeout_s,
        keep_going=True,
        deadline=deadline,
        on_result=seen,
    )
    save()
    return raw


def load_raw(work_dir: Path) -> dict[str, Any] | None:
    path = Path(work_dir) / RAW_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
