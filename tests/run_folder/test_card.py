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
    rows = [re.split(r"(?<!\\)\|", line.strip().strip("|")) for line in block.splitlines() if line.startswith("| ")]
    plain = lambda cell: re.sub(r"\\(.)", r"\1", cell.strip())  # noqa: E731 - Markdown escapes undone
    return {plain(key): plain(value) for key, value in rows[2:]}  # after the header and its rule


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


# ---------------------------------------------------------------- user text cannot break the card

DESCRIPTIONS = [
    "LoRA: run #2 with ```python\nprint('x')\n``` inside",
    "~~~\nfenced with tildes",
    "<details><summary>more</summary>",
    "<!-- an open comment",
    "<script>alert(1)</script> and <https://auto.link>",
    "# a heading\n## another",
    "line\n---\nunder a rule",
    "line\n===",
    "| a | b |\n| - | - |\n| 1 | 2 |",
    "[link](http://x) and ![img](y.png) and [^1]",
    "*bold* **strong** _em_ snake_case_name ~~gone~~",
    "1. first\n2) second\n- bullet\n+ plus\n> quote",
    "    four spaces: code?",
    "math $x^2$ and $$y$$, &amp; &lt; entities, a \\ backslash, `code`",
    "first paragraph\n\nsecond paragraph",
]
HEADINGS = ["Training", "Data", "Final metrics", "Curves", "How to load", "Reproduce", "Resolved recipe"]


def _card_of(plan_for, tmp_path: Path, *overrides: str) -> tuple[str, Path]:
    from spo_align.recipe.load import save_resolved
    from spo_align.run_folder.card import render

    plan = plan_for("spo", *overrides)
    out = tmp_path / "card-run"
    out.mkdir(exist_ok=True)
    save_resolved(plan, out / "resolved_recipe.yaml")
    info = {"command": "spo train x.yaml --set 'description=```'", "run_info": {}}
    return render(out, plan, info, [{"step": 1, "loss": 0.5}], None), out


@pytest.mark.parametrize("description", DESCRIPTIONS)
def test_a_description_shows_as_written_and_never_breaks_the_card(plan_for, tmp_path: Path, description: str):
    """Parsed with a CommonMark parser: the card keeps its sections, the description is plain text (no HTML, no
    heading, list, rule, table, code or link of its own), and every code block holds exactly its file."""
    import html

    from markdown_it import MarkdownIt

    card, out = _card_of(plan_for, tmp_path, f"description={description}")
    card = card.split("---\n", 2)[2]  # the body, as the hub shows it below the front matter
    tokens = MarkdownIt("commonmark").enable("table").enable("strikethrough").parse(card)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open" and t.tag == "h2"]
    assert headings == HEADINGS
    assert [t.content for t in tokens if t.type == "html_block"] == [CARD_MARK + "\n"]
    assert not any(t.type == "html_inline" for t in tokens for t in (t.children or []))
    fences = {t.info: t.content for t in tokens if t.type == "fence"}
    assert fences["yaml"] == (out / "resolved_recipe.yaml").read_text()
    assert fences["bash"] == "spo train x.yaml --set 'description=```'\n"
    # the description is the paragraphs right after the first one, and reads exactly as written
    start = next(i for i, t in enumerate(tokens) if t.type == "paragraph_open")
    paragraphs = []
    for i in range(start + 3, len(tokens)):
        if tokens[i].type == "heading_open" or (
            tokens[i].type == "paragraph_open" and tokens[i + 1].content.startswith("The base is a local folder")
        ):
            break
        if tokens[i].type == "paragraph_open":
            paragraphs.append(tokens[i + 1])
    kinds = {child.type for inline in paragraphs for child in inline.children}
    assert kinds <= {"text", "softbreak"}, kinds
    shown = "\n\n".join(
        "".join(c.content if c.type == "text" else "\n" for c in inline.children) for inline in paragraphs
    )
    written = "\n\n".join("\n".join(line.strip() for line in part.splitlines()) for part in description.split("\n\n"))
    assert shown == written, (shown, written)
    rendered = MarkdownIt("commonmark").render(card)
    assert "<details>" not in rendered and "<script>" not in rendered and html.escape("<details>") in rendered or (
        "details" not in description)


