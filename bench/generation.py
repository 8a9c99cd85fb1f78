"""Generation speed of `spo eval generate` on the bench model: greedy answers to the workload's prompts.

The call timed is `spo_align.eval.generate.generate`, the function the command runs (model load, chat
template, left-padded batches, decode, answer files). A first, short call warms the device up (CUDA
context, kernels); then `rounds` calls are timed, each writing its own answer files. The model load
inside each call is timed apart once, so the reader sees its share.

A random-weight model may emit EOS at any step, or special tokens that the decoded answers leave out, so
neither the answers nor the step count say how many tokens were generated. The generation runs therefore
read the bench model through a folder of links to its files whose `generation_config.json` sets
`min_new_tokens` to the cap: every row then generates exactly `max_new_tokens` tokens (transformers keeps
EOS from being chosen before that), and the count is prompts x max_new_tokens by construction.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.clock import sync_device
from bench.config import GpuCheck, Workload


def _prompts(pairs_path: Path, n: int) -> list[Any]:
    from spo_align.eval.records import PromptRow

    rows = [json.loads(line) for line in Path(pairs_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{pairs_path}: no pairs to take prompts from")
    return [PromptRow(str(i), rows[i % len(rows)]["prompt"][0]["content"]) for i in range(n)]


def full_length_model(model_dir: Path, out_dir: Path, new_tokens: int) -> Path:
    """A folder of links to `model_dir`'s files whose generation config makes every row generate `new_tokens`."""
    from transformers import GenerationConfig

    model_dir = Path(model_dir).resolve()
    out = Path(out_dir) / "model-full-length"
    out.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        link = out / item.name
        if item.name != "generation_config.json" and not link.exists():
            link.symlink_to(item)
    try:
        config = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: start from the model config's defaults
        config = GenerationConfig()
    config.min_new_tokens = new_tokens
    config.save_pretrained(out)
    return out


def run_generation(work: Workload, check: GpuCheck, model_dir: Path, pairs_path: Path, out_dir: Path) -> dict[str, Any]:
    import torch

    from spo_align.eval.generate import GenerationSettings, ModelSpec, generate, load_model_and_tokenizer
    from spo_align.eval.records import read_generation_file

    out_dir = Path(out_dir)
    spec = ModelSpec(str(full_length_model(model_dir, out_dir, check.gen_new_tokens)), "bench")
    prompts = _prompts(pairs_path, check.gen_prompts)
    dtype = work.dtype if work.dtype in ("float32", "bfloat16", "float16") else "auto"
    settings = GenerationSettings(max_new_tokens=check.gen_new_tokens, batch_size=check.gen_batch, dtype=dtype)
    # The warm-up call is short: its rows stop at max_new_tokens before min_new_tokens matters.
    warmup = GenerationSettings(max_new_tokens=min(8, check.gen_new_tokens), batch_size=check.gen_batch, dtype=dtype)
    generate([spec], prompts[: check.gen_batch], warmup, out_dir / "warmup", skip_existing=False)

    began = time.perf_counter()
    model, _ = load_model_and_tokenizer(spec, dtype)
    sync_device()
    load_s = time.perf_counter() - began
    if model.generation_config.min_new_tokens != check.gen_new_tokens:
        raise RuntimeError("the generation model's min_new_tokens was not read: the token count would be wrong")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    rounds = []
    for index in range(check.gen_rounds):
        began = time.perf_counter()
        (path,) = generate([spec], prompts, settings, out_dir / f"round{index + 1}", skip_existing=False)
        sync_device()
        seconds = time.perf_counter() - began
        answered = len(read_generation_file(path))
        if answered != len(prompts):
            raise RuntimeError(f"{path}: {answered} answers for {len(prompts)} prompts")
        new_tokens = answered * check.gen_new_tokens
        rounds.append({"seconds": seconds, "new_tokens": new_tokens, "tokens_per_s": new_tokens / seconds})
    cuda = torch.cuda.is_available()
    return {
        "prompts": len(prompts),
        "batch_size": check.gen_batch,
        "max_new_tokens": check.gen_new_tokens,
        "greedy": settings.greedy,
        "dtype": dtype,
        "load_s": load_s,
        "rounds": rounds,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rounds),
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "cuda_peak_allocated_mb": torch.cuda.max_memory_allocated() / 1e6 if cuda else None,
    }
