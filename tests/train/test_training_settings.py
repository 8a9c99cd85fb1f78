"""Recipe settings reach the trainer as written, for every stage: activation (gradient) checkpointing,
dropout, and the revision and choice of the reference model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spo_align.cli import app

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"
STAGES = {"spo": None, "sft_packed": "SFTConfig", "kto": "KTOConfig"}


@pytest.mark.parametrize("value", [False, True])
@pytest.mark.parametrize("recipe", sorted(STAGES))
def test_gradient_checkpointing_reaches_every_stage_both_ways_without_a_deprecation_warning(
    plan_for, tmp_path: Path, recipe: str, value: bool
):
    import trl

    from spo_align.train.args import build_training_args

    plan = plan_for(recipe, f"training.gradient_checkpointing={str(value).lower()}", "output.report_to=[none]")
    cls = getattr(trl, STAGES[recipe]) if STAGES[recipe] else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = build_training_args(plan, tmp_path, cls)
    assert args.activation_checkpointing is value and args.gradient_checkpointing is value
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("recipe", sorted(STAGES))
def test_dry_run_shows_the_checkpointing_the_run_will_use(small_model: Path, recipe: str):
    result = CliRunner().invoke(
        app, ["train", str(RECIPES / f"{recipe}.yaml"), "--set", f"model.name_or_path={small_model}", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    args = json.loads(result.stdout.split("\n", 1)[1])["trainer_args"]
    assert args["activation_checkpointing"] is False


# ------------------------------------------------------------------ helpers: runs of one optimizer step


def _run(recipe: str, out: Path, *overrides: str) -> dict:
    """`spo train` for one step; returns the first logged step's metrics (computed before any update)."""
    args = ["train", str(RECIPES / f"{recipe}.yaml"), "--set", f"output.dir={out}", "--set", "training.max_steps=1"]
    args += ["--set", "data.train.0.max_samples=8"]
    for override in overrides:
        args += ["--set", override]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if "loss" in r)


def _log_ratios(step: dict) -> tuple[float, float]:
    return step["rewards/chosen"], step["rewards/rejected"]


def _copy_model(source: Path, target: Path, **config: object) -> Path:
    """A copy of a saved model folder with some config values changed."""
    import shutil

    shutil.copytree(source, target)
    values = json.loads((target / "config.json").read_text())
    values.update(config)
    (target / "config.json").write_text(json.dumps(values))
    return target


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory: pytest.TempPathFactory, small_model: Path) -> Path:
    """The small model with attention dropout 0.3 in its config (Llama applies it as a functional dropout)."""
    return _copy_model(small_model, tmp_path_factory.mktemp("dropout") / "model", attention_dropout=0.3)


# ------------------------------------------------------------------ dropout

