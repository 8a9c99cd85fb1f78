"""Batch layouts for preference pairs: padded, or packed into rows with per-sequence positions.

A micro-batch of B pairs always holds 2B sequences, numbered chosen 0..B-1 then rejected B..2B-1, so the
losses see exactly the same per-pair tensors whatever the layout. Labels are already shifted
(``labels[t]`` is the token predicted from position t; -100 where nothing is scored), as
`spo_align.losses.sequence_logps` expects; only completion tokens are scored.

Layouts (`Layout`):
- ``padded``: ``[2B, L]`` right-padded to the longest sequence, with an attention mask. The baseline.
- ``packed_rows``: the pairs are laid into rows of at most ``pack_length`` tokens by best-fit decreasing
  (a pair is never split), and every row is forwarded on its own, unpadded. Each sequence's
  ``position_ids`` restart at 0 and no attention mask is passed, so transformers derives a per-sequence
  causal mask (sdpa/eager: `masking_utils.find_packed_sequence_indices`). The choice on CPU, where the
  preference stage switches sdpa to per-sequence attention without a mask (`train/logps`);
  with eager the packed mask is applied densely over a row, so short rows keep the wasted attention small.
  Nothing is padded. (Under ZeRO-3 ranks add one-token filler forwards so they all run as many: `logps`.)
- ``packed_batch``: rows padded to the longest row and stacked ``[R, L]`` for one forward: the choice for
  sdpa/eager on GPU, where one batched forward keeps the device busy. Since every row costs as much as
  the longest, the row capacity (at most ``pack_length``) is chosen to minimise R x L (`balanced_rows`).
  The padding tail of a row gets positions restarting at 0: a segment of its own, attended to by no one.
- ``packed_single_row``: all 2B sequences in one ``[1, total]`` row, for flash_attention_2, whose
  variable-length kernel computes within sequences only and wastes nothing. The collator also emits the
  sequence boundaries under the names transformers' flash-attention path reads from the forward's kwargs
  (`modeling_flash_attention_utils._flash_attention_forward`, `FlashAttentionKwargs`): ``cu_seq_lens_q`` =
  ``cu_seq_lens_k`` (int32 ``[2B + 1]``, the cumulative sequence lengths) and ``max_length_q`` =
  ``max_length_k`` (Python ints). Given all four, transformers calls the varlen kernel with them directly;
  without them it re-derives them from ``position_ids`` in every layer (`prepare_fa_kwargs_from_position_ids`,
  a nonzero() and a max() that each wait on the device). sdpa, eager and flex attention ignore them.
The flat tensors of ``packed_rows`` and ``packed_single_row`` are ``[1, total]``; ``row_lengths`` says
how to split them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from spo_align.data.packing import PairPacking, pack_pairs

Layout = Literal["padded", "packed_rows", "packed_batch", "packed_single_row"]
IGNORE_INDEX = -100


def choose_layout(packing: bool, attn_implementation: str | None, device_type: str) -> Layout:
    """Packing off -> padded; CUDA with flash_attention_2 -> one row per micro-batch; CUDA otherwise ->
    stacked rows (one batched forward keeps the GPU busy); CPU -> row by row (no padding, short dense masks)."""
    if not packing:
        return "padded"
    if device_type == "cuda":
        if attn_implementation is not None and attn_implementation.startswith("flash_attention"):
            return "packed_single_row"
        return "packed_batch"
    return "packed_rows"


def _sequences(features: Sequence[dict[str, Any]]) -> tuple[list[list[int]], list[int]]:
    """Token ids and prompt lengths of the 2B sequences (chosen first, then rejected)."""
    seqs: list[list[int]] = []
    prompt_lens: list[int] = []
    for key in ("chosen_ids", "rejected_ids"):
        for f in features:
            seqs.append(list(f["prompt_ids"]) + list(f[key]))
            prompt_lens.append(len(f["prompt_ids"]))
    return seqs, prompt_lens


def _shifted_labels(ids: list[int], prompt_len: int) -> list[int]:
    """labels[t] = ids[t + 1] where position t + 1 is a completion token, else IGNORE_INDEX."""
    return [ids[t + 1] if t + 1 >= prompt_len else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def _reference(features: Sequence[dict[str, Any]], out: dict[str, Any]) -> None:
    if "ref_chosen_logps" in features[0]:
        ref = [f["ref_chosen_logps"] for f in features] + [f["ref_rejected_logps"] for f in features]
        out["ref_logps"] = torch.tensor(ref, dtype=torch.float64)


@dataclass
class PairCollator:
    """Collate tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``pair_index``)."""

    pad_token_id: int
    layout: Layout = "padded"
    pack_length: int | None = None
    reset_positions: bool = True
    """Restart position_ids at every sequence. Only a control experiment turns this off (it must break)."""

    def __post_init__(self) -> None:
        if self.layout in ("packed_rows", "packed_batch") and self.pack_length is None:
            raise ValueError(f"the {self.layout} layout needs pack_length")

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        seqs, prompt_lens = _sequences(features)
        b = len(features)
        out: dict[str, Any] = {
            "pair_index": torch.tensor([int(f.get("pair_index", -1)) for f in features], dtype=torch.long),
            "num_real_tokens": torch.tensor(sum(len(s) for s in seqs), dtype=torch.long),
        }
        _reference(features, out)
        if self.layout == "padded":
            width = max(len(s) for s in seqs)
            ids = torch.full((2 * b, width), self.pad_token_id, dtype=torch.long)
            labels = torch.full((2 * b, width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((2 * b, width), dtype=torch.long)
            for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
                ids[i, : len(s)] = torch.tensor(s)
                labels[i, : len(s)] = torch.tensor(_shifted_labels(s, p))
                mask[i, : len(s)] = 1
            out.update(input_ids=ids, attention_mask=mask, labels=labels)
            return out

        if self.layout == "packed_single_row":
            rows = [list(range(b))]
        else:
            assert self.pack_length is not None
            chosen, rejected = [len(seqs[i]) for i in range(b)], [len(seqs[b + i]) for i in range(b)]
            if self.layout == "packed_batch":
                rows = balanced_rows(chosen, rejected, self.pack_length).rows
            else:
                rows = pack_pairs(chosen, rejected, self.pack_length).rows
        flat_ids: list[int] = []
        flat_pos: list[int] = []
        flat_labels: list[int] = []
        flat_seg: list[int] = []
        row_lengths: list[int] = []
        seq_lengths: list[int] = []
        for row in rows:
            start = len(flat_ids)
            for pair in row:
                for seq_index in (pair, b + pair):
                    s = seqs[seq_index]
                    flat_ids.extend(s)
                    flat_labels.extend(_shifted_labels(s, prompt_lens[seq_index]))
                    flat_seg.extend([seq_index] * len(s))
                    flat_pos.extend(range(len(s)))
                    seq_lengths.append(len(s))
            row_lengths.append(len(flat_ids) - start)
            if not self.reset_positions:
                flat_pos[start:] = range(len(flat_ids) - start)
        if self.layout == "packed_batch":
            out.update(_stack_rows(row_lengths, flat_ids, flat_pos, flat_labels, flat_seg, self.pad_token_id))
            return out
        out.update(
            input_ids=torch.tensor([flat_ids], dtype=torch.long),
            position_ids=torch.tensor([flat_pos], dtype=torch.long),
            labels=torch.tensor([flat_labels], dtype=torch.long),
            segment_ids=torch.tensor([flat_seg], dtype=torch.long),
            row_lengths=torch.tensor(row_lengths, dtype=torch.long),
        )
        if self.layout == "packed_single_row":
            # Without the position reset (the control) the row is one sequence, and the boundaries say so.
            out.update(flash_boundaries(seq_lengths if self.reset_positions else row_lengths))
        return out


FLASH_BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
"""The forward kwargs transformers' flash-attention path takes as the packed boundaries (self-attention: q = k)."""


