"""Turn the raw per-run results into the bench table: medians, ratios against TRL, targets, JSON + Markdown."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.config import BenchConfig

LABELS = {
    "trl": "(a) TRL DPOTrainer, live reference",
    "spo-padded": "(b) spo train, padded",
    "spo-packed": "(c) spo train, packed",
    "spo-packed-precompute": "(d) spo train, packed + precomputed reference",
    "sft-padded": "SFT, no packing",
    "sft-packed": "SFT, packing",
    "logp-full": "full-tensor log_softmax",
    "logp-chunked": "spo_align.train.sequence_logps (chunked)",
}

# Done-when targets of issue 7 (2 CPU cores): measured against, never adjusted.
TARGETS = {
    "spo-packed": {"tokens_per_s_ratio_min": 3.0, "peak_rss_ratio_max": 0.5},
    "spo-packed-precompute": {"tokens_per_s_ratio_min": 3.5, "peak_rss_ratio_max": 0.5},
}
# Issue 17's bar for the real model (2 CPU cores): whole-process wall time and peak RSS against TRL, as
# medians of the per-round ratios (each round runs TRL and spo back to back). speed = TRL wall / spo wall.
REAL_TARGETS = {
    "spo-packed": {"speed_min": 2.0, "peak_rss_ratio_max": 0.6},
    "spo-padded": {"speed_min": 1.0, "peak_rss_ratio_max": None},
}
LOGP_TARGET_RATIO_MAX = 0.25
MATMUL_PEAK = "matmul-peak"
"""The job that measures the CPU's dense fp32 matrix-product rate at the bench's threads, once per round."""
PACKED_PADDING_SHARE_MAX = 0.05


def _median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _training_row(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    errors = [r["error"] for r in runs if "error" in r]
    for run in ok:
        run["tokens_per_s"] = run["real_tokens"] / run["loop_s"] if run["loop_s"] > 0 else None
        pre = run.get("precompute_s")
        run["tokens_per_s_with_precompute"] = run["real_tokens"] / (run["loop_s"] + pre) if pre else None
        cpu = run.get("loop_cpu_s")
        run["tokens_per_cpu_s"] = run["real_tokens"] / cpu if cpu else None
        steady = run.get("steady_s")
        run["steady_tokens_per_s"] = run["steady_real_tokens"] / steady if steady else None

    def med(key: str) -> float | None:
        return _median([r.get(key) for r in ok])

    return {
        "name": name,
        "label": LABELS.get(name, name),
        "rounds": len(runs),
        "errors": errors,
        "attention": ok[0].get("attention") if ok else None,
        "n_params": ok[0].get("n_params") if ok else None,
        "tokens_per_s": med("tokens_per_s"),
        "steady_tokens_per_s": med("steady_tokens_per_s"),
        "tokens_per_cpu_s": med("tokens_per_cpu_s"),
        "tokens_per_s_with_precompute": med("tokens_per_s_with_precompute"),
        "padding_share": med("padding_share"),
        "peak_rss_mb": med("peak_rss_mb"),
        "sampled_peak_rss_mb": med("sampled_peak_rss_mb"),
        "loop_s": med("loop_s"),
        "wall_s": med("wall_s"),
        "per_round_wall_s": [r["wall_s"] for r in ok],
        "executed_tflop": _median([r["executed_flops"]["total"] / 1e12 if "executed_flops" in r else None for r in ok]),
        "executed_terms_tflop": {k: v / 1e12 for k, v in ok[0]["executed_flops"].items()} if ok and "executed_flops" in ok[0] else None,
        "gflop_per_s": med("gflop_per_s"),
        "share_of_matmul_peak": med("share_of_matmul_peak"),
        "precompute_s": med("precompute_s"),
        "real_tokens": med("real_tokens"),
        "steps": med("steps"),
        "per_round_tokens_per_s": [r["tokens_per_s"] for r in ok],
        "per_round_peak_rss_mb": [r["peak_rss_mb"] for r in ok],
    }


def _paired(results: dict[str, list[dict[str, Any]]], name: str, key: str) -> list[float]:
    """Per round, run `name`'s `key` over TRL's in the same round (rounds where both succeeded)."""
    trl = {r.get("round"): r for r in results.get("trl", []) if "error" not in r and r.get(key)}
    out = []
    for run in results.get(name, []):
        base = trl.get(run.get("round"))
        if "error" not in run and base is not None and run.get(key) is not None:
            out.append(run[key] / base[key])
    return out


def _add_flops(results: dict[str, list[dict[str, Any]]], dims: Any, lora_r: int | None) -> float | None:
    """Executed FLOPs and GFLOP/s of every training run (bench/flops.py); returns the median matrix-product
    peak (FLOP/s) of the rounds' `matmul-peak` jobs, if any ran."""
    from bench.flops import executed_flops

    peaks = [r["flops_per_s"] for r in results.get(MATMUL_PEAK, []) if "error" not in r]
    peak = statistics.median(peaks) if peaks else None
    for name, runs in results.items():
        if name == MATMUL_PEAK:
            continue
        for run in runs:
            if "error" in run or "labelled_tokens" not in run or dims is None:
                continue
            terms = executed_flops(dims, run, engine="trl" if name.startswith("trl") else "spo", lora_r=lora_r)
            run["executed_flops"] = terms
            run["gflop_per_s"] = terms["total"] / run["loop_s"] / 1e9 if run["loop_s"] > 0 else None
            run["share_of_matmul_peak"] = terms["total"] / run["loop_s"] / peak if peak and run["loop_s"] > 0 else None
    return peak


