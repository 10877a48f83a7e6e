"""Up, down and status through a stand-in cloud backend: rollback, flag errors, capabilities, state kept or purged."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from cluster import lifecycle
from infra import clouds, inventory, keys, state
from infra.clouds import ClusterRequest
from infra.errors import TrainrigError
from infra.inventory import Inventory, Retained
from tests.helpers import make_inventory
from tests.sshd import free_port

FLAG_CASES = yaml.safe_load((Path(__file__).parent / "cases" / "up_flags.yaml").read_text())


@dataclass
class FakeBackend:
    """The Backend protocol, recording every verb; like a real backend, create writes the cluster's state."""

    ready_error: BaseException | None = None
    destroy_error: Exception | None = None
    calls: list[tuple] = field(default_factory=list)

    def create(self, request: ClusterRequest, board) -> Inventory:
        self.calls.append(("create", request))
        inv = make_inventory(gpu_nodes=request.gpu_nodes, cluster=request.name)
        inventory.save(inv)
        return inv

    def wait_ready(self, inv: Inventory, board) -> None:
        self.calls.append(("wait_ready", inv.cluster))
        if self.ready_error:
            raise self.ready_error

    def describe(self, cluster: str) -> Inventory:
        raise AssertionError("lifecycle does not describe")

    def reconcile(self, inv: Inventory, board) -> tuple[Inventory, list[str]]:
        self.calls.append(("reconcile", inv.cluster))
        moved = [n.model_copy(update={"ssh_port": n.ssh_port + 1000}) for n in inv.nodes]
        return inv.model_copy(update={"nodes": moved}), ["node0: started"]

    def destroy(self, inv: Inventory, purge: bool) -> Inventory | None:
        self.calls.append(("destroy", inv.cluster, purge))
        if self.destroy_error:
            raise self.destroy_error
        if purge:
            return None
        kept = [n for n in inv.nodes if n.role == "storage"]
        return inv.model_copy(update={"nodes": kept})

    def resume(self, inv: Inventory, board) -> Inventory:
        self.calls.append(("resume", inv.cluster))
        resumed = inv.model_copy(update={"parked_at": None})
        inventory.save(resumed)
        return resumed

    def billable(self, cluster: str) -> list[str]:
        return []

    def verbs(self) -> list[str]:
        return [c[0] for c in self.calls]


@dataclass
class FakeCloud:
    name: str = "local"
    capabilities: frozenset[str] = frozenset({"create", "data_disk", "shared_storage"})
    backend_: FakeBackend = field(default_factory=FakeBackend)
    stacks: list[str | None] = field(default_factory=list)

    def backend(self, stack: str | None = None) -> FakeBackend:
        self.stacks.append(stack)
        return self.backend_


@pytest.fixture
def cloud(tmp_path, monkeypatch) -> FakeCloud:
    """A stand-in cloud registered under every name, with TRAINRIG_HOME in tmp_path."""
    monkeypatch.setenv("TRAINRIG_HOME", str(tmp_path / "home"))
    fake = FakeCloud()
    monkeypatch.setattr(clouds, "get", lambda name: fake)
    return fake


def test_up_creates_then_waits_and_keeps_a_ready_cluster(cloud):
    inv = lifecycle.up("alpha", gpu_nodes=3, data_disk_gb=8)
    backend = cloud.backend_
    assert backend.verbs() == ["create", "wait_ready"]
    assert backend.calls[0][1] == ClusterRequest(name="alpha", cloud="local", gpu_nodes=3, data_disk_gb=8)
    assert [n.name for n in inv.gpu_nodes] == ["node0", "node1", "node2"]


def test_a_new_cluster_that_never_gets_ready_is_removed_entirely(cloud):
    cause = TrainrigError("node1 did not answer on SSH within 120s")
    cloud.backend_.ready_error = cause
    with pytest.raises(TrainrigError) as exc:
        lifecycle.up("alpha", gpu_nodes=2, data_disk_gb=2)
    assert exc.value is cause
    # The backend wrote state while creating: newness is judged from before create, so purge=True.
    assert cloud.backend_.calls[-1] == ("destroy", "alpha", True)
    # No inventory of nodes that are gone, no keys: the next `fab up` starts afresh, not "already up".
    assert not state.cluster_dir("alpha").exists()


