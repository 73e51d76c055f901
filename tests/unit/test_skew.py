"""The clock-skew estimator (galaxy/gossip/skew.py): table tests and a property over random delays."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from galaxy.gossip.skew import SkewEstimator

WALL0 = 1_700_000_000_000


def frame(est: SkewEstimator, now_ms: int, peer: str, skew_ms: int, delay_ms: int) -> None:
    """A frame ``peer`` sent ``delay_ms`` ago (our time), stamped by a clock ``skew_ms`` ahead of ours."""
    received = WALL0 + now_ms
    est.observe(now_ms, peer, received - delay_ms + skew_ms, received)


def test_the_least_delayed_frame_wins() -> None:
    est = SkewEstimator(bucket_ms=1000)
    assert est.skew_ms(0, "b") is None
    for t, delay in ((0, 40), (10, 3), (20, 90)):
        frame(est, t, "b", 1500, delay)
    assert est.skew_ms(20, "b") == 1497
    frame(est, 30, "c", -800, 1)
    assert est.skew_ms(30, "c") == -801 and est.skew_ms(30, "b") == 1497


def test_a_stepped_clock_ages_out_and_silence_forgets() -> None:
    est = SkewEstimator(bucket_ms=1000)
    frame(est, 0, "b", 2000, 0)            # b's clock is 2 s ahead ...
    frame(est, 500, "b", 0, 0)             # ... then NTP steps it back
    assert est.skew_ms(500, "b") == 2000, "within the window the old maximum holds"
    frame(est, 1200, "b", 0, 0)            # next bucket: the previous still counts
    assert est.skew_ms(1200, "b") == 2000
    frame(est, 2300, "b", 0, 5)            # two buckets on: only recent frames
    assert est.skew_ms(2300, "b") == 0
    assert est.skew_ms(3400, "b") == -5, "a bucket old: the current bucket alone"
    assert est.skew_ms(4300, "b") is None, "unheard for two buckets: no estimate"
    est.forget("b")
    assert len(est) == 0


def test_peers_are_bounded_least_recently_heard_first() -> None:
    est = SkewEstimator(peers_max=3)
    for i, peer in enumerate("abcd"):
        frame(est, i, peer, 10, 0)
    assert len(est) == 3 and est.skew_ms(4, "a") is None and est.skew_ms(4, "d") == 10
    frame(est, 5, "b", 10, 0)              # b heard again: c is now the oldest
    frame(est, 6, "e", 10, 0)
    assert est.skew_ms(7, "c") is None and est.skew_ms(7, "b") == 10


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        SkewEstimator(bucket_ms=0)
    with pytest.raises(ValueError):
        SkewEstimator(peers_max=0)


@settings(max_examples=200, deadline=None)
@given(skew_ms=st.integers(-120_000, 120_000),
       frames=st.lists(st.tuples(st.integers(1, 400), st.integers(0, 250)), min_size=1, max_size=60))
def test_estimate_errs_low_by_at_most_the_least_recent_delay(skew_ms: int, frames: list[tuple[int, int]]) -> None:
    """Delays only lower a sample: the estimate is never above the true skew, and never below
    it by more than the smallest delay of the frames of the last bucket_ms."""
    est = SkewEstimator(bucket_ms=1000)
    now = 0
    seen: list[tuple[int, int]] = []
    for gap, delay in frames:
        now += gap
        frame(est, now, "b", skew_ms, delay)
        seen.append((now, delay))
        got = est.skew_ms(now, "b")
        assert got is not None and got <= skew_ms
        recent = [d for t, d in seen if now - t < 1000]
        assert got >= skew_ms - min(recent)
