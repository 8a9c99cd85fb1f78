"""Generation: batched left-padded greedy decoding through the chat template, LoRA outputs, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spo_align.eval.generate import (
    GenerationSettings,
    ModelSpec,
    generate,
    load_prompts,
    parse_model_spec,
)
from spo_align.eval.records import EvalInputError, PromptRow, read_generation_file

PROMPTS = [
    PromptRow("p1", "23+58=", "81"),
    PromptRow("p2", "7+1=", "8"),
    PromptRow("p3", "what is ten plus ninety nine?", None),
    PromptRow("p4", "1+1=", "2"),
    PromptRow("p5", "99+99=", "198"),
]


def _one_by_one(model_dir: Path | str, prompts: list[PromptRow], max_new_tokens: int, model=None) -> list[str]:
    """Reference decoding: one prompt at a time, no padding, straight `model.generate`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = model or AutoModelForCausalLM.from_pretrained(model_dir)
    out = []
    for row in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": row.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = GenerationSettings(max_new_tokens=6, batch_size=3)
    [path] = generate([ModelSpec(str(tiny_model_dir), "tiny")], PROMPTS, settings, tmp_path)
    assert path == tmp_path / "tiny.jsonl"
    records = read_generation_file(path)
    assert [r.prompt_id for r in records] == ["p1", "p2", "p3", "p4", "p5"]
    assert [r.response for r in records] == _one_by_one(tiny_model_dir, PROMPTS, 6)
    assert any(r.response for r in records)
    assert records[0].reference == "81" and records[2].reference is None
    assert records[0].settings["max_new_tokens"] == 6 and records[0].settings["temperature"] == 0.0
    assert records[0].settings["model_path"] == str(tiny_model_dir)
    assert "reference" not in json.loads(path.read_text().splitlines()[2])


