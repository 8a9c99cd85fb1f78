"""The whole bench: write the shared workload, build the jobs, run them in rounds, hand the results on."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bench.config import BenchConfig, Workload
from bench.harness import Job, run_rounds
from bench.pairs import (
    conversation_tokens,
    make_conversations,
    make_pairs,
    pair_token_counts,
    real_pair_tokens,
    single_token_words,
    write_jsonl,
    write_model,
)
from bench.report import MATMUL_PEAK

logger = logging.getLogger(__name__)

Part = Literal["preference", "sft", "logp"]
PARTS: tuple[Part, ...] = ("logp", "preference", "sft")
"""Run order: the short, load-insensitive memory part first, then the main table; with a time budget the
parts run last are the ones cut short."""
PREFERENCE_RUNS = ("trl", "spo-padded", "spo-packed", "spo-packed-precompute")


@dataclass(frozen=True)
class WorkloadFiles:
    model_dir: Path
    pairs: Path
    sft_rows: Path
    pair_tokens: int
    """Real tokens of one epoch over the pairs (prompt + chosen and prompt + rejected, template included)."""
    sft_mean_tokens: float = 0.0
    """Mean tokens of an SFT conversation (template included)."""


def _init_device(work: Workload) -> str:
    if work.device != "cuda":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare(config: BenchConfig) -> WorkloadFiles:
    work = config.workload
    root = Path(config.work_dir).resolve()
    if work.model is not None:
        return _prepare_real(config, root)
    model_dir = write_model(root / "model", work.shape, seed=work.seed, device=_init_device(work), dtype=work.dtype)
    pairs = make_pairs(work.n_pairs, work.lengths, work.shape.vocab_size, seed=work.seed)
    rows = make_conversations(work.sft_rows, work.lengths, work.shape.vocab_size, seed=work.seed + 1000)
    return WorkloadFiles(
        model_dir=model_dir,
        pairs=write_jsonl(pairs, root / "pairs.jsonl"),
        sft_rows=write_jsonl(rows, root / "sft.jsonl"),
        pair_tokens=sum(sum(pair_token_counts(row)) for row in pairs),
        sft_mean_tokens=sum(conversation_tokens(row) for row in rows) / max(1, len(rows)),
    )


def _prepare_real(config: BenchConfig, root: Path) -> WorkloadFiles:
    """A packaged real model (converted once into the cache) and pairs written in its own tokens' words."""
    from transformers import AutoTokenizer

    from spo_align.packaged_model import materialise

    work = config.workload
    assert work.model is not None
    model_dir = materialise(work.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = single_token_words(tokenizer)
    pairs = make_pairs(work.n_pairs, work.lengths, len(vocab), seed=work.seed, vocab=vocab)
    return WorkloadFiles(
        model_dir=model_dir,
        pairs=write_jsonl(pairs, root / f"pairs-{work.model}.jsonl"),
        sft_rows=write_jsonl([], root / f"sft-{work.model}.jsonl"),
        pair_tokens=real_pair_tokens(tokenizer, pairs),
    )


def preference_jobs(config: BenchConfig, files: WorkloadFiles) -> list[Job]:
    """(a) TRL, (b) padded, (c) packed, (d) packed + precompute (the GPU check has its own plan: gpu_plan)."""
    root = Path(config.work_dir).resolve() / "runs"
    paths = {"model_dir": str(files.model_dir), "pairs": str(files.pairs)}

    def job(name: str, task: str, **extra: Any) -> Job:
        return Job(name, task, {"workload": config.workload.to_json(), **paths, "out_dir": str(root / name), **extra})

    jobs = []
    if config.workload.model is not None:  # the CPU's measured matrix-product rate, once per round
        spec = {"size": 2048, "repeats": 10, "dtype": "float32"}
        jobs.append(Job(MATMUL_PEAK, "peak", spec))
    for name in config.runs:
        if name == "trl":
            jobs.append(job("trl", "trl"))
        elif name.startswith("spo-"):
            jobs.append(job(name, "spo", variant=name[len("spo-") :].replace("-", "_")))
        else:
            raise ValueError(f"unknown bench run {name!r}")
    return jobs


def sft_jobs(config: BenchConfig, files: WorkloadFiles) -> list[Job]:
    """SFT with and without packing, at about the same real tokens per optimizer step: without packing a
    batch is `sft_rows_per_step` conversations; with packing it is that many tokens' worth of packed rows."""
    from spo_align.recipe.resolve import default_pack_length

    root = Path(config.work_dir).resolve() / "runs"
    work = config.workload
    common = {"workload": work.to_json(), "model_dir": str(files.model_dir), "rows": str(files.sft_rows)}
    pack_length = work.pack_length or default_pack_length(work.lengths.max_length, "cuda" if work.device == "cuda" else "cpu")
    packed_batch = max(1, round(work.sft_rows_per_step * files.sft_mean_tokens / pack_length))
    return [
        Job("sft-padded", "sft", {**common, "packing": False, "batch": work.sft_rows_per_step, "out_dir": str(root / "sft-padded")}),
        Job("sft-packed", "sft", {**common, "packing": True, "batch": packed_batch, "out_dir": str(root / "sft-packed")}),
    ]


def logp_jobs(config: BenchConfig) -> list[Job]:
    return [Job(f"logp-{method}", "logp", {"logp": config.logp.to_json(), "method": method}) for method in ("full", "chunked")]


def run_bench(
    config: BenchConfig,
    parts: Iterable[Part],
    budget_s: float | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    reused: dict[str, dict[str, list[dict[str, Any]]]] | None = None,
) -> dict[str, Any]:
    """Run the chosen parts; returns the raw results per part and when each ran. With `budget_s`, jobs
    that would start after the budget is spent are recorded as skipped (the report still gets written).
    `progress` gets the raw results so far after every job. `reused` (part -> run -> results, from an
    earlier report's ``raw``) adds the earlier results of runs this invocation does not run, with their
    round numbers, so that a round cut short can be completed by a second invocation."""
    parts = tuple(parts)
    started = time.time()
    deadline = None if budget_s is None else time.monotonic() + budget_s
    files = prepare(config)
    raw: dict[str, Any] = {
        "started": started,
        "seconds": 0.0,
        "pair_tokens": files.pair_tokens,
        "model_dir": str(files.model_dir),
        "parts": {},
        "load_average_start": os.getloadavg()[0],
    }
    for part in parts:
        part_started = time.time()
        if part == "preference":
            jobs, threads, rounds = preference_jobs(config, files), config.workload.threads, config.rounds
        elif part == "sft":
            jobs, threads, rounds = sft_jobs(config, files), config.workload.threads, config.rounds
        else:
            jobs, threads, rounds = logp_jobs(config), config.logp.threads, min(config.rounds, config.logp.rounds)
        entry: dict[str, Any] = {"started": part_started, "seconds": 0.0, "results": {}}
        raw["parts"][part] = entry

        earlier = {
            name: runs for name, runs in (reused or {}).get(part, {}).items() if name not in {j.name for j in jobs}
        }

        def seen(
            results: dict[str, list[dict[str, Any]]], entry: dict[str, Any] = entry, earlier: dict = earlier
        ) -> None:
            entry["results"] = {**earlier, **results}
            entry["seconds"] = time.time() - entry["started"]
            raw["seconds"] = time.time() - started
            raw["load_average_end"] = os.getloadavg()[0]
            if progress is not None:
                progress(raw)

        run_rounds(
            jobs,
            rounds,
            Path(config.work_dir).resolve(),
            threads,
            config.job_timeout_s,
            keep_going=config.keep_going or budget_s is not None,
            deadline=deadline,
            on_result=seen,
        )
    raw["seconds"] = time.time() - started
    raw["load_average_end"] = os.getloadavg()[0]
    return raw