def test_a_folder_name_and_paths_with_markdown_in_them_stay_text(plan_for, tmp_path: Path):
    from markdown_it import MarkdownIt

    from spo_align.recipe.load import save_resolved
    from spo_align.run_folder.card import render

    base = tmp_path / "base `x` <b>"
    base.mkdir()
    plan = plan_for("spo", f"model.name_or_path={base}")
    out = tmp_path / "run # <i>1 `q` #"
    out.mkdir()
    save_resolved(plan, out / "resolved_recipe.yaml")
    card = render(out, plan, {"command": "spo train", "run_info": {}}, [], None).split("---\n", 2)[2]
    tokens = MarkdownIt("commonmark").parse(card)
    title = next(tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open" and t.tag == "h1")
    assert MarkdownIt("commonmark").renderInline(title) == "run # &lt;i&gt;1 `q` #"
    codes = [c.content for t in tokens for c in (t.children or []) if c.type == "code_inline"]
    assert str(base) in codes
    assert not any(c.type == "html_inline" for t in tokens for c in (t.children or []))


# ---------------------------------------------------------------- license and lineage from the base's card


@pytest.mark.parametrize(
    ("front", "expected"),
    [
        ("license: apache-2.0\n", {"license": "apache-2.0"}),
        ("license: other\nlicense_name: qwen\nlicense_link: https://example.com/LICENSE\n",
         {"license": "other", "license_name": "qwen", "license_link": "https://example.com/LICENSE"}),
        ("license: other\n", {}),  # the hub refuses `other` without a name and a link: not copied, said in the text
        ("license: other\nlicense_name: qwen\n", {}),
    ],
)
def test_the_base_license_is_copied_whole_or_not_at_all(plan_for, tmp_path: Path, front: str, expected: dict):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text(f"---\n{front}---\n# base\n")
    plan = plan_for("spo", f"model.name_or_path={base}")
    meta = front_matter(plan)
    assert {k: v for k, v in meta.items() if k.startswith("license")} == expected
    card, _ = _card_of(plan_for, tmp_path, f"model.name_or_path={base}")
    if not expected:
        assert "says `license: other` without `license_name` and `license_link`" in card


def test_a_local_base_names_the_hub_model_it_came_from(plan_for, tmp_path: Path):
    """hub -> SFT (local) -> SFT again (local) -> this run: base_model is the hub model, from the nearest card or
    resolved recipe that names one; a local folder with neither leaves base_model out."""
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "README.md").write_text("---\nbase_model: Org/Hub-Model-7B\nlicense: mit\n---\n")
    again = tmp_path / "sft2"
    again.mkdir()
    (again / "resolved_recipe.yaml").write_text(f"stage: sft\nmodel:\n  name_or_path: {sft}\n")
    assert front_matter(plan_for("spo", f"model.name_or_path={sft}"))["base_model"] == "Org/Hub-Model-7B"
    assert front_matter(plan_for("spo", f"model.name_or_path={again}"))["base_model"] == "Org/Hub-Model-7B"
    recipe_only = tmp_path / "from-recipe"
    recipe_only.mkdir()
    (recipe_only / "resolved_recipe.yaml").write_text("stage: sft\nmodel:\n  name_or_path: Other/Base\n")
    assert front_matter(plan_for("spo", f"model.name_or_path={recipe_only}"))["base_model"] == "Other/Base"
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "README.md").write_text(f"---\nbase_model: {loop}\n---\n")  # names itself: no hub model
    assert "base_model" not in front_matter(plan_for("spo", f"model.name_or_path={loop}"))
    card, _ = _card_of(plan_for, tmp_path, f"model.name_or_path={again}")
    assert "trained from the hub model `Org/Hub-Model-7B`" in card


@pytest.mark.slow
def test_the_card_of_a_run_from_a_local_sft_folder_of_a_hub_model_names_that_hub_model(small_model: Path, tmp_path: Path):
    """The paper's flow, hub -> SFT -> SPO, with the hub model read from a real hub cache (offline): the SFT card
    names the hub model, and so does the SPO card, whose base is the local SFT folder; the license (other, with
    its name and link) follows both."""
    import os
    import shutil
    import subprocess
    import sys

    from huggingface_hub.repocard import metadata_load

    cache = tmp_path / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--spo-test--tiny-base" / "snapshots" / sha
    shutil.copytree(small_model, snapshot)
    (snapshot / "README.md").write_text(
        "---\nlicense: other\nlicense_name: tiny-license\nlicense_link: https://example.com/LICENSE\n---\n# tiny base\n"
    )
    (cache / "models--spo-test--tiny-base" / "refs").mkdir()
    (cache / "models--spo-test--tiny-base" / "refs" / "main").write_text(sha)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def train(recipe: str, model: str, out: Path) -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "spo_align.cli", "train", str(RECIPES / f"{recipe}.yaml"),
             "--set", f"model.name_or_path={model}", "--set", f"output.dir={out}", "--set", "training.max_steps=2",
             "--set", "data.train.0.max_samples=16", "--set", "training.cpu_threads=1"],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return metadata_load(out / "README.md")

    licensed = {"license": "other", "license_name": "tiny-license", "license_link": "https://example.com/LICENSE"}
    sft = train("sft_packed", "spo-test/tiny-base", tmp_path / "sft")
    assert sft["base_model"] == "spo-test/tiny-base" and licensed.items() <= sft.items()
    spo = train("spo", str(tmp_path / "sft"), tmp_path / "spo")
    assert spo["base_model"] == "spo-test/tiny-base" and licensed.items() <= spo.items()
    assert "trained from the hub model `spo-test/tiny-base`" in (tmp_path / "spo" / "README.md").read_text()