def test_an_existing_cluster_that_never_gets_ready_keeps_its_storage(cloud):
    state.cluster_dir("alpha").mkdir(parents=True)  # e.g. storage kept by an earlier `fab down`
    cause = TrainrigError("node0 did not answer on SSH within 120s")
    cloud.backend_.ready_error = cause
    with pytest.raises(TrainrigError) as exc:
        lifecycle.up("alpha", gpu_nodes=2, data_disk_gb=2)
    assert exc.value is cause
    assert cloud.backend_.calls[-1] == ("destroy", "alpha", False)
    assert state.cluster_dir("alpha").is_dir()  # its kept storage is still known


def test_an_interrupted_wait_rolls_back_too(cloud):
    cloud.backend_.ready_error = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        lifecycle.up("alpha", gpu_nodes=1, data_disk_gb=2)
    assert cloud.backend_.calls[-1] == ("destroy", "alpha", True)


@pytest.mark.parametrize(
    ("existing", "again"), [(False, "fab down --name alpha --purge"), (True, "fab down --name alpha")]
)
def test_a_failed_rollback_still_reports_the_cause_and_what_to_remove(cloud, existing, again):
    if existing:
        state.cluster_dir("alpha").mkdir(parents=True)
    cloud.backend_.ready_error = TrainrigError("node1 did not answer on SSH within 120s")
    cloud.backend_.destroy_error = TrainrigError("docker rm failed: device busy")
    with pytest.raises(TrainrigError) as exc:
        lifecycle.up("alpha", gpu_nodes=2, data_disk_gb=2)
    assert str(exc.value) == (
        "node1 did not answer on SSH within 120s; removing the half-made cluster failed too "
        f"(docker rm failed: device busy): run {again}"
    )
    assert exc.value.__cause__ is cloud.backend_.ready_error


@pytest.mark.parametrize("case", FLAG_CASES, ids=[c["case"] for c in FLAG_CASES])
def test_bad_flags_are_one_line_naming_the_flag(cloud, case):
    args = {"name": "alpha", "gpu_nodes": 2, "data_disk_gb": 2, **case["args"]}
    with pytest.raises(TrainrigError) as exc:
        lifecycle.up(**args)
    message = str(exc.value)
    assert message.startswith(case["error"]) and "\n" not in message
    assert cloud.backend_.calls == []


def test_up_of_a_cloud_that_fab_up_cannot_create_is_refused_with_a_reason(cloud):
    cloud.name = "aws"
    cloud.capabilities = frozenset({"pulumi_stack", "gpu"})
    with pytest.raises(TrainrigError) as exc:
        lifecycle.up("alpha", gpu_nodes=2, data_disk_gb=2, cloud="aws")
    assert str(exc.value) == "aws clusters cannot be created by fab up: make them with pulumi up --stack NAME"
    assert cloud.backend_.calls == []
    assert not state.cluster_dir("alpha").exists()


def _saved_cluster(name: str) -> Inventory:
    inv = make_inventory(cluster=name)
    inventory.save(inv)
    keys.ensure_login_key(state.cluster_dir(name) / "id_ed25519", name)
    return inv


def test_down_keeps_the_state_and_reports_what_remains(cloud):
    inv = _saved_cluster("alpha")
    remaining = lifecycle.down(inv, purge=False, stack="team-a")
    assert cloud.stacks == ["team-a"]
    assert cloud.backend_.calls == [("destroy", "alpha", False)]
    assert remaining is not None and [n.name for n in remaining.nodes] == ["storage"]
    assert inventory.path_for("alpha").is_file()
    assert (state.cluster_dir("alpha") / "id_ed25519").is_file()


def test_down_purge_removes_the_state_directory(cloud):
    inv = _saved_cluster("alpha")
    _saved_cluster("beta")
    assert lifecycle.down(inv, purge=True) is None
    assert cloud.backend_.calls == [("destroy", "alpha", True)]
    assert not state.cluster_dir("alpha").exists()
    assert inventory.path_for("beta").is_file()


def test_a_failed_destroy_keeps_the_state(cloud):
    inv = _saved_cluster("alpha")
    cloud.backend_.destroy_error = TrainrigError("pulumi destroy failed: throttled")
    with pytest.raises(TrainrigError, match="throttled"):
        lifecycle.down(inv, purge=True)
    assert inventory.path_for("alpha").is_file()


def _rows(table) -> dict[str, list[str]]:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(table)
    rows = [line.split() for line in out.getvalue().splitlines() if line.strip()]
    return {row[0]: row for row in rows}


