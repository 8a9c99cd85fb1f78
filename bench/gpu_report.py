"""The GPU check's report: everything bench/gpu_check.sh learned, as `<size>.json` and `<size>.md`.

    python -m bench gpu-report --size gpu --work-dir W --results-dir R [--command "..."]

It reads what the script's phases left in the work folder: `phases.tsv` (one line per phase: name, status,
seconds, detail), `env.json` (`python -m bench env`) and `raw.json` (the bench runs, `bench.gpu_plan`),
whichever exist, so a report is written whatever failed. It needs nothing but the standard library.

Figures per training run: real tokens/s is the median, over the optimizer steps after the first (the
warm-up), of each step's real tokens over its seconds; the epoch figure counts every step. MFU = real
tokens/s x (6 N per trained token, + 2 N per token of a live reference forward) / the card's dense bf16
rate measured by the `peak` run, N = distinct parameters (a tied embedding counted once); attention FLOPs
are not counted. A precomputed reference is folded in once: (6 N x tokens + 2 N x tokens of the reference
pass) over (epoch seconds + pass seconds). LoRA runs use the same 6 N convention, though frozen weights get
no weight gradient (about 4 N are computed), so their MFU overstates the work; no target applies to them.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.config import BenchConfig

PHASES_FILE = "phases.tsv"
ENV_FILE = "env.json"
TARGET_SPEEDUP_MIN = 1.5
TARGET_MEMORY_RATIO_MAX = 0.7
TARGET_MFU_MIN = 0.40
BASELINE = "trl"

LABELS = {
    "trl": "TRL 1.16 DPOTrainer, live reference",
    "trl-precompute": "TRL 1.16 DPOTrainer, precompute_ref_log_probs",
    "spo-packed-precompute-sdpa": "spo packed + precomputed reference",
    "spo-lora-packed-sdpa": "spo LoRA packed, adapter-off reference",
}


def _label(name: str, attention: str | None) -> str:
    if name in LABELS:
        return LABELS[name]
    if name.startswith("spo-packed-"):
        return "spo packed, live reference"
    return name


def read_phases(work_dir: Path) -> list[dict[str, Any]]:
    path = Path(work_dir) / PHASES_FILE
    if not path.is_file():
        return []
    phases = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        name, status, seconds, detail = ([*line.split("\t", 3), "", "", ""])[:4]
        try:
            secs: float | None = float(seconds)
        except ValueError:
            secs = None
        phases.append({"name": name, "status": status, "seconds": secs, "detail": detail})
    return phases


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        return {"error": f"{path.name} is not valid JSON: {exc}"}


def _ok(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if "error" not in r]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _status(runs: list[dict[str, Any]] | None) -> tuple[str, str | None]:
    if not runs:
        return "no result", "the bench was stopped before this run ended (or began)"
    if _ok(runs):
        return "ok", None
    error = runs[-1]["error"]
    return ("skipped" if error.startswith("skipped") else "failed"), error


def _flops(n_params: int | None, live: bool) -> float | None:
    return (6 + (2 if live else 0)) * n_params if n_params else None


def training_row(plan: dict[str, Any], runs: list[dict[str, Any]] | None, peak: float | None, pair_tokens: int | None) -> dict[str, Any]:
    status, error = _status(runs)
    row: dict[str, Any] = {
        "name": plan["name"],
        "label": _label(plan["name"], plan.get("attention")),
        "attention": plan.get("attention"),
        "variant": plan.get("variant"),
        "status": status,
        "error": error,
    }
    ok = _ok(runs or [])
    if not ok:
        return row
    run = ok[0]  # one round: the medians are over its steps
    steps = list(zip(run["step_seconds"], run["step_real_tokens"]))
    measured = [tokens / seconds for seconds, tokens in steps[1:] if seconds > 0]
    live = bool(run.get("has_reference_model"))
    n_params = run.get("n_params")
    per_token = _flops(n_params, live)
    tokens_per_s = _median(measured) if len(measured) >= 2 else None
    epoch_tps = run["real_tokens"] / run["loop_s"] if run["loop_s"] > 0 else None
    precompute_s = run.get("precompute_s") or None
    row.update(
        engine=run.get("engine"),
        live_reference=live,
        device_name=run.get("device_name"),
        n_params=n_params,
        steps=run["steps"],
        measured_steps=len(measured),
        tokens_per_s=tokens_per_s,
        per_step_tokens_per_s=measured,
        epoch_tokens_per_s=epoch_tps,
        real_tokens=run["real_tokens"],
        tokens_match_workload=pair_tokens is not None and run["real_tokens"] == pair_tokens,
        padding_share=run.get("padding_share"),
        flops_per_token=per_token,
        mfu=tokens_per_s * per_token / peak if tokens_per_s and per_token and peak else None,
        precompute_s=precompute_s,
        cuda_peak_allocated_mb=run.get("cuda_peak_allocated_mb"),
        cuda_peak_reserved_mb=run.get("cuda_peak_reserved_mb"),
        peak_rss_mb=run.get("peak_rss_mb"),
        loss_finite=run.get("loss_finite"),
        losses=run.get("losses"),
        loop_s=run["loop_s"],
        wall_s=run.get("wall_s"),
    )
    if precompute_s and n_params:
        total_s = run["loop_s"] + precompute_s
        row["epoch_tokens_per_s_with_precompute"] = run["real_tokens"] / total_s
        work = 6 * n_params * run["real_tokens"] + 2 * n_params * run["real_tokens"]
        row["mfu_with_precompute"] = work / total_s / peak if peak else None
    if "adapter" in run:
        row["adapter"] = run["adapter"]
    return row


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare_with_baseline(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ratios against TRL's live-reference run, and the targets for every packed full fine-tuning spo run."""
    base = next((r for r in rows if r["name"] == BASELINE and r["status"] == "ok"), None)
    targets = []
    for row in rows:
        if row["status"] != "ok" or base is None:
            continue
        row["vs_trl_tokens_per_s"] = _ratio(row.get("tokens_per_s"), base.get("tokens_per_s"))
        row["vs_trl_peak_memory"] = _ratio(row.get("cuda_peak_allocated_mb"), base.get("cuda_peak_allocated_mb"))
        if row.get("epoch_tokens_per_s_with_precompute"):
            row["vs_trl_epoch_with_precompute"] = _ratio(row["epoch_tokens_per_s_with_precompute"], base.get("epoch_tokens_per_s"))
        if row["name"].startswith("spo-packed-"):
            speed, memory, mfu = row["vs_trl_tokens_per_s"], row["vs_trl_peak_memory"], row.get("mfu")
            targets.append(
                {
                    "run": row["name"],
                    "speedup": speed,
                    "speedup_met": speed is not None and speed >= TARGET_SPEEDUP_MIN,
                    "memory_ratio": memory,
                    "memory_met": memory is not None and memory <= TARGET_MEMORY_RATIO_MAX,
                    "mfu": mfu,
                    "mfu_met": mfu is not None and mfu >= TARGET_MFU_MIN,
                }
            )
    return targets


