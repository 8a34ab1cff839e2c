"""--max-size's room spending (edgeq/size_plan.py): the pure parts; end to end in tests/test_convert.py."""

from __future__ import annotations

from edgeq.size_plan import _shed


def test_an_overshoot_sheds_the_fewest_last_layers_that_cover_it():
    """The byte estimate counts weights, not scales and layout, so a mix can come out a few KB over
    the size: the lowest-ranked layers go, only as many as the overshoot needs."""
    extra = {1: 295_000, 2: 74_000, 3: 74_000, 4: 74_000}.__getitem__
    assert _shed([1, 2, 3, 4], 5_800, extra) == [1, 2, 3]
    assert _shed([1, 2, 3, 4], 74_001, extra) == [1, 2]
    assert _shed([1, 2, 3, 4], 200_000, extra) == [1]
    assert _shed([1, 2, 3, 4], 600_000, extra) == []
    assert _shed([1, 2], 0, extra) == [1, 2]
