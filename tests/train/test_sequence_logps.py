"""sequence_logps: equals a full log_softmax, packs exactly, scores only labelled tokens, saves memory."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

from spo_align.train.sequence_logps import IGNORE_INDEX, _TargetLogProbs, sequence_logps, token_counts

torch.set_num_threads(1)


def reference_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The obvious implementation: full logits, full log_softmax, masked gather, row sums."""
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * (labels != IGNORE_INDEX)).sum(-1)


def random_case(batch=3, length=9, hidden=6, vocab=13, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(vocab, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[-1, 6:] = IGNORE_INDEX  # padding
    return h, w, b, labels


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("scale,softcap", [(None, None), (0.8, None), (1.3, 2.5)])
def test_values_and_gradients_equal_the_full_log_softmax(chunk_size, scale, softcap):
    h, w, b, labels = random_case()
    out = sequence_logps(
        h, w, labels, lm_head_bias=b, chunk_size=chunk_size, logit_scale=scale, logit_softcap=softcap
    )
    ref = reference_logps(h, w, labels, b, scale, softcap)
    assert out.dtype == torch.float32 and out.shape == (3,)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)
    upstream = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    got = torch.autograd.grad((out.double() * upstream).sum(), [h, w, b])
    want = torch.autograd.grad((ref * upstream).sum(), [h, w, b])
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale,softcap", [(None, None), (1.3, 2.5)])
def test_chunked_function_passes_gradcheck(scale, softcap):
    h, w, b, labels = random_case(batch=1, length=7, hidden=4, vocab=9)
    mask = labels[0] != IGNORE_INDEX
    hidden = h[0][mask].detach().requires_grad_(True)
    targets = labels[0][mask]
    assert torch.autograd.gradcheck(
        lambda x, weight, bias: _TargetLogProbs.apply(x, weight, bias, targets, 2, scale, softcap, torch.float64),
        (hidden, w, b),
    )


def test_unlabelled_positions_never_reach_the_head():
    h, w, _, labels = random_case(dtype=torch.float32)
    poisoned = h.detach().clone()
    poisoned[labels == IGNORE_INDEX] = float("nan")  # a NaN through the head would poison its row's sum
    poisoned.requires_grad_(True)
    out = sequence_logps(poisoned, w, labels)
    torch.testing.assert_close(out, sequence_logps(h, w, labels))
    (grad,) = torch.autograd.grad(out.sum(), poisoned)
    assert (grad[labels == IGNORE_INDEX] == 0).all() and torch.isfinite(grad).all()


def test_rows_without_labels_sum_to_zero():
    h, w, _, labels = random_case(dtype=torch.float32)
    labels[2] = IGNORE_INDEX
    assert sequence_logps(h, w, labels)[2].item() == 0.0


def _sequences(seed: int, vocab: int, hidden: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-sequence (hidden [n, H], labels [n]) with a prompt of -100 labels and a scored completion."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt, completion in [(5, 7), (3, 12), (9, 2), (1, 30), (6, 6)]:
        n = prompt + completion
        labels = torch.randint(0, vocab, (n,), generator=g)
        labels[:prompt] = IGNORE_INDEX
        out.append((torch.randn(n, hidden, generator=g), labels))
    return out


def test_packed_rows_equal_the_unpacked_rows_to_1e_5():
    vocab, hidden = 500, 16
    w = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(1))
    seqs = _sequences(0, vocab, hidden)
    # Unpacked: one row per sequence, right-padded.
    length = max(len(lab) for _, lab in seqs)
    h_rows = torch.zeros(len(seqs), length, hidden)
    l_rows = torch.full((len(seqs), length), IGNORE_INDEX)
    for i, (h, lab) in enumerate(seqs):
        h_rows[i, : len(lab)], l_rows[i, : len(lab)] = h, lab
    unpacked = sequence_logps(h_rows, w, l_rows, chunk_size=8)
    # Packed: sequences 0, 1, 2 in row 0 and 3, 4 in row 1, with padding (segment -1) at the ends.
    h_packed = torch.zeros(2, 48, hidden)
    l_packed = torch.full((2, 48), IGNORE_INDEX)
    segments = torch.full((2, 48), -1)
    cursor = [0, 0]
    for sid, (h, lab) in enumerate(seqs):
        row = 0 if sid < 3 else 1
        start, stop = cursor[row], cursor[row] + len(lab)
        h_packed[row, start:stop], l_packed[row, start:stop], segments[row, start:stop] = h, lab, sid
        cursor[row] = stop
    packed = sequence_logps(h_packed, w, l_packed, segment_ids=segments, num_segments=len(seqs), chunk_size=8)
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=0)
    counts = token_counts(l_packed, segment_ids=segments, num_segments=len(seqs))
    assert counts.tolist() == [7, 12, 2, 30, 6] == token_counts(l_rows).tolist()


