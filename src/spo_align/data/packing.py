"""Best-fit-decreasing bin packing, generic over what is packed (SFT conversations, preference pairs).

`best_fit_decreasing` takes item lengths and a capacity and returns bins as lists of item indices.
Items are placed longest first, each into the open bin whose free space is smallest but still enough
(ties: the bin opened first), else into a new bin. Results are deterministic for the same input.

For preference pairs the item is the whole pair (chosen + rejected sequence), so a pair is never split
across rows. A pair longer than the capacity cannot share a row; `pack_pairs` gives it a row of its own
(`oversized="own_row"`) rather than splitting it; `best_fit_decreasing` itself refuses such items.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items of `lengths` into bins of `capacity`; return bins of item indices (largest item first).

    Raises ValueError for a non-positive capacity, a negative length or an item longer than `capacity`.
    """
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Sorted (free space, bin number) of the bins that still have room.
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n < 0:
            raise ValueError(f"item {i} has negative length {n}")
        if n > capacity:
            raise ValueError(f"item {i} of length {n} does not fit in capacity {capacity}")
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            space, b = free.pop(pos)
            bins[b].append(i)
            space -= n
        else:
            b = len(bins)
            bins.append([i])
            space = capacity - n
        if space > 0:
            bisect.insort(free, (space, b))
    return bins


@dataclass(frozen=True)
class PairPacking:
    rows: list[list[int]]
    """Pair indices per row; each pair contributes its chosen then its rejected sequence to its row."""
    oversized_rows: int
    """Rows holding one pair longer than the capacity (not split, so the row exceeds the capacity)."""


def pack_pairs(
    chosen_lengths: Sequence[int],
    rejected_lengths: Sequence[int],
    capacity: int,
    *,
    oversized: Literal["own_row", "raise"] = "own_row",
) -> PairPacking:
    """Lay pairs into rows of at most `capacity` tokens, best fit decreasing, never splitting a pair."""
    if len(chosen_lengths) != len(rejected_lengths):
        raise ValueError("chosen_lengths and rejected_lengths differ in length")
    totals = [c + r for c, r in zip(chosen_lengths, rejected_lengths)]
    fitting = [i for i, n in enumerate(totals) if n <= capacity]
    too_big = [i for i, n in enumerate(totals) if n > capacity]
    if too_big and oversized == "raise":
        raise ValueError(f"pair {too_big[0]} of {totals[too_big[0]]} tokens exceeds the row capacity {capacity}")
    rows = [[fitting[j] for j in b] for b in best_fit_decreasing([totals[i] for i in fitting], capacity)]
    rows.extend([i] for i in too_big)
    return PairPacking(rows=rows, oversized_rows=len(too_big))
