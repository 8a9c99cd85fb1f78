"""GEMM rate against the row count M, at the bench's width: why row-by-row forwards can lose on a busy CPU.

    python -m bench gemm [--threads 2] [--width 256]

A packed row is forwarded on its own, so its linear layers multiply [M, width] by [width, width] with M
the row's tokens (hundreds to ~2k); a padded batch multiplies with M = sequences x longest length (~10k).
This prints GFLOP per wall second and per CPU second for a range of M; when the rate at small M is far
below the rate at large M, packing trades padding waste for slow small matrix products.
"""

from __future__ import annotations

import time

ROWS = (512, 1024, 2048, 4096, 8192, 16384)


def gemm_rates(threads: int, width: int, rows: tuple[int, ...] = ROWS, flop_per_size: float = 2e9) -> list[dict[str, float]]:
    import torch

    torch.set_num_threads(threads)
    out = []
    for m in rows:
        a, b = torch.randn(m, width), torch.randn(width, width)
        for _ in range(3):
            a @ b
        repeats = max(3, int(flop_per_size / (2 * m * width * width)))
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(repeats):
            a @ b
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        flop = 2.0 * m * width * width * repeats
        out.append({"m": m, "gflop_per_s": flop / wall / 1e9, "gflop_per_cpu_s": flop / cpu / 1e9 if cpu > 0 else float("nan")})
    return out


def gemm_table(threads: int, width: int) -> str:
    lines = [
        f"[M, {width}] x [{width}, {width}] fp32, {threads} torch thread(s)",
        "",
        "| M | GFLOP/s (wall) | GFLOP per CPU-s |",
        "| ---: | ---: | ---: |",
    ]
    for rate in gemm_rates(threads, width):
        lines.append(f"| {rate['m']:,} | {rate['gflop_per_s']:.1f} | {rate['gflop_per_cpu_s']:.1f} |")
    return "\n".join(lines)