def test_num_segments_keeps_empty_trailing_segments_and_is_inferred_otherwise():
    h, w, _, labels = random_case(dtype=torch.float32)
    segments = torch.zeros_like(labels)
    segments[1:] = 1
    assert sequence_logps(h, w, labels, segment_ids=segments).shape == (2,)
    padded = sequence_logps(h, w, labels, segment_ids=segments, num_segments=4)
    assert padded.shape == (4,) and padded[2:].tolist() == [0.0, 0.0]


def test_invalid_segment_ids_and_shapes_raise_with_the_reason():
    h, w, _, labels = random_case(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        sequence_logps(h, w, labels, segment_ids=torch.full_like(labels, 3), num_segments=2)
    with pytest.raises(ValueError, match="lm_head_weight must be"):
        sequence_logps(h, w.T, labels)
    with pytest.raises(ValueError, match="labels has shape"):
        sequence_logps(h, w, labels[:, 1:])
    with pytest.raises(ValueError, match="only meaningful together with segment_ids"):
        sequence_logps(h, w, labels, num_segments=3)


def test_half_precision_inputs_give_fp32_sums_and_gradients_in_their_own_dtype():
    h, w, _, labels = random_case(dtype=torch.float32)
    h16, w16 = h.detach().bfloat16().requires_grad_(True), w.detach().bfloat16().requires_grad_(True)
    out = sequence_logps(h16, w16, labels, chunk_size=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference_logps(h16.float(), w16.float(), labels), rtol=2e-2, atol=0)
    grad_h, grad_w = torch.autograd.grad(out.sum(), [h16, w16])
    assert grad_h.dtype == torch.bfloat16 and grad_w.dtype == torch.bfloat16


def test_bf16_head_gradient_over_many_chunks_stays_within_two_bf16_steps_of_fp32():
    """The weight gradient sums 64 chunks; summed in bf16, every chunk would round the running sum."""
    tokens, vocab, hidden, chunk = 4096, 500, 64, 64
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens, hidden, generator=g).bfloat16()
    w = (torch.randn(vocab, hidden, generator=g) * 0.1).bfloat16()
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    w32 = w.float().requires_grad_(True)  # fp32, one chunk, on the same bf16-rounded values
    (want,) = torch.autograd.grad(sequence_logps(h.float(), w32, labels, chunk_size=tokens).sum(), [w32])
    w16 = w.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(sequence_logps(h, w16, labels, chunk_size=chunk).sum(), [w16])
    assert got.dtype == torch.bfloat16
    # Tolerance: two bf16 steps (2**-7) of the largest entry. What remains is the bf16 rounding of each
    # chunk's product and of the final cast; a bf16 running sum was off by 2.4% of it here.
    error = float((got.float() - want).abs().max() / want.abs().max())
    assert error < 2**-7, error


def test_autocast_picks_the_head_dtype_whatever_the_weights_dtype():
    """Under bf16 autocast the head reads its inputs rounded to bf16 (fp32 master weights or not) and writes
    fp32 logits: exactly what explicit bf16 inputs give. Without autocast fp32 inputs compute in fp32."""
    h, w, _, labels = random_case(dtype=torch.float32)
    h32, w32 = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast = sequence_logps(h32, w32, labels, chunk_size=4)
    explicit = sequence_logps(h.detach(), w.detach(), labels, chunk_size=4, head_dtype=torch.bfloat16)
    halves = sequence_logps(h.detach().bfloat16(), w.detach().bfloat16(), labels, chunk_size=4)
    assert autocast.dtype == torch.float32
    assert torch.equal(autocast, explicit) and torch.equal(autocast, halves)
    plain = sequence_logps(h.detach(), w.detach(), labels)
    torch.testing.assert_close(plain.double(), reference_logps(h.detach(), w.detach(), labels).double(), rtol=1e-6, atol=0)
    assert not torch.equal(plain, autocast)
    grad_h, grad_w = torch.autograd.grad(autocast.sum(), [h32, w32])  # gradients in the masters' dtype
    assert grad_h.dtype == torch.float32 and grad_w.dtype == torch.float32
    h16, w16 = h.detach().bfloat16().requires_grad_(True), w.detach().bfloat16().requires_grad_(True)
    grad_h16, grad_w16 = torch.autograd.grad(sequence_logps(h16, w16, labels, chunk_size=4).sum(), [h16, w16])
    assert torch.equal(grad_h.bfloat16(), grad_h16) and torch.equal(grad_w.bfloat16(), grad_w16)


