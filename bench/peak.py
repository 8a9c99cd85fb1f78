"""The device's measured dense matrix-product rate: the denominator of the GPU check's MFU.

One square product `size` x `size` x `size` on random data (never zeros: they run faster than real data),
timed `repeats` times after three warm-ups, with CUDA events on a GPU and the host clock on a CPU; the
figure is the median. 2 size^3 floating-point operations per product.
"""

from __future__ import annotations

import statistics
import time
from typing import Any


def run_peak(size: int, repeats: int, dtype_name: str) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    seconds: list[float] = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            torch.matmul(a, b, out=out)
            seconds.append(time.perf_counter() - began)
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("the timed matrix product gave non-finite values")
    median = statistics.median(seconds)
    flops = 2.0 * size**3
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": dtype_name,
        "size": size,
        "repeats": repeats,
        "median_s": median,
        "flops_per_s": flops / median,
        "all_s": seconds,
    }
