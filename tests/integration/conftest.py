"""One real local cluster per test session: containers with systemd and sshd, pinned keys."""

import os
import subprocess

import pytest

from cluster import inventory, lifecycle, provision
from infra.backends.local.instance import LABEL

# Distinct names let two test sessions share one Docker engine.
CLUSTER = os.environ.get("TRAINRIG_TEST_CLUSTER", "pytest-it")


def remove_leftovers(cluster: str) -> None:
    """Containers, network and volume an earlier, killed test session may have left."""
    for kind, name_format in (("container", "{{.Names}}"), ("network", "{{.Name}}"), ("volume", "{{.Name}}")):
        every = ["--all"] if kind == "container" else []
        names = subprocess.run(["docker", kind, "ls", *every, "--filter", f"label={LABEL}={cluster}", "--format", name_format],
                               capture_output=True, text=True).stdout.split()
        if names:
            subprocess.run(["docker", kind, "rm", *(["-f"] if kind != "network" else []), *names], capture_output=True)


@pytest.fixture(scope="session")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("trainrig-home")
    previous = os.environ.get("TRAINRIG_HOME")
    os.environ["TRAINRIG_HOME"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("TRAINRIG_HOME", None)
    else:
        os.environ["TRAINRIG_HOME"] = previous


@pytest.fixture(scope="session")
def cluster(home):
    remove_leftovers(CLUSTER)
    inv = lifecycle.up(CLUSTER, gpu_nodes=2, data_disk_gb=1)
    try:
        yield inv
    finally:
        # Clean up even when tests failed: nothing of the test cluster may outlive the session.
        lifecycle.down(inventory.load(CLUSTER), purge=True)


@pytest.fixture(scope="session")
def provisioned(cluster):
    return provision.provision(cluster)
