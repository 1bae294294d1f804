"""`clipsearch ingest` polls the dataset less often while much is left to index, every second near the end."""

from __future__ import annotations

import pytest
from clipsearch_tools.cli.ingest_commands import _MAX_POLL_SECONDS, _POLL_SECONDS, _poll_interval

pytestmark = pytest.mark.unit


def test_no_progress_yet_polls_every_second():
    assert _poll_interval((100.0, 0), 100.0, 0, 1000) == _POLL_SECONDS
    assert _poll_interval((100.0, 0), 130.0, 0, 1000) == _POLL_SECONDS


def test_the_interval_follows_the_time_left_within_its_bounds():
    # 10 images/s so far: 900 left is 90 s, capped; 100 left is 10 s -> 2.5 s; 5 left is 0.5 s -> 1 s.
    assert _poll_interval((0.0, 0), 10.0, 100, 1000) == _MAX_POLL_SECONDS
    assert _poll_interval((0.0, 0), 90.0, 900, 1000) == pytest.approx(2.5)
    assert _poll_interval((0.0, 0), 99.5, 995, 1000) == _POLL_SECONDS