def summarize_preference(
    results: dict[str, list[dict[str, Any]]],
    pair_tokens: int,
    real_targets: bool = False,
    dims: Any = None,
    lora_r: int | None = None,
) -> dict[str, Any]:
    peak = _add_flops(results, dims, lora_r)
    results = {name: runs for name, runs in results.items() if name != MATMUL_PEAK}
    rows = [_training_row(name, runs) for name, runs in results.items()]
    checks = []
    base = next((row for row in rows if row["name"] == "trl"), None)
    for row in rows:
        # Paired: each round's spo run against the TRL run of the same round (drifting load hits both).
        row["paired_wall_ratios"] = _paired(results, row["name"], "wall_s")
        row["paired_rss_ratios"] = _paired(results, row["name"], "peak_rss_mb")
        row["paired_wall_ratio"] = _median(row["paired_wall_ratios"])
        row["paired_rss_ratio"] = _median(row["paired_rss_ratios"])
        row["paired_speed"] = 1.0 / row["paired_wall_ratio"] if row["paired_wall_ratio"] else None
        row["baseline"] = base["name"] if base else None
        row["tokens_per_s_ratio"] = _ratio(row["tokens_per_s"], base["tokens_per_s"]) if base else None
        row["with_precompute_ratio"] = (
            _ratio(row["tokens_per_s_with_precompute"], base["tokens_per_s"]) if base else None
        )
        row["peak_rss_ratio"] = _ratio(row["peak_rss_mb"], base["peak_rss_mb"]) if base else None
        # Every engine trains one epoch over the same pairs, so each must have seen exactly their tokens.
        row["tokens_match_workload"] = row["real_tokens"] == pair_tokens
        real = REAL_TARGETS.get(row["name"]) if real_targets else None
        if real and base:
            rss_max = real["peak_rss_ratio_max"]
            checks.append(
                {
                    "run": row["name"],
                    "kind": "real",
                    "speed": row["paired_speed"],
                    "speed_min": real["speed_min"],
                    "speed_met": (row["paired_speed"] or 0) >= real["speed_min"],
                    "peak_rss_ratio": row["paired_rss_ratio"],
                    "peak_rss_ratio_max": rss_max,
                    "peak_rss_met": None if rss_max is None else (row["paired_rss_ratio"] or 1e9) <= rss_max,
                }
            )
        target = None if real_targets else TARGETS.get(row["name"])
        if target and base:
            checks.append(
                {
                    "run": row["name"],
                    "tokens_per_s_ratio": row["tokens_per_s_ratio"],
                    "tokens_per_s_ratio_min": target["tokens_per_s_ratio_min"],
                    "tokens_per_s_met": (row["tokens_per_s_ratio"] or 0) >= target["tokens_per_s_ratio_min"],
                    "peak_rss_ratio": row["peak_rss_ratio"],
                    "peak_rss_ratio_max": target["peak_rss_ratio_max"],
                    "peak_rss_met": row["peak_rss_ratio"] is not None
                    and row["peak_rss_ratio"] <= target["peak_rss_ratio_max"],
                    "padding_share": row["padding_share"],
                    "padding_share_met": row["padding_share"] is not None
                    and row["padding_share"] < PACKED_PADDING_SHARE_MAX,
                }
            )
    return {"rows": rows, "targets": checks, "pair_tokens": pair_tokens, "matmul_peak_flops_per_s": peak}


