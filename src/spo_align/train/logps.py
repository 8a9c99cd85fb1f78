"""Per-sequence log-probs of a collated pair batch: decoder body, then the LM head on scored positions only.

The model is unwrapped down to the causal-LM module (DeepSpeed engine / DDP `.module`, peft's
`get_base_model()`: LoRA layers are injected in place, so the base model's decoder carries them and
`disable_adapter()` still applies). Its decoder runs with ``use_cache=False`` (transformers derives the
packed per-sequence mask only without a cache) and returns the final hidden states; then
`train/sequence_logps.py` applies the head at labelled positions, chunked: inputs rounded to the compute
dtype, fp32 accumulation and fp32 logits, log-softmax in fp32.

ZeRO-3 partitions every weight outside its module's forward, so ``lm_head.weight`` cannot be read
directly. The head is therefore always entered through the lm_head module's own ``__call__`` (whose
DeepSpeed hooks gather the weight for the forward and again for the backward) with a forward that
computes the sequence log-probs: `head_logps`. Tied embeddings need nothing special: the head's weight is
the embedding parameter, gathered by the same hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spo_align.data.collate import FLASH_BOUNDARY_KEYS
from spo_align.train.sequence_logps import DEFAULT_CHUNK_SIZE, sequence_logps, token_counts


class ModelLayoutError(TypeError):
    """The model does not expose a decoder and a plain linear LM head."""


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The `*ForCausalLM` module under DeepSpeed/DDP wrappers and a peft `PeftModel`."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model
    raise ModelLayoutError("could not unwrap the model (wrappers nested too deep)")


@dataclass(frozen=True)
class ModelParts:
    decoder: nn.Module
    lm_head: nn.Linear


def model_parts(model: nn.Module) -> ModelParts:
    causal = unwrap_causal_lm(model)
    decoder = causal.get_decoder() if hasattr(causal, "get_decoder") else None
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    if decoder is None or head is None:
        raise ModelLayoutError(f"{type(causal).__name__} has no decoder / output embeddings")
    if hasattr(head, "base_layer") or not isinstance(head, nn.Linear):
        raise ModelLayoutError(
            f"the LM head is a {type(head).__name__}: only a plain nn.Linear head is supported "
            "(do not put a LoRA adapter on lm_head)"
        )
    if head.bias is not None:
        raise ModelLayoutError("LM heads with a bias are not supported")
    config = getattr(causal, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise ModelLayoutError(f"{type(causal).__name__} scales or softcaps its logits; not supported yet")
    return ModelParts(decoder=decoder, lm_head=head)


def _head_forward(
    self: nn.Linear,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor | None,
    num_segments: int | None,
    chunk_size: int,
) -> torch.Tensor:
    return sequence_logps(
        hidden, self.weight, labels, segment_ids=segment_ids, num_segments=num_segments, chunk_size=chunk_size
    )


def head_logps(
    lm_head: nn.Linear,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """`sequence_logps` through the head module's `__call__`, so ZeRO-3 gathers its weight (see module doc)."""
    lm_head.forward = _head_forward.__get__(lm_head)  # type: ignore[method-assign]
    try:
        return lm_head(hidden, labels, segment_ids, num_segments, chunk_size)
    finally:
        del lm_head.forward


def _hidden(decoder: nn.Module, **inputs: Any) -> torch.Tensor:
    return decoder(**inputs, use_cache=False).last_hidden_state


def flash_kwargs(batch: dict[str, Any]) -> dict[str, Any]:
    """The packed boundaries the collator emitted for flash attention (`collate.flash_boundaries`), or {}.

    The decoder passes its keyword arguments on to every attention call: flash attention then runs its
    varlen kernel on them instead of re-deriving them from ``position_ids`` in every layer; sdpa, eager and
    flex attention ignore them (their mask comes from ``position_ids``)."""
    return {key: batch[key] for key in FLASH_BOUNDARY_KEYS if key in batch}


