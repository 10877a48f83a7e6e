"""One real local cluster per test session: containers with systemd and sshd, pinned keys."""

import os
import subprocess

import pytest
import yaml

from cluster import lifecycle, provision
from infra import inventory
from infra.clouds.local.instance import LABEL

# Distinct names let two test sessions share one Docker engine.
CLUSTER = os.environ.get("TRAINRIG_TEST_CLUSTER", "pytest-it")


def remove_leftovers(cluster: str) -> None:
    """Containers, network and volume an earlier, killed test session may have left."""
    for kind, name_format in (("container", "{{.Names}}"), ("network", "{{.Name}}"), ("volume", "{{.Name}}")):
        every = ["--all"] if kind == "container" else []
        names = subprocess.run(
            ["docker", kind, "ls", *every, "--filter", f"label={LABEL}={cluster}", "--format", name_format],
            capture_output=True,
            text=True,
        ).stdout.split()
        if names:
            subprocess.run(["docker", kind, "rm", *(["-f"] if kind != "network" else []), *names], capture_output=True)


def pytest_collection_modifyitems(items):
    """Tests of the nodes as created run before any test provisions them (whatever file it is in), and
    tests that kill a node of the session's cluster run after every other: that node does not come back."""

    def order(item) -> int:
        if item.get_closest_marker("fresh_nodes"):
            return 0
        return 2 if item.get_closest_marker("kills_a_node") else 1

    items.sort(key=order)


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


# -- a private registry for the registry_login role ----------------------------------------
# Port 5000 on the storage node is the cluster's own registry (image_registry role); this one needs a login.
REGISTRY = "storage:5001"
REGISTRY_USER = "trainrig"
REGISTRY_CONFIG = """\
version: 0.1
storage:
  filesystem:
    rootdirectory: /var/lib/docker-registry-auth
http:
  addr: :5001
auth:
  htpasswd:
    realm: trainrig-test
    path: /etc/docker/registry/htpasswd
"""


def node_exec(cluster: str, node: str, *argv: str, input: str | None = None) -> subprocess.CompletedProcess:
    """A command in a node through the engine (set-up and faults, not what is under test)."""
    return subprocess.run(
        ["docker", "exec", "-i", f"trainrig-{cluster}-{node}", *argv],
        input=input,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )


@pytest.fixture(scope="session")
def registry(cluster, provisioned):
    """Debian's docker-registry on the storage node, htpasswd (bcrypt) auth, plain HTTP on the
    cluster network; provisioning from here on logs the GPU nodes in (provision-vars.yml)."""
    import secrets

    password = secrets.token_urlsafe(18)
    node_exec(
        CLUSTER,
        "storage",
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "docker-registry",
        "apache2-utils",
    )
    # htpasswd reads the password from stdin (-i), so it is never on a command line.
    htpasswd = node_exec(CLUSTER, "storage", "htpasswd", "-iBn", REGISTRY_USER, input=password).stdout
    node_exec(CLUSTER, "storage", "sh", "-c", "cat > /etc/docker/registry/htpasswd", input=htpasswd)
    node_exec(CLUSTER, "storage", "sh", "-c", "cat > /etc/docker/registry/auth.yml", input=REGISTRY_CONFIG)
    node_exec(
        CLUSTER,
        "storage",
        "systemd-run",
        "--unit",
        "trainrig-test-registry",
        "--collect",
        "/usr/bin/docker-registry",
        "serve",
        "/etc/docker/registry/auth.yml",
    )
    provision.cluster_vars_path(CLUSTER).write_text(
        yaml.safe_dump(
            {
                # The cluster's own registry too, where the inventory has one (a test's storage-less
                # or EFS inventory has none, and a plain reference would be undefined there).
                "docker_insecure_registries": (
                    f"{{{{ ['{REGISTRY}'] + ([trainrig_registry] if trainrig_registry is defined else []) }}}}"
                ),
                "registry_login_registry": REGISTRY,
                "registry_login_username": REGISTRY_USER,
            }
        )
    )
    previous = os.environ.get("TRAINRIG_REGISTRY_PASSWORD")
    os.environ["TRAINRIG_REGISTRY_PASSWORD"] = password
    try:
        yield password
    finally:
        if previous is None:
            os.environ.pop("TRAINRIG_REGISTRY_PASSWORD", None)
        else:
            os.environ["TRAINRIG_REGISTRY_PASSWORD"] = previous