def summarize_sft(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rows = [_training_row(name, runs) for name, runs in results.items()]
    padded = next((row for row in rows if row["name"] == "sft-padded"), None)
    for row in rows:
        row["tokens_per_s_ratio"] = _ratio(row["tokens_per_s"], padded["tokens_per_s"]) if padded else None
    return {"rows": rows}


def summarize_logp(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rows = []
    for name, all_runs in results.items():
        runs = [r for r in all_runs if "error" not in r]
        if not runs:
            continue
        rows.append(
            {
                "name": name,
                "label": LABELS.get(name, name),
                "rounds": len(runs),
                "step_peak_mb": _median([r["step_peak_mb"] for r in runs]),
                "seconds": _median([r["seconds"] for r in runs]),
                "step_set_peak": all(r["step_set_peak"] for r in runs),
                "vocab_size": runs[0]["vocab_size"],
                "tokens": runs[0]["tokens"],
                "scored_tokens": runs[0]["scored_tokens"],
                "chunk_size": runs[0]["chunk_size"],
                "logps": runs[0]["logps"],
            }
        )
    by_name = {row["name"]: row for row in rows}
    full, chunked = by_name.get("logp-full"), by_name.get("logp-chunked")
    summary: dict[str, Any] = {"rows": rows}
    if full and chunked:
        ratio = _ratio(chunked["step_peak_mb"], full["step_peak_mb"])
        worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(full["logps"], chunked["logps"]))
        summary.update(
            ratio=ratio,
            ratio_max=LOGP_TARGET_RATIO_MAX,
            met=ratio is not None and ratio <= LOGP_TARGET_RATIO_MAX,
            max_relative_logp_difference=worst,
        )
    return summary


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for package in ("torch", "transformers", "trl", "accelerate", "datasets", "spo-align"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), "packages": versions}