def test_status_shows_each_node_reachable_or_not(ssh_cluster):
    cluster = ssh_cluster(2)
    gone = cluster.inv.node("node1").model_copy(update={"ssh_port": free_port()})
    impostor = cluster.inv.node("storage").model_copy(update={"host_key": keys.bare(keys.generate().public_openssh)})
    inv = cluster.inv.model_copy(
        update={
            "nodes": [cluster.inv.node("node0"), gone, impostor],
            "retained": [Retained(kind="volume", name="alpha-data", hourly_price_usd=0.05)],
        }
    )
    rows = _rows(lifecycle.status_table(inv))
    assert rows["node0"][-1] == "yes"
    assert rows["node1"][-1] == "no"
    assert rows["storage"][-1] == "no"
    assert rows["node0"][1:3] == ["gpu", "10.9.0.10"]
    assert f"127.0.0.1:{gone.ssh_port}" in rows["node1"]
    assert rows["alpha-data"][1:] == ["kept", "volume", "0.05"]
    assert " ".join(rows["a"]) == "a node that stopped or restarted comes back with: fab up --name unit"


def test_up_of_a_cluster_that_is_up_brings_its_nodes_back_instead_of_refusing(cloud):
    inventory.save(make_inventory(gpu_nodes=2, cluster="alpha"))
    assert lifecycle.running_gpu_nodes("alpha") == 2
    inv = lifecycle.up("alpha", gpu_nodes=2, data_disk_gb=2)
    assert cloud.backend_.verbs() == ["reconcile"]  # nothing created, nothing removed
    assert [n.ssh_port for n in inv.nodes] == [3200, 3201, 3202]


def test_up_of_a_cluster_that_is_up_with_another_size_is_refused(cloud):
    inventory.save(make_inventory(gpu_nodes=2, cluster="alpha"))
    with pytest.raises(TrainrigError, match=r"^cluster 'alpha' is up with 2 GPU nodes, not 3; use it as it is, or"):
        lifecycle.up("alpha", gpu_nodes=3, data_disk_gb=2)
    assert cloud.backend_.calls == []


# -- what the dead-man switch does: down or park ------------------------------------------------


def test_up_records_what_the_switch_does(cloud, monkeypatch):
    from cluster import deadman

    monkeypatch.setattr(deadman, "teardown_record", lambda inv: None)
    lifecycle.up("alpha", gpu_nodes=1, data_disk_gb=2, on_idle="park")
    assert cloud.backend_.calls[0][1].on_idle == "park"
    # Given again for a cluster that is up, it replaces the choice (the next arming uses it).
    inventory.save(make_inventory(gpu_nodes=1, cluster="beta"))
    inv = lifecycle.up("beta", gpu_nodes=1, data_disk_gb=2, on_idle="park")
    assert inv.on_idle == "park" and inventory.load("beta").on_idle == "park"
    assert cloud.backend_.verbs() == ["create", "wait_ready", "reconcile"]


def test_up_resumes_what_the_switch_parked_and_arms_it_again(cloud, monkeypatch):
    import time

    from cluster import deadman

    inventory.save(make_inventory(gpu_nodes=1, cluster="alpha").model_copy(update={"on_idle": "park"}))
    now = time.time()
    parked = {
        "by": "the dead-man switch on storage",
        "trigger": "idle",
        "reason": "quiet",
        "at": now + 1,
        "hosts": ["node0"],
        "action": "park",
        "compute_gone_at": now + 3,
        "still_up": [],
    }
    monkeypatch.setattr(deadman, "teardown_record", lambda inv: parked)
    armed = []
    monkeypatch.setattr(
        deadman, "rearm_after_park", lambda inv: armed.append(inv.cluster) or deadman.Settings(idle=600)
    )
    inv = lifecycle.up("alpha", gpu_nodes=1, data_disk_gb=2)
    assert cloud.backend_.verbs() == ["resume"], "parked nodes are started, not made anew"
    assert inv.parked_at is None and armed == ["alpha"]


def test_up_does_not_change_what_a_stack_cluster_does(cloud):
    inventory.save(make_inventory(gpu_nodes=1, cluster="alpha").model_copy(update={"stack": "aws-16-gpu"}))
    with pytest.raises(TrainrigError, match=r"^cluster 'alpha' is made by stack aws-16-gpu: set trainrig:on_idle"):
        lifecycle.up("alpha", gpu_nodes=1, data_disk_gb=2, on_idle="park")
    assert inventory.load("alpha").on_idle == "down" and cloud.backend_.calls == []