def _single(plan_name: str, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    runs = results.get(plan_name)
    status, error = _status(runs)
    if status != "ok":
        return {"status": status, "error": error}
    return {"status": "ok", **_ok(runs or [])[0]}


def build_gpu_report(config: BenchConfig, work_dir: Path, command: str) -> dict[str, Any]:
    work_dir = Path(work_dir)
    raw = _read_json(work_dir / "raw.json") or {}
    env = _read_json(work_dir / ENV_FILE)
    results: dict[str, list[dict[str, Any]]] = raw.get("results", {})
    plan: list[dict[str, Any]] = raw.get("plan", [])
    peak = _single("peak", results)
    peak_flops = peak.get("flops_per_s") if peak["status"] == "ok" else None
    rows = [
        training_row(p, results.get(p["name"]), peak_flops, raw.get("pair_tokens"))
        for p in plan
        if p["task"] in ("trl", "spo")
    ]
    targets = compare_with_baseline(rows)
    checks = {p["attention"]: _single(p["name"], results) for p in plan if p["task"] == "logp_check"}
    for value in checks.values():
        value.pop("logps", None)  # kept in raw
    lora = next((r for r in rows if r["name"].startswith("spo-lora") and r["status"] == "ok"), None)
    adapter = lora.get("adapter") if lora else None
    torch_facts = (env or {}).get("torch", {})
    device = torch_facts.get("device_name") or peak.get("device_name") or next((r.get("device_name") for r in rows if r.get("device_name")), None)
    not_run = list(raw.get("not_run", []))
    not_run += [{"name": p["name"], "reason": _status(results.get(p["name"]))[1]} for p in plan if _status(results.get(p["name"]))[0] != "ok"]
    started = raw.get("started")
    correctness = {
        "logp_checks": checks,
        "loss_finite": {r["name"]: r.get("loss_finite") for r in rows if r["status"] == "ok"},
        "lora_adapter": adapter,
        "lora_adapter_changed": bool(adapter and adapter.get("changed_tensors")),
    }
    phases = read_phases(work_dir)
    succeeded = (
        bool(plan)
        and not raw.get("prepare_error")
        and all(p["status"] in ("ok", "fallback", "skipped") for p in phases)
        and all(_status(results.get(p["name"]))[0] == "ok" for p in plan)
        and all(c.get("passed") for c in checks.values())
        and all(correctness["loss_finite"].values())
        and (adapter is None or correctness["lora_adapter_changed"])
    )
    return {
        "kind": "gpu-check",
        "size": config.name,
        "dry_run": config.workload.device != "cuda",
        "command": command,
        "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds") if started else None,
        "bench_seconds": raw.get("seconds"),
        "prepare_s": raw.get("prepare_s"),
        "prepare_error": raw.get("prepare_error"),
        "device_name": device,
        "succeeded": succeeded,
        "environment": env,
        "phases": phases,
        "workload": asdict(config.workload),
        "check": asdict(config.gpu) if config.gpu else None,
        "pair_tokens": raw.get("pair_tokens"),
        "peak": peak,
        "training": rows,
        "targets": targets,
        "target_bars": {"speedup_min": TARGET_SPEEDUP_MIN, "memory_ratio_max": TARGET_MEMORY_RATIO_MAX, "mfu_min": TARGET_MFU_MIN},
        "correctness": correctness,
        "generation": _single("generate", results),
        "not_run": not_run,
        "raw": raw,
    }


