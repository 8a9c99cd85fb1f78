"""The child side of the harness: `python -m bench worker SPEC OUT` runs one job and writes its figures."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bench.clock import set_threads
from bench.config import GpuCheck, LogpWork, Workload

logger = logging.getLogger(__name__)


TASKS = ("logp", "trl", "spo", "sft", "peak", "logp_check", "generate")


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    task = spec["task"]
    if task not in TASKS:
        raise ValueError(f"unknown bench task {task!r}; expected one of {', '.join(TASKS)}")
    if task == "logp":
        work = LogpWork(**spec["logp"])
        set_threads(work.threads)
        from bench.logp_memory import run_logp

        return run_logp(work, spec["method"])
    if task == "peak":
        from bench.peak import run_peak

        return run_peak(int(spec["size"]), int(spec["repeats"]), spec["dtype"])
    workload = Workload.from_json(spec["workload"])
    set_threads(workload.threads)
    out_dir = Path(spec["out_dir"])
    model_dir = Path(spec["model_dir"])
    check = GpuCheck.from_json(spec["check"]) if "check" in spec else None
    if task in ("logp_check", "generate") and check is None:
        raise ValueError(f"bench task {task!r} needs the GPU check's settings ('check' in its spec)")
    if task == "trl":
        from bench.trl_baseline import run_trl

        return run_trl(workload, model_dir, Path(spec["pairs"]), out_dir, precompute=bool(spec.get("precompute", False)))
    if task == "spo":
        from bench.spo_runs import LoraSettings, run_spo

        lora = LoraSettings(**spec["lora"]) if "lora" in spec else None
        return run_spo(workload, spec["variant"], model_dir, Path(spec["pairs"]), out_dir, lora)
    if task == "logp_check":
        from bench.logp_check import run_logp_check

        return run_logp_check(workload, check, workload.attention, model_dir, Path(spec["pairs"]))
    if task == "generate":
        from bench.generation import run_generation

        return run_generation(workload, check, model_dir, Path(spec["pairs"]), out_dir)
    from bench.spo_runs import run_sft

    return run_sft(workload, bool(spec["packing"]), int(spec["batch"]), model_dir, Path(spec["rows"]), out_dir)


def main(spec_path: Path, out_path: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result = run_spec(spec)
    tmp = Path(out_path).with_suffix(".partial")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    tmp.replace(out_path)
