"""The bench harness at toy size: what it counts and compares, not how fast anything runs."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import pytest

from bench.clock import LoopTimes, batch_tokens, batch_work
from bench.config import TOY
from bench.harness import BenchJobError, Job, run_job
from bench.pairs import LengthModel, make_pairs, pair_token_counts, sample_lengths
from bench.report import build_report, summarize_preference, to_markdown


@pytest.fixture(autouse=True)
def _one_thread():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lengths_are_long_tailed_and_fit_max_length():
    lengths = LengthModel(max_length=1024)
    sample = sample_lengths(3000, lengths, seed=0)
    prompts = [p.prompt for p in sample]
    answers = [p.chosen for p in sample] + [p.rejected for p in sample]
    assert 50 <= statistics.median(prompts) <= 70
    assert 160 <= statistics.median(answers) <= 200
    # long tail: the longest answers are several times the median
    assert max(answers) > 4 * statistics.median(answers)
    assert max(p.prompt + max(p.chosen, p.rejected) for p in sample) + 3 <= lengths.max_length


def test_token_counts_are_what_the_chat_template_gives():
    from bench.pairs import build_tokenizer
    from spo_align.data.tokenize import tokenize_pair

    tokenizer = build_tokenizer(512)
    for row in make_pairs(5, LengthModel(prompt_median=10, response_median=20, max_length=128), 512, seed=3):
        pair = tokenize_pair(tokenizer, row["prompt"], row["chosen"][0]["content"], row["rejected"][0]["content"])
        counted = pair_token_counts(row)
        assert counted == (len(pair.prompt_ids) + len(pair.chosen_ids), len(pair.prompt_ids) + len(pair.rejected_ids))
        assert tokenizer.unk_token_id not in pair.prompt_ids + pair.chosen_ids + pair.rejected_ids


def test_batch_tokens_counts_padding_from_the_mask_and_none_in_packed_rows():
    torch = pytest.importorskip("torch")
    padded = {"input_ids": torch.zeros(4, 10, dtype=torch.long), "attention_mask": torch.zeros(4, 10, dtype=torch.long)}
    padded["attention_mask"][:, :6] = 1
    assert batch_tokens(padded) == (24, 40)
    packed = {"input_ids": torch.zeros(1, 37, dtype=torch.long), "position_ids": torch.zeros(1, 37, dtype=torch.long)}
    assert batch_tokens(packed) == (37, 37)
    packed["num_real_tokens"] = torch.tensor(30)
    assert batch_tokens(packed) == (30, 37)


def test_batch_work_counts_scored_tokens_and_the_attention_each_layout_computes():
    torch = pytest.importorskip("torch")
    labels = torch.tensor([[-100, 1, 2, -100, -100], [1, 1, 1, 1, -100]])
    padded = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5), "labels": labels}
    assert batch_work(padded) == (6, 2 * 5 * 5)  # a mask is given: the kernel computes every row whole
    packed = {"input_ids": torch.zeros(1, 7, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1]])}
    assert batch_work(packed) == (7, 6 + 3 + 3)  # per sequence, causal: s(s+1)/2 each; no labels: every slot


def test_loop_summary_ignores_the_batch_fetched_ahead_and_the_pre_loop_pass():
    times = LoopTimes(begin=0.0, first_fetch=5.0, step_ends=[6.0, 7.0, 8.0], end=8.5)
    times.batch_real = [10, 20, 30, 999]  # the 4th batch was fetched ahead and never trained on
    times.batch_slots = [20, 20, 40, 999]
    summary = times.summary()
    assert summary["steps"] == 3
    assert summary["real_tokens"] == 60
    assert summary["padding_share"] == pytest.approx(1 - 60 / 80)
    assert summary["loop_s"] == pytest.approx(3.5)  # from the first fetch, not from train begin
    assert summary["pre_loop_s"] == pytest.approx(5.0)
    assert summary["steady_real_tokens"] == 50
    # per optimizer step: the first step runs from the first fetch, each later one from the step before
    assert summary["step_seconds"] == pytest.approx([1.0, 1.0, 1.0])
    assert summary["step_real_tokens"] == [10, 20, 30]
    two_per_step = LoopTimes(begin=0.0, first_fetch=1.0, step_ends=[3.0, 4.0], end=4.0)
    two_per_step.batch_real, two_per_step.batch_slots = [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]
    assert two_per_step.summary(micro_batches_per_step=2)["step_real_tokens"] == [3, 7]
    with pytest.raises(RuntimeError, match="collator was not tracked"):
        LoopTimes(begin=0.0, first_fetch=0.0, step_ends=[1.0], end=1.0).summary()


def _run(real: int, loop_s: float, rss: float, share: float) -> dict:
    return {
        "real_tokens": real, "loop_s": loop_s, "steady_s": None, "steady_real_tokens": 0, "padding_share": share,
        "peak_rss_mb": rss, "sampled_peak_rss_mb": rss, "wall_s": loop_s + 1, "steps": 2, "precompute_s": None,
        "loop_cpu_s": 2 * loop_s,
    }


def test_report_takes_medians_of_rounds_and_ratios_against_trl():
    results = {
        "trl": [_run(1000, 10.0, 2000, 0.4), _run(1000, 12.0, 2100, 0.4), _run(1000, 50.0, 2050, 0.4)],
        "spo-packed": [_run(1000, 3.0, 900, 0.0), _run(1000, 2.5, 950, 0.0), _run(1000, 4.0, 1200, 0.0)],
        "spo-packed-precompute": [_run(1000, 4.0, 800, 0.0), _run(1000, 4.0, 800, 0.0), _run(999, 4.0, 800, 0.0)],
    }
    summary = summarize_preference(results, pair_tokens=1000)
    rows = {row["name"]: row for row in summary["rows"]}
    assert rows["trl"]["tokens_per_s"] == pytest.approx(1000 / 12.0)  # the 50 s outlier round is not the median
    assert rows["spo-packed"]["tokens_per_s_ratio"] == pytest.approx((1000 / 3.0) / (1000 / 12.0))
    assert rows["spo-packed"]["peak_rss_ratio"] == pytest.approx(950 / 2050)
    assert rows["spo-packed"]["tokens_match_workload"]
    targets = {t["run"]: t for t in summary["targets"]}
    assert targets["spo-packed"]["tokens_per_s_met"] and targets["spo-packed"]["peak_rss_met"]
    assert not targets["spo-packed-precompute"]["tokens_per_s_met"]  # 3.0x < 3.5x: reported as missed
    assert targets["spo-packed-precompute"]["padding_share_met"]


def test_markdown_table_shows_every_run_and_missed_targets():
    config = dataclasses.replace(TOY, rounds=1)
    raw = {
        "started": 0.0,
        "seconds": 1.0,
        "pair_tokens": 1000,
        "parts": {
            "preference": {
                "seconds": 1.0,
                "results": {"trl": [_run(1000, 10.0, 2000, 0.4)], "spo-packed": [_run(1000, 5.0, 1500, 0.0)]},
            }
        },
    }
    report = build_report(config, raw, "python -m bench run --size toy")
    text = to_markdown(report)
    assert "`python -m bench run --size toy`" in text
    assert "(a) TRL DPOTrainer" in text and "(c) spo train, packed" in text
    assert "2.00x" in text and "MISSED" in text  # 2x < 3x target, 0.73x > 0.5x memory target


@pytest.mark.slow
def test_harness_runs_a_job_in_a_fresh_process_and_reports_its_failure(tmp_path: Path):
    logp = dataclasses.replace(TOY.logp, threads=1)
    result = run_job(Job("logp-full", "logp", {"logp": logp.to_json(), "method": "full"}), tmp_path, 1, 300)
    assert result["method"] == "full"
    assert result["sampled_peak_rss_mb"] > 0 and result["peak_rss_mb"] > 0
    assert result["step_peak_mb"] >= 0
    assert Path(result["log"]).is_file()

    from bench.logp_memory import run_logp

    chunked = run_logp(logp, "chunked")  # in this process: same inputs (same seed), chunked head
    assert chunked["logps"] == pytest.approx(result["logps"], rel=1e-5)

    with pytest.raises(BenchJobError, match="unknown bench task"):
        run_job(Job("broken", "no-such-task", {"workload": TOY.workload.to_json()}), tmp_path, 1, 120)


@pytest.mark.slow
def test_trl_and_spo_train_on_exactly_the_same_tokens(tmp_path: Path):
    """Runs (a) and (c) in this process at toy size: same real tokens; TRL pads, packed spo does not."""
    pytest.importorskip("trl")
    pytest.importorskip("spo_align.train.stages")
    from bench.spo_runs import run_spo
    from bench.suite import prepare
    from bench.trl_baseline import run_trl

    # 2 pairs per micro-batch x 2 accumulation steps: tokens are counted per micro-batch, steps per update;
    # LoRA on both sides, checkpointing set off on both (TRL's default is on), as in the real-model case
    work = dataclasses.replace(TOY.workload, pairs_per_device=2, grad_accum=2, lora_r=4, lora_alpha=8.0)
    config = dataclasses.replace(TOY, work_dir=tmp_path, workload=work)
    files = prepare(config)
    trl = run_trl(work, files.model_dir, files.pairs, tmp_path / "trl")
    spo = run_spo(dataclasses.replace(work, loss="spo"), "packed", files.model_dir, files.pairs, tmp_path / "spo")
    assert trl["real_tokens"] == spo["real_tokens"] == files.pair_tokens
    assert trl["steps"] == spo["steps"] == work.steps == 2
    assert not trl["has_reference_model"]  # peft model: TRL's reference is the adapter-off policy, as spo's
    assert trl["gradient_checkpointing"] is False and spo["gradient_checkpointing"] is False
    assert trl["lora_r"] == spo["lora_r"] == 4
    assert trl["padding_share"] > 0.05
    assert spo["padding_share"] == 0.0
    assert spo["loop_s"] > 0 and trl["loop_s"] > 0


def test_a_spent_budget_skips_jobs_but_still_returns_results(tmp_path: Path):
    import time

    from bench.harness import run_rounds

    jobs = [Job("never-started", "logp", {"logp": TOY.logp.to_json(), "method": "full"})]
    results = run_rounds(jobs, 1, tmp_path, 1, 60, deadline=time.monotonic() + 1)
    assert results["never-started"][0]["error"].startswith("skipped")


def test_executed_flops_count_what_each_engine_runs():
    from bench.flops import executed_flops
    from spo_align.recipe.model_shapes import ModelShape

    dims = ModelShape(source="test", model_type="llama", hidden_size=4, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=2, intermediate_size=8, vocab_size=10, tie_word_embeddings=True)
    # per layer: q 4x4, k 4x2, v 4x2, o 4x4, gate/up 4x8 each, down 8x4 = 16+8+8+16+32+32+32 = 144 weights
    run = {"token_slots": 10, "labelled_tokens": 4, "score_entries": 30}
    linear, attention = 2 * 288 * 10, 4 * 2 * 2 * 2 * 30
    spo = executed_flops(dims, run, engine="spo", lora_r=None)
    head = 2 * 4 * 10 * 4  # spo's head runs on the 4 scored tokens only
    assert spo["forward"] == linear + attention + head
    assert spo["backward"] == 2 * (linear + attention + head)
    assert spo["head_recompute"] == head  # the chunked head recomputes its logits in the backward
    assert spo["reference"] == linear + attention + head
    assert spo["total"] == 4 * (linear + attention + head) + head
    trl = executed_flops(dims, run, engine="trl", lora_r=None)
    assert trl["head_recompute"] == 0 and trl["forward"] == linear + attention + 2 * 4 * 10 * 10  # every slot
    lora = executed_flops(dims, run, engine="spo", lora_r=1)
    per_layer = (4 + 4) + (4 + 2) + (4 + 2) + (4 + 4) + (4 + 8) + (4 + 8) + (8 + 4)  # r 1 x (in + out)
    adapters = 2 * 2 * per_layer * 10  # 2 FLOPs per weight, 2 layers, 10 token slots
    assert lora["backward"] == linear + 2 * adapters + 2 * attention + head  # frozen base and head: input grads
    precompute = executed_flops(dims, {**run, "variant": "packed_precompute"}, engine="spo", lora_r=None)
    assert precompute["reference"] == 0
