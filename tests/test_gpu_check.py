"""The GPU check (bench/gpu_check.sh, bench/gpu_plan.py, bench/gpu_report.py) without a GPU: its plan, its
report from whatever the phases left, and the whole script in its CPU dry mode."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.config import GPU, GPU_CPU
from bench.gpu_report import build_gpu_report, to_markdown, training_row, write_gpu_report

REPO = Path(__file__).resolve().parents[1]
N = 1_000_000_000


def test_gpu_plan_runs_each_importable_kernel_and_names_the_missing_ones(tmp_path: Path, monkeypatch):
    import bench.gpu_plan as plan

    monkeypatch.setattr(plan, "kernel_missing", lambda a: "no flash-attn here" if a == "flash_attention_2" else None)
    jobs, not_run = plan.gpu_jobs(dataclasses.replace(GPU, work_dir=tmp_path), tmp_path / "model", tmp_path / "pairs")
    names = [job.name for job in jobs]
    assert names == [
        "peak",
        "trl",
        "spo-packed-sdpa",
        "spo-packed-precompute-sdpa",
        "spo-lora-packed-sdpa",
        "check-sdpa",
        "generate",
        "spo-packed-flex_attention",
        "check-flex_attention",
        "trl-precompute",
    ]
    assert [(n.name, n.reason) for n in not_run] == [
        ("flash_attention_2 (packed spo run and its log-prob check)", "not measured: no flash-attn here")
    ]
    by_name = {job.name: job for job in jobs}
    # every run has its own cap; the compiled kernel gets the longer one
    assert all(job.timeout_s for job in jobs)
    assert by_name["spo-packed-flex_attention"].timeout_s > by_name["spo-packed-sdpa"].timeout_s
    assert by_name["spo-lora-packed-sdpa"].spec["lora"] == {"r": 64, "alpha": 128.0, "learning_rate": 1e-4}
    assert by_name["trl-precompute"].spec["precompute"] is True
    for job in jobs[1:]:
        work = job.spec["workload"]
        assert work["dtype"] == "bfloat16" and work["shape"]["vocab_size"] == 151_936 and work["device"] == "cuda"


def _train_run(step_tokens: list[int], step_seconds: list[float], **extra) -> dict:
    return {
        "engine": "spo",
        "step_real_tokens": step_tokens,
        "step_seconds": step_seconds,
        "real_tokens": sum(step_tokens),
        "loop_s": sum(step_seconds),
        "steps": len(step_tokens),
        "n_params": N,
        "padding_share": 0.0,
        "device_name": "NVIDIA H100 80GB HBM3",
        "losses": [0.69, 0.68],
        "loss_finite": True,
        **extra,
    }


def test_training_row_takes_the_median_after_the_warm_up_step_and_mfu_over_the_measured_peak():
    plan = {"name": "spo-packed-sdpa", "task": "spo", "attention": "sdpa", "variant": "packed"}
    # the warm-up step (100 tokens in 10 s) is left out; the median of 1000, 3000, 2000 tokens/s is 2000
    run = _train_run([100, 1000, 3000, 2000], [10.0, 1.0, 1.0, 1.0], has_reference_model=True)
    row = training_row(plan, [run], peak=800e12, pair_tokens=6100)
    assert row["tokens_per_s"] == pytest.approx(2000)
    assert row["measured_steps"] == 3
    assert row["epoch_tokens_per_s"] == pytest.approx(6100 / 13)
    assert row["mfu"] == pytest.approx(2000 * 8 * N / 800e12)  # live reference: 6 N + 2 N per token
    assert row["tokens_match_workload"]
    precompute = _train_run([100, 1000, 3000], [10.0, 1.0, 1.0], has_reference_model=False, precompute_s=3.0)
    row = training_row({**plan, "name": "spo-packed-precompute-sdpa"}, [precompute], peak=800e12, pair_tokens=1)
    assert row["mfu"] == pytest.approx(2000 * 6 * N / 800e12)
    # the reference pass folded in once: 2 N per token over the pass, on top of the epoch's 6 N
    assert row["epoch_tokens_per_s_with_precompute"] == pytest.approx(4100 / 15)
    assert row["mfu_with_precompute"] == pytest.approx(8 * N * 4100 / 15 / 800e12)
    assert not row["tokens_match_workload"]
    one_step = training_row(plan, [_train_run([100, 200], [1.0, 1.0])], peak=800e12, pair_tokens=None)
    assert one_step["tokens_per_s"] is None  # fewer than 2 steps after the warm-up: no median


def _work_dir(tmp_path: Path, results: dict, plan: list[dict], phases: str) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    raw = {"started": 0.0, "seconds": 10.0, "prepare_s": 1.0, "pair_tokens": 6100, "plan": plan, "results": results,
           "not_run": [{"name": "flash_attention_2", "reason": "not measured: flash-attn is not installed here"}]}
    (work / "raw.json").write_text(json.dumps(raw), encoding="utf-8")
    (work / "phases.tsv").write_text(phases, encoding="utf-8")
    return work


def test_report_compares_with_trl_checks_targets_and_lists_what_failed_or_never_ran(tmp_path: Path):
    plan = [
        {"name": "peak", "task": "peak"},
        {"name": "trl", "task": "trl", "attention": "sdpa"},
        {"name": "spo-packed-sdpa", "task": "spo", "attention": "sdpa", "variant": "packed"},
        {"name": "spo-packed-flex_attention", "task": "spo", "attention": "flex_attention", "variant": "packed"},
        {"name": "check-sdpa", "task": "logp_check", "attention": "sdpa"},
        {"name": "generate", "task": "generate"},
    ]
    worst = {"sequence": "pair 3 rejected", "abs_diff": 0.5, "bound": 30.0, "ratio": 0.5 / 30, "tokens": 240}
    leak = {"sequence": "pair 1 chosen", "abs_diff": 90.0, "bound": 25.0, "ratio": 3.6, "tokens": 200}
    check = {"attention": "sdpa", "layout": "packed_batch", "dtype": "bfloat16", "sequences": 16, "scored_tokens": 4000,
             "bound_per_unit_logit": 2**-7, "mean_logit_scale": 20.0, "passed": True, "control_failed": True,
             "boundaries_received": None, "problems": [], "logps": {"padded": [1.0]},
             "packed_vs_padded": {"worst": worst, "sequences_over_bound": 0},
             "control_vs_padded": {"worst": leak, "sequences_over_bound": 9},
             "padded_vs_fp32": {"max_abs_per_token": 3e-3}, "packed_vs_fp32": {"max_abs_per_token": 3e-3}}
    results = {
        "peak": [{"flops_per_s": 800e12, "dtype": "bfloat16", "size": 8192, "repeats": 20, "device_name": "NVIDIA H100"}],
        "trl": [_train_run([10, 1000, 1000], [1.0, 1.0, 1.0], has_reference_model=True, cuda_peak_allocated_mb=40_000)],
        "spo-packed-sdpa": [
            _train_run([10, 1600, 1600], [1.0, 1.0, 1.0], has_reference_model=True, cuda_peak_allocated_mb=20_000)
        ],
        "spo-packed-flex_attention": [{"name": "spo-packed-flex_attention", "error": "spo-packed-flex_attention: killed after 150 s"}],
        "check-sdpa": [check],
    }
    phases = "install\tfallback\t31\tresolver refused\nenv\tok\t9\tNVIDIA H100\ngpu-tests\tok\t40\t2 passed in 30s\n"
    work = _work_dir(tmp_path, results, plan, phases)
    report = build_gpu_report(GPU, work, "bash bench/gpu_check.sh $OUT")
    rows = {row["name"]: row for row in report["training"]}
    assert rows["spo-packed-sdpa"]["vs_trl_tokens_per_s"] == pytest.approx(1.6)
    assert rows["spo-packed-sdpa"]["vs_trl_peak_memory"] == pytest.approx(0.5)
    assert rows["spo-packed-flex_attention"]["status"] == "failed"
    (target,) = report["targets"]
    assert target["speedup_met"] and target["memory_met"]
    assert target["mfu"] == pytest.approx(1600 * 8 * N / 800e12) and not target["mfu_met"]  # 1.6% < 40%
    assert report["correctness"]["logp_checks"]["sdpa"]["passed"]
    assert "logps" not in report["correctness"]["logp_checks"]["sdpa"]  # kept in raw only
    assert report["generation"]["status"] == "no result"
    assert not report["succeeded"]  # a failed run and a run that never ended
    names = {item["name"] for item in report["not_run"]}
    assert names == {"flash_attention_2", "spo-packed-flex_attention", "generate"}
    text = to_markdown(report)
    assert text.startswith("# GPU check on NVIDIA H100")
    assert "`bash bench/gpu_check.sh $OUT`" in text
    assert "| install | fallback | 31 | resolver refused |" in text
    assert "flash_attention_2: not measured: flash-attn is not installed here" in text
    assert "failed: spo-packed-flex_attention: killed after 150 s" in text
    assert "spo-packed-sdpa: 1.60x (met), memory 0.50x (met), MFU 1.6% (MISSED)" in text
    assert "Worst sequence pair 3 rejected: 0.5 nats over 240 tokens" in text
    assert "9 of 16 sequences over their bound, worst pair 1 chosen 90 nats (3.6x), failed as it must" in text


def test_report_is_written_when_nothing_but_the_phases_ran(tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "phases.tsv").write_text("install\tfailed\t0\tno wheel bundle in bench/wheels\n", encoding="utf-8")
    report = build_gpu_report(GPU, work, "bash bench/gpu_check.sh out")
    json_path, md_path = write_gpu_report(report, tmp_path / "out")
    assert json_path.name == "gpu.json" and md_path.name == "gpu.md"
    written = json.loads(json_path.read_text(encoding="utf-8"))
    assert written["succeeded"] is False and written["training"] == [] and written["peak"]["status"] == "no result"
    text = md_path.read_text(encoding="utf-8")
    assert "| install | failed | 0 | no wheel bundle in bench/wheels |" in text
    assert "Dense peak not measured" in text and "No environment facts were recorded." in text


def _dry_env(tmp_path: Path, budget: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SPO_GPU_CHECK_CPU="1",
        GPU_CHECK_BUDGET_S=budget,
        GPU_CHECK_WORK=str(tmp_path / "work"),
        GPU_CHECK_WHEELS=str(tmp_path / "no-wheels"),
        PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")]),
    )
    return env


@pytest.mark.slow
def test_dry_run_with_no_time_left_for_the_bench_still_writes_the_report(tmp_path: Path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), str(out)], env=_dry_env(tmp_path, "1"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the bench never ran: not every phase succeeded
    report = json.loads((out / "gpu-cpu.json").read_text(encoding="utf-8"))
    phases = {p["name"]: p for p in report["phases"]}
    assert phases["install"]["status"] == "skipped" and "no wheel bundle" in phases["install"]["detail"]
    assert phases["env"]["status"] == "ok"
    assert phases["gpu-tests"]["status"] == "skipped" and "no CUDA device" in phases["gpu-tests"]["detail"]
    assert phases["bench"]["status"] == "skipped"
    assert report["training"] == [] and report["dry_run"] and not report["succeeded"]
    assert report["environment"]["torch"]["cuda_available"] is False
    assert sorted(p.name for p in out.iterdir()) == ["gpu-cpu.json", "gpu-cpu.md", "gpu_check.log", "gpu_tests.log", "logs.tar.gz"]


@pytest.mark.slow
def test_dry_run_goes_through_every_run_of_the_plan_and_reports_them(tmp_path: Path):
    """The whole script on a CPU at toy size: every planned run, check and report path, as on the card."""
    pytest.importorskip("trl")
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), str(out)], env=_dry_env(tmp_path, "900"),
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    log = (out / "gpu_check.log").read_text(encoding="utf-8")
    report = json.loads((out / "gpu-cpu.json").read_text(encoding="utf-8"))
    statuses = {row["name"]: (row["status"], row["error"]) for row in report["training"]}
    assert all(status == "ok" for status, _ in statuses.values()), statuses
    assert set(statuses) == {"trl", "spo-packed-sdpa", "spo-packed-precompute-sdpa", "spo-lora-packed-sdpa", "trl-precompute"}
    rows = {row["name"]: row for row in report["training"]}
    for row in rows.values():
        assert row["tokens_match_workload"] and row["loss_finite"] and row["measured_steps"] == 2
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0
    assert rows["trl"]["padding_share"] > 0 and rows["spo-packed-sdpa"]["padding_share"] == 0
    assert rows["spo-packed-precompute-sdpa"]["precompute_s"] > 0 and rows["trl-precompute"]["precompute_s"] > 0
    assert not rows["spo-packed-precompute-sdpa"]["live_reference"] and rows["spo-lora-packed-sdpa"]["live_reference"]
    assert report["correctness"]["lora_adapter_changed"]
    assert report["correctness"]["lora_adapter"]["frozen_max_abs_change"] == 0
    check = report["correctness"]["logp_checks"]["sdpa"]
    assert check["status"] == "ok" and check["passed"] and check["layout"] == "packed_rows"
    # per sequence, each within its bound, and the leaking control over its bound, as the check requires
    assert check["packed_vs_padded"]["sequences_over_bound"] == 0 and check["packed_vs_padded"]["worst"]["ratio"] <= 1
    assert check["control_failed"] and check["control_vs_padded"]["worst"]["ratio"] > 1
    generation = report["generation"]
    assert generation["status"] == "ok" and len(generation["rounds"]) == 2
    assert all(r["new_tokens"] == GPU_CPU.gpu.gen_prompts * GPU_CPU.gpu.gen_new_tokens for r in generation["rounds"])
    assert report["peak"]["status"] == "ok" and report["peak"]["flops_per_s"] > 0
    assert [item["name"] for item in report["not_run"]] == ["flash_attention_2 (packed spo run and its log-prob check)"]
    assert report["succeeded"] and proc.returncode == 0, log
    text = (out / "gpu-cpu.md").read_text(encoding="utf-8")
    assert text.startswith("# GPU check pipeline, CPU dry run (gpu-cpu): no GPU figures")


def test_generation_model_folder_makes_every_row_run_to_the_cap(tmp_path: Path):
    """What the generation count rests on: with the folder's min_new_tokens, greedy rows never stop early."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.config import TOY_SHAPE
    from bench.generation import full_length_model
    from bench.pairs import write_model

    model_dir = write_model(tmp_path / "model", TOY_SHAPE, seed=3)
    folder = full_length_model(model_dir, tmp_path / "gen", new_tokens=12)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.generation_config.min_new_tokens == 12
    enc = tokenizer(["<|user|> w1 w2 <|assistant|>", "<|user|> w3 <|assistant|>"], return_tensors="pt", padding=True)
    with torch.no_grad():
        bias = torch.zeros(model.config.vocab_size)
        bias[tokenizer.eos_token_id] = 1e4  # EOS is the greedy choice at every step
        model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[:, enc["input_ids"].shape[1] :]
    assert new.shape[1] == 12 and not (new == tokenizer.eos_token_id).any()


