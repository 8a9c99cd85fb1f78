"""The model card (README.md) of a finished run, in the Hugging Face Hub's convention.

YAML front matter (base_model: the hub model the run descends from, hub datasets, library_name, license when the
base's own card states one whole, pipeline_tag, tags), then: what was trained (stage, loss and its parameters with the
optimum they imply, adapter, data with the run's row-policy counts), the final metrics, the curves, how to
load it, the exact `spo train` command and the resolved recipe. Every number is copied from run.json,
metrics.jsonl or the resolved recipe, never computed again. Written before the completion marker.

Text the user wrote (the description, folder names, paths, the command, the resolved recipe) is shown as
written: escaped where it is prose, in code spans and fences longer than any backtick run it holds, so no
code fence, HTML tag or Markdown mark in it can change the card around it.

base_model follows the lineage of a local base: a local SFT folder is not on the hub, but the card or resolved
recipe in it names what it was trained from, and so on up to the first hub model (hub -> SFT -> SPO).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from spo_align.run_folder.layout import CARD_MARK, CURVES, RESOLVED_RECIPE
from spo_align.run_folder.lineage import License, base_card, hub_ancestor, license_of

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan

logger = logging.getLogger(__name__)

_NOT_SHOWN = {"step", "epoch", "elapsed_s"}


def number(value: Any) -> str:
    """How the card shows a value: floats to 6 significant digits, everything else as JSON would."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int):
        return str(value)
    return str(value)


# ---------------------------------------------------------------- Markdown that shows text as written

_INLINE_MARKS = re.compile(r"([\\`*\[\]<>&|~$])")
_EDGE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")  # `snake_case` stays as it is
_BLOCK_START = re.compile(r"^(#|[-+=]|\d+[.)])")


def plain(text: str) -> str:
    """`text` as Markdown prose that renders exactly as written: every mark that could start emphasis, code,
    a link, HTML, an entity or math is backslash-escaped, as is a line start that could open a heading, list,
    rule or quote; lines lose their indentation (four spaces would make a code block). Blank lines still
    separate paragraphs."""
    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        line = _EDGE_UNDERSCORE.sub(r"\\_", _INLINE_MARKS.sub(r"\\\1", line.strip()))
        start = _BLOCK_START.match(line)
        if start:
            marker = start.group(1)
            line = marker[:-1] + "\\" + line[len(marker) - 1 :]
        lines.append(line)
    return "\n".join(lines)


def _heading(text: str) -> str:
    """One line of plain text for a heading (a trailing `#` would be read as the heading's closing mark)."""
    line = plain(" ".join(text.splitlines()))
    return re.sub(r"(?<!\\)(#+)\s*$", lambda m: m.group(1).replace("#", "\\#"), line)


def code(text: str) -> str:
    """`text` as an inline code span, whatever backticks it holds."""
    text = " ".join(text.splitlines())
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith(("`", " ")) or text.endswith(("`", " ")) else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def fenced(text: str, info: str) -> list[str]:
    """`text` as a fenced code block whose fence is longer than any backtick run inside it."""
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return [fence + info, text.rstrip("\n"), fence]


def _cell(value: Any) -> str:
    return _INLINE_MARKS.sub(r"\\\1", number(value)).replace("\n", " ")


def _table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("", "")) -> list[str]:
    lines = [f"| {head[0]} | {head[1]} |", "| --- | --- |"]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in rows]
    return lines


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts and lists as (dotted key, scalar) rows, in their order."""
    if isinstance(value, dict) and value:
        return [row for key, item in value.items() for row in flatten(item, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(value, list) and value and any(isinstance(item, (dict, list)) for item in value):
        return [row for i, item in enumerate(value) for row in flatten(item, f"{prefix}.{i}")]
    return [(prefix, value)]


def _reported(run_info: dict[str, Any]) -> dict[str, Any]:
    """run_info for the card: row-policy counts without the zeros (rows in and kept always shown), and without
    the per-source breakdown when a split has one source (it equals the total)."""

    def counts(values: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in values.items() if v or k in ("rows_in", "rows_kept") or not isinstance(v, int)}

    policy = run_info.get("row_policy")
    if not isinstance(policy, dict):
        return run_info
    shown: dict[str, Any] = {}
    for split, report in policy.items():
        if not isinstance(report, dict) or not report:
            continue
        report = dict(report)
        if isinstance(report.get("total"), dict):
            report["total"] = counts(report["total"])
        sources = report.get("by_source")
        if isinstance(sources, dict):
            if len(sources) <= 1:
                report.pop("by_source")
            else:
                report["by_source"] = {name: counts(c) if isinstance(c, dict) else c for name, c in sources.items()}
        shown[split] = report
    return {**run_info, "row_policy": shown}


def _is_local(plan: RunPlan, path: str) -> bool:
    return Path(path).is_absolute() or (plan.base_dir / path).exists() or Path(path).exists()


def base_model(plan: RunPlan) -> str | None:
    """The hub model the run descends from: the base itself when it is a hub id, else the nearest hub model up
    a local base's lineage (`lineage.hub_ancestor`); None for a `tiny:` model or a lineage that names none."""
    return hub_ancestor(plan.model_path)


