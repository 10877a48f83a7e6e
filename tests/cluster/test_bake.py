"""fab bake's checks before anything is captured, and what the generalizing script removes."""

import subprocess

import pytest

from cluster import bake, phases, provision
from infra.errors import TrainrigError


@pytest.fixture
def records(tmp_path, monkeypatch):
    """Phase records in a folder of the test's (the in-process sshd runs commands on this machine)."""
    folder = tmp_path / "records"
    monkeypatch.setattr(phases, "READ", phases.READ.replace(phases.RECORDS, str(folder)))
    monkeypatch.setattr(phases, "RECORDS", str(folder))
    return folder


def test_only_a_gpu_node_of_the_cluster_is_baked(ssh_cluster, records):
    cluster = ssh_cluster(1)
    with pytest.raises(TrainrigError, match=r"^'storage' is not a GPU node of 'unit'; bake one of: node0$"):
        bake.bake(cluster.inv, "storage")


def test_a_node_that_has_not_finished_provisioning_is_refused_before_any_capture(ssh_cluster, records, monkeypatch):
    cluster = ssh_cluster(1)
    monkeypatch.setattr(bake.clouds, "get", lambda name: pytest.fail("a cloud was asked to capture"))
    phases.record(cluster.inv, {"node0": {"common": "x", "docker": "y"}})
    with pytest.raises(TrainrigError) as exc:
        bake.bake(cluster.inv, "node0")
    unfinished = "node0 of 'unit' has not finished provisioning (cluster_hosts, data_disk, apt_cache, "
    assert str(exc.value).startswith(unfinished)
    assert str(exc.value).endswith("not done); run fab provision --name unit first")


def test_the_generalizing_script_keeps_only_the_portable_phase_records(tmp_path):
    folder = tmp_path / "phases"
    folder.mkdir()
    for phase in provision.PHASES:
        (folder / phase.name).write_text("digest\n")
    # The records part of the script, run against a copy (the rest touches /root and /etc).
    records_part = bake.GENERALIZE.split(" ; ")[1].replace(phases.RECORDS, str(folder))
    subprocess.run(["sh", "-c", records_part], check=True)
    assert sorted(p.name for p in folder.iterdir()) == sorted(bake.PORTABLE)
    assert set(bake.PORTABLE) <= {p.name for p in provision.PHASES}


class Capturing:
    """A cloud backend that records what it was asked to capture (a stack cloud: it generalizes the node)."""

    def __init__(self):
        self.captured = []

    def bake(self, inv, node, name, generalize):
        self.captured.append((node.name, name))
        return f"img-{name}", True


class StandInCloud:
    def __init__(self, backend):
        self._backend = backend

    def backend(self, stack):
        return self._backend


def test_the_gpu_node_and_the_storage_node_are_baked_and_provisioned_again_once(ssh_cluster, records, monkeypatch):
    cluster = ssh_cluster(2)
    done = {p.name: "x" for p in provision.PHASES}
    phases.record(cluster.inv, {n.name: done for n in cluster.inv.nodes})
    backend = Capturing()
    monkeypatch.setattr(bake.clouds, "get", lambda name: StandInCloud(backend))
    provisioned = []
    monkeypatch.setattr(bake.provision, "provision", lambda inv: provisioned.append(inv.cluster))
    baked = bake.bake(cluster.inv, "node1", "nightly")
    assert backend.captured == [("node1", "nightly"), ("storage", "nightly-storage")]
    assert baked == bake.Baked("img-nightly", "img-nightly-storage")
    # Both gave up their mesh keys: the mesh phase runs again on every node, in one provisioning.
    assert provisioned == ["unit"]
    assert all("ssh_mesh" not in phases.read_state(cluster.inv, [n])[n.name].recorded for n in cluster.inv.nodes)


def test_an_unfinished_storage_node_is_refused_before_any_capture(ssh_cluster, monkeypatch):
    cluster = ssh_cluster(1)
    monkeypatch.setattr(bake.clouds, "get", lambda name: pytest.fail("a cloud was asked to capture"))
    # The in-process sshd gives every node this machine's one records folder: each node's state is given here.
    done = phases.NodeState("facts", {p.name: "x" for p in provision.PHASES})
    started = phases.NodeState("facts", {"common": "x"})
    monkeypatch.setattr(bake.phases, "read_state", lambda inv, nodes: {"node0": done, "storage": started})
    with pytest.raises(TrainrigError, match=r"^storage of 'unit' has not finished provisioning \(cluster_hosts, "):
        bake.bake(cluster.inv, "node0")


def test_a_failed_storage_capture_still_provisions_the_generalized_gpu_node_again(ssh_cluster, records, monkeypatch):
    cluster = ssh_cluster(1)
    phases.record(cluster.inv, {n.name: {p.name: "x" for p in provision.PHASES} for n in cluster.inv.nodes})

    class RefusesStorage(Capturing):
        def bake(self, inv, node, name, generalize):
            if node.name == "storage":
                raise TrainrigError("cannot bake unit-storage into an AMI: quota")
            return super().bake(inv, node, name, generalize)

    backend = RefusesStorage()
    monkeypatch.setattr(bake.clouds, "get", lambda name: StandInCloud(backend))
    provisioned = []
    monkeypatch.setattr(bake.provision, "provision", lambda inv: provisioned.append(inv.cluster))
    with pytest.raises(TrainrigError, match="quota"):
        bake.bake(cluster.inv, "node0", "nightly")
    assert provisioned == ["unit"]  # node0 got its mesh key and credentials back