def flash_boundaries(lengths: Sequence[int]) -> dict[str, Any]:
    """`FLASH_BOUNDARY_KEYS` for consecutive sequences of `lengths` in one row: cumulative lengths from 0
    as int32 (flash-attn's dtype for cu_seqlens) and the longest sequence as a Python int (no device sync)."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    cu_seq_lens = torch.tensor(cu, dtype=torch.int32)
    longest = max((int(n) for n in lengths), default=0)
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest, "max_length_k": longest}


def _stacked_cost(packing: PairPacking, chosen: Sequence[int], rejected: Sequence[int]) -> int:
    return len(packing.rows) * max(sum(chosen[i] + rejected[i] for i in row) for row in packing.rows)


def balanced_rows(chosen: Sequence[int], rejected: Sequence[int], pack_length: int) -> PairPacking:
    """Pair packing for stacked rows: of the capacities ceil(total / k) (k = 1, 2, ...) that fit within
    `pack_length` and hold the longest pair, the one whose packing has the fewest rows x longest row."""
    best = pack_pairs(chosen, rejected, pack_length)
    best_cost = _stacked_cost(best, chosen, rejected)
    totals = [c + r for c, r in zip(chosen, rejected)]
    longest, total = max(totals), sum(totals)
    for k in range(1, len(totals) + 1):
        capacity = max(longest, -(-total // k))
        if capacity <= pack_length:
            candidate = pack_pairs(chosen, rejected, capacity)
            cost = _stacked_cost(candidate, chosen, rejected)
            if cost < best_cost:
                best, best_cost = candidate, cost
        if capacity == longest:
            break
    return best


def _stack_rows(
    row_lengths: list[int], ids: list[int], pos: list[int], labels: list[int], seg: list[int], pad_token_id: int
) -> dict[str, torch.Tensor]:
    width = max(row_lengths)
    r = len(row_lengths)
    out = {
        "input_ids": torch.full((r, width), pad_token_id, dtype=torch.long),
        "position_ids": torch.arange(width, dtype=torch.long).repeat(r, 1),
        "labels": torch.full((r, width), IGNORE_INDEX, dtype=torch.long),
        "segment_ids": torch.zeros((r, width), dtype=torch.long),
        "row_lengths": torch.tensor(row_lengths, dtype=torch.long),
    }
    start = 0
    for i, n in enumerate(row_lengths):
        stop = start + n
        out["input_ids"][i, :n] = torch.tensor(ids[start:stop])
        out["labels"][i, :n] = torch.tensor(labels[start:stop])
        out["segment_ids"][i, :n] = torch.tensor(seg[start:stop])
        out["position_ids"][i, :n] = torch.tensor(pos[start:stop])
        out["position_ids"][i, n:] = torch.arange(width - n)
        start = stop
    return out


@dataclass(frozen=True)
class LayoutStats:
    """Tokens the forwards process under each layout, over a whole pass of micro-batches."""

    real_tokens: int
    padded_tokens: int
    """Tokens of the padded layout: 2B x longest sequence, per micro-batch."""
    packed_tokens: int
    """Tokens of the packed layout as forwarded: real tokens for packed_rows / packed_single_row (rows go
    unpadded), rows x longest row for packed_batch."""
    packed_rows: int
    oversized_rows: int

    @property
    def padded_share(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def packed_share(self) -> float:
        return 1.0 - self.real_tokens / self.packed_tokens if self.packed_tokens else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "real_tokens": self.real_tokens,
            "padded_tokens": self.padded_tokens,
            "packed_tokens": self.packed_tokens,
            "padding_share_padded": round(self.padded_share, 6),
            "padding_share_packed": round(self.packed_share, 6),
            "packed_rows": self.packed_rows,
            "oversized_rows": self.oversized_rows,
        }


def layout_stats(
    prompt_lens: Sequence[int],
    chosen_lens: Sequence[int],
    rejected_lens: Sequence[int],
    batch_size: int,
    pack_length: int,
    layout: Layout,
) -> LayoutStats:
    """Token counts of consecutive micro-batches of `batch_size` pairs, padded vs packed as `layout` lays them."""
    real = padded = packed = rows = oversized = 0
    for start in range(0, len(prompt_lens), batch_size):
        idx = range(start, min(start + batch_size, len(prompt_lens)))
        c = [prompt_lens[i] + chosen_lens[i] for i in idx]
        r = [prompt_lens[i] + rejected_lens[i] for i in idx]
        real += sum(c) + sum(r)
        padded += 2 * len(c) * max(c + r)
        if layout == "packed_single_row":
            rows += 1
            packed += sum(c) + sum(r)
            continue
        packing = balanced_rows(c, r, pack_length) if layout == "packed_batch" else pack_pairs(c, r, pack_length)
        rows += len(packing.rows)
        oversized += packing.oversized_rows
        row_tokens = [sum(c[i] + r[i] for i in row) for row in packing.rows]
        packed += len(row_tokens) * max(row_tokens) if layout == "packed_batch" else sum(row_tokens)
    return LayoutStats(real, padded, packed, rows, oversized)
