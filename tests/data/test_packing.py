"""Best-fit-decreasing packing: valid, tight, deterministic; pairs are never split."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spo_align.data.packing import best_fit_decreasing, pack_pairs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 100), max_size=60), st.integers(100, 300))
def test_every_item_once_and_no_bin_over_capacity(lengths, capacity):
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # Any-fit property: a bin is opened only when its first item fits in no open bin, so at most one bin
    # ends at most half full (a later bin's first item would have fitted into it).
    assert sum(2 * sum(lengths[i] for i in b) <= capacity for b in bins) <= 1


def test_best_fit_picks_the_tightest_bin():
    # 60 and 50 open two bins (free 40 and 50); 40 goes to the tighter one (free 40), 45 to the other.
    assert best_fit_decreasing([60, 50, 45, 40], 100) == [[0, 3], [1, 2]]


def test_deterministic_and_refuses_oversized_items():
    lengths = [5, 3, 8, 3, 5, 1]
    assert best_fit_decreasing(lengths, 8) == best_fit_decreasing(list(lengths), 8)
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing([3, 9], 8)
    with pytest.raises(ValueError, match="capacity"):
        best_fit_decreasing([1], 0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 80), st.integers(1, 80)), min_size=1, max_size=30), st.integers(40, 200))
def test_pairs_are_never_split(pairs, capacity):
    chosen = [c for c, _ in pairs]
    rejected = [r for _, r in pairs]
    packing = pack_pairs(chosen, rejected, capacity)
    assert sorted(i for row in packing.rows for i in row) == list(range(len(pairs)))
    oversized = [row for row in packing.rows if sum(chosen[i] + rejected[i] for i in row) > capacity]
    assert all(len(row) == 1 for row in oversized)  # only a lone pair may exceed the row length
    assert len(oversized) == packing.oversized_rows == sum(c + r > capacity for c, r in pairs)


def test_oversized_pair_can_be_refused():
    with pytest.raises(ValueError, match="exceeds the row capacity"):
        pack_pairs([30], [40], 64, oversized="raise")