def build_report(config: BenchConfig, raw: dict[str, Any], command: str) -> dict[str, Any]:
    parts = raw["parts"]
    report: dict[str, Any] = {
        "command": command,
        "size": config.name,
        "started": _dt.datetime.fromtimestamp(raw["started"], _dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": raw["seconds"],
        "load_average_start": raw.get("load_average_start"),
        "load_average_end": raw.get("load_average_end"),
        "rounds": config.rounds,
        "threads": config.workload.threads,
        "machine": machine(),
        "workload": asdict(config.workload),
        "logp_work": asdict(config.logp),
    }
    parts = {name: part for name, part in parts.items() if part["results"]}
    if "preference" in parts:
        dims = None
        if raw.get("model_dir"):
            from bench.flops import model_shape

            dims = model_shape(Path(raw["model_dir"]))
        report["preference"] = summarize_preference(
            parts["preference"]["results"],
            raw["pair_tokens"],
            real_targets=config.workload.model is not None,
            dims=dims,
            lora_r=config.workload.lora_r,
        )
        report["preference"]["seconds"] = parts["preference"]["seconds"]
    if "sft" in parts:
        report["sft"] = summarize_sft(parts["sft"]["results"])
        report["sft"]["seconds"] = parts["sft"]["seconds"]
    if "logp" in parts:
        report["logp"] = summarize_logp(parts["logp"]["results"])
        report["logp"]["seconds"] = parts["logp"]["seconds"]
    report["raw"] = {part: value["results"] for part, value in parts.items()}
    return report


def _f(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _model_line(w: dict[str, Any]) -> str:
    training = (
        f"LoRA r {w['lora_r']} (alpha {w['lora_alpha']:g}) on all linear layers, reference = adapter off, on both sides"
        if w.get("lora_r")
        else "full fine-tuning"
    )
    checkpointing = f"gradient checkpointing {'on' if w.get('gradient_checkpointing') else 'off'} on both sides (set explicitly)"
    if w.get("model"):
        return f"- Model: {w['model']} (the packaged real model, `spo packaged-model {w['model']}`); {training}; {checkpointing}."
    return (
        f"- Model: hidden {w['shape']['hidden_size']}, {w['shape']['num_hidden_layers']} layers, "
        f"{w['shape']['num_attention_heads']} heads, intermediate {w['shape']['intermediate_size']}, vocab "
        f"{w['shape']['vocab_size']} ({w['shape']['architecture']}), random weights; {training}; {checkpointing}."
    )


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    w = report["workload"]
    lines = [
        f"# Bench results ({report['size']})",
        "",
        f"- Command: `{report['command']}`",
        f"- Started {report['started']}, took {report['seconds']:.0f} s; {report['rounds']} rounds, each run in a "
        f"fresh process, runs interleaved by round; medians shown; {report['threads']} torch threads. "
        f"1-minute load average of the machine: {_f(report.get('load_average_start'), 1)} at the start, "
        f"{_f(report.get('load_average_end'), 1)} at the end (other processes compete for the cores when it "
        f"exceeds their number).",
        f"- Machine: {m['cpu']}, {m['cpu_count']} cores visible, {m['platform']}, Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
        _model_line(w),
        f"- Work: {w['n_pairs']} synthetic pairs, one epoch, {w['pairs_per_device'] * w['grad_accum']} pairs per "
        f"optimizer step ({w['pairs_per_device']} per micro-batch x {w['grad_accum']}), log-normal "
        f"lengths (prompt median {w['lengths']['prompt_median']:g}, answers {w['lengths']['response_median']:g}, capped "
        f"at max_length {w['lengths']['max_length']}); spo runs' loss {w['loss']} (beta {w['beta']:g}"
        + (", label smoothing 0, TRL's sigmoid loss" if w["loss"] == "dpo" else "")
        + f"); AdamW, lr {w['learning_rate']:g}, {w['dtype']}.",
        "",
    ]
    if "preference" in report:
        lines += _cpu_preference_lines(report["preference"])
    if "sft" in report:
        lines += [
            "## SFT packing",
            "",
            "| run | real tokens/s | vs no packing | padding share | peak RSS (MB) | loop (s) | tokens per CPU-s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in report["sft"]["rows"]:
            lines.append(
                f"| {row['label']} | {_f(row['tokens_per_s'])} | {_x(row['tokens_per_s_ratio'])} | "
                f"{_pct(row['padding_share'])} | {_f(row['peak_rss_mb'])} | {_f(row['loop_s'], 1)} | "
                f"{_f(row['tokens_per_cpu_s'])} |"
            )
        lines.append("")
    if "logp" in report and report["logp"]["rows"]:
        logp = report["logp"]
        first = logp["rows"][0]
        lines += [
            "## Log-prob step memory",
            "",
            f"Forward + backward of per-sequence log-probs, vocab {first['vocab_size']:,}, {first['tokens']:,} tokens "
            f"({first['scored_tokens']:,} scored), hidden {report['logp_work']['hidden_size']}, fp32, "
            f"{first['rounds']} fresh process(es) per method. Step peak = peak RSS during the step minus RSS "
            "just before it (the kernel's high-water mark is reset before the step).",
            "",
            "| method | step peak (MB) | seconds |",
            "| --- | ---: | ---: |",
        ]
        for row in logp["rows"]:
            label = row["label"] + (f", chunk {row['chunk_size']}" if row["chunk_size"] else "")
            lines.append(f"| {label} | {_f(row['step_peak_mb'])} | {_f(row['seconds'], 2)} |")
        if "ratio" in logp:
            lines += [
                "",
                f"Chunked / full: {_x(logp['ratio'])} (target <= {logp['ratio_max']:g}x: "
                f"{'met' if logp['met'] else 'MISSED'}); largest relative difference of the log-probs: "
                f"{logp['max_relative_logp_difference']:.1e}.",
            ]
        lines.append("")
    return "\n".join(lines)


def _cpu_preference_lines(pref: dict[str, Any]) -> list[str]:
    lines = [
        "## Preference training vs TRL",
        "",
        f"Real tokens of the epoch: {pref['pair_tokens']:,} (every run must see exactly these). "
        "Tokens/s = real (non-pad) tokens / training-loop seconds (first step included; the reference "
        "precompute of (d) runs before the loop and is listed apart). Peak RSS = the process's high-water mark. "
        "Tokens per CPU-s = real tokens / the process's CPU seconds over the loop (a cross-check that "
        "other load on the machine moves much less than wall time).",
        "",
        "| run | real tokens/s | vs (a) | padding share | peak RSS (MB) | vs (a) | loop (s) | ref precompute (s) | tokens per CPU-s | tokens match |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for row in pref["rows"]:
        if row["errors"] and row["tokens_per_s"] is None:
            lines.append(f"| {row['label']} | failed: {row['errors'][0]} | | | | | | | | |")
            continue
        lines.append(
            f"| {row['label']} | {_f(row['tokens_per_s'])} | {_x(row['tokens_per_s_ratio'])} | "
            f"{_pct(row['padding_share'])} | {_f(row['peak_rss_mb'])} | {_x(row['peak_rss_ratio'])} | "
            f"{_f(row['loop_s'], 1)} | {_f(row['precompute_s'], 1)} | {_f(row['tokens_per_cpu_s'])} | "
            f"{'yes' if row['tokens_match_workload'] else 'NO'} |"
        )
    for row in pref["rows"]:
        if row.get("tokens_per_s_with_precompute"):
            lines += ["", f"{row['label']}, counting its reference precompute pass as part of the run: "
                      f"{_f(row['tokens_per_s_with_precompute'])} real tokens/s ({_x(row['with_precompute_ratio'])} (a))."]
    lines += [
        "",
        "Whole processes, paired by round (each round runs TRL and every spo run back to back; the ratio is "
        "taken within the round, then the median over rounds):",
        "",
        "| run | wall (s) | wall vs TRL, paired | speed vs TRL (TRL wall / wall) | peak RSS vs TRL, paired | per-round wall (s) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in pref["rows"]:
        lines.append(
            f"| {row['label']} | {_f(row['wall_s'], 1)} | {_x(row.get('paired_wall_ratio'))} | "
            f"{_x(row.get('paired_speed'))} | {_x(row.get('paired_rss_ratio'))} | "
            + ", ".join(_f(v, 1) for v in row.get("per_round_wall_s", []))
            + " |"
        )
    if any(row.get("executed_tflop") for row in pref["rows"]):
        peak = pref.get("matmul_peak_flops_per_s")
        lines += [
            "",
            "Executed FLOPs (bench/flops.py: linear layers over every forwarded slot, attention over the score "
            "entries each layout computes, the LM head over the tokens it is applied to; backward and the "
            "reference forward included). Share of peak = GFLOP/s over the loop / the CPU's dense fp32 "
            "matrix-product rate measured at the same threads in every round (`matmul-peak`, 2048^3, median"
            + (f": {peak / 1e9:,.1f} GFLOP/s" if peak else ": not measured")
            + "). No published peak is used: the machine's CPU model and clocks are not published for this VM.",
            "",
            "| run | TFLOP (epoch) | of which attention | of which LM head (incl. recompute) | GFLOP/s | share of measured peak |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in pref["rows"]:
            terms = row.get("executed_terms_tflop") or {}
            lines.append(
                f"| {row['label']} | {_f(row.get('executed_tflop'), 2)} | {_f(terms.get('attention_all'), 2)} | "
                f"{_f(terms.get('head_all'), 2)} | {_f(row.get('gflop_per_s'), 1)} | {_pct(row.get('share_of_matmul_peak'))} |"
            )
    lines += ["", "Per-round real tokens/s: " + "; ".join(
        f"{row['name']} " + ", ".join(_f(v) for v in row["per_round_tokens_per_s"]) for row in pref["rows"]
    ), ""]
    real = [t for t in pref["targets"] if t.get("kind") == "real"]
    if real:
        lines += ["Targets (issue 17, real model, 2 CPU cores; paired medians):", ""]
        for t in real:
            rss = (
                ""
                if t["peak_rss_ratio_max"] is None
                else f"; peak RSS {_x(t['peak_rss_ratio'])} (target <= {t['peak_rss_ratio_max']:g}x: "
                f"{'met' if t['peak_rss_met'] else 'MISSED'})"
            )
            lines.append(
                f"- {t['run']}: speed {_x(t['speed'])} TRL's (target >= {t['speed_min']:g}x: "
                f"{'met' if t['speed_met'] else 'MISSED'}){rss}"
            )
        lines.append("")
    issue7 = [t for t in pref["targets"] if t.get("kind") != "real"]
    if issue7:
        lines += ["Targets (issue 7, 2 CPU cores):", ""]
        for t in issue7:
            lines.append(
                f"- {t['run']}: tokens/s {_x(t['tokens_per_s_ratio'])} (target >= {t['tokens_per_s_ratio_min']:g}x: "
                f"{'met' if t['tokens_per_s_met'] else 'MISSED'}); peak RSS {_x(t['peak_rss_ratio'])} "
                f"(target <= {t['peak_rss_ratio_max']:g}x: {'met' if t['peak_rss_met'] else 'MISSED'}); padding "
                f"{_pct(t['padding_share'])} (target < 5%: {'met' if t['padding_share_met'] else 'MISSED'})"
            )
        lines.append("")
    return lines


def write_report(report: dict[str, Any], results_dir: Path) -> tuple[Path, Path]:
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{report['size']}.json"
    md_path = results_dir / f"{report['size']}.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    md_path.write_text(to_markdown(report), encoding="utf-8")
    return json_path, md_path