def _f(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _gb(mb: float | None) -> str:
    return "n/a" if mb is None else f"{mb / 1e3:.1f}"


def _met(flag: bool) -> str:
    return "met" if flag else "MISSED"


def to_markdown(report: dict[str, Any]) -> str:
    w = report["workload"]
    shape = w["shape"]
    if report["dry_run"]:
        title = f"# GPU check pipeline, CPU dry run ({report['size']}): no GPU figures"
    elif report["device_name"]:
        title = f"# GPU check on {report['device_name']}"
    else:
        title = "# GPU check: no device was identified"
    lines = [
        title,
        "",
        f"- Command: `{report['command']}`",
        f"- Outcome: {'every phase and run succeeded' if report['succeeded'] else 'NOT every phase or run succeeded (below)'}.",
        f"- Started {report['started'] or 'n/a'}; bench part {_f(report['bench_seconds'])} s (model written in "
        f"{_f(report['prepare_s'])} s).",
        f"- Model: {shape['architecture']}, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} KV heads, intermediate "
        f"{shape['intermediate_size']}, vocab {shape['vocab_size']:,}, random weights, {w['dtype']}"
        + (" (full fine-tuning: float32 master weights under bfloat16 autocast, in both trainers; LoRA: a bfloat16 "
           "base)" if w["dtype"] == "bfloat16" else ", full fine-tuning unless LoRA is named") + ".",
        f"- Work: {w['n_pairs']} synthetic pairs (real tokens of the epoch: {_f(report['pair_tokens'])}), one epoch, "
        f"{w['pairs_per_device']} pairs per micro-batch x {w['grad_accum']} = {w['pairs_per_device'] * w['grad_accum']} "
        f"per optimizer step, max_length {w['lengths']['max_length']}; spo loss {w['loss']}, TRL sigmoid, beta "
        f"{w['beta']:g}, AdamW lr {w['learning_rate']:g}.",
        "",
    ]
    if report.get("prepare_error"):
        lines += [f"**The workload could not be prepared:** {report['prepare_error']}", ""]
    lines += _phase_lines(report) + _environment_lines(report) + _training_lines(report)
    lines += _correctness_lines(report) + _generation_lines(report) + _not_run_lines(report)
    return "\n".join(lines) + "\n"


def _phase_lines(report: dict[str, Any]) -> list[str]:
    if not report["phases"]:
        return []
    lines = ["## Phases", "", "| phase | status | seconds | detail |", "| --- | --- | ---: | --- |"]
    for p in report["phases"]:
        lines.append(f"| {p['name']} | {p['status']} | {_f(p['seconds'])} | {p['detail'].replace('|', '/')} |")
    return lines + [""]


def _environment_lines(report: dict[str, Any]) -> list[str]:
    env = report["environment"]
    lines = ["## Machine", ""]
    if not env:
        lines.append("- No environment facts were recorded.")
    else:
        smi = env.get("nvidia_smi", {})
        lines.append(
            f"- nvidia-smi ({smi['query']}): {'; '.join(smi['rows'])}" if "rows" in smi else f"- nvidia-smi: {smi.get('error', 'n/a')}"
        )
        torch_facts = env.get("torch", {})
        lines.append(
            f"- Python {env.get('python')}, torch {torch_facts.get('version')} (CUDA {torch_facts.get('cuda')}), "
            f"capability {torch_facts.get('capability', 'n/a')}, {torch_facts.get('multiprocessors', 'n/a')} SMs"
        )
        lines.append("- Packages: " + "; ".join(f"{k} {v}" for k, v in env.get("packages", {}).items()))
    peak = report["peak"]
    if peak["status"] == "ok":
        lines.append(
            f"- Measured dense peak (the MFU denominator): {peak['flops_per_s'] / 1e12:.4g} TFLOP/s, {peak['dtype']} "
            f"{peak['size']}^3 matrix product on random data, median of {peak['repeats']}."
        )
    else:
        lines.append(f"- Dense peak not measured ({peak['status']}: {peak['error']}): no MFU figure.")
    return lines + [""]


def _training_lines(report: dict[str, Any]) -> list[str]:
    rows = report["training"]
    if not rows:
        return []
    lines = [
        "## Training runs",
        "",
        "Real tokens/s: median over the optimizer steps after the first (warm-up) of the step's real tokens / "
        "its seconds. Epoch: all steps. MFU: (6 N + 2 N with a live reference forward) x real tokens/s / the "
        "measured peak. Peak memory: torch.cuda.max_memory_allocated of the run's process.",
        "",
        "| run | attention | status | real tokens/s | vs TRL | epoch tokens/s | MFU | padding | peak GPU mem (GB) | vs TRL | ref precompute (s) | loss finite | tokens match |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | :---: |",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['attention'] or ''} | {r['status']}: {r['error']} | | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['label']} | {r['attention']} | ok | {_f(r['tokens_per_s'])} | {_x(r.get('vs_trl_tokens_per_s'))} | "
            f"{_f(r['epoch_tokens_per_s'])} | {_pct(r['mfu'])} | {_pct(r['padding_share'])} | "
            f"{_gb(r['cuda_peak_allocated_mb'])} | {_x(r.get('vs_trl_peak_memory'))} | {_f(r['precompute_s'], 1)} | "
            f"{'yes' if r['loss_finite'] else 'NO'} | {'yes' if r['tokens_match_workload'] else 'NO'} |"
        )
    for r in rows:
        if r.get("epoch_tokens_per_s_with_precompute"):
            lines += [
                "",
                f"{r['label']} ({r['name']}), its reference pass folded in once: "
                f"{_f(r['epoch_tokens_per_s_with_precompute'])} real tokens/s over the epoch "
                f"({_x(r.get('vs_trl_epoch_with_precompute'))} TRL's epoch figure), MFU {_pct(r.get('mfu_with_precompute'))}.",
            ]
    lines += ["", "Per-step real tokens/s after the warm-up step:", ""]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"- {r['name']}: " + ", ".join(_f(v) for v in r["per_step_tokens_per_s"]))
    bars = report["target_bars"]
    if report["targets"]:
        lines += [
            "",
            f"Targets (packed SPO, full fine-tuning, against TRL's live-reference run): real tokens/s >= "
            f"{bars['speedup_min']:g}x, peak GPU memory <= {bars['memory_ratio_max']:g}x, MFU >= {_pct(bars['mfu_min'])}.",
            "",
        ]
        for t in report["targets"]:
            lines.append(
                f"- {t['run']}: {_x(t['speedup'])} ({_met(t['speedup_met'])}), memory {_x(t['memory_ratio'])} "
                f"({_met(t['memory_met'])}), MFU {_pct(t['mfu'])} ({_met(t['mfu_met'])})"
            )
    else:
        lines += ["", "Targets not evaluated: TRL's run or every packed SPO run is missing."]
    return lines + [""]


