"""Executed floating-point operations of a bench run, counted from what the forwards and backwards ran.

Counted: the matrix products of the decoder's linear layers (LoRA's two small products included) over every
token slot a forward processed (padding included: it runs), attention's two products (scores and weighted
values, 2 x head_dim per score entry and head each) over the score entries the layout makes the kernel
compute (padded with a mask: rows x width^2; packed per sequence: each causal triangle), and the LM head
(2 x hidden x vocab per token it is applied to: the scored tokens for spo's chunked head, every slot for
TRL's). Not counted: norms, rotary embeddings, softmax and other element-wise work (a few percent).

A step is the policy's forward, its backward and the reference's forward. Backward: products with a trained
weight cost twice their forward (input and weight gradients); with frozen weights (LoRA's base, the tied
head under LoRA) once (input gradient only); attention's backward twice its forward. spo's chunked head
recomputes its logits in the backward: one more head forward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spo_align.recipe.model_shapes import ModelShape, shape_from_config


def model_shape(folder: Path) -> ModelShape:
    """The shape of the model in `folder` (its config.json), as the recipe's memory estimate reads it."""
    config = Path(folder) / "config.json"
    return shape_from_config(json.loads(config.read_text(encoding="utf-8")), str(config))


def _linear_weights(shape: ModelShape, lora_r: int | None) -> tuple[int, int]:
    """(weights of the decoder's linear layers, weights of a LoRA adapter of rank `lora_r` on all of them)."""
    base = shape.num_layers * sum(fan_in * fan_out for fan_in, fan_out in shape.linears().values())
    return base, shape.lora_params(lora_r, "all-linear") if lora_r else 0


def executed_flops(shape: ModelShape, run: dict[str, Any], *, engine: str, lora_r: int | None) -> dict[str, float]:
    """FLOPs of the run's trained batches (`run`: a bench result with token_slots, labelled_tokens and
    score_entries), by term, and their total. A precomputed reference (variant packed_precompute) runs
    before the loop: its forward is not part of the loop's work."""
    slots = float(run["token_slots"])
    head_tokens = slots if engine == "trl" else float(run["labelled_tokens"])
    linear_weights, adapter_weights = _linear_weights(shape, lora_r)
    base = 2.0 * linear_weights * slots
    lora = 2.0 * adapter_weights * slots
    attention = 4.0 * shape.num_layers * shape.num_heads * shape.head_dim * float(run["score_entries"])
    head = 2.0 * shape.hidden_size * shape.vocab_size * head_tokens
    forward = base + lora + attention + head
    grad = 1.0 if lora_r else 2.0  # frozen base and head: input gradients only; trained: input and weight
    backward = grad * base + 2.0 * lora + 2.0 * attention + grad * head
    recompute = head if engine != "trl" else 0.0
    reference = base + attention + head  # live reference (adapter off under LoRA): one forward, no gradient
    if run.get("variant") == "packed_precompute":
        reference = 0.0
    return {
        "forward": forward,
        "backward": backward,
        "head_recompute": recompute,
        "reference": reference,
        "attention_all": 3.0 * attention + (attention if reference else 0.0),
        "head_all": (1.0 + grad) * head + recompute + (head if reference else 0.0),
        "total": forward + backward + recompute + reference,
    }
