"""Per-sequence log-probabilities from final hidden states: the LM head applied at labelled positions only,
a chunk at a time, in fp32. Every loss's inputs are these sums (`spo_align.losses.pair.PairInputs`).

`sequence_logps` sums the log-probs of the labelled tokens per row, or per packed segment; `token_counts`
counts the same tokens by the same rules. No fp32 [tokens, vocab] tensor ever exists whole: `_TargetLogProbs`
keeps only each token's log-sum-exp between forward and backward and recomputes each chunk's logits in the
backward. `train/logps.py` runs a model on a pair batch and calls `sequence_logps` on its hidden states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from spo_align.data.collate import IGNORE_INDEX
from spo_align.losses.pair import compute_dtype

DEFAULT_CHUNK_SIZE = 512
"""Tokens per LM-head chunk in :func:`sequence_logps`. Transient memory is about two fp32 [chunk, vocab]
buffers: 125 MiB at vocab 32k (measured peak 129 MiB on CPU), 586 MiB at 150k. On CPU 512 also ran faster
than 1024 (4.0 s vs 5.4 s forward+backward for 8192 tokens x 32k vocab, hidden 32, one thread)."""


def _chunk_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    logit_scale: float | None,
    logit_softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [c, V] in at least fp32, and tanh(scaled / softcap) when a softcap is set (for backward)."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(compute_dtype(logits))
    if logit_scale is not None:
        logits = logits * logit_scale
    if logit_softcap is None:
        return logits, None
    capped = torch.tanh(logits / logit_softcap)
    return capped * logit_softcap, capped


class _TargetLogProbs(torch.autograd.Function):
    """log_softmax(head(hidden))[target] per row, chunk by chunk; backward recomputes each chunk's logits.

    Only the per-token log-sum-exp ([N] fp32) is kept between forward and backward, never the logits.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
        logit_scale: float | None,
        logit_softcap: float | None,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        dtype = compute_dtype(hidden)
        out = torch.empty(n, dtype=dtype, device=hidden.device)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            logits, _ = _chunk_logits(hidden[start:stop], weight, bias, logit_scale, logit_softcap)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            target_logits = logits.gather(1, targets[start:stop, None]).squeeze(1)
            out[start:stop] = target_logits - chunk_lse
            lse[start:stop] = chunk_lse
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.logit_scale = logit_scale
        ctx.logit_softcap = logit_softcap
        return out

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # The weight gradient sums every chunk's contribution: summed in (at least) fp32 and cast once, so that
        # a half-precision head does not round its running sum once per chunk. Costs one fp32 [V, H] buffer.
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=lse.dtype, device=weight.device) if need_bias else None
        grad_out = grad_out.to(lse.dtype)
        n = hidden.shape[0]
        for start in range(0, n, ctx.chunk_size):
            stop = min(start + ctx.chunk_size, n)
            h = hidden[start:stop]
            logits, capped = _chunk_logits(h, weight, bias, ctx.logit_scale, ctx.logit_softcap)
            g = grad_out[start:stop, None]
            # d(logit[t] - lse)/d logits = onehot(t) - softmax(logits); built in place in the logits buffer.
            grad_logits = logits.sub_(lse[start:stop, None]).exp_().mul_(-g)
            grad_logits.scatter_add_(1, targets[start:stop, None], g)
            if capped is not None:
                grad_logits.mul_(1.0 - capped.square_())
                del capped
            if ctx.logit_scale is not None:
                grad_logits.mul_(ctx.logit_scale)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            grad_linear = grad_logits.to(hidden.dtype)
            del logits, grad_logits
            if grad_hidden is not None:
                grad_hidden[start:stop] = grad_linear @ weight
            if grad_weight is not None:
                grad_weight += (grad_linear.t() @ h).to(acc_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _segment_index(
    labels: torch.Tensor,
    mask: torch.Tensor,
    segment_ids: torch.Tensor | None,
    num_segments: int | None,
) -> tuple[torch.Tensor, int]:
    """For each labelled token, the output slot it sums into, and the number of slots."""
    batch, length = labels.shape
    if segment_ids is None:
        if num_segments is not None:
            raise ValueError("num_segments is only meaningful together with segment_ids")
        rows = torch.arange(batch, device=labels.device)[:, None].expand(batch, length)
        return rows[mask], batch
    if segment_ids.shape != labels.shape:
        raise ValueError(
            f"segment_ids has shape {tuple(segment_ids.shape)}, labels has {tuple(labels.shape)}"
        )
    index = segment_ids[mask].long()
    if num_segments is None:
        num_segments = int(index.max().item()) + 1 if index.numel() else 0
    if index.numel() and (int(index.min().item()) < 0 or int(index.max().item()) >= num_segments):
        raise ValueError(
            f"segment_ids at labelled positions must lie in [0, {num_segments}); "
            f"found [{int(index.min().item())}, {int(index.max().item())}]"
        )
    return index, num_segments


def sequence_logps(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    lm_head_bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    logit_softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Summed log-probabilities of the labelled tokens, per row or per packed segment.

    ``hidden_states`` [B, T, H] are the model's final hidden states (after the final norm);
    ``labels`` [B, T] are already shifted: ``labels[b, t]`` is the token predicted from
    ``hidden_states[b, t]``, ``ignore_index`` where nothing is scored (prompt, padding).
    ``lm_head_weight`` is [V, H] (``lm_head_bias`` [V] optional). Logits are
    ``softcap * tanh(scale * head(h) / softcap)`` with either step skipped when its argument is None.

    Without ``segment_ids`` the result is [B]; with ``segment_ids`` [B, T] (values at unlabelled positions
    are ignored; labelled ones number the packed segments 0..num_segments-1 across the whole batch) it is
    [num_segments], one sum per segment, equal to what the unpacked rows give. ``num_segments`` defaults
    to the largest labelled id + 1; pass it to keep empty trailing segments and avoid a device sync.

    Only labelled positions reach the head (gathered with a boolean mask first), ``chunk_size`` tokens at
    a time; log-softmax runs in fp32 and the target log-prob is gathered per chunk, so no fp32
    [tokens, vocab] tensor exists whole. Backward recomputes each chunk's logits instead of keeping them.
    The head matmul runs in the promoted dtype of hidden states and weight, outside autocast; the sums are
    accumulated in fp64 and returned as fp32. Gradients flow to ``hidden_states``, ``lm_head_weight`` and
    ``lm_head_bias``.
    """
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be [B, T, H], got shape {tuple(hidden_states.shape)}")
    if labels.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}, hidden_states has {tuple(hidden_states.shape)}"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden_states.shape[2]:
        raise ValueError(
            f"lm_head_weight must be [V, {hidden_states.shape[2]}], got shape {tuple(lm_head_weight.shape)}"
        )
    if lm_head_bias is not None and lm_head_bias.shape != lm_head_weight.shape[:1]:
        raise ValueError(f"lm_head_bias must be [{lm_head_weight.shape[0]}], got {tuple(lm_head_bias.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be > 0, got {logit_softcap}")

    mask = labels != ignore_index
    index, size = _segment_index(labels, mask, segment_ids, num_segments)
    targets = labels[mask].long()
    head_dtype = torch.promote_types(hidden_states.dtype, lm_head_weight.dtype)
    hidden = hidden_states[mask].to(head_dtype)
    weight = lm_head_weight.to(head_dtype)
    bias = lm_head_bias.to(head_dtype) if lm_head_bias is not None else None
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        token_logps = _TargetLogProbs.apply(
            hidden, weight, bias, targets, chunk_size, logit_scale, logit_softcap
        )
    acc_dtype = torch.float32 if hidden.device.type == "mps" else torch.float64  # MPS has no fp64
    sums = torch.zeros(size, dtype=acc_dtype, device=hidden.device)
    return sums.index_add(0, index, token_logps.to(acc_dtype)).float()


def token_counts(
    labels: torch.Tensor,
    *,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Number of labelled tokens per row ([B]) or per packed segment ([num_segments]), as int64.

    Same indexing rules as :func:`sequence_logps`, so ``sequence_logps(...) / token_counts(...)`` is the
    per-token mean log-prob.
    """
    mask = labels != ignore_index
    index, size = _segment_index(labels, mask, segment_ids, num_segments)
    return torch.zeros(size, dtype=torch.long, device=labels.device).index_add(
        0, index, torch.ones_like(index)
    )
