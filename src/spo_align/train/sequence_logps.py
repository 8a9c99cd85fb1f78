"""Per-sequence log-probabilities from final hidden states: the LM head applied at labelled positions only,
a chunk at a time. Every loss's inputs are these sums (`spo_align.losses.pair.PairInputs`).

Precision: the head's matmul reads its inputs in the compute dtype (autocast's dtype where autocast is on,
e.g. bfloat16 over float32 master weights; else the promoted dtype of hidden states and weight), accumulates
in fp32 and writes fp32 logits; log-sum-exp, target gather and gradients of the logits run in fp32, and the
per-sequence sums are accumulated in fp64 (`head_matmul` says how each device gets the fp32 output).

`sequence_logps` sums the log-probs of the labelled tokens per row, or per packed segment; `token_counts`
counts the same tokens by the same rules. No fp32 [tokens, vocab] tensor ever exists whole: `_TargetLogProbs`
keeps only each token's log-sum-exp between forward and backward and recomputes each chunk's logits in the
backward. `train/logps.py` runs a model on a pair batch and calls `sequence_logps` on its hidden states.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from spo_align.data.collate import IGNORE_INDEX

DEFAULT_CHUNK_SIZE = 512
"""Tokens per LM-head chunk in :func:`sequence_logps`. Transient memory is about two fp32 [chunk, vocab]
buffers: 125 MiB at vocab 32k (measured peak 129 MiB on CPU, fp32), 586 MiB at 150k; in bf16 the backward
adds the chunk's logit gradient rounded to bf16 (and, on CPU, held in fp32: `recipe.memory.pair_head_bytes`). On CPU 512 also ran faster
than 1024 (4.0 s vs 5.4 s forward+backward for 8192 tokens x 32k vocab, hidden 32, one thread)."""

_HALF = (torch.bfloat16, torch.float16)
_FP32_OUTPUT_MM: dict[tuple[str, torch.dtype], bool] = {}


def head_compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul reads: autocast's on the hidden states' device when it is enabled there
    (bfloat16 training over float32 master weights), else the promoted dtype of hidden states and weight."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _has_fp32_output_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs for `dtype` inputs on `device` (CUDA: yes;
    torch 2.13's CPU build has no kernel for it). Probed once per device type and dtype."""
    key = (device.type, dtype)
    if key not in _FP32_OUTPUT_MM:
        try:
            one = torch.ones(1, 1, dtype=dtype, device=device)
            _FP32_OUTPUT_MM[key] = torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, NotImplementedError, TypeError):
            _FP32_OUTPUT_MM[key] = False
    return _FP32_OUTPUT_MM[key]


