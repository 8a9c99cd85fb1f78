"""Packed rows attended segment by segment: sdpa without an L x L mask (the CPU packed layout).

With packed rows (per-sequence ``position_ids``, no attention mask) transformers' ``sdpa`` builds a
block-diagonal causal mask over the whole row and hands it to the kernel, so every layer computes and
keeps attention over row length squared, most of it masked out, and the mask itself is materialised.
``sdpa_segments`` instead finds each row's sequences where its positions restart (the rule transformers'
`find_packed_sequence_indices` uses: a position that is not the previous one + 1) and runs causal sdpa on
each sequence alone: the same function of the same inputs (no token attends outside its sequence in
either), with sum of squared sequence lengths instead of the row's squared length, and no mask tensor.
Batches that carry a padding mask (padded layout, evaluation) go to transformers' sdpa unchanged.

`use_segment_attention(model)` registers the implementation once and switches a loaded model to it; the
name lives in the model's config in memory only (transformers does not save ``_attn_implementation``).
"""

from __future__ import annotations

from typing import Any

import torch

SEGMENT_SDPA = "sdpa_segments"


def segment_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, stop)] of the sequences of one row of positions: a new one wherever a position is not the
    previous position + 1."""
    positions = position_ids.reshape(-1)
    if positions.numel() == 0:
        return []
    starts = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten().add(1).tolist()
    edges = [0, *starts, int(positions.numel())]
    return list(zip(edges[:-1], edges[1:]))


def segment_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa per packed sequence when there is no mask and the positions say where sequences
    start; transformers' sdpa itself otherwise (a padding mask, a cache, decoding)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    length = query.shape[2]
    packed = (
        attention_mask is None
        and position_ids is not None
        and key.shape[2] == length
        and length > 1
        and position_ids.shape[-1] == length
    )
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = position_ids.expand(query.shape[0], -1)
    outputs = []
    for b in range(query.shape[0]):
        bounds = segment_bounds(rows[b])
        if len(bounds) == 1:
            out, _ = sdpa_attention_forward(module, query[b : b + 1], key[b : b + 1], value[b : b + 1], None, **kwargs)
        else:
            out = torch.cat(
                [
                    sdpa_attention_forward(
                        module,
                        query[b : b + 1, :, start:stop],
                        key[b : b + 1, :, start:stop],
                        value[b : b + 1, :, start:stop],
                        None,
                        **kwargs,
                    )[0]
                    for start, stop in bounds
                ],
                dim=1,
            )
        outputs.append(out)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)), None


def _segment_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """No mask where the attention runs per segment (no padding mask given); sdpa's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register_segment_attention() -> str:
    """Register ``sdpa_segments`` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_forward)
    AttentionMaskInterface.register(SEGMENT_SDPA, _segment_mask)
    return SEGMENT_SDPA


def use_segment_attention(model: torch.nn.Module) -> None:
    """Switch a model loaded with ``sdpa`` (its config and every sub-config) to ``sdpa_segments``."""
    register_segment_attention()
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no config to set the attention implementation on")
    if config._attn_implementation != "sdpa":
        raise ValueError(f"sdpa_segments replaces sdpa; the model runs {config._attn_implementation!r}")
    config._attn_implementation = SEGMENT_SDPA
