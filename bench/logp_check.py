"""Packed against padded log-probs on the device, in the run's dtype, with an fp32 reference beside them.

Packing is a layout change only: every sequence's summed completion log-prob must be what the padded
batch gives. In bf16 the two layouts multiply matrices of different shapes, so their roundings differ;
the check states its tolerance (largest relative difference of a sequence's summed log-prob) and shows,
beside it, how far each bf16 layout is from the same model in fp32 (padded, sdpa): the size of bf16's own
rounding, which a packing error would stand far above.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from bench.config import GpuCheck, Workload

logger = logging.getLogger(__name__)


def _features(tokenizer: Any, pairs_path: Path, n: int) -> list[dict[str, Any]]:
    from spo_align.data.tokenize import tokenize_pair

    features = []
    with Path(pairs_path).open(encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if index >= n:
                break
            row = json.loads(line)
            pair = tokenize_pair(tokenizer, row["prompt"], row["chosen"][0]["content"], row["rejected"][0]["content"])
            features.append(
                {
                    "prompt_ids": pair.prompt_ids,
                    "chosen_ids": pair.chosen_ids,
                    "rejected_ids": pair.rejected_ids,
                    "pair_index": index,
                }
            )
    return features


def _logps(model: Any, features: list[dict[str, Any]], collator: Any, batch: int, device: str) -> list[float]:
    """Summed completion log-probs, micro-batch by micro-batch, in pair order (chosen, then rejected)."""
    import torch

    from spo_align.train.logps import batch_logps

    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(features), batch):
            collated = collator(features[start : start + batch])
            moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collated.items()}
            out.extend(float(x) for x in batch_logps(model, moved).double().cpu())
    return out


def _compare(a: list[float], b: list[float], tokens: list[int]) -> dict[str, float]:
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
    return {
        "max_relative": max(d / max(abs(y), 1e-12) for d, y in zip(diffs, b)),
        "max_abs": max(diffs),
        "max_abs_per_token": max(d / max(n, 1) for d, n in zip(diffs, tokens)),
    }


def _scored_tokens(features: list[dict[str, Any]], batch: int) -> list[int]:
    """Completion tokens of each sequence, in the order `_logps` returns them (per micro-batch: chosen, rejected)."""
    out: list[int] = []
    for start in range(0, len(features), batch):
        chunk = features[start : start + batch]
        out.extend(len(f["chosen_ids"]) for f in chunk)
        out.extend(len(f["rejected_ids"]) for f in chunk)
    return out


def run_logp_check(work: Workload, check: GpuCheck, attention: str, model_dir: Path, pairs_path: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spo_align.data.collate import PairCollator, choose_layout
    from spo_align.recipe.resolve import default_pack_length

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    features = _features(tokenizer, pairs_path, check.check_pairs)
    batch = work.pairs_per_device
    packed_layout = choose_layout(True, attention, device)
    pack_length = work.pack_length or default_pack_length(work.lengths.max_length, device)
    padded = PairCollator(tokenizer.pad_token_id, "padded")
    packed = PairCollator(tokenizer.pad_token_id, packed_layout, pack_length=pack_length)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, work.dtype), attn_implementation=attention)
    model.to(device).eval()
    run_padded = _logps(model, features, padded, batch, device)
    run_packed = _logps(model, features, packed, batch, device)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    reference.to(device).eval()
    run_fp32 = _logps(reference, features, padded, batch, device)
    del reference

    tokens = _scored_tokens(features, batch)
    packed_vs_padded = _compare(run_packed, run_padded, tokens)
    finite = all(math.isfinite(x) for x in run_padded + run_packed + run_fp32)
    return {
        "attention": attention,
        "dtype": work.dtype,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "layout": packed_layout,
        "pack_length": pack_length,
        "pairs": len(features),
        "sequences": len(tokens),
        "scored_tokens": sum(tokens),
        "tolerance": check.logp_tolerance,
        "packed_vs_padded": packed_vs_padded,
        "padded_vs_fp32": _compare(run_padded, run_fp32, tokens),
        "packed_vs_fp32": _compare(run_packed, run_fp32, tokens),
        "finite": finite,
        "passed": finite and packed_vs_padded["max_relative"] <= check.logp_tolerance,
        "logps": {"padded": run_padded, "packed": run_packed, "fp32_padded": run_fp32},
    }
