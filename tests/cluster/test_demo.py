"""`fab demo` works on local clusters only: an earlier cluster of its name on a cloud is never removed."""

import pytest

from cluster import demo, lifecycle
from infra import inventory
from infra.errors import TrainrigError
from tests.helpers import make_inventory


def test_the_demo_refuses_a_cloud_cluster_of_its_name_and_touches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINRIG_HOME", str(tmp_path))
    inventory.save(make_inventory(cluster="demo").model_copy(update={"cloud": "aws", "stack": "aws-16-gpu"}))
    before = inventory.path_for("demo").read_bytes()
    removed: list = []
    monkeypatch.setattr(lifecycle, "down", lambda *a, **k: removed.append(a))
    monkeypatch.setattr(lifecycle, "up", lambda *a, **k: removed.append(a))
    with pytest.raises(TrainrigError, match=r"cluster 'demo' is on aws; the demo runs on a local cluster"):
        demo.demo("demo", 2)
    assert removed == [] and inventory.path_for("demo").read_bytes() == before


class Flow:
    """The demo's steps as stand-ins that record their order: no cluster, no run."""

    def __init__(self, monkeypatch, tmp_path, fail_at=None):
        from datetime import UTC, datetime
        from types import SimpleNamespace

        from cluster import deadman, monitor, plot, provision, results, runs
        from tests.helpers import make_inventory

        monkeypatch.setenv("TRAINRIG_HOME", str(tmp_path / "home"))
        self.calls: list = []
        self.inv = make_inventory(gpu_nodes=1, cluster="demo")
        self.record = runs.RunRecord(
            id="r1",
            job="dp-mlp",
            node="node0",
            run_dir="/data/trainrig/runs/r1",
            ranks=2,
            max_steps=30,
            started_at=datetime.now(UTC),
        )

        def step(name, result=None):
            def call(*args, **kwargs):
                self.calls.append((name, args[1:], kwargs))
                if name == fail_at:
                    raise TrainrigError(f"{name} failed")
                return result

            return call

        view = SimpleNamespace(state="succeeded", record=self.record, last={"step": 30}, losses=lambda: [1.0, 0.1])
        gone = {
            "by": "the dead-man switch on storage",
            "trigger": "down-after",
            "reason": "run r1 succeeded",
            "at": 100.0,
            "compute_gone_at": 104.0,
            "hosts": ["node0"],
            "still_up": [],
        }
        monkeypatch.setattr(lifecycle, "up", step("up", self.inv))
        monkeypatch.setattr(lifecycle, "down", step("down"))
        monkeypatch.setattr(provision, "provision", step("provision"))
        monkeypatch.setattr(deadman, "preflight", step("preflight"))
        monkeypatch.setattr(runs, "launch", step("launch", self.record))
        monkeypatch.setattr(
            deadman, "arm", lambda inv, settings, every=2.0: self.calls.append(("arm", settings)) or settings
        )
        monkeypatch.setattr(monitor, "monitor", step("monitor", view))
        monkeypatch.setattr(results, "fetch", step("fetch", tmp_path))
        monkeypatch.setattr(plot, "plot_run", step("plot", tmp_path / "curves.png"))
        monkeypatch.setattr(plot, "plot_telemetry", step("telemetry"))
        monkeypatch.setattr(deadman, "teardown_record", step("record", gone))

    def names(self):
        return [c[0] for c in self.calls]


def test_demo_down_after_leaves_the_teardown_to_the_cluster_and_keeps_storage(tmp_path, monkeypatch):
    flow = Flow(monkeypatch, tmp_path)
    demo.demo("demo", 1, down_after=30.0)
    # Checked before the run starts, armed once it is recorded, with the run and its grace (train's own path).
    assert flow.names() == [
        "up",
        "provision",
        "preflight",
        "launch",
        "arm",
        "monitor",
        "fetch",
        "plot",
        "telemetry",
        "record",
    ]
    armed = flow.calls[4][1]
    assert armed.after_run == {"id": "r1", "run_dir": "/data/trainrig/runs/r1", "grace": 30.0}
    assert "down" not in flow.names(), "the switch tears the compute down; the demo purges nothing"


def test_demo_without_down_after_purges_as_before(tmp_path, monkeypatch):
    flow = Flow(monkeypatch, tmp_path)
    demo.demo("demo", 1)
    assert "preflight" not in flow.names() and "arm" not in flow.names()
    assert flow.calls[-1] == ("down", (), {"purge": True})


def test_demo_down_after_that_fails_before_the_run_keeps_storage(tmp_path, monkeypatch):
    """Nothing armed the switch: the demo takes the compute down itself, and keeps storage as asked."""
    flow = Flow(monkeypatch, tmp_path, fail_at="provision")
    with pytest.raises(TrainrigError, match="provision failed"):
        demo.demo("demo", 1, down_after=0.0)
    assert flow.names() == ["up", "provision", "down"]
    assert flow.calls[-1] == ("down", (), {"purge": False})