# --------------------------------------------------------------------------------------------- memory

_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _measure(fn) -> tuple[int, int, object]:
    """(peak, retained) resident memory above the start while / after fn() runs, and its result.

    Linux only: writing 5 to /proc/self/clear_refs resets the peak (VmHWM) to the current RSS.
    """
    gc.collect()
    _CLEAR_REFS.write_text("5")
    start = _status_bytes("VmRSS")
    result = fn()
    return _status_bytes("VmHWM") - start, _status_bytes("VmRSS") - start, result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc (Linux)")
def test_peak_memory_on_8192_tokens_by_32000_vocab_stays_far_below_a_full_log_softmax():
    tokens, vocab, hidden = 8192, 32000, 32
    full_logits_bytes = tokens * vocab * 4
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.1).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak-RSS counter here")

    def full() -> float:
        with torch.no_grad():
            return torch.log_softmax(h[0] @ w.T, -1).gather(1, labels[0, :, None]).sum().item()

    def chunked_forward() -> torch.Tensor:
        return sequence_logps(h, w, labels)

    full_peak, _, full_value = _measure(full)
    forward_peak, kept_for_backward, out = _measure(chunked_forward)
    backward_peak, _, _ = _measure(lambda: out.sum().backward())
    print(
        f"peak RSS above start: full log_softmax {full_peak / 2**20:.0f} MiB; chunked forward "
        f"{forward_peak / 2**20:.0f} MiB (kept for backward {kept_for_backward / 2**20:.0f} MiB), "
        f"chunked backward {backward_peak / 2**20:.0f} MiB"
    )
    assert full_peak > full_logits_bytes  # the baseline really holds the fp32 [tokens, vocab] logits
    assert max(forward_peak, backward_peak) < full_peak / 8
    assert kept_for_backward < full_logits_bytes / 50  # no chunk's logits survive the forward
    assert out.item() == pytest.approx(full_value, rel=1e-5)
    assert h.grad is not None and torch.isfinite(h.grad).all()


def _profiled_peak(fn) -> int:
    """Most bytes of tensors live at once while fn() runs, above what was live before (torch's CPU allocator
    events, as tests/train/memory_probe.py counts them)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(
    "hidden_dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
    ids=["fp32", "bf16", "fp32-masters-bf16-autocast"],
)
def test_the_memory_estimates_head_term_matches_the_measured_head(hidden_dtype, autocast):
    """`recipe.memory.pair_head_bytes` against the head's measured CPU peaks, forward and backward, in each
    precision the CPU runs. Bounds 0.95-1.15: the estimate leaves out buffers of O(chunk x hidden + tokens)
    bytes (under 2% here) and adds the final cast of the weight gradient, which is never live together with
    a chunk's buffers (at most vocab x hidden x 2 bytes, 7% of the bf16 peak here)."""
    from spo_align.recipe.memory import pair_head_bytes

    tokens, vocab, hidden, chunk = 1024, 8192, 256, 512
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens, hidden, generator=g).to(hidden_dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.05).to(hidden_dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, tokens), generator=g)

    def forward() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return sequence_logps(h, w, labels, chunk_size=chunk)

    forward_peak = _profiled_peak(forward)
    out = forward()
    backward_peak = _profiled_peak(lambda: out.sum().backward())
    compute = 2 if autocast or hidden_dtype == torch.bfloat16 else 4
    stream = hidden_dtype.itemsize
    backward, operand = pair_head_bytes(vocab, hidden, tokens, chunk, compute, stream, "cpu", True)
    assert 0.95 <= backward / backward_peak <= 1.15, (backward, backward_peak)
    assert 0.95 <= (chunk * vocab * 8 + operand) / forward_peak <= 1.15, (operand, forward_peak)