def _correctness_lines(report: dict[str, Any]) -> list[str]:
    c = report["correctness"]
    lines = ["## Correctness on the device", ""]
    for attention, check in c["logp_checks"].items():
        if check["status"] != "ok":
            lines.append(f"- Packed vs padded log-probs, {attention}: {check['status']}: {check['error']}")
            continue
        pv, cv = check["packed_vs_padded"], check["control_vs_padded"]
        pw, cw = pv["worst"], cv["worst"]
        lines.append(
            f"- Packed ({check['layout']}) vs padded summed log-probs per sequence, {attention}, {check['dtype']}, "
            f"{check['sequences']} sequences / {check['scored_tokens']:,} scored tokens, bound per token "
            f"{check['bound_per_unit_logit']:.3g} x (2 max|logit| + |LSE|) (mean {check['mean_logit_scale']:.3g}): "
            f"{'passed' if check['passed'] else 'FAILED'}. Worst sequence {pw['sequence']}: {pw['abs_diff']:.3g} nats "
            f"over {pw['tokens']} tokens, {pw['ratio']:.2g}x its bound {pw['bound']:.3g}. Leaking control (positions "
            f"reset, boundaries withheld): {cv['sequences_over_bound']} of {check['sequences']} sequences over their "
            f"bound, worst {cw['sequence']} {cw['abs_diff']:.3g} nats ({cw['ratio']:.2g}x), "
            f"{'failed as it must' if check['control_failed'] else 'PASSED: the check cannot see a leak here'}."
            + ("" if check.get("boundaries_received") is None else
               f" cu_seq_lens reached every attention call: {'yes' if check['boundaries_received'] else 'NO'}.")
            + f" Per token against fp32: padded {check['padded_vs_fp32']['max_abs_per_token']:.2e}, packed "
            f"{check['packed_vs_fp32']['max_abs_per_token']:.2e}."
        )
        lines += [f"  - {problem}" for problem in check.get("problems", [])]
    for name, finite in c["loss_finite"].items():
        if not finite:
            lines.append(f"- {name}: a logged loss was not finite")
    if c["loss_finite"] and all(c["loss_finite"].values()):
        lines.append(f"- Every logged training loss finite ({len(c['loss_finite'])} runs).")
    adapter = c["lora_adapter"]
    if adapter:
        lines.append(
            f"- LoRA SPO step: {adapter.get('changed_tensors')} of {adapter.get('trainable_tensors')} adapter tensors "
            f"changed after the first optimizer step (largest change {adapter.get('max_abs_change', 0):.3g}; LoRA's B "
            "matrices start at zero, so only they can move on the first step, the A matrices from the second); "
            f"frozen {adapter.get('frozen_checked')} moved by {adapter.get('frozen_max_abs_change', float('nan')):.3g}."
        )
    else:
        lines.append("- LoRA SPO step: not checked (the LoRA run did not complete).")
    return lines + [""]


