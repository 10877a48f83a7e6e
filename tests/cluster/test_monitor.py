"""The monitor's view of a run: partial lines, state, sparkline."""

from datetime import UTC, datetime

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
