"""`fab down` of a cloud cluster: the Pulumi CLI takes compute (or everything) away, the cloud's listing must agree."""

from __future__ import annotations

import json
import os
import stat
import urllib.request

import boto3
import pytest
import SoftLayer
from SoftLayer.testing import MockableTransport

from cluster import inventory, lifecycle
from cluster.errors import TrainrigError
from infra.backends.ibm_provider import Listing
from tests.cluster.test_inventory_sources import NODE, OUTPUTS

moto_server = pytest.importorskip("moto.server")
STACK = "aws-16-gpu"  # stacks/Pulumi.aws-16-gpu.yaml: cluster imagenet in us-east-1


@pytest.fixture(scope="module")
def endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def ec2(endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # boto3 sends every call to moto on loopback
    # moto keeps one in-process account for every server: start each test from an empty one.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10)
    return boto3.client("ec2", region_name="us-east-1")


def launch(ec2, role: str) -> str:
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    tags = [{"Key": "trainrig:cluster", "Value": "imagenet"}, {"Key": "trainrig:role", "Value": role}]
    return ec2.run_instances(ImageId=ami, InstanceType="p2.16xlarge", MinCount=1, MaxCount=1,
                             TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])["Instances"][0]["InstanceId"]


@pytest.fixture
def pulumi_cli(tmp_path, monkeypatch):
    """A stand-in Pulumi CLI (the real one is not installable here) that logs every call."""
    monkeypatch.setenv("TRAINRIG_HOME", str(tmp_path / "home"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    storage_only = {**OUTPUTS, "inventory": {**OUTPUTS["inventory"], "nodes": [NODE]}}
    script = bin_dir / "pulumi"
    script.write_text(f"""#!/bin/sh
echo "$*" >> {calls}
case "$*" in
  "stack output --json"*) cat {tmp_path / "outputs.json"} ;;
  "stack --show-name") echo {STACK} ;;
esac
""")
    (tmp_path / "outputs.json").write_text(json.dumps(storage_only))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    gpu = {**NODE, "name": "node0", "role": "gpu", "private_address": "10.42.0.10", "gpu_count": 16, "gpu_model": "K80"}
    inventory.save(inventory.parse(json.dumps({**OUTPUTS["inventory"], "nodes": [gpu, NODE]}), "test"))
    return lambda: calls.read_text().splitlines()


def test_down_removes_compute_keeps_storage(ec2, pulumi_cli):
    launch(ec2, "storage")
    remaining = lifecycle.down(inventory.load("imagenet"), purge=False)
    assert pulumi_cli()[:3] == ["stack --show-name", "config set trainrig:gpu_nodes 0", "up --yes --skip-preview"]
    assert [n.name for n in remaining.nodes] == ["storage"]
    assert inventory.load("imagenet").gpu_nodes == []


def test_down_fails_when_the_cloud_still_lists_compute(ec2, pulumi_cli):
    gpu = launch(ec2, "gpu")
    with pytest.raises(TrainrigError, match=rf"aws still lists compute of 'imagenet': instance {gpu} \(p2.16xlarge, running, gpu\)"):
        lifecycle.down(inventory.load("imagenet"), purge=False, stack=STACK)
    assert pulumi_cli()[0] == "config set trainrig:gpu_nodes 0 --stack aws-16-gpu"


def test_purge_destroys_everything_and_checks(ec2, pulumi_cli, tmp_path):
    storage = launch(ec2, "storage")
    with pytest.raises(TrainrigError, match=f"aws still lists for 'imagenet': instance {storage}"):
        lifecycle.down(inventory.load("imagenet"), purge=True)
    ec2.terminate_instances(InstanceIds=[storage])
    assert lifecycle.down(inventory.load("imagenet"), purge=True) is None
    assert pulumi_cli()[-2:] == ["state unprotect --all --yes", "destroy --yes --skip-preview"]
    assert not (tmp_path / "home" / "clusters" / "imagenet").exists()


def test_without_the_pulumi_cli_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINRIG_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    inv = inventory.parse(json.dumps(OUTPUTS["inventory"]), "test")
    with pytest.raises(TrainrigError, match=r"runs the Pulumi CLI, which is not installed: .*pulumi config set trainrig:gpu_nodes 0"):
        lifecycle.down(inv, purge=False)


def test_ibm_listing_by_cluster_tag():
    transport = MockableTransport(SoftLayer.FixtureTransport())
    guests = transport.set_mock("SoftLayer_Account", "getVirtualGuests")
    guests.return_value = [{"id": 7, "hostname": "node0"}, {"id": 8, "hostname": "storage"}]
    assert Listing(transport).servers("nmt") == ["virtual server 7 (node0)", "virtual server 8 (storage)"]
    request = transport.calls[-1]
    assert "trainrig-cluster:nmt" in json.dumps(request.filter)
