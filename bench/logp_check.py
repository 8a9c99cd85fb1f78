"""Packed against padded log-probs on the device, in the run's dtype, sequence by sequence, with the leaking
control and an fp32 reference beside them.

The random-weight bench model is first re-drawn at unit gain (`context_sensitive`): at the default init a
leak moves log-probs by about one bf16 rounding and no check could see it. Then
`bench.packing_check.check_packing` does the comparison: every sequence's summed completion
log-prob in the layout the kernel selects (packed_batch for sdpa/flex, packed_single_row with the collator's
cu_seq_lens for flash_attention_2) against the padded batch, each within its own bound derived from the
dtype (`packing_check.token_bound_factor`), and the leaking control (positions reset, boundaries withheld)
that must fail the same check. Beside it, how far each layout is from the same model in fp32 (padded,
sdpa): the size of the dtype's own rounding, for the reader.
"""

from __future__ import annotations

import json
import logging
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


def context_sensitive(model: Any, seed: int = 0) -> Any:
    """Re-draw the weights of a random model at unit gain, in place, so that its predictions depend on the
    context: every linear weight from N(0, 1 / fan_in), embeddings from N(0, 1), norms left at 1.

    At transformers' default init (std 0.02) attention is near uniform, each layer adds little to the
    residual stream and the logits are near zero, so what a token attends to barely moves its log-prob: a
    leaking layout then moves it by about one bf16 rounding (measured on the toy shape in bf16: the leaking
    control at 0.6 of its bound, so the check could not see a leak). At unit gain the attention logits and
    each layer's contribution are O(1) whatever the width, and a leak moves a token's logits by a share of
    their size. Packing must leave any weights' log-probs unchanged, so the check loses nothing."""
    import torch

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)

    def draw(shape: torch.Size) -> torch.Tensor:  # fp32 draws, so a bf16 model and its fp32 twin get the same
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(draw(module.weight.shape) / module.weight.shape[1] ** 0.5)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.Embedding):
                module.weight.copy_(draw(module.weight.shape))
    return model


def _padded_logps(model: Any, features: list[dict[str, Any]], collator: Any, batch: int, device: str) -> list[float]:
    """Summed completion log-probs, micro-batch by micro-batch, in `check_packing`'s order (per micro-batch:
    chosen, then rejected)."""
    import torch

    from spo_align.train.logps import batch_logps

    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(features), batch):
            collated = collator(features[start : start + batch])
            moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collated.items()}
            out.extend(float(x) for x in batch_logps(model, moved).double().cpu())
    return out


def _per_token(a: list[float], b: list[float], tokens: list[int]) -> dict[str, float]:
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
    return {"max_abs": max(diffs), "max_abs_per_token": max(d / max(n, 1) for d, n in zip(diffs, tokens))}


def run_logp_check(work: Workload, check: GpuCheck, attention: str, model_dir: Path, pairs_path: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.packing_check import check_packing
    from spo_align.data.collate import PairCollator, choose_layout
    from spo_align.recipe.resolve import default_pack_length

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    features = _features(tokenizer, pairs_path, check.check_pairs)
    batch = work.pairs_per_device
    packed_layout = choose_layout(True, attention, device)
    pack_length = work.pack_length or default_pack_length(work.lengths.max_length, device)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, work.dtype), attn_implementation=attention)
    context_sensitive(model.to(device).eval())
    result = check_packing(
        model, features, pad_token_id=tokenizer.pad_token_id, layout=packed_layout, pack_length=pack_length,
        batch_size=batch, device=device,
    )
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    context_sensitive(reference.to(device).eval())
    run_fp32 = _padded_logps(reference, features, PairCollator(tokenizer.pad_token_id, "padded"), batch, device)
    del reference
    for problem in result["problems"]:
        logger.error("log-prob check (%s, %s): %s", attention, packed_layout, problem)
    logps = result["logps"]
    return {
        **result,
        "attention": attention,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "pack_length": pack_length,
        "pairs": len(features),
        "padded_vs_fp32": _per_token(logps["padded"], run_fp32, logps["tokens"]),
        "packed_vs_fp32": _per_token(logps["packed"], run_fp32, logps["tokens"]),
        "logps": {**logps, "fp32_padded": run_fp32},
    }
