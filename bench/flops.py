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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Dims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @staticmethod
    def from_config(config: dict[str, Any]) -> Dims:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return Dims(
            hidden=hidden,
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
        )

    @staticmethod
    def from_folder(folder: Path) -> Dims:
        return Dims.from_config(json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")))

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes())

    def lora_params(self, r: int) -> int:
        return self.layers * sum(r * (a + b) for a, b in self.linear_shapes())


def executed_flops(dims: Dims, run: dict[str, Any], *, engine: str, lora_r: int | None) -> dict[str, float]:
    """FLOPs of the run's trained batches (`run`: a bench result with token_slots, labelled_tokens and
    score_entries), by term, and their total. A precomputed reference (variant packed_precompute) runs
    before the loop: its forward is not part of the loop's work."""
    slots = float(run["token_slots"])
    head_tokens = slots if engine == "trl" else float(run["labelled_tokens"])
    base = 2.0 * dims.linear_params() * slots
    lora = 2.0 * dims.lora_params(lora_r) * slots if lora_r else 0.0
    attention = 4.0 * dims.layers * dims.heads * dims.head_dim * float(run["score_entries"])
    head = 2.0 * dims.hidden * dims.vocab * head_tokens
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