def logps_from_parts(parts: ModelParts, batch: dict[str, Any], *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Summed completion log-probs of the batch's 2B sequences (chosen then rejected), fp32 [2B].

    Padded batches carry an attention mask. Packed batches carry flat ``[1, total]`` tensors split by
    ``row_lengths`` (one forward per row; under ZeRO-3 padded with filler forwards to the same count on
    every rank), or ``[R, L]`` stacked rows (one forward; the padding tail of each row is a segment of its
    own, so it is never attended to by real tokens). A single packed row (``packed_single_row``) also
    carries its sequence boundaries for flash attention, passed to the decoder as kwargs (`flash_kwargs`).
    """
    num_sequences = 2 * int(batch["pair_index"].shape[0])
    if "attention_mask" in batch:
        hidden = _hidden(parts.decoder, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return head_logps(parts.lm_head, hidden, batch["labels"], chunk_size=chunk_size)
    ids, pos = batch["input_ids"], batch["position_ids"]
    lengths = [int(n) for n in batch["row_lengths"].tolist()]
    extra = _forwards_to_match(parts, 1 if ids.shape[0] > 1 else len(lengths))
    if ids.shape[0] > 1 or len(lengths) == 1:
        hidden = _hidden(parts.decoder, input_ids=ids, position_ids=pos, **flash_kwargs(batch))
    else:
        hidden = torch.cat(
            [
                _hidden(parts.decoder, input_ids=i, position_ids=p)
                for i, p in zip(ids.split(lengths, dim=1), pos.split(lengths, dim=1))
            ],
            dim=1,
        )
    # Filler forwards (one token each) so that every rank runs as many as the busiest one, before the
    # head so that all ranks enter the modules in the same order; kept in the graph with weight 0 so
    # that their backward, whose hooks gather weights too, runs on every rank as well.
    fillers = [_hidden(parts.decoder, input_ids=ids[:1, :1], position_ids=pos[:1, :1]).sum() for _ in range(extra)]
    logps = head_logps(
        parts.lm_head,
        hidden,
        batch["labels"],
        segment_ids=batch["segment_ids"],
        num_segments=num_sequences,
        chunk_size=chunk_size,
    )
    for filler in fillers:
        logps = logps + 0.0 * filler
    return logps


def _forwards_to_match(parts: ModelParts, own: int) -> int:
    """How many filler decoder forwards this rank must add so all ranks run the same number.

    Under ZeRO-3 (partitioned weights) every module forward gathers its weights with collective calls, so
    ranks whose micro-batches pack into different numbers of rows would wait on each other forever.
    Elsewhere (single process, DDP, ZeRO-1/2) forwards are local and this returns 0 without communicating.
    """
    param = next(parts.decoder.parameters(), None)
    if param is None or not hasattr(param, "ds_id"):
        return 0
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    most = torch.tensor([own], dtype=torch.long, device=param.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item()) - own


def batch_logps(model: nn.Module, batch: dict[str, Any], *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """`logps_from_parts`, entered through the outermost wrapper's forward.

    DDP and DeepSpeed do per-step bookkeeping in their own ``forward`` (DDP prepares the gradient
    reducer; DeepSpeed 0.19 registers the backward prologue of ZeRO on the outputs), so the call must go
    through them. The causal LM's ``forward`` is swapped for the log-prob computation for the duration
    of the call; the wrappers (and peft, whose LoRA tuner calls ``model.forward``) pass through to it. A
    ``forward`` already set on the instance is put back afterwards, not deleted.
    """
    causal = unwrap_causal_lm(model)
    parts = model_parts(causal)

    def forward(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        return logps_from_parts(parts, batch, chunk_size=chunk_size)

    own = causal.__dict__.get("forward")  # a forward set on the instance (accelerate's autocast wrapper) stays
    causal.forward = forward  # type: ignore[method-assign]
    try:
        return model(input_ids=batch["input_ids"])
    finally:
        if own is None:
            del causal.forward
        else:
            causal.forward = own  # type: ignore[method-assign]


def batch_token_counts(batch: dict[str, Any]) -> torch.Tensor:
    """Scored (completion) tokens of the batch's 2B sequences, chosen then rejected, int64 [2B].

    Counted from the labels by the same rules as the log-prob sums (`sequence_logps.token_counts`), per row when
    padded, per packed segment otherwise, so ``logps / counts`` is each answer's per-token mean log-prob.
    """
    if "attention_mask" in batch:
        return token_counts(batch["labels"])
    num_sequences = 2 * int(batch["pair_index"].shape[0])
    return token_counts(batch["labels"], segment_ids=batch["segment_ids"], num_segments=num_sequences)


# ---------------------------------------------------------------- per-sequence attention for packed rows on CPU
# Packed rows attended segment by segment: sdpa without an L x L mask (the CPU packed layout).
#
# With packed rows (per-sequence ``position_ids``, no attention mask) transformers' ``sdpa`` builds a
# block-diagonal causal mask over the whole row and hands it to the kernel, so every layer computes and
# keeps attention over row length squared, most of it masked out, and the mask itself is materialised.
# ``sdpa_segments`` instead finds each row's sequences where its positions restart (the rule transformers'
# `find_packed_sequence_indices` uses: a position that is not the previous one + 1) and runs causal sdpa on
# each sequence alone: the same function of the same inputs (no token attends outside its sequence in
# either), with sum of squared sequence lengths instead of the row's squared length, and no mask tensor.
# Batches that carry a padding mask (padded layout, evaluation) go to transformers' sdpa unchanged.
#
# `use_segment_attention(model)` registers the implementation once and switches a loaded model to it; the
# name lives in the model's config in memory only (transformers does not save ``_attn_implementation``).
#
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
