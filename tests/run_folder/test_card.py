"""The model card (README.md) of a finished run: hub front matter, numbers copied from run.json and
metrics.jsonl, a loading snippet that works, and a card even when the curves cannot be drawn."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from spo_align.cli import app
from spo_align.run_folder.card import flatten, front_matter, number
from spo_align.run_folder.layout import CARD_MARK
from spo_align.run_folder.metrics_file import read_metrics

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"


def _train(recipe: str, model: Path, out: Path, *extra: str) -> None:
    result = CliRunner().invoke(app, [
        "train", str(RECIPES / f"{recipe}.yaml"), "--set", f"model.name_or_path={model}", "--set", f"output.dir={out}",
        "--set", "training.max_steps=3", "--set", "training.save_steps=3", "--set", "data.train.0.max_samples=16",
        *extra,
    ])
    assert result.exit_code == 0, result.output


def _table(card: str, heading: str) -> dict[str, str]:
    """The two-column table that follows `heading` in the card."""
    block = card.split(heading, 1)[1].split("\n\n", 2)[1]
    rows = [line.strip("|").split("|") for line in block.splitlines() if line.startswith("| ")]
    return {key.strip(): value.strip() for key, value in rows[2:]}  # after the header and its rule


def _code(card: str, language: str, after: str) -> str:
    return re.search(rf"```{language}\n(.*?)```", card.split(after, 1)[1], re.S).group(1)


@pytest.mark.slow
def test_card_of_a_full_run_carries_the_numbers_of_its_files(small_model: Path, tmp_path: Path):
    from huggingface_hub.repocard import metadata_load

    out = tmp_path / "spo-run"
    _train("spo", small_model, out, "--set", "loss.beta=0.25")
    card = (out / "README.md").read_text()
    meta = metadata_load(out / "README.md")
    assert meta == yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "transformers" and meta["tags"] == ["spo-align", "spo"]
    assert meta["pipeline_tag"] == "text-generation" and "base_model" not in meta  # a local base
    assert CARD_MARK in card

    info = json.loads((out / "run.json").read_text())
    records = read_metrics(out / "metrics.jsonl")
    last = [r for r in records if "loss" in r][-1]
    shown = _table(card, "Last logged step")
    assert shown == {"step": str(last["step"]), **{k: number(v) for k, v in last.items() if k not in ("step", "epoch", "elapsed_s")}}
    facts = _table(card, "What the run reported")
    reported = {k: number(v) for k, v in flatten(info["run_info"])}
    assert all(reported[k] == v for k, v in facts.items())  # every fact shown is run.json's
    hidden = set(reported) - set(facts)  # only zero counts, an empty split, a one-source breakdown (= the total)
    assert all(k.startswith("row_policy.") and (reported[k] in ("0", "{}") or ".by_source." in k) for k in hidden)
    assert facts["row_policy.train.total.rows_in"] == "16"
    training = _table(card, "## Training")
    assert training["loss.beta"] == "0.25" and training["optimum margin (summed log-ratio)"] == "4"  # 1/beta
    assert training["recipe hash"] == info["recipe_hash"]
    assert _code(card, "bash", "## Reproduce").strip() == info["command"]
    assert _code(card, "yaml", "## Resolved recipe") == (out / "resolved_recipe.yaml").read_text()
    assert "![training curves](metrics.png)" in card and (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "README.md").stat().st_mtime <= (out / "COMPLETE").stat().st_mtime


@pytest.mark.slow
def test_card_of_a_lora_run_says_how_to_load_the_adapter_and_the_snippet_works(small_model: Path, tmp_path: Path):
    out = tmp_path / "sft-lora"
    _train("sft_packed", small_model, out, "--set", "adapter.r=4", "--set", "adapter.alpha=8",
           "--set", "output.save_merged=true")
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["library_name"] == "peft"
    assert "merged/" in card
    snippet = _code(card, "python", "## How to load")
    assert "AutoPeftModelForCausalLM" in snippet
    namespace: dict = {}
    exec(snippet, namespace)  # the card's own instructions, run as written
    assert not any("lora_" in name for name, _ in namespace["model"].named_parameters())  # merged back


def test_front_matter_names_hub_datasets_and_the_license_of_a_local_base(plan_for, tmp_path: Path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# base\n")
    plan = plan_for("dpo", f"model.name_or_path={base}", "data.train.0.path=HuggingFaceH4/ultrafeedback_binarized",
                    "data.train.0.format=ultrafeedback", "adapter.r=8")
    meta = front_matter(plan)
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["HuggingFaceH4/ultrafeedback_binarized"]
    assert meta["library_name"] == "peft" and meta["tags"] == ["spo-align", "dpo", "lora"]
    assert "base_model" not in meta
    hub = plan_for("dpo", "model.name_or_path=Qwen/Qwen2.5-7B-Instruct")
    assert front_matter(hub)["base_model"] == "Qwen/Qwen2.5-7B-Instruct" and "datasets" not in front_matter(hub)


def test_the_card_is_written_when_the_curves_cannot_be_drawn(plan_for, tmp_path: Path):
    from spo_align.run_folder.card import render
    from spo_align.train.finish import draw_curves

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "train_runtime": 1.0}\n')  # a summary, no step curve
    plan = plan_for("spo")
    info = {"command": "spo train x.yaml", "run_info": {}}
    card = render(out, plan, info, read_metrics(out / "metrics.jsonl"), draw_curves(out))
    assert "The curves could not be drawn: PlotError:" in card and "holds no usable metric record" in card
    assert not (out / "metrics.png").exists()
