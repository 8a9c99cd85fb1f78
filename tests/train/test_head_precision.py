"""The LM head's precision claim, checked against fp64 with a derived bound (not a fitted tolerance).

The claim (`spo_align.train.sequence_logps`): the head reads hidden states and weight rounded to the compute
dtype (here bfloat16), accumulates their products in fp32 and writes fp32 logits; log-sum-exp, target gather
and per-token log-probs run in fp32; per-sequence sums are accumulated in fp64 and returned as fp32.

The reference runs the same bf16-rounded hidden states and weight in fp64. With u = 2^-24 (fp32 unit
roundoff), gamma_n = n u / (1 - n u), vocabulary V, hidden size H, the error of one token's log-prob is at most

1. logits: a product of two bf16 values (8-bit significands) is exact in fp32, so the only error is the
   fp32 summation of H products, |dz_i| <= gamma_H * A_i with A_i = sum_k |h_k w_ik| (any summation order);
   log p = z_t - lse(z) moves by at most |dz_t| + max_i |dz_i| (lse is 1-Lipschitz in the max norm), so
   <= 2 gamma_H max_i A_i;
2. log-sum-exp of the fp32 logits, as torch computes it (m = max, exact; S = sum exp(z_i - m); m + log S):
   the subtraction z_i - m is rounded (relative u), which changes S by a relative u * sum_i p_i |z_i - m|
   <= u ln V (that sum is H(p) - ln S <= ln V); exp within 2 ULP (relative 4u; torch's CPU kernels use
   SLEEF's 1-ULP functions); the sum of V positive terms, relative gamma_{V-1}, in any order; subnormal
   exp results, absolute V 2^-149 with S >= 1. With eta the sum of those relative errors (times 1.01 for
   their products), log S moves by at most eta / (1 - eta); log itself is within 2 ULP (4u ln V);
3. the roundings of m + log S and of z_t - lse: u (|lse| + |log p|).

Per sequence the bound is the sum over its tokens, plus the fp64 accumulation (T 2^-53 sum |log p|) and the
final rounding of the sum to fp32 (u |sum|). The computation that rounds the logits to bf16 and casts them
afterwards (what the head did before) must break that bound on logits near 16-32, where a bf16 step is 0.125:
the negative control below, so the bound can fail.
"""

from __future__ import annotations

import math

import pytest
import torch

from spo_align.train.sequence_logps import sequence_logps

torch.set_num_threads(1)
U32 = 2.0**-24
U64 = 2.0**-53


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def _case(batch: int = 4, length: int = 64, hidden: int = 64, vocab: int = 1024, seed: int = 0):
    """bf16 hidden states and weight whose logits lie around 16-32: a shared component (8 x 3 = 24) on top of
    N(0, 4^2) spread, so each logit's bf16 step is 0.125 while the log-probs stay moderate."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.5
    h[..., 0], w[:, 0] = 8.0, 3.0
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    return h.bfloat16(), w.bfloat16(), labels


def _fp64_reference_and_bound(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor):
    """Per-sequence fp64 log-prob sums of the same bf16-rounded values, and the derived bound of the head's error."""
    h64, w64 = h.double(), w.double()
    vocab, hidden = w.shape
    logits = h64 @ w64.T
    lse = torch.logsumexp(logits, -1)
    logp = logits.gather(-1, labels[..., None]).squeeze(-1) - lse
    reference = logp.sum(-1)
    magnitude = (h64.abs() @ w64.abs().T).amax(-1) * (1 + 1e-12)  # max_i A_i per token
    logit_term = 2 * _gamma(hidden) * magnitude
    eta = 1.01 * (U32 * math.log(vocab) + 4 * U32 + _gamma(vocab - 1)) + vocab * 2.0**-149
    lse_term = eta / (1 - eta) + 4 * U32 * math.log(vocab) + U32 * (lse.abs() + logp.abs())
    per_token = logit_term + lse_term
    bound = per_token.sum(-1) + labels.shape[-1] * U64 * logp.abs().sum(-1) + U32 * reference.abs()
    return reference, bound * (1 + 1e-9)


def _bf16_logits_then_cast(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The former head: bf16 matmul output (logits rounded to bf16), cast to fp32 for the log-softmax."""
    logits = torch.nn.functional.linear(h, w).float()
    return logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1).double().sum(-1).float()


def test_bf16_head_log_probs_lie_within_the_derived_bound_of_fp64():
    h, w, labels = _case()
    reference, bound = _fp64_reference_and_bound(h, w, labels)
    for chunk_size in (7, 512):
        got = sequence_logps(h, w, labels, chunk_size=chunk_size)
        assert got.dtype == torch.float32
        error = (got.double() - reference).abs()
        assert (error <= bound).all(), (error.tolist(), bound.tolist())
    # fp32 master weights under bf16 autocast compute the same values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = sequence_logps(h.float(), w.float(), labels)
    assert torch.equal(autocast, sequence_logps(h, w, labels))


def test_bf16_logits_cast_afterwards_break_the_bound():
    """Negative control: the same check on the former computation fails, by far, on every sequence."""
    h, w, labels = _case()
    reference, bound = _fp64_reference_and_bound(h, w, labels)
    error = (_bf16_logits_then_cast(h, w, labels).double() - reference).abs()
    assert (error > 3 * bound).all(), (error.tolist(), bound.tolist())


@pytest.mark.gpu
def test_on_cuda_the_head_uses_the_fp32_output_kernel_within_the_same_bound():
    """On a card the bf16 operands stay bf16 and `torch.mm(..., out_dtype=torch.float32)` accumulates and writes
    fp32 (the speed the head is for); its summation order differs from the CPU's, the bound does not."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from spo_align.train.sequence_logps import HeadMatmul

    assert HeadMatmul(torch.bfloat16, torch.device("cuda")).native
    h, w, labels = _case()
    reference, bound = _fp64_reference_and_bound(h, w, labels)
    hc, wc = h.cuda().requires_grad_(True), w.cuda().requires_grad_(True)
    got = sequence_logps(hc, wc, labels.cuda(), chunk_size=100)
    error = (got.double().cpu() - reference).abs()
    assert (error <= bound).all(), (error.tolist(), bound.tolist())
    grad_h, grad_w = torch.autograd.grad(got.sum(), [hc, wc])
    assert grad_h.dtype == grad_w.dtype == torch.bfloat16 and torch.isfinite(grad_w.float()).all()
