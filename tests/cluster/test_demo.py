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
