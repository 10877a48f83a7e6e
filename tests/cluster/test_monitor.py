"""The monitor's view of a run: partial lines, state, sparkline."""

import io
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cluster import monitor
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


def test_every_state_the_supervisor_ends_with_is_final_everywhere():
    from cluster import runs
    from cluster.remote import sampler, supervisor

    assert {"succeeded", "failed", "cancelled", "stalled"} == runs.FINAL_STATES
    assert sampler.FINAL == runs.FINAL_STATES  # the sampler stops on each of them
    # Every state the supervisor can write is one of them.
    source = Path(supervisor.__file__).read_text()
    written = set(re.findall(r'return "(\w+)", code', source)) | set(re.findall(r'decide\("(\w+)"', source))
    written |= set(re.findall(r'state, reason = "(\w+)"', source))
    assert written and written <= runs.FINAL_STATES, written


def stalled_run(ssh_cluster, state: str = "stalled"):
    cluster = ssh_cluster(1)
    run_dir = cluster.share / "trainrig" / "runs" / "tiny-1"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "time": 1.0}\n')
    (run_dir / "train.log").write_text("step 1 loss 2.0\n")
    reason = "no new step for 30s (last: step 1 at 12:00:01)"
    (run_dir / "status.json").write_text(
        json.dumps({"state": state, "started_at": 100.0, "ended_at": 140.0, "reason": reason})
    )
    # Any look at the unit says it is gone, as after a stall: the state alone must end the watch.
    cluster.add_program("systemctl", "exit 3\n")
    rec = RunRecord(
        id="tiny-1", job="tiny", node="node0", run_dir=str(run_dir), ranks=1, max_steps=10, started_at=datetime.now(UTC)
    )
    return cluster, rec


def test_monitor_ends_on_a_stalled_run_with_its_cause(ssh_cluster):
    cluster, rec = stalled_run(ssh_cluster)
    view = monitor.monitor(cluster.inv, rec, interval=0.1, timeout=20)
    assert view.state == "stalled" and view.finished
    assert view.reason == "no new step for 30s (last: step 1 at 12:00:01)"
    assert "cause" in str([c for c in monitor.render(view).columns[0]._cells])


def test_logs_follow_ends_on_a_stalled_run(ssh_cluster):
    cluster, rec = stalled_run(ssh_cluster)
    out = io.StringIO()
    started = time.monotonic()
    monitor.logs(cluster.inv, rec, follow=True, interval=0.1, out=out)
    assert out.getvalue() == "step 1 loss 2.0\n" and time.monotonic() - started < 15


def test_eta_from_the_recent_pace_and_the_jobs_own_metrics():
    view = RunView(RECORD, status={"state": "running", "started_at": 0})
    assert view.eta() is None  # no pace yet
    view.metrics = [{"step": s, "loss": 1.0, "time": s / 2} for s in range(10, 60, 10)]  # 2 steps/s
    view.metrics.insert(2, {"step": 20, "bleu": 21.5, "time": 10.5})
    assert view.eta() == pytest.approx((100 - 50) / 2)
    assert view.own_metrics() == {"bleu": (21.5, 20)}
    rows = dict(zip(*[column._cells for column in monitor.render(view).columns], strict=True))
    assert rows["ETA"] == "0m25s" and rows["bleu"] == "21.5  (step 20)"
    assert monitor.plain_line(view, view.metrics[2]).endswith("step 20/100  bleu 21.5")
    view.status = {"state": "succeeded", "started_at": 0, "ended_at": 30}
    assert view.eta() is None and "ETA" not in dict(zip(*[c._cells for c in monitor.render(view).columns], strict=True))
    assert monitor.duration(3 * 3600 + 125) == "3h02m"


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
