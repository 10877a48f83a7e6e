"""The monitor's view of a run: partial lines, state, sparkline."""

import time
from datetime import UTC, datetime

import pytest

from cluster.monitor import RunView, sparkline
from cluster.runs import RunRecord

RECORD = RunRecord(
    id="r", job="j", node="node0", run_dir="/data/r", ranks=4, max_steps=100, started_at=datetime.now(UTC)
)


def test_feed_keeps_partial_lines_for_later():
    view = RunView(RECORD)
    assert view.feed(b'{"step": 1, "loss": 2.0}\n{"step": 2, "lo') == [{"step": 1, "loss": 2.0}]
    assert view.feed(b'ss": 1.0}\n') == [{"step": 2, "loss": 1.0}]
    assert view.losses() == [2.0, 1.0]
    assert view.state == "starting" and not view.finished


def test_final_states():
    view = RunView(RECORD, status={"state": "failed", "started_at": 0, "ended_at": 5})
    assert view.finished and view.elapsed == 5


def test_sparkline_shape():
    line = sparkline([4.0, 3.0, 2.0, 1.0])
    assert line[0] == "█" and line[-1] == "▁" and len(line) == 4
    assert sparkline([]) == ""


def test_elapsed_uses_the_nodes_clock_only_even_far_ahead_of_ours(monkeypatch):
    ahead = time.time() + 204_528_419  # the node's clock, years ahead of the operator's
    view = RunView(RECORD, status={"state": "running", "started_at": ahead, "heartbeat_at": ahead + 40})
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    assert view.elapsed == pytest.approx(40)
    now[0] += 2.5  # no new heartbeat yet: our own clock carries it on
    assert view.elapsed == pytest.approx(42.5)
    view.status = {**view.status, "heartbeat_at": ahead + 43}
    assert view.elapsed == pytest.approx(43)
    view.status = {**view.status, "state": "succeeded", "ended_at": ahead + 44}
    assert view.elapsed == 44


def test_a_sample_age_is_how_long_ago_it_came_in(monkeypatch):
    now = [50.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    view = RunView(RECORD)
    view.feed_telemetry("node0", b'{"time": 9999999999.0, "cpu": 5}\n')
    now[0] += 7
    assert view.sample_ages() == {"node0": 7.0}
