"""The whole bench: write the shared workload, build the jobs, run them in rounds, hand the results on."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from bench.config import BenchConfig
from bench.harness import Job, run_rounds
from bench.pairs import make_conversations, make_pairs, pair_token_counts, write_jsonl, write_model

logger = logging.getLogger(__name__)

Part = Literal["preference", "sft", "logp"]
PARTS: tuple[Part, ...] = ("preference", "sft", "logp")
PREFERENCE_RUNS = ("trl", "spo-padded", "spo-packed", "spo-packed-precompute")
JOB_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class WorkloadFiles:
    model_dir: Path
    pairs: Path
    sft_rows: Path
    pair_tokens: int
    """Real tokens of one epoch over the pairs (prompt + chosen and prompt + rejected, template included)."""


def prepare(config: BenchConfig) -> WorkloadFiles:
    work = config.workload
    root = Path(config.work_dir).resolve()
    model_dir = write_model(root / "model", work.shape, seed=work.seed)
    pairs = make_pairs(work.n_pairs, work.lengths, work.shape.vocab_size, seed=work.seed)
    rows = make_conversations(work.sft_rows, work.lengths, work.shape.vocab_size, seed=work.seed + 1000)
    return WorkloadFiles(
        model_dir=model_dir,
        pairs=write_jsonl(pairs, root / "pairs.jsonl"),
        sft_rows=write_jsonl(rows, root / "sft.jsonl"),
        pair_tokens=sum(sum(pair_token_counts(row)) for row in pairs),
    )


def preference_jobs(config: BenchConfig, files: WorkloadFiles) -> list[Job]:
    root = Path(config.work_dir).resolve() / "runs"
    common = {"workload": config.workload.to_json(), "model_dir": str(files.model_dir), "pairs": str(files.pairs)}
    jobs = [Job("trl", "trl", {**common, "out_dir": str(root / "trl")})]
    for variant in ("padded", "packed", "packed_precompute"):
        name = "spo-" + variant.replace("_", "-")
        jobs.append(Job(name, "spo", {**common, "variant": variant, "out_dir": str(root / name)}))
    return jobs


def sft_jobs(config: BenchConfig, files: WorkloadFiles) -> list[Job]:
    root = Path(config.work_dir).resolve() / "runs"
    common = {"workload": config.workload.to_json(), "model_dir": str(files.model_dir), "rows": str(files.sft_rows)}
    return [
        Job("sft-padded", "sft", {**common, "packing": False, "out_dir": str(root / "sft-padded")}),
        Job("sft-packed", "sft", {**common, "packing": True, "out_dir": str(root / "sft-packed")}),
    ]


def logp_jobs(config: BenchConfig) -> list[Job]:
    return [Job(f"logp-{method}", "logp", {"logp": config.logp.to_json(), "method": method}) for method in ("full", "chunked")]


def run_bench(config: BenchConfig, parts: Iterable[Part]) -> dict[str, Any]:
    """Run the chosen parts; returns the raw results per part and when each ran."""
    parts = tuple(parts)
    started = time.time()
    files = prepare(config)
    threads = config.workload.threads
    raw: dict[str, Any] = {"started": started, "pair_tokens": files.pair_tokens, "parts": {}}
    for part in parts:
        part_started = time.time()
        if part == "preference":
            jobs = preference_jobs(config, files)
        elif part == "sft":
            jobs = sft_jobs(config, files)
        else:
            jobs = logp_jobs(config)
            threads = config.logp.threads
        results = run_rounds(jobs, config.rounds, Path(config.work_dir).resolve(), threads, JOB_TIMEOUT_S)
        raw["parts"][part] = {"started": part_started, "seconds": time.time() - part_started, "results": results}
    raw["seconds"] = time.time() - started
    return raw
