"""Checkpoint pacing: pickling stays below a share of the event loop's time."""

from __future__ import annotations

import doctest

import pytest

from models import checkpoint
from models.checkpoint import CheckpointPacer


def test_a_round_waits_in_proportion_to_what_the_last_one_cost() -> None:
    pacer = CheckpointPacer(max_share=0.05)
    assert pacer.due(now=10.0)
    pacer.spent(0.2, now=10.2)  # 0.2 s of pickling: 3.8 s more before the next round
    assert not pacer.due(now=13.9)
    assert pacer.due(now=14.0)
    assert pacer.skipped == 1
    # Over many rounds, each run as soon as allowed, pickling is the allowed share of time.
    now, busy = 14.0, 0.0
    for _ in range(100):
        while not pacer.due(now):
            now += 0.01
        now += 0.2
        busy += 0.2
        pacer.spent(0.2, now)
    assert busy / (now - 14.0) == pytest.approx(0.05, rel=0.01)


def test_a_cheap_round_leaves_the_configured_interval_in_charge() -> None:
    pacer = CheckpointPacer(max_share=0.05)
    pacer.spent(0.001, now=1.0)
    assert pacer.due(now=1.02)


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_the_share_must_be_a_fraction(share: float) -> None:
    with pytest.raises(ValueError, match="max_share"):
        CheckpointPacer(max_share=share)


def test_the_docstring_example_holds() -> None:
    assert doctest.testmod(checkpoint).failed == 0
