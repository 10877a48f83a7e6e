"""fab bake on a real local cluster: a provisioned GPU node and the storage node become images, a new
cluster starts from them, provisions without reinstalling what the images carry, and trains."""

import subprocess
from pathlib import Path

import pytest

from cluster import bake, jobs, lifecycle, monitor, provision, runs
from infra import inventory
from infra.errors import TrainrigError
from tests.integration.conftest import CLUSTER, remove_leftovers

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DOCKER_INSTALL = "Install the Docker engine"
CACHE_INSTALL = "Install the package cache"


def test_a_cluster_from_a_baked_node_skips_what_the_image_carries_and_trains(cluster, provisioned):
    assert DOCKER_INSTALL in provisioned.hosts["node0"].changes  # a fresh node installs Docker
    assert CACHE_INSTALL in provisioned.hosts["storage"].changes  # a fresh storage node, the package cache
    baked = bake.bake(cluster, "node0", f"{CLUSTER}-test")
    assert baked == bake.Baked(f"trainrig-baked/{CLUSTER}-test", f"trainrig-baked/{CLUSTER}-test-storage")
    # The node it came from was not touched: it still answers with its mesh key in place.
    assert provision.provision(cluster).hosts["node0"].message.startswith("up to date")
    twin = f"{CLUSTER}-b"[:31]
    remove_leftovers(twin)
    try:
        inv = lifecycle.up(twin, gpu_nodes=2, data_disk_gb=1, image=baked.image, storage_image=baked.storage_image)
        recap = provision.provision(inv)
        # On the GPU nodes only what names this cluster or lives on its disks ran: not the driver,
        # Docker, the toolkit, the package proxy or the base packages.
        assert recap.hosts["node0"].phases == ["cluster_hosts", "data_disk", "nfs", "ssh_mesh", "registry_login"]
        assert set(recap.hosts["node0"].up_to_date) == set(bake.PORTABLE)
        for node in ("node0", "node1"):
            assert recap.hosts[node].succeeded
            assert DOCKER_INSTALL not in recap.hosts[node].changes, recap.hosts[node].changes
        # The storage node's services run again for the new cluster's addresses, on its new disk.
        assert recap.hosts["storage"].succeeded
        assert CACHE_INSTALL not in recap.hosts["storage"].changes, recap.hosts["storage"].changes
        assert provision.provision(inv).hosts["node0"].message.startswith("up to date")  # recorded
        # What belonged to the first cluster's node0 stayed out: each node made its own mesh key.
        keys = {
            n: subprocess.run(
                ["docker", "exec", f"trainrig-{twin}-{n}", "cat", "/root/.ssh/id_ed25519.pub"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            for n in ("node0", "node1")
        }
        assert len(set(keys.values())) == 2
        record = runs.launch(inv, jobs.load(ROOT / "training_jobs" / "dp-mlp.yaml"))
        view = monitor.monitor(inv, record, timeout=600)
        assert view.state == "succeeded"
        losses = view.losses()
        assert losses[-1] < losses[0]
    finally:
        if inventory.path_for(twin).is_file():
            lifecycle.down(inventory.load(twin), purge=True)
        subprocess.run(["docker", "image", "rm", baked.image, baked.storage_image], capture_output=True)


def test_up_from_an_image_that_does_not_exist_is_one_line_and_makes_nothing(home):
    with pytest.raises(TrainrigError, match=r"^--image: no local node image 'trainrig-baked/nope'; bake one"):
        lifecycle.up(f"{CLUSTER}-n"[:31], gpu_nodes=1, data_disk_gb=1, image="trainrig-baked/nope")
    assert not inventory.path_for(f"{CLUSTER}-n"[:31]).exists()