def test_logp_check_model_is_redrawn_so_that_a_leak_stands_above_bf16_rounding(tmp_path: Path):
    """At the default init (std 0.02) the toy's predictions barely depend on context: in bf16 the leaking
    control stays within its bound and the check fails as it must (it could not see a leak). Re-drawn at unit
    gain (`context_sensitive`, what the GPU check runs), the control stands above it and the layouts pass."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.config import TOY_SHAPE, LengthModel
    from bench.logp_check import _features, context_sensitive
    from bench.packing_check import check_packing
    from bench.pairs import make_pairs, write_jsonl, write_model

    model_dir = write_model(tmp_path / "model", TOY_SHAPE, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = LengthModel(prompt_median=12, response_median=24, max_length=128)
    pairs = write_jsonl(make_pairs(8, lengths, TOY_SHAPE.vocab_size, 0), tmp_path / "pairs.jsonl")
    features = _features(tokenizer, pairs, 8)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def check(m):
        return check_packing(m.to(torch.bfloat16), features, pad_token_id=tokenizer.pad_token_id,
                             layout="packed_batch", pack_length=128, batch_size=2)

    default = check(model)
    assert not default["control_failed"] and not default["passed"]
    assert any("leaking control PASSED" in p for p in default["problems"])
    redrawn = check(context_sensitive(model.float()))
    assert redrawn["passed"] and redrawn["control_failed"], redrawn["problems"]