RUNS = {"spo-lora": ("spo", True), "spo-full": ("spo", False), "kto-lora": ("kto", True)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_preference_stages_train_without_dropout_so_log_ratios_start_at_exactly_zero(
    name: str, dropout_model: Path, tmp_path: Path
):
    recipe, lora = RUNS[name]
    base = [f"model.name_or_path={dropout_model}"]
    if lora:
        base += ["adapter.r=4", "adapter.dropout=0.3"]
    step = _run(recipe, tmp_path / "default", *base)
    assert _log_ratios(step) == (0.0, 0.0)
    info = json.loads((tmp_path / "default" / "run.json").read_text())["run_info"]
    assert info["dropout_disabled"] is True and info["device"]["device"] == "cpu"

    kept = _run(recipe, tmp_path / "kept", *base, "training.disable_dropout=false")
    assert _log_ratios(kept) != (0.0, 0.0)  # the policy's dropout is on, the reference's is not (or differs)


def test_dropout_default_is_per_stage_and_disabling_reaches_every_rate(plan_for, dropout_model: Path):
    from peft import get_peft_model

    from spo_align.train.model import disable_dropout, dropout_disabled, load_model, lora_config

    assert dropout_disabled(plan_for("spo")) and dropout_disabled(plan_for("kto"))
    assert not dropout_disabled(plan_for("sft_packed"))
    assert dropout_disabled(plan_for("sft_packed", "training.disable_dropout=true"))
    assert not dropout_disabled(plan_for("spo", "training.disable_dropout=false"))

    plan = plan_for("spo", f"model.name_or_path={dropout_model}", "adapter.dropout=0.2")
    model = get_peft_model(load_model(plan), lora_config(plan))
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    attention = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    assert layers and attention and all(m.p == 0.2 for m in layers)
    assert disable_dropout(model) == len(layers) + len(attention)
    assert all(m.p == 0.0 for m in layers) and all(m.attention_dropout == 0.0 for m in attention)
    assert model.config.attention_dropout == 0.3  # the saved config keeps its rate


# ------------------------------------------------------------------ reference revision

COMMIT_A, COMMIT_B, COMMIT_C = "a" * 40, "b" * 40, "c" * 40
HUB_ID, TOKENIZER_ID = "spo-test/tiny", "spo-test/tokenizer"


@pytest.fixture
def hub_model(tmp_path_factory: pytest.TempPathFactory, small_model: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A hub model in an offline cache with two commits: A (the small model) and B (its LM head scaled by 1.5),
    the default branch pointing at B; and a tokenizer repo whose only commit is C."""
    import shutil

    import huggingface_hub.constants
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hub")
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    for commit, scale in ((COMMIT_A, 1.0), (COMMIT_B, 1.5)):
        model = AutoModelForCausalLM.from_pretrained(small_model)
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
        snapshot = repo / "snapshots" / commit
        model.save_pretrained(snapshot)
        for path in small_model.iterdir():
            if not (snapshot / path.name).exists():
                shutil.copy(path, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_B)
    tokenizer_repo = root / ("models--" + TOKENIZER_ID.replace("/", "--"))  # a tokenizer-only repo, one commit
    shutil.copytree(repo / "snapshots" / COMMIT_A, tokenizer_repo / "snapshots" / COMMIT_C,
                    ignore=shutil.ignore_patterns("*.safetensors"))
    (tokenizer_repo / "refs").mkdir()
    (tokenizer_repo / "refs" / "main").write_text(COMMIT_C)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return HUB_ID


@pytest.mark.slow
@pytest.mark.parametrize("recipe, reference", [("kto", None), ("spo", HUB_ID)], ids=["kto", "spo-reference-named"])
def test_a_reference_that_is_the_starting_model_loads_at_its_pinned_revision(
    hub_model: str, tmp_path: Path, recipe: str, reference: str | None
):
    extra = [f"reference.model={reference}"] if reference else []
    step = _run(recipe, tmp_path / "out", f"model.name_or_path={hub_model}", f"model.revision={COMMIT_A}", *extra)
    assert _log_ratios(step) == (0.0, 0.0)  # the default branch (B) would give the reference another head


@pytest.mark.slow
def test_kto_with_an_adapter_uses_the_reference_model_the_recipe_names(
    hub_model: str, small_model: Path, tmp_path: Path
):
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(small_model)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    model.save_pretrained(other)
    overrides = (f"model.name_or_path={hub_model}", f"model.revision={COMMIT_A}", "adapter.r=4")
    own = _run("kto", tmp_path / "own", *overrides)
    assert _log_ratios(own) == (0.0, 0.0)  # the adapter disabled: the starting model itself
    named = _run("kto", tmp_path / "named", *overrides, f"reference.model={other}")
    assert _log_ratios(named)[0] != 0.0 and _log_ratios(named)[1] != 0.0


def test_revision_applies_to_the_starting_model_wherever_it_is_named(plan_for, small_model: Path):
    from spo_align.train.model import revision_of

    plan = plan_for("spo", f"model.name_or_path={HUB_ID}", f"model.revision={COMMIT_A}", f"reference.model={HUB_ID}")
    assert revision_of(plan, None) == COMMIT_A
    assert revision_of(plan, plan.model_path) == revision_of(plan, plan.reference_model_path) == COMMIT_A
    assert revision_of(plan, str(small_model)) is None


def test_a_tokenizer_from_another_repo_is_not_asked_for_the_models_revision(plan_for, hub_model: str):
    from spo_align.train.model import load_tokenizer

    plan = plan_for("spo", f"model.name_or_path={hub_model}", f"model.revision={COMMIT_A}", f"model.tokenizer={TOKENIZER_ID}")
    assert load_tokenizer(plan).pad_token is not None  # the model's commit does not exist in the tokenizer repo


# ------------------------------------------------------------------ warnings


@pytest.mark.parametrize("recipe", ["spo", "kto"])
def test_no_deprecated_checkpointing_name_warns_during_a_lora_run(recipe: str, small_model: Path, tmp_path: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(recipe, tmp_path / "out", f"model.name_or_path={small_model}", "adapter.r=4",
             "training.gradient_checkpointing=true")
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "checkpointing" in m and "deprecated" in m], messages


def test_only_the_checkpointing_aliases_are_hidden():
    from spo_align.train.model import quiet_checkpointing_aliases

    def from_transformers(message: str) -> None:
        warnings.warn_explicit(message, FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_checkpointing_aliases():
            from_transformers("`is_gradient_checkpointing` is deprecated and will be removed in v6.")
            from_transformers("`gradient_checkpointing_enable` is deprecated and will be removed in v6.")
            from_transformers("`some_other_method` is deprecated and will be removed in v6.")
            warnings.warn("`is_gradient_checkpointing` is deprecated (raised elsewhere)", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "`some_other_method` is deprecated and will be removed in v6.",
        "`is_gradient_checkpointing` is deprecated (raised elsewhere)",
    ]


def test_the_adapter_off_reference_runs_without_dropout_when_the_policy_keeps_it(plan_for, dropout_model: Path):
    """With `disable_dropout: false` the LoRA policy trains with dropout; its reference (the same model with the
    adapter off) must still be deterministic, like a frozen reference in eval mode."""
    import torch

    from spo_align.data.collate import PairCollator
    from spo_align.losses.registry import build_pair_loss
    from spo_align.losses.spo import SPOLoss
    from spo_align.train.args import build_training_args
    from spo_align.train.model import apply_adapter, load_model, load_tokenizer
    from spo_align.train.preference_trainer import PreferenceTrainer, ReferenceSpec
    from tests.train.preference_helpers import tokenized_dataset

    plan = plan_for("spo", f"model.name_or_path={dropout_model}", "adapter.r=4", "adapter.dropout=0.3",
                    "training.disable_dropout=false")
    tokenizer = load_tokenizer(plan)
    ds = tokenized_dataset(tokenizer, 8, max_length=32)
    model = apply_adapter(load_model(plan), plan)
    trainer = PreferenceTrainer(
        model=model, args=build_training_args(plan, plan.output_dir, remove_unused_columns=False),
        train_dataset=ds, data_collator=PairCollator(tokenizer.pad_token_id, "padded", 32),
        processing_class=tokenizer, pair_loss=build_pair_loss(SPOLoss(type="spo")), reference=ReferenceSpec(kind="adapter"),
    )
    batch = trainer.data_collator([ds[i] for i in range(4)])
    model.train()
    torch.manual_seed(0)
    first = trainer.reference_logps(model, batch, "train")
    second = trainer.reference_logps(model, batch, "train")
    assert torch.equal(first, second) and model.training
