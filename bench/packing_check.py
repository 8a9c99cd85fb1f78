"""Packed against padded log-probs, sequence by sequence, with a negative control that must fail the same check.

Packing is a layout change only: every sequence's summed completion log-prob must be what the padded batch
gives, up to the rounding of the compute dtype. `check_packing` computes each sequence's sum both ways and
holds every sequence to its own bound (`sequence_bound`: eps of the compute dtype times the sum over its
scored tokens of 2 max |logit| + |log-sum-exp|, derived in `token_bound_factor`), so a leak into one
sequence cannot hide in the sum over a batch; it reports the worst sequence (largest difference over its
bound).

The control: the same sequences in one packed row with their positions reset, but the sequence boundaries
withheld from the attention kernel (a causal mask over the whole row: an all-ones attention mask, and for
flash attention ``cu_seq_lens`` that span the whole row), so every sequence attends to the ones before it:
exactly what a backend that ignores the packed mask but keeps the position resets computes. The check must
fail on it; if it does not, the check cannot see a leak on this model and says so (``passed`` is then False
whatever the packed layout gave).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spo_align.data.collate import IGNORE_INDEX, Layout, PairCollator, flash_boundaries
from spo_align.train.logps import batch_logps, batch_token_counts, head_logps, model_parts


def token_bound_factor(dtype: torch.dtype) -> float:
    """The machine epsilon of the compute dtype: a token's bound is this times its logit scale
    2 max_j |z_j| + |LSE(z)| (`logit_scales`); a sequence's, the sum over its scored tokens (`sequence_bound`).

    Derivation. A token's log-prob is z_t - LSE(z) over its logits z. Both layouts apply the same weights to
    the same tokens; only the order and blocking of the floating-point sums differ (a padded row adds masked
    keys that contribute exact zeros), so the two differ by rounding alone. Each layout rounds a computed
    value by at most u = eps / 2 relative, so two layouts differ by up to 2u = eps relative per value:
    - the logits: |dz_j| <= eps Z, with Z = max_j |z_j| (the head's input is stored in the compute dtype);
    - the log-sum-exp: its inputs move by at most eps Z (dLSE/dz = softmax(z) sums to 1), and its own
      value, a sum over the vocabulary (taken in fp32 or finer, so this term is generous in bf16), rounds
      by at most eps |LSE|;
    - the target logit: eps Z again.
    So |d log p_t| <= eps (2 Z + |LSE|). In fp32 (CPU) with Z and |LSE| near 25 (SmolLM2) that is 9e-6
    nats per token; in bf16 (GPU) 0.59. The roundings of the earlier layers, carried to the head, mostly
    cancel between tokens and are not counted; the tests and the GPU check report how much of the bound
    honest layouts use (the worst sequence's ratio). A leak changes what every leaking token attends to and
    moves its logits by a share of their size, not by eps: the control measures by how much.
    """
    return torch.finfo(dtype).eps


def sequence_bound(logit_scale: float, dtype: torch.dtype) -> float:
    """The largest packed-vs-padded difference allowed for a sequence whose scored tokens' logit scales
    2 max|z| + |LSE| sum to `logit_scale` (`logit_scales`)."""
    return token_bound_factor(dtype) * logit_scale


def logit_scales(model: nn.Module, batch: dict[str, Any], chunk_size: int = 512) -> torch.Tensor:
    """Per sequence of a padded batch, the sum over its scored tokens of 2 max_j |z_j| + |LSE(z)|, from its
    fp32 logits [2B] (fp64)."""
    parts = model_parts(model)
    hidden = parts.decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    mask = batch["labels"] != IGNORE_INDEX
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    scored = hidden[mask]
    weight = parts.lm_head.weight.float()
    scales = [scored.new_zeros(0, dtype=torch.float32)]
    for i in range(0, scored.shape[0], chunk_size):
        logits = F.linear(scored[i : i + chunk_size].float(), weight)
        scales.append(2 * logits.abs().amax(-1) + torch.logsumexp(logits, -1).abs())
    return torch.zeros(mask.shape[0], dtype=torch.float64, device=mask.device).index_add(
        0, rows, torch.cat(scales).double()
    )


@dataclass(frozen=True)
class SequenceComparison:
    """One layout's summed log-probs against the padded layout's, sequence by sequence."""

    diffs: list[float]
    bounds: list[float]
    tokens: list[int]
    logit_scales: list[float]
    finite: bool

    @property
    def worst(self) -> int:
        """Index of the sequence with the largest difference relative to its bound."""
        return max(range(len(self.diffs)), key=lambda i: self.diffs[i] / max(self.bounds[i], 1e-300))

    @property
    def passed(self) -> bool:
        return self.finite and all(d <= b for d, b in zip(self.diffs, self.bounds))

    def summary(self, labels: Sequence[str] | None = None) -> dict[str, Any]:
        w = self.worst
        return {
            "passed": self.passed,
            "finite": self.finite,
            "sequences_over_bound": sum(d > b for d, b in zip(self.diffs, self.bounds)),
            "worst": {
                "sequence": labels[w] if labels is not None else w,
                "abs_diff": self.diffs[w],
                "bound": self.bounds[w],
                "ratio": self.diffs[w] / max(self.bounds[w], 1e-300),
                "tokens": self.tokens[w],
                "mean_logit_scale": self.logit_scales[w] / max(self.tokens[w], 1),
                "abs_diff_per_token": self.diffs[w] / max(self.tokens[w], 1),
            },
            "max_abs_diff": max(self.diffs),
            "max_abs_diff_per_token": max(d / max(n, 1) for d, n in zip(self.diffs, self.tokens)),
        }


def compare_sequences(
    candidate: Sequence[float],
    padded: Sequence[float],
    tokens: Sequence[int],
    logit_scale: Sequence[float],
    dtype: torch.dtype,
) -> SequenceComparison:
    """Per-sequence |candidate - padded| against `sequence_bound` (non-finite values fail)."""
    finite = all(math.isfinite(x) for x in list(candidate) + list(padded))
    diffs = [abs(a - b) if math.isfinite(a - b) else math.inf for a, b in zip(candidate, padded, strict=True)]
    bounds = [sequence_bound(z, dtype) for z in logit_scale]
    return SequenceComparison(diffs, bounds, list(tokens), list(logit_scale), finite)


def leaking_logps(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The control: a ``packed_single_row`` batch forwarded with its positions reset but its boundaries
    withheld (all-ones attention mask; for flash attention, ``cu_seq_lens`` spanning the whole row), so each
    sequence attends to the sequences before it in the row. Summed log-probs per sequence, like `batch_logps`."""
    if "cu_seq_lens_q" not in batch:
        raise ValueError("the leaking control needs a packed_single_row batch")
    parts = model_parts(model)
    ids = batch["input_ids"]
    whole_row = {
        k: v.to(ids.device) if isinstance(v, torch.Tensor) else v for k, v in flash_boundaries([ids.shape[1]]).items()
    }
    hidden = parts.decoder(
        input_ids=ids,
        position_ids=batch["position_ids"],
        attention_mask=torch.ones_like(ids),
        use_cache=False,
        **whole_row,
    ).last_hidden_state
    return head_logps(
        parts.lm_head,
        hidden,
        batch["labels"],
        segment_ids=batch["segment_ids"],
        num_segments=2 * int(batch["pair_index"].shape[0]),
    )


class _BoundaryProbe:
    """Records whether every self-attention call of a forward received the batch's flash boundaries."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        self.handles = [
            m.register_forward_pre_hook(self._record, with_kwargs=True)
            for name, m in model.named_modules()
            if name.endswith("self_attn")
        ]

    def _record(self, _module: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        self.calls.append({k: kwargs.get(k) for k in ("cu_seq_lens_q", "max_length_q")})

    def received(self, batch: dict[str, Any]) -> bool:
        want = batch["cu_seq_lens_q"].cpu()
        return bool(self.calls) and all(
            c["cu_seq_lens_q"] is not None and torch.equal(c["cu_seq_lens_q"].cpu(), want)
            and c["max_length_q"] == batch["max_length_q"]
            for c in self.calls
        )

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _to(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _sequence_labels(features: Sequence[dict[str, Any]]) -> list[str]:
    idx = [int(f.get("pair_index", i)) for i, f in enumerate(features)]
    return [f"pair {i} chosen" for i in idx] + [f"pair {i} rejected" for i in idx]


def check_packing(
    model: nn.Module,
    features: Sequence[dict[str, Any]],
    *,
    pad_token_id: int,
    layout: Layout,
    pack_length: int | None = None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Run `features` padded, in `layout`, and in the leaking control, micro-batch by micro-batch; compare
    each sequence's summed log-prob with the padded one. ``passed``: the layout is within every sequence's
    bound and the control is not (``control_failed``). A control within bound is reported as the failure
    it is: the check could not have seen a leak."""
    dtype = next(model.parameters()).dtype
    padded_c = PairCollator(pad_token_id, "padded")
    packed_c = PairCollator(pad_token_id, layout, pack_length=pack_length)
    control_c = PairCollator(pad_token_id, "packed_single_row")
    padded: list[float] = []
    packed: list[float] = []
    control: list[float] = []
    tokens: list[int] = []
    scales: list[float] = []
    labels: list[str] = []
    boundaries_received: bool | None = None
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            chunk = features[start : start + batch_size]
            base = _to(padded_c(chunk), device)
            padded += batch_logps(model, base).double().cpu().tolist()
            tokens += batch_token_counts(base).cpu().tolist()
            scales += logit_scales(model, base).cpu().tolist()
            labels += _sequence_labels(chunk)
            batch = _to(packed_c(chunk), device)
            probe = _BoundaryProbe(model) if "cu_seq_lens_q" in batch else None
            try:
                packed += batch_logps(model, batch).double().cpu().tolist()
            finally:
                if probe is not None:
                    probe.close()
            if probe is not None:
                boundaries_received = probe.received(batch) and boundaries_received is not False
            control += leaking_logps(model, _to(control_c(chunk), device)).double().cpu().tolist()
    packed_cmp = compare_sequences(packed, padded, tokens, scales, dtype)
    control_cmp = compare_sequences(control, padded, tokens, scales, dtype)
    control_failed = not control_cmp.passed
    passed = packed_cmp.passed and control_failed and boundaries_received is not False
    problems = []
    if not packed_cmp.passed:
        w = packed_cmp.summary(labels)["worst"]
        problems.append(
            f"packed ({layout}) {w['sequence']} differs from padded by {w['abs_diff']:.3g} nats, over its bound "
            f"{w['bound']:.3g} ({w['tokens']} tokens)"
        )
    if not control_failed:
        problems.append(
            "the leaking control PASSED the check: sequences that attend to each other were not told apart from "
            "padded ones, so this check cannot see a leak on this model"
        )
    if boundaries_received is False:
        problems.append("the attention calls did not receive the collator's cu_seq_lens / max_length")
    return {
        "layout": layout,
        "dtype": str(dtype).removeprefix("torch."),
        "bound_per_unit_logit": token_bound_factor(dtype),
        "mean_logit_scale": sum(scales) / max(sum(tokens), 1),
        "sequences": len(tokens),
        "scored_tokens": sum(tokens),
        "packed_vs_padded": packed_cmp.summary(labels),
        "control_vs_padded": control_cmp.summary(labels),
        "control_failed": control_failed,
        "boundaries_received": boundaries_received,
        "passed": passed,
        "problems": problems,
        "logps": {"padded": padded, "packed": packed, "control": control, "tokens": tokens, "logit_scales": scales},
    }


# Four short chat pairs whose answers differ in length and wording: the real model's packing check runs on them
# (tests/train/test_packing_check.py and bench/packing_errors.py), each rendered with the model's own template.
CHAT_PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris, a city on the Seine.", "France's capital is Lyon."),
    (
        "Give me a tip for sleeping better.",
        "Keep a regular schedule: go to bed and get up at the same time every day, even at weekends.",
        "Drink coffee before bed.",
    ),
    ("Translate 'good morning' into Spanish.", "Buenos días.", "Buenas noches, which is what you say in the evening."),
    (
        "Why is the sky blue?",
        "Air molecules scatter short (blue) wavelengths of sunlight far more than long (red) ones.",
        "Because it reflects the ocean.",
    ),
]


def chat_features(tokenizer: Any) -> list[dict[str, Any]]:
    """`CHAT_PAIRS` tokenized as preference pairs with `tokenizer`'s chat template, in collator features."""
    from spo_align.data.tokenize import tokenize_pair

    features = []
    for i, (prompt, chosen, rejected) in enumerate(CHAT_PAIRS):
        pair = tokenize_pair(tokenizer, [{"role": "user", "content": prompt}], chosen, rejected)
        features.append(
            {"prompt_ids": pair.prompt_ids, "chosen_ids": pair.chosen_ids, "rejected_ids": pair.rejected_ids,
             "pair_index": i}
        )
    return features
