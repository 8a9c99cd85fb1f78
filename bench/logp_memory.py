"""Peak memory of the per-sequence log-prob step (forward + backward) at Qwen2.5's 152k vocabulary.

Two methods, each in its own fresh process so neither inherits the other's allocator state:
- ``full``: what a plain implementation does: logits for every position ``[B, T, V]`` in fp32, a full
  ``log_softmax``, gather the targets, mask the prompt, sum per row.
- ``chunked``: `spo_align.train.sequence_logps.sequence_logps`: the head applied only at labelled positions, a chunk of
  tokens at a time, logits recomputed in backward.
The figure is the process's peak resident set during the step minus its resident set just before it
(inputs, weights and their gradient buffers are allocated before the baseline is read; the kernel's
high-water mark is reset right before the step, so nothing earlier in the process can stand in for it).
"""

from __future__ import annotations

import gc
import time
from functools import partial
from typing import Any, Literal

from bench.clock import peak_rss_mb
from bench.config import LogpWork
from bench.harness import rss_mb

Method = Literal["full", "chunked"]
METHODS: tuple[Method, ...] = ("full", "chunked")
IGNORE_INDEX = -100


def _inputs(work: LogpWork) -> tuple[Any, Any, Any]:
    import torch

    generator = torch.Generator().manual_seed(work.seed)
    hidden = torch.randn(work.rows, work.length, work.hidden_size, generator=generator).requires_grad_(True)
    weight = torch.randn(work.vocab_size, work.hidden_size, generator=generator).mul_(0.02).requires_grad_(True)
    labels = torch.randint(0, work.vocab_size, (work.rows, work.length), generator=generator)
    labels[:, : int(work.length * work.prompt_share)] = IGNORE_INDEX
    # Allocate the gradient buffers up front: both methods need them, so they are not part of the step.
    hidden.grad = torch.zeros_like(hidden)
    weight.grad = torch.zeros_like(weight)
    return hidden, weight, labels


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: write 5 to /proc/self/clear_refs); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return read_hwm_mb() is not None


def read_hwm_mb() -> float | None:
    """VmHWM (peak RSS since start or since the last reset) from /proc/self/status, in MB."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


def full_tensor_logps(hidden: Any, weight: Any, labels: Any) -> Any:
    import torch

    logits = torch.matmul(hidden, weight.t()).float()
    logps = torch.log_softmax(logits, dim=-1)
    mask = labels != IGNORE_INDEX
    targets = labels.clamp(min=0).unsqueeze(-1)
    token_logps = logps.gather(-1, targets).squeeze(-1)
    return (token_logps * mask).sum(dim=-1)


def run_logp(work: LogpWork, method: Method) -> dict[str, Any]:
    import os

    from spo_align.train.sequence_logps import DEFAULT_CHUNK_SIZE, sequence_logps

    hidden, weight, labels = _inputs(work)
    chunk = work.chunk_size or DEFAULT_CHUNK_SIZE
    step = full_tensor_logps if method == "full" else partial(sequence_logps, chunk_size=chunk)
    # Warm-up on a few tokens: the first call of an op loads kernels and libraries (~200 MB of RSS on CPU)
    # that are no part of the step's own memory.
    small = hidden[:1, :16].detach().clone().requires_grad_(True)
    small_labels = labels[:1, :16].clone()
    small_labels[0, -4:] = 1
    step(small, weight, small_labels).sum().backward()
    weight.grad.zero_()
    del small, small_labels
    gc.collect()
    before = rss_mb(os.getpid())
    if before is None:
        raise RuntimeError("the log-prob bench reads /proc/self/status and needs Linux")
    peak_before = peak_rss_mb()
    # Reset the kernel's high-water mark (VmHWM) so the set-up's own peak (imports, inputs) cannot mask
    # the step's; where that is refused, ru_maxrss is used and `step_set_peak` says whether it is exact.
    hwm_reset = reset_peak_rss()
    started = time.perf_counter()
    logps = step(hidden, weight, labels)
    logps.sum().backward()
    seconds = time.perf_counter() - started
    peak = read_hwm_mb() if hwm_reset else peak_rss_mb()
    return {
        "method": method,
        "vocab_size": work.vocab_size,
        "tokens": work.rows * work.length,
        "scored_tokens": int((labels != IGNORE_INDEX).sum()),
        "chunk_size": chunk if method == "chunked" else None,
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "step_peak_mb": peak - before,
        "peak_before_step_mb": peak_before,
        "hwm_reset": hwm_reset,
        # False: the set-up, not the step, set the high-water mark, so step_peak_mb is only an upper bound.
        "step_set_peak": hwm_reset or peak > peak_before,
        "seconds": seconds,
        "logps": [float(v) for v in logps.detach()],
        "hidden_grad_norm": float(hidden.grad.norm()),
    }