def _generation_lines(report: dict[str, Any]) -> list[str]:
    g = report["generation"]
    lines = ["## Generation (`spo eval generate`)", ""]
    if g["status"] != "ok":
        return lines + [f"Not measured ({g['status']}: {g['error']}).", ""]
    rounds = "; ".join(f"{_f(r['tokens_per_s'])} tokens/s ({r['new_tokens']:,} tokens in {r['seconds']:.1f} s)" for r in g["rounds"])
    lines.append(
        f"{g['prompts']} prompts, batch {g['batch_size']}, {'greedy' if g['greedy'] else 'sampled'}, up to "
        f"{g['max_new_tokens']} new tokens, {g['dtype']}: median {_f(g['tokens_per_s'])} generated tokens/s over the "
        f"whole call, model load included (the load alone: {g['load_s']:.1f} s). Calls: {rounds}. Every row "
        "generates exactly the cap (the model folder's generation config sets min_new_tokens to it)."
    )
    return lines + [""]


def _not_run_lines(report: dict[str, Any]) -> list[str]:
    if not report["not_run"]:
        return []
    lines = ["## Not measured", ""]
    for item in report["not_run"]:
        lines.append(f"- {item['name']}: {item['reason']}")
    return lines + [""]


def write_gpu_report(report: dict[str, Any], results_dir: Path) -> tuple[Path, Path]:
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{report['size']}.json"
    md_path = results_dir / f"{report['size']}.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    md_path.write_text(to_markdown(report), encoding="utf-8")
    return json_path, md_path
