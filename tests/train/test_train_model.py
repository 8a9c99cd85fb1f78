"""Model set-up: tiny: paths, local paths, attention/dtype resolution, refusals before any weights load, LoRA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from spo_align.train import model as model_mod
from spo_align.train.model import (
    ModelSetupError,
    apply_adapter,
    load_model,
    load_tokenizer,
    resolve_attention,
    resolve_dtype,
    resolve_model_path,
)


@pytest.fixture
def no_weights_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything reaches from_pretrained."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called before the set-up check")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_tiny_prefix_materialises_the_embedded_model_in_the_cache_and_reuses_it():
    path = Path(resolve_model_path("tiny:arith"))
    assert path.parent.parent == Path(os.environ["SPO_ALIGN_CACHE"])
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()
    mtime = (path / "config.json").stat().st_mtime
    assert Path(resolve_model_path("tiny:arith")) == path
    assert (path / "config.json").stat().st_mtime == mtime


def test_bad_tiny_name_is_refused():
    with pytest.raises(ModelSetupError, match="tiny:<name>"):
        resolve_model_path("tiny:../x")


def test_relative_local_model_path_resolves_against_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("m") == str((tmp_path / "m").resolve())
    assert resolve_model_path("org/hub-model") == "org/hub-model"


def test_cpu_defaults_are_float32_and_sdpa(plan_for):
    plan = plan_for("spo", "model.dtype=auto")
    assert resolve_dtype(plan) == torch.float32
    assert resolve_attention(plan) == "sdpa"
    assert resolve_attention(plan_for("spo", "model.attention=eager")) == "eager"


def test_flash_attention_where_it_cannot_run_is_refused_before_loading(plan_for, no_weights_loaded):
    plan = plan_for("spo", "model.attention=flash_attention_2", "model.dtype=bfloat16")
    with pytest.raises(ModelSetupError, match="flash_attention_2 cannot run here: it needs a CUDA GPU"):
        load_model(plan)


def test_auto_attention_on_cuda_picks_flash_only_when_flash_attn_is_importable(
    plan_for, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(model_mod, "cuda_available", lambda: True)
    plan = plan_for("spo", "model.attention=auto", "model.dtype=auto")
    assert resolve_dtype(plan) == torch.bfloat16
    monkeypatch.setattr(model_mod.importlib.util, "find_spec", lambda name: None)
    assert resolve_attention(plan) == "sdpa"
    with pytest.raises(ModelSetupError, match="flash-attn package is not installed"):
        resolve_attention(plan_for("spo", "model.attention=flash_attention_2", "model.dtype=bfloat16"))
    monkeypatch.setattr(model_mod.importlib.util, "find_spec", lambda name: object())
    assert resolve_attention(plan) == "flash_attention_2"


def test_qlora_without_cuda_is_refused_before_loading(plan_for, no_weights_loaded):
    plan = plan_for("spo", "adapter.type=qlora", "model.dtype=bfloat16")
    with pytest.raises(ModelSetupError, match="qlora needs a CUDA GPU"):
        load_model(plan)


def test_trust_remote_code_is_off_unless_the_recipe_says_so(plan_for, monkeypatch: pytest.MonkeyPatch):
    from transformers import AutoModelForCausalLM

    seen: list[dict] = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.append(kwargs)
        return original(path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(plan_for("spo"))
    load_model(plan_for("spo", "model.trust_remote_code=true"))
    assert [k["trust_remote_code"] for k in seen] == [False, True]
    assert seen[0]["attn_implementation"] == "sdpa" and seen[0]["dtype"] == torch.float32


def test_reference_load_is_frozen_and_lora_trains_only_the_adapter(plan_for):
    plan = plan_for("spo", "adapter.r=4")
    reference = load_model(plan, for_training=False)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    policy = apply_adapter(load_model(plan), plan)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_an_adapter_only_folder_loads_merged_onto_its_base(plan_for, tmp_path: Path):
    plan = plan_for("spo", "adapter.r=4")
    policy = apply_adapter(load_model(plan), plan)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    policy.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 6, 7]])
    expected = policy.eval()(ids).logits
    merged = load_model(plan_for("spo"), str(tmp_path / "adapter"))
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_tokenizer_gets_the_recipe_chat_template(plan_for):
    template = "'{% for m in messages %}{{ m.content }}{% endfor %}'"
    tokenizer = load_tokenizer(plan_for("spo", f"model.chat_template={template}"))
    assert tokenizer.chat_template == template.strip("'")
    assert tokenizer.pad_token is not None
