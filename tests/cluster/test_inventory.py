"""The inventory contract: validation that names the field, round trips, pinned host keys."""

import json
from datetime import UTC

import pytest

from infra import inventory
from infra.errors import TrainrigError
from tests.helpers import make_inventory


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINRIG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_round_trip_and_known_hosts(home):
    inv = make_inventory()
    inventory.save(inv)
    loaded = inventory.load("unit")
    assert loaded == inv
    lines = (home / "clusters" / "unit" / "known_hosts").read_text().splitlines()
    assert lines[0].startswith("[127.0.0.1]:2200 ssh-ed25519 ")
    assert len(lines) == 3


def test_cost_adds_nodes_and_kept_storage():
    assert make_inventory(gpu_nodes=2).hourly_cost_usd() == pytest.approx(3.2)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(cloud="gcp"), "cloud: Value error, unknown cloud 'gcp'; one of: aws, ibm, local"),
        (lambda d: d["nodes"][0].update(ssh_port=0), "nodes.0.ssh_port: Input should be greater than or equal to 1"),
        (lambda d: d["nodes"][1].update(name="node0"), "node names must be unique, repeated: node0"),
        (lambda d: d["nodes"][0].update(host_key="not-a-key"), "nodes.0.host_key: String should match pattern"),
        (
            lambda d: d["nodes"][0].update(host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA=x"),
            "nodes.0.host_key: Value error, the ssh-ed25519 key is not valid base64",
        ),
        (
            # An RSA key's blob under the ed25519 name: paramiko would fail on it at every connection.
            lambda d: d["nodes"][1].update(host_key="ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7"),
            "nodes.1.host_key: Value error, the key says ssh-ed25519 but holds ssh-rsa",
        ),
        (lambda d: d["nodes"][0].update(private_address="192.168.1.1"), "nodes outside network 10.9.0.0/24: node0"),
        (lambda d: d["storage"].update(server="node0"), "storage.server 'node0' is not a storage node"),
        (lambda d: d.update(schema_version=2), "schema_version: Input should be 1"),
        (lambda d: d["nodes"][0].update(role="gpu", rack=3), "nodes.0.rack: Extra inputs are not permitted"),
    ],
)
def test_invalid_inventory_names_the_field(tmp_path, mutate, message):
    data = json.loads(inventory.dumps(make_inventory()))
    mutate(data)
    path = tmp_path / "inv.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TrainrigError) as err:
        inventory.load_file(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_unknown_cluster_lists_the_known_ones():
    inventory.save(make_inventory(cluster="alpha"))
    with pytest.raises(
        TrainrigError, match=r"no cluster named 'beta' \(known clusters: alpha\); create it with: fab up --name beta"
    ):
        inventory.load("beta")


def test_invalid_cluster_name():
    with pytest.raises(TrainrigError, match="cluster name 'Bad Name' is invalid"):
        inventory.load("Bad Name")


def test_stopped_cluster_is_not_running():
    inv = make_inventory().model_copy(update={"nodes": []})
    with pytest.raises(TrainrigError, match="has no nodes running; start it with: fab up --name unit"):
        inventory.require_running(inv)


def test_secret_files_are_owner_only(home):
    from infra import keys

    keys.ensure_login_key(home / "k" / "id_ed25519", "c")
    assert (home / "k" / "id_ed25519").stat().st_mode & 0o777 == 0o600


def test_efs_storage_needs_no_storage_node_and_reads_from_a_gpu_node():
    from datetime import datetime

    from cluster.runs import RunRecord, reader_node

    base = make_inventory(gpu_nodes=2)
    data = json.loads(inventory.dumps(base))
    data.update(
        cloud="aws",
        nodes=data["nodes"][:2],
        storage={"kind": "efs", "server": "10.9.0.99", "export": "/", "mount_point": "/data"},
    )
    inv = inventory.parse(json.dumps(data), "test")
    assert inv.storage_node is None and inv.storage.kind == "efs"
    record = RunRecord(
        id="r", job="j", node="node1", run_dir="/data/r", ranks=2, max_steps=1, started_at=datetime.now(UTC)
    )
    assert reader_node(inv, record).name == "node1"
    # After fab down an EFS cluster has no node at all: say how to bring one back, for this cloud.
    down = inv.model_copy(update={"nodes": [], "stack": "efs-demo"})
    with pytest.raises(
        TrainrigError,
        match=r"no node of 'unit' is up to read run r from; start it with: "
        r"pulumi config set trainrig:gpu_nodes N --stack efs-demo && "
        r"pulumi up --stack efs-demo$",
    ):
        reader_node(down, record)
    with pytest.raises(TrainrigError, match=r"has no nodes running; start it with: pulumi config set"):
        inventory.require_running(down)
