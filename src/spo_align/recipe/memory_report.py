"""`spo resolve` and `spo validate --gpu-memory`: the memory estimate of a recipe as a table, data and warnings.

The estimate itself is `recipe/memory.py`; the model's shape comes from `recipe/model_shapes.py`, which follows a
model folder that does not exist yet to the recipe that writes it (looked for beside the recipe and under
recipes/ and spo_recipes/ of the working directory).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spo_align.recipe.errors import RecipeError, RecipeErrors
from spo_align.recipe.memory import GIB, MemoryEstimate, estimate_memory
from spo_align.recipe.model_shapes import ModelShape, NoShape, Writers, find_shape

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan

CARDS: dict[str, float] = {
    "a10g": 24,
    "l40s": 48,
    "a100-40gb": 40,
    "a100-80gb": 80,
    "h100": 80,
    "h200": 141,
}
"""Memory of the cards `--gpu-memory` knows by name: the vendor's published size (NVIDIA A10G 24 GB, L40S 48 GB,
A100 40/80 GB, H100 SXM/PCIe 80 GB, H200 141 GB), taken as GiB like a number given to --gpu-memory."""

DEFAULT_RECIPE_ROOTS = (Path("recipes"), Path("spo_recipes"))


@dataclass(frozen=True)
class Card:
    name: str | None
    """The card's name in `CARDS`, or None for a bare size."""
    gib: float

    @property
    def nbytes(self) -> int:
        return int(self.gib * GIB)

    def __str__(self) -> str:
        return f"{self.gib:g} GiB" if self.name is None else f"{self.name} ({self.gib:g} GiB)"

    @property
    def option(self) -> str:
        return self.name or f"{self.gib:g}"


def parse_card(text: str) -> Card:
    """`80` or `80.5` (GiB) or a card name from `CARDS`; ValueError with the accepted forms otherwise."""
    name = text.strip().lower()
    if name in CARDS:
        return Card(name, CARDS[name])
    try:
        gib = float(name.removesuffix("gib").removesuffix("gb"))
    except ValueError:
        gib = float("nan")
    if not gib > 0 or gib == float("inf"):
        known = ", ".join(f"{card} ({size:g})" for card, size in CARDS.items())
        raise ValueError(f"--gpu-memory {text!r}: give GiB per GPU (e.g. 80) or a card name: {known}")
    return Card(None, gib)


# ---------------------------------------------------------------- the model's shape


def recipe_writers(near: Iterable[Path]) -> Writers:
    """Output folder -> starting model of every valid recipe beside `near` and under recipes/, spo_recipes/."""
    from spo_align.recipe.load import RECIPE_SUFFIXES, find_recipe_files, load_recipe
    from spo_align.recipe.paths import output_dir

    roots = [root for root in DEFAULT_RECIPE_ROOTS if root.is_dir()]
    files, _ = find_recipe_files(roots)
    for path in near:
        files += sorted(p for p in Path(path).parent.glob("*") if p.suffix in RECIPE_SUFFIXES and p.is_file())
    writers: Writers = {}
    for file in dict.fromkeys(p.resolve() for p in files):
        try:
            recipe = load_recipe(file)
        except RecipeErrors:
            continue
        writers.setdefault(output_dir(recipe), (recipe.model.name_or_path, _shown(file)))
    return writers