def base_license(plan: RunPlan) -> License:
    """The license of the base's own card (copied whole or not at all), else of its hub ancestor's cached card."""
    found = license_of(base_card(plan.model_path, plan.recipe.model.revision))
    ancestor = base_model(plan)
    if not found.fields and found.note is None and ancestor is not None and ancestor != plan.model_path:
        found = license_of(base_card(ancestor, None))
    return found


def _sources(plan: RunPlan) -> list[tuple[str, dict[str, Any]]]:
    """Every data source as the resolved recipe has it (local paths absolute), with its split."""
    data = plan.recipe_dict()["data"]
    return [(split, source) for split in ("train", "eval") for source in data[split]]


def front_matter(plan: RunPlan) -> dict[str, Any]:
    recipe = plan.recipe
    meta: dict[str, Any] = {}
    base = base_model(plan)
    if base is not None:
        meta["base_model"] = base
    datasets = []
    for _, source in _sources(plan):
        if not _is_local(plan, source["path"]) and source["path"] not in datasets:
            datasets.append(source["path"])
    if datasets:
        meta["datasets"] = datasets
    meta["library_name"] = "peft" if recipe.adapter is not None else "transformers"
    meta.update(base_license(plan).fields)
    meta["pipeline_tag"] = "text-generation"
    tags = ["spo-align", recipe.loss.type if recipe.loss is not None else recipe.stage]
    if recipe.adapter is not None:
        tags.append(recipe.adapter.type)
    meta["tags"] = tags
    return meta


def _training_rows(plan: RunPlan, info: dict[str, Any]) -> list[tuple[str, Any]]:
    from spo_align.losses.registry import loss_optimum

    recipe = plan.recipe
    rows: list[tuple[str, Any]] = [("stage", recipe.stage), ("base model", plan.model_path)]
    if recipe.loss is not None:
        params = {k: v for k, v in recipe.loss.model_dump(mode="json").items() if k != "type" and v is not None}
        if plan.ipo_tau is not None:
            params["tau (resolved)"] = plan.ipo_tau
        rows.append(("loss", recipe.loss.type))
        rows += [(f"loss.{key}", value) for key, value in params.items()]
        optimum = loss_optimum(recipe.loss)
        if optimum:
            rows += [(f"optimum {key} (summed log-ratio)", value) for key, value in optimum.items()]
    if recipe.adapter is not None:
        rows += [(f"adapter.{k}", v) for k, v in recipe.adapter.model_dump(mode="json").items()]
    else:
        rows.append(("adapter", "none (full fine-tuning)"))
    t = recipe.training
    rows += [
        ("learning rate", t.learning_rate), ("scheduler", t.lr_scheduler),
        ("global batch", plan.global_batch_size),
        ("max_steps", t.max_steps) if t.max_steps is not None else ("epochs", t.num_epochs),
        ("max_length", recipe.data.max_length), ("recipe hash", info.get("recipe_hash")),
    ]
    return rows


def _final_metrics(records: list[dict[str, Any]]) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """(the last logged step's values, the closing summary) from metrics.jsonl."""
    steps = [r for r in records if not any(str(k).startswith("train_") for k in r)]
    summary = [r for r in records if any(str(k).startswith("train_") for k in r)]
    last = [("step", steps[-1].get("step"))] + [(k, v) for k, v in steps[-1].items() if k not in _NOT_SHOWN] if steps else []
    closing = [(k, v) for k, v in summary[-1].items() if k not in _NOT_SHOWN] if summary else []
    return last, closing


