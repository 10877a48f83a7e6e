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
