"""fab bake on a real local cluster: a provisioned node becomes an image, a new cluster starts from it,
provisions without reinstalling what the image carries, and trains."""

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


def test_a_cluster_from_a_baked_node_skips_what_the_image_carries_and_trains(cluster, provisioned):
    assert DOCKER_INSTALL in provisioned.hosts["node0"].changes  # a fresh node installs Docker
    image = bake.bake(cluster, "node0", f"{CLUSTER}-test")
    assert image == f"trainrig-baked/{CLUSTER}-test"
    # The node it came from was not touched: it still answers with its mesh key in place.
    assert provision.provision(cluster).hosts["node0"].message.startswith("up to date")
    baked = f"{CLUSTER}-b"[:31]
    remove_leftovers(baked)
    try:
        inv = lifecycle.up(baked, gpu_nodes=2, data_disk_gb=1, image=image)
        recap = provision.provision(inv)
        for node in ("node0", "node1"):
            assert recap.hosts[node].succeeded
            assert DOCKER_INSTALL not in recap.hosts[node].changes, recap.hosts[node].changes
        # What belonged to the first cluster's node0 stayed out: each node made its own mesh key.
        keys = {
            n: subprocess.run(
                ["docker", "exec", f"trainrig-{baked}-{n}", "cat", "/root/.ssh/id_ed25519.pub"],
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
        if inventory.path_for(baked).is_file():
            lifecycle.down(inventory.load(baked), purge=True)
        subprocess.run(["docker", "image", "rm", image], capture_output=True)


def test_up_from_an_image_that_does_not_exist_is_one_line_and_makes_nothing(home):
    with pytest.raises(TrainrigError, match=r"^no local node image 'trainrig-baked/nope'; bake one"):
        lifecycle.up(f"{CLUSTER}-n"[:31], gpu_nodes=1, data_disk_gb=1, image="trainrig-baked/nope")
    assert not inventory.path_for(f"{CLUSTER}-n"[:31]).exists()