def _load_section(output_dir: Path, lora: bool, merged: bool) -> list[str]:
    folder = str(output_dir)
    if lora:
        snippet = "\n".join([
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f"model = AutoPeftModelForCausalLM.from_pretrained({folder!r})  # or the hub id it is pushed to",
            f"tokenizer = AutoTokenizer.from_pretrained({folder!r})",
            "model = model.merge_and_unload()  # optional: one plain model, no adapter layers",
        ])
        lines = [
            "This folder holds a LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`) and the tokenizer;",
            "peft loads the base model the adapter names and puts the adapter on it:",
            "", *fenced(snippet, "python"),
        ]
        if merged:
            lines += ["", "`merged/` holds the adapter already merged into the base, loadable with `AutoModelForCausalLM`."]
        return lines
    snippet = "\n".join([
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({folder!r})  # or the hub id it is pushed to",
        f"tokenizer = AutoTokenizer.from_pretrained({folder!r})",
    ])
    return fenced(snippet, "python")


def render(
    output_dir: Path, plan: RunPlan, info: dict[str, Any], records: list[dict[str, Any]], curves_error: str | None
) -> str:
    """The card's text (see the module docstring)."""
    output_dir = Path(output_dir)
    recipe = plan.recipe
    meta = front_matter(plan)
    what = f"{recipe.loss.type.upper()} preference training" if recipe.loss is not None else "supervised fine-tuning"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", CARD_MARK, ""]
    lines += [f"# {_heading(output_dir.name)}", "", f"{what} of {code(plan.model_path)} with spo-align"
              + (f" ({recipe.adapter.type} adapter)." if recipe.adapter is not None else " (full fine-tuning).")]
    if recipe.description:
        lines += ["", plain(recipe.description)]  # shown as written: nothing in it is Markdown or HTML
    if "base_model" not in meta and not plan.model_path.startswith("tiny:"):
        lines += ["", f"The base is a local folder ({code(plan.model_path)}); if you publish it, add its hub id as "
                  "`base_model` in the front matter above."]
    elif meta.get("base_model") not in (None, plan.model_path):
        lines += ["", f"The base is a local folder ({code(plan.model_path)}), trained from the hub model "
                  f"{code(meta['base_model'])}: `base_model` above names it."]
    note = base_license(plan).note
    if note is not None:
        lines += ["", note]
    lines += ["", "## Training", "", *_table(_training_rows(plan, info), ("setting", "value"))]
    lines += ["", "## Data", ""]
    rows = []
    for split, source in _sources(plan):
        index = sum(1 for key, _ in rows if key.startswith(split + "."))
        limit = f", max_samples {source['max_samples']}" if source.get("max_samples") is not None else ""
        rows.append((f"{split}.{index}", f"{source['path']} ({source['format']}, split {source['split']}{limit})"))
    lines += _table(rows, ("source", "dataset"))
    facts = flatten(_reported(info.get("run_info") or {}))
    if facts:
        lines += ["", "What the run reported (row-policy counts, sizes, layout; from `run.json`; row-policy counts "
                      "that are 0 are left out):", ""]
        lines += _table(facts, ("fact", "value"))
    last, closing = _final_metrics(records)
    lines += ["", "## Final metrics", ""]
    if last:
        lines += ["Last logged step (`metrics.jsonl`):", "", *_table(last, ("metric", "value"))]
    if closing:
        lines += ["", "Closing summary of the last session:", "", *_table(closing, ("metric", "value"))]
    if not last and not closing:
        lines.append("No metrics were logged.")
    lines += ["", "## Curves", ""]
    lines.append(f"![training curves]({CURVES})" if curves_error is None else f"The curves could not be drawn: {curves_error}")
    lines += ["", "## How to load", "", *_load_section(output_dir, recipe.adapter is not None, recipe.output.save_merged)]
    lines += ["", "## Reproduce", "", *fenced(str(info.get("command") or "(not recorded)"), "bash")]
    sessions = info.get("sessions") or []
    if len(sessions) > 1:
        lines += ["", f"The run was continued {len(sessions) - 1} time(s) from a checkpoint:", ""]
        lines += [f"- {plain(str(s.get('started')))}: from {plain(str(s.get('resumed_from') or 'the start'))}"
                  for s in sessions]
    resolved = output_dir / RESOLVED_RECIPE
    if resolved.is_file():
        lines += ["", "## Resolved recipe", "", *fenced(resolved.read_text(encoding="utf-8"), "yaml")]
    lines += ["", f"Trained {info.get('started')} to {info.get('finished')} "
              f"(spo-align {info.get('packages', {}).get('spo-align', '?')}, git {info.get('git_revision') or '?'})."]
    return "\n".join(lines) + "\n"