def _shown(path: Path) -> Path:
    """`path` relative to the working directory when it lies under it."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


@dataclass(frozen=True)
class Report:
    """The estimate of one recipe (or why there is none), for a card when one was given."""

    estimate: MemoryEstimate | None
    reason: str | None
    card: Card | None

    @property
    def fits(self) -> bool | None:
        if self.estimate is None or self.card is None:
            return None
        return self.estimate.total <= self.card.nbytes

    def to_dict(self) -> dict[str, Any]:
        if self.estimate is None:
            return {"estimate": None, "reason": self.reason}
        e, shape = self.estimate, self.estimate.shape
        data: dict[str, Any] = {
            "device": e.setting.device,
            "model": _shape_dict(shape),
            "trainable_params": e.setting.trainable,
            "terms": [
                {"key": t.key, "label": t.label, "bytes": t.nbytes, "gib": round(t.nbytes / GIB, 3), "phase": t.phase,
                 "note": t.note}
                for t in e.terms
            ],
            "peak_allocated_bytes": e.peak_allocated,
            "total_bytes": e.total,
            "total_gib": round(e.total / GIB, 2),
            "assumptions": list(ASSUMPTIONS),
        }
        if self.card is not None:
            data["card"] = {"name": self.card.name, "gib": self.card.gib}
            data["fits"] = self.fits
            data["headroom_gib"] = round((self.card.nbytes - e.total) / GIB, 2)
        return data


ASSUMPTIONS = (
    "worst-case micro-batch: every sequence max_length long (packed rows full)",
    "attention: sdpa with an attention mask unless model.attention names flash_attention_2 (auto counts as sdpa)",
    "DeepSpeed model states as DeepSpeed's own estimators count them (stage 0/1 counted like 2)",
    "allocator allowance 10% of the allocated peak; CUDA context 1.5 GiB per process",
    "activation terms derived for Llama-style decoders and checked against CPU peaks only: no GPU has measured them",
)


def _shape_dict(shape: ModelShape) -> dict[str, Any]:
    return {
        "source": shape.source, "model_type": shape.model_type, "params": shape.total_params,
        "hidden_size": shape.hidden_size, "num_layers": shape.num_layers, "num_heads": shape.num_heads,
        "num_kv_heads": shape.num_kv_heads, "intermediate_size": shape.intermediate_size,
        "vocab_size": shape.vocab_size, "tie_word_embeddings": shape.tie_word_embeddings,
    }


def report(plan: RunPlan, card: Card | None, writers: Writers | None = None) -> Report:
    """The estimate for a resolved plan (`RunPlan`) on CUDA, or the reason there is none."""
    writers = recipe_writers([plan.recipe_path]) if writers is None else writers
    shape = find_shape(plan.recipe.model.name_or_path, writers)
    if isinstance(shape, NoShape):
        return Report(None, shape.reason, card)
    return Report(estimate_memory(plan, shape, "cuda"), None, card)


# ---------------------------------------------------------------- text


def _gib(nbytes: int) -> str:
    if 0 < nbytes < GIB // 10:
        return f"{nbytes / 2**20:8.2f} MiB"
    return f"{nbytes / GIB:8.2f} GiB"


def verdict(rep: Report) -> str | None:
    if rep.estimate is None or rep.card is None:
        return None
    spare = rep.card.nbytes - rep.estimate.total
    if spare >= 0:
        return f"fits {rep.card} per GPU with {spare / GIB:.1f} GiB to spare"
    return f"does NOT fit {rep.card} per GPU: {-spare / GIB:.1f} GiB over"


def table_lines(rep: Report) -> list[str]:
    """The breakdown as plain lines (the CLI prints them as YAML comments)."""
    if rep.estimate is None:
        return [f"Memory per GPU: no estimate: {rep.reason}"]
    e, s = rep.estimate, rep.estimate.setting
    shape = e.shape
    lines = [
        "Memory per GPU, estimated for CUDA (docs/memory.md):",
        f"  model: {_count(shape.total_params)} parameters, {_count(s.trainable)} trainable; {shape.model_type} "
        f"shape from {shape.source}",
    ]
    titles = {"resident": "held throughout", "step": "training step (forward/backward)",
              "optimizer": "optimizer step (activations freed)", "overhead": "overheads"}
    for phase, title in titles.items():
        terms = [t for t in e.terms if t.phase == phase]
        if not terms:
            continue
        lines.append(f"  {title}:")
        for t in terms:
            lines.append(f"    {t.label:<34}{_gib(t.nbytes)}" + (f"   {t.note}" if t.note else ""))
    lines.append(f"  {'peak allocated':<36}{_gib(e.peak_allocated)}   held + max(training step, optimizer step)")
    lines.append(f"  {'total':<36}{_gib(e.total)}")
    said = verdict(rep)
    if said is not None:
        lines.append(f"  verdict: {said}")
    lines.append("  assumptions:")
    lines.extend(f"    - {assumption}" for assumption in ASSUMPTIONS)
    return lines


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


# ---------------------------------------------------------------- spo validate --gpu-memory


Blame = tuple[tuple[str, ...], tuple[tuple[str, ...], ...], str]


def _blame(rep: Report, plan: RunPlan) -> Blame:
    """(key most responsible, keys whose line to point at (the first written in the recipe's own file wins: an
    absent key has no line), advice) for a recipe that does not fit."""
    assert rep.estimate is not None
    e, recipe = rep.estimate, plan.recipe
    states = sum(t.nbytes for t in e.terms if t.phase in ("resident", "optimizer") and t.key != "reference")
    reference = e.term("reference")
    step = e.phase("step")
    groups = {"states": states, "reference": reference.nbytes if reference else 0, "step": step}
    worst = max(groups, key=lambda k: groups[k])
    if worst == "reference":
        return ("reference",), (("reference",), ("loss",)), "a frozen reference copy: set reference.precompute: true"
    if worst == "step":
        if not recipe.training.gradient_checkpointing:
            return (("training", "gradient_checkpointing"), (("training",),),
                    "activations dominate: set training.gradient_checkpointing: true")
        return (("training", "per_device_batch_size"), (("training", "per_device_batch_size"),),
                "activations dominate: lower per_device_batch_size (raise gradient_accumulation_steps) or max_length")
    if plan.zero_stage is not None:
        if plan.world_size == 1:
            return (("distributed", "num_processes"), (("distributed", "num_processes"),),
                    "ZeRO shards model states over processes and one process shards nothing: use more GPUs, "
                    "deepspeed_configs/zero3_offload.json or a LoRA adapter")
        if plan.zero_stage != 3:
            return (("distributed", "deepspeed"), (("distributed", "deepspeed"),),
                    "model states dominate: ZeRO-3 (deepspeed_configs/zero3.json) shards the weights too")
        offload = "" if e.setting.offload_optimizer else "deepspeed_configs/zero3_offload.json, "
        return (("distributed", "deepspeed"), (("distributed", "deepspeed"),),
                f"model states dominate even sharded {plan.world_size} ways: {offload}more GPUs, or a LoRA adapter")
    if recipe.adapter is None:
        return (("adapter",), (("model",), ("distributed",)),
                "full fine-tuning without DeepSpeed keeps fp32 weights, gradients and AdamW states of every parameter "
                "on each GPU: add an adapter (LoRA) or distributed.deepspeed with ZeRO-3 over several GPUs")
    return (("adapter", "type"), (("adapter", "type"), ("adapter",)), "the frozen base dominates: adapter.type qlora stores it in 4 bits")


def memory_findings(files: Iterable[Path], card: Card) -> list[RecipeError]:
    """A warning per valid recipe whose estimate exceeds `card` (at the key most responsible), and per recipe
    with no estimate (why, and how to get one). Recipes that do not load are skipped: validate reports them."""
    from spo_align.recipe.load import load_positions, load_recipe
    from spo_align.recipe.locate import locate
    from spo_align.recipe.resolve import resolve

    files = [Path(f) for f in files]
    writers = recipe_writers(files)
    findings: list[RecipeError] = []
    for file in files:
        try:
            plan = resolve(load_recipe(file), file, "cuda")
        except RecipeErrors:
            continue
        rep = report(plan, card, writers)
        positions = load_positions(file)
        if rep.estimate is None:
            loc = locate(("model", "name_or_path"), positions, str(file))
            findings.append(RecipeError(loc.file, loc.line, loc.col, "model.name_or_path",
                                        f"no memory estimate: {rep.reason}", "warning"))
            continue
        if rep.fits:
            continue
        key, anchors, advice = _blame(rep, plan)
        found = [locate(anchor, positions, str(file)) for anchor in anchors]
        loc = next((where for where in found if where.file == str(file)), found[0])
        message = (f"needs about {rep.estimate.total / GIB:.1f} GiB per GPU, more than {card} "
                   f"(spo resolve {file} --gpu-memory {card.option} shows the breakdown); {advice}")
        findings.append(RecipeError(loc.file, loc.line, loc.col, ".".join(key), message, "warning"))
    return findings
