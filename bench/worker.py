"""The child side of the harness: `python -m bench worker SPEC OUT` runs one job and writes its figures."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bench.clock import set_threads
from bench.config import LogpWork, Workload

logger = logging.getLogger(__name__)


TASKS = ("logp", "trl", "spo", "sft")


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    task = spec["task"]
    if task not in TASKS:
        raise ValueError(f"unknown bench task {task!r}; expected one of {', '.join(TASKS)}")
    if task == "logp":
        work = LogpWork(**spec["logp"])
        set_threads(work.threads)
        from bench.logp_memory import run_logp

        return run_logp(work, spec["method"])
    workload = Workload.from_json(spec["workload"])
    set_threads(workload.threads)
    out_dir = Path(spec["out_dir"])
    model_dir = Path(spec["model_dir"])
    if task == "trl":
        from bench.trl_baseline import run_trl

        return run_trl(workload, model_dir, Path(spec["pairs"]), out_dir)
    if task == "spo":
        from bench.spo_runs import run_spo

        return run_spo(workload, spec["variant"], model_dir, Path(spec["pairs"]), out_dir)
    from bench.spo_runs import run_sft

    return run_sft(workload, bool(spec["packing"]), int(spec["batch"]), model_dir, Path(spec["rows"]), out_dir)


def main(spec_path: Path, out_path: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result = run_spec(spec)
    tmp = Path(out_path).with_suffix(".partial")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    tmp.replace(out_path)