def test_complete_output_is_skipped_and_changed_settings_regenerate(tiny_model_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec(str(tiny_model_dir), "tiny")
    settings = GenerationSettings(max_new_tokens=3, batch_size=5)
    generate([spec], PROMPTS, settings, tmp_path)
    calls = []
    import spo_align.eval.generate as gen_module

    real = gen_module._generate_transformers
    monkeypatch.setattr(gen_module, "_generate_transformers", lambda *a: calls.append(a) or real(*a))
    generate([spec], PROMPTS, settings, tmp_path)
    assert calls == []
    generate([spec], PROMPTS, GenerationSettings(max_new_tokens=4, batch_size=5), tmp_path)
    assert len(calls) == 1
    assert read_generation_file(tmp_path / "tiny.jsonl")[0].settings["max_new_tokens"] == 4


def test_seeded_sampling_is_reproducible(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = ModelSpec(str(tiny_model_dir), "tiny")
    settings = GenerationSettings(max_new_tokens=6, batch_size=5, temperature=1.0, seed=3)
    first = read_generation_file(generate([spec], PROMPTS, settings, tmp_path / "a")[0])
    second = read_generation_file(generate([spec], PROMPTS, settings, tmp_path / "b")[0])
    assert [r.response for r in first] == [r.response for r in second]


def test_lora_output_loads_on_top_of_its_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    adapter_dir = tmp_path / "lora_out"
    peft_model.save_pretrained(adapter_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)

    spec = parse_model_spec(f"{adapter_dir}=lora")
    assert spec.is_lora
    settings = GenerationSettings(max_new_tokens=6, batch_size=2)
    lora, base = generate([spec, ModelSpec(str(tiny_model_dir), "base")], PROMPTS, settings, tmp_path / "gen")
    lora_answers = [r.response for r in read_generation_file(lora)]
    merged = peft_model.merge_and_unload()
    assert lora_answers == _one_by_one(tiny_model_dir, PROMPTS, 6, model=merged)
    assert lora_answers != [r.response for r in read_generation_file(base)]


def test_model_spec_parsing() -> None:
    assert parse_model_spec("runs/sft") == ModelSpec("runs/sft", "sft")
    assert parse_model_spec("runs/sft/=base") == ModelSpec("runs/sft/", "base")
    assert parse_model_spec("Qwen/Qwen2.5-0.5B-Instruct").name == "Qwen2.5-0.5B-Instruct"
    with pytest.raises(EvalInputError, match="model name"):
        parse_model_spec("runs/x=bad name")
    with pytest.raises(EvalInputError, match="unique"):
        generate([ModelSpec("a", "m"), ModelSpec("b", "m")], PROMPTS, GenerationSettings(), Path("unused"))


def test_prompt_jsonl_reading_and_errors_with_line_numbers(tmp_path: Path) -> None:
    good = tmp_path / "prompts.jsonl"
    good.write_text('{"id": 1, "prompt": "2+2=", "reference": 4}\n\n{"id": "b", "prompt": "hi"}\n{"id": 3, "prompt": "x"}\n')
    assert load_prompts(str(good)) == [PromptRow("1", "2+2=", "4"), PromptRow("b", "hi", None), PromptRow("3", "x", None)]
    assert len(load_prompts(str(good), n=2)) == 2
    cases = {
        '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n': ":2: duplicate id '1' (first on line 1)",
        '{"prompt": "a"}\n': ":1: missing 'id'",
        '{"id": 1, "prompt": ""}\n': ":1: 'prompt' must be a non-empty string",
        '{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "b"\n': ":2: not valid JSON",
        '[1, 2]\n': ":1: each line must be a JSON object",
        "": "no prompts",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(EvalInputError) as info:
            load_prompts(str(bad))
        assert message in str(info.value)
    with pytest.raises(EvalInputError, match="file not found"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_settings_are_checked() -> None:
    for bad in ({"max_new_tokens": 0}, {"batch_size": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"engine": "tgi"},
                {"dtype": "int4"}):
        with pytest.raises(EvalInputError):
            GenerationSettings(**bad)


def test_dataset_source_uses_prompt_and_prompt_id_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub path (`NAME[:SPLIT]`), exercised offline with a local dataset laid out like
    ultrafeedback_binarized (the hub itself is out of reach in tests)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    data = tmp_path / "ufb" / "data"
    data.mkdir(parents=True)
    rows = [{"prompt": f"question {i}", "prompt_id": f"id{i}", "score_chosen": 8.0} for i in range(5)]
    (data / "test_prefs-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "train_prefs-00000-of-00001.jsonl").write_text(json.dumps(rows[0] | {"prompt": "other"}) + "\n")
    prompts = load_prompts(f"{tmp_path / 'ufb'}:test_prefs", n=3)
    assert prompts == [PromptRow(f"id{i}", f"question {i}") for i in range(3)]

    other = tmp_path / "other" / "data"
    other.mkdir(parents=True)
    (other / "test-00000-of-00001.jsonl").write_text(json.dumps({"text": "q"}) + "\n")
    with pytest.raises(EvalInputError, match="has no 'prompt' column"):
        load_prompts(str(tmp_path / "other"))  # split defaults to `test`


def test_vllm_engine_is_optional(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without vllm the engine is a clear error; with it (a stand-in module here, vllm is not installed in
    tests) prompts go in as chat-templated token ids and answers come back in prompt order."""
    import sys
    import types

    settings = GenerationSettings(engine="vllm", max_new_tokens=4)
    spec = ModelSpec(str(tiny_model_dir), "tiny")
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(EvalInputError, match="needs the vllm package"):
        generate([spec], PROMPTS, settings, tmp_path / "a")

    seen: dict[str, object] = {}

    class LLM:
        def __init__(self, model: str, **kwargs: object) -> None:
            seen["model"], seen["kwargs"] = model, kwargs

        def generate(self, inputs: list[dict], params: object, lora_request: object = None) -> list[object]:
            seen["inputs"], seen["params"] = inputs, params
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"answer {i}")]) for i in range(len(inputs))]

    fake = types.ModuleType("vllm")
    fake.LLM = LLM  # type: ignore[attr-defined]
    fake.SamplingParams = lambda **kw: kw  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    [path] = generate([spec], PROMPTS, settings, tmp_path / "b")
    assert [r.response for r in read_generation_file(path)] == [f"answer {i}" for i in range(len(PROMPTS))]
    assert seen["model"] == str(tiny_model_dir) and seen["kwargs"] == {"dtype": "auto", "seed": 0}
    assert seen["params"] == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 4, "seed": 0}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    first = seen["inputs"][0]["prompt_token_ids"]  # type: ignore[index]
    assert tok.decode(first) == "<u>23+58=<a>"
