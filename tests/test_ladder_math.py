"""The ladder's math on hand-made scores (train/ladder/curriculum.py): levels, the U-shape filter, the
NeuraLadder order, the low-complexity drop, smoothing and the stage split, including ties, empty
levels, and sets that are all right or all wrong."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from observe_r1_train.ladder import curriculum as c

K = 8


def test_difficulty_and_level_have_nine_values_for_k_8():
    assert [c.difficulty(correct, K) for correct in range(K, -1, -1)] == [i / K for i in range(K + 1)]
    assert [c.level(correct, K) for correct in range(K + 1)] == list(range(K, -1, -1))
    assert c.difficulty(8, 8) == 0.0 and c.difficulty(0, 8) == 1.0 and c.difficulty(6, 8) == 0.25
    for bad in [(-1, 8), (9, 8), (0, 0)]:
        with pytest.raises(ValueError):
            c.difficulty(*bad)


def test_complexity_is_the_mean_length():
    assert c.complexity([10, 20, 30, 40]) == 25.0
    assert c.complexity([7]) == 7.0
    with pytest.raises(ValueError):
        c.complexity([])


def test_u_filter_drops_both_ends_by_default_and_keeps_the_middle():
    ps = [correct / K for correct in range(K + 1)]
    assert [p for p in ps if c.u_filter_keeps(p, 0.0, 1.0)] == ps[1:-1]
    assert [p for p in ps if c.u_filter_keeps(p, 0.25, 0.75)] == [0.375, 0.5, 0.625]  # both ends exclusive
    assert not any(c.u_filter_keeps(p, 0.0, 1.0) for p in [0.0] * 5)  # an all-wrong set: nothing left
    assert not any(c.u_filter_keeps(p, 0.0, 1.0) for p in [1.0] * 5)  # an all-right set: nothing left


def test_ladder_order_sorts_by_difficulty_then_complexity_and_keeps_ties_in_input_order():
    difficulties = [0.5, 0.0, 0.5, 0.0, 1.0, 0.5]
    complexities = [30.0, 50.0, 10.0, 50.0, 5.0, 30.0]
    assert c.ladder_order(difficulties, complexities) == [1, 3, 2, 0, 5, 4]
    assert c.ladder_order([], []) == []


def test_easy_drop_takes_the_least_complex_share_of_difficulty_zero_only():
    difficulties = [0.0, 0.0, 0.5, 0.0, 0.0, 1.0, 0.0]
    complexities = [40.0, 10.0, 1.0, 10.0, 30.0, 1.0, 20.0]
    # five items at difficulty 0; floor(0.5 x 5) = 2, the two of complexity 10 (a tie, both taken)
    assert c.easy_drop(difficulties, complexities, 0.5) == [1, 3]
    # a tie at the cut: the earlier item goes first
    assert c.easy_drop(difficulties, complexities, 0.2) == [1]
    assert c.easy_drop(difficulties, complexities, 1.0) == [0, 1, 3, 4, 6]
    assert c.easy_drop(difficulties, complexities, 0.0) == []
    assert c.easy_drop([0.5, 1.0], [1.0, 2.0], 0.5) == []  # no difficulty-0 level: nothing dropped
    assert c.easy_drop([0.0] * 4, [3.0, 3.0, 3.0, 3.0], 0.5) == [0, 1]  # all right, all equal


def test_stage_split_at_the_threshold():
    assert [c.stage(i / K, 0.75) for i in range(K + 1)] == [1] * 6 + [2] * 3
    assert c.stage(0.74, 0.75) == 1 and c.stage(0.75, 0.75) == 2


def test_smoothing_by_hand():
    levels = [0] * 10 + [1] * 10 + [3] * 5
    s = c.smooth(levels, width=2, self_share=0.6, seed=0)
    # Level 3 is three levels from 0, outside width 2: e_0 = floor(0.4 x 10) = 4, all towards 1;
    # e_1 = 4, two towards 0 and two towards 3; e_3 = floor(0.4 x 5) = 2, towards 1.
    # Swaps: 0 <-> 1 min(4, 2) = 2; 1 <-> 3 min(2, 2) = 2.
    assert s.mix == {0: {0: 8, 1: 2}, 1: {0: 2, 1: 6, 3: 2}, 3: {1: 2, 3: 3}}
    assert s.segments == levels  # every stretch keeps its size
    assert sorted(s.order) == list(range(25))
    # a stretch's own items keep their ladder order, and so do the incoming ones
    stretch0 = s.order[:10]
    own = [p for p in stretch0 if levels[p] == 0]
    assert own == sorted(own)
    assert c.smooth(levels, 2, 0.6, seed=1).order != s.order  # the seed decides who moves and where


@pytest.mark.parametrize(
    "levels, width, share",
    [
        ([], 2, 0.6),  # empty ladder
        ([0] * 6, 2, 0.6),  # one level only (all right): nobody to mix with
        ([8] * 6, 2, 0.6),  # all wrong
        ([0] * 5 + [1] * 5, 0, 0.6),  # width 0
        ([0] * 5 + [1] * 5, 2, 1.0),  # self share 1
        ([0] * 5 + [4] * 5, 2, 0.0),  # the levels between are empty and 0, 4 are further apart than 2
    ],
)
def test_smoothing_that_cannot_or_must_not_mix_is_the_identity(levels, width, share):
    s = c.smooth(levels, width, share, seed=3)
    assert s.order == list(range(len(levels))) and s.segments == levels


def test_smoothing_bridges_an_empty_level_within_the_width():
    levels = [0] * 10 + [2] * 10  # level 1 empty; 0 and 2 are two levels apart
    s = c.smooth(levels, width=2, self_share=0.5, seed=0)
    assert s.mix == {0: {0: 5, 2: 5}, 2: {0: 5, 2: 5}}


def test_smoothing_refuses_an_unordered_ladder():
    with pytest.raises(ValueError, match="non-decreasing"):
        c.smooth([1, 0], 2, 0.6, 0)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 12), min_size=1, max_size=K + 1),
    width=st.integers(0, 4),
    share=st.floats(0, 1),
    seed=st.integers(0, 10),
)
def test_smoothing_properties(sizes, width, share, seed):
    levels = [lv for lv, n in enumerate(sizes) for _ in range(n)]
    s = c.smooth(levels, width, share, seed)
    assert sorted(s.order) == list(range(len(levels)))  # every item once
    assert s.segments == levels  # stretch sizes kept
    for segment, counts in s.mix.items():
        assert sum(counts.values()) == sizes[segment]
        assert counts.get(segment, 0) >= share * sizes[segment] - 1e-9  # the self share is a floor
        assert all(abs(source - segment) <= width for source in counts)  # only from the neighbours
    placed = Counter((seg, levels[p]) for seg, p in zip(s.segments, s.order, strict=True))
    assert placed == Counter({(a, b): n for a, m in s.mix.items() for b, n in m.items()})
    assert c.smooth(levels, width, share, seed) == s  # deterministic given the seed