class HeadMatmul:
    """Matrix products of values rounded to `dtype`, accumulated in fp32 (or wider), with fp32 (or wider) output.

    For bfloat16/float16, where the device has a kernel for it (CUDA), the operands stay in `dtype` and
    ``torch.mm(..., out_dtype=torch.float32)`` accumulates and writes in fp32 at half-precision speed.
    Elsewhere (CPU) the operands are rounded to `dtype` and then held in fp32: a product of two bfloat16 (or
    float16) values is exact in fp32, so an fp32 matmul of the upcast values computes the same sums of the
    same exact products, in fp32 — the value an fp32-accumulating half-precision kernel gives, up to the order
    of summation. float32 and float64 compute as they are.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        self.native = dtype in _HALF and _has_fp32_output_mm(device, dtype)
        self.operand_dtype = torch.float32 if dtype in _HALF and not self.native else dtype
        self.out_dtype = torch.promote_types(self.operand_dtype, torch.float32)
        """The products' dtype: fp32, or fp64 for fp64 operands."""

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        """`t` rounded to the compute dtype, in the dtype the products read."""
        return t.to(self.dtype).to(self.operand_dtype)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` of two operands, in `out_dtype`."""
        if self.native:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b)

    def addmm_(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``acc += a @ b``, in place where the kernel allows (the fp32 path), else through one product."""
        if self.native:
            acc += self.mm(a, b)
        else:
            acc.addmm_(a, b)


def _chunk_logits(
    matmul: HeadMatmul,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    logit_scale: float | None,
    logit_softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [c, V] in at least fp32 from the weight operand [V, H], and tanh(scaled / softcap) when a
    softcap is set (for backward)."""
    logits = matmul.mm(matmul.operand(hidden), weight.t())
    if bias is not None:
        logits += bias
    if logit_scale is not None:
        logits = logits * logit_scale
    if logit_softcap is None:
        return logits, None
    capped = torch.tanh(logits / logit_softcap)
    return capped * logit_softcap, capped


class _TargetLogProbs(torch.autograd.Function):
    """log_softmax(head(hidden))[target] per row, chunk by chunk; backward recomputes each chunk's logits.

    Only the per-token log-sum-exp ([N] fp32) is kept between forward and backward, never the logits; the
    weight operand (the weight rounded to the compute dtype) is made again in the backward rather than kept.
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
        head_dtype: torch.dtype,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        matmul = HeadMatmul(head_dtype, hidden.device)
        dtype = matmul.out_dtype
        w = matmul.operand(weight)
        b = bias.to(head_dtype).to(dtype) if bias is not None else None
        out = torch.empty(n, dtype=dtype, device=hidden.device)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            logits, _ = _chunk_logits(matmul, hidden[start:stop], w, b, logit_scale, logit_softcap)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            target_logits = logits.gather(1, targets[start:stop, None]).squeeze(1)
            out[start:stop] = target_logits - chunk_lse
            lse[start:stop] = chunk_lse
            del logits
        del w
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.logit_scale = logit_scale
        ctx.logit_softcap = logit_softcap
        ctx.head_dtype = head_dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            grads = _backward(ctx, grad_out, hidden, weight, bias, targets, lse)
        return (*grads, None, None, None, None, None)


def _backward(
    ctx: torch.autograd.function.FunctionCtx,
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients wrt hidden, weight and bias, chunk by chunk: each chunk's logits are recomputed, turned into
    their gradient in place (fp32), rounded to the compute dtype (what a half-precision matmul's backward
    reads) and multiplied out with fp32 accumulation. The weight gradient sums every chunk's product in one
    fp32 (or wider) buffer and is cast to the weight's dtype once, so a half-precision head does not round its
    running sum once per chunk."""
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    matmul = HeadMatmul(ctx.head_dtype, hidden.device)
    w = matmul.operand(weight)
    b = bias.to(ctx.head_dtype).to(lse.dtype) if bias is not None else None
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    acc_dtype = torch.promote_types(weight.dtype, matmul.out_dtype)
    grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=lse.dtype, device=weight.device) if need_bias else None
    grad_out = grad_out.to(lse.dtype)
    n = hidden.shape[0]
    for start in range(0, n, ctx.chunk_size):
        stop = min(start + ctx.chunk_size, n)
        logits, capped = _chunk_logits(matmul, hidden[start:stop], w, b, ctx.logit_scale, ctx.logit_softcap)
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
        grad_linear = matmul.operand(grad_logits)
        del logits, grad_logits
        if grad_hidden is not None:
            grad_hidden[start:stop] = matmul.mm(grad_linear, w).to(hidden.dtype)
        if grad_weight is not None:
            matmul.addmm_(grad_weight, grad_linear.t(), matmul.operand(hidden[start:stop]))
        del grad_linear
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight, grad_bias


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
    head_dtype: torch.dtype | None = None,
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
    The head matmul reads hidden states and weight rounded to ``head_dtype`` (default
    `head_compute_dtype`: autocast's dtype where autocast is on, else their promoted dtype), accumulates in
    fp32 and outputs fp32 logits (`HeadMatmul`); no logit is ever rounded to half precision. The sums are
    accumulated in fp64 and returned as fp32. Gradients flow to ``hidden_states``, ``lm_head_weight`` and
    ``lm_head_bias``, each in its own dtype; the weight's is accumulated over chunks in fp32.
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
    if head_dtype is None:
        head_dtype = head_compute_dtype(hidden_states, lm_head_weight)
    hidden = hidden_states[mask]
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        token_logps = _TargetLogProbs.apply(
            hidden, lm_head_weight, lm_head_bias, targets, chunk_size, logit_scale, logit_softcap, head_dtype
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
