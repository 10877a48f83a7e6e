"""`fab down` of a cluster a Pulumi stack made: automation takes compute (or all) away; the cloud's listing agrees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import SoftLayer
import yaml
from SoftLayer.testing import MockableTransport

from cluster import lifecycle
from infra import config, inventory
from infra.clouds.ibm.softlayer import Listing
from infra.errors import TrainrigError
from tests.cluster.test_inventory_sources import NODE, OUTPUTS
from tests.helpers import make_inventory
from tests.infra.conftest import ROOT

STACK = "aws-16-gpu"  # stacks/Pulumi.aws-16-gpu.yaml: cluster imagenet in us-east-1
GPU = {**NODE, "name": "node0", "role": "gpu", "private_address": "10.42.0.10", "gpu_count": 16, "gpu_model": "K80"}


def stack_config(**changes) -> dict[str, str]:
    """The sample stack's config as `pulumi config --json` hands it over (structured values as JSON text)."""
    doc = yaml.safe_load(config.stack_file(STACK, ROOT).read_text())["config"]
    doc.update({f"trainrig:{k}": v for k, v in changes.items()})
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in doc.items()}


def launch(ec2, role: str) -> str:
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    tags = [{"Key": "trainrig:cluster", "Value": "imagenet"}, {"Key": "trainrig:role", "Value": role}]
    return ec2.run_instances(
        ImageId=ami,
        InstanceType="p2.16xlarge",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )["Instances"][0]["InstanceId"]


@pytest.fixture
def ec2(aws):
    return boto3.client("ec2", region_name="us-east-1")


@pytest.fixture
def stack(fake_pulumi, tmp_path, monkeypatch):
    """A saved inventory of cluster imagenet made by stack aws-16-gpu, and that stack (storage only once GPUs go)."""
    monkeypatch.setenv("TRAINRIG_HOME", str(tmp_path / "home"))
    storage_only = {**OUTPUTS, "inventory": {**OUTPUTS["inventory"], "stack": STACK, "nodes": [NODE]}}
    fake = fake_pulumi(storage_only, stack_config())
    inventory.save(inventory.parse(json.dumps({**OUTPUTS["inventory"], "stack": STACK, "nodes": [GPU, NODE]}), "test"))
    return fake


def test_down_removes_compute_keeps_storage(ec2, stack):
    launch(ec2, "storage")
    remaining = lifecycle.down(inventory.load("imagenet"), purge=False)
    verbs = stack.verbs()
    assert verbs.index("config set") < verbs.index("up") and "destroy" not in verbs
    assert ["config", "set", "trainrig:gpu_nodes", "--plaintext", "--stack", STACK, "--", "0"] in stack.calls()
    assert all(STACK in call for call in stack.calls() if call[:1] != ["version"])  # always the named stack
    # Refreshed first: GPU instances that terminated themselves (the dead-man switch) are read as gone.
    assert any(call[:1] == ["up"] and "--refresh" in call for call in stack.calls())
    assert [n.name for n in remaining.nodes] == ["storage"]
    assert inventory.load("imagenet").gpu_nodes == []


def test_down_fails_when_the_cloud_still_lists_compute(ec2, stack):
    gpu = launch(ec2, "gpu")
    with pytest.raises(
        TrainrigError, match=rf"aws still lists compute of 'imagenet': instance {gpu} \(p2.16xlarge, running, gpu\)"
    ):
        lifecycle.down(inventory.load("imagenet"), purge=False, stack=STACK)


def test_purge_destroys_everything_and_checks(ec2, stack, tmp_path):
    storage = launch(ec2, "storage")
    with pytest.raises(TrainrigError, match=f"aws still lists for 'imagenet': instance {storage}"):
        lifecycle.down(inventory.load("imagenet"), purge=True)
    ec2.terminate_instances(InstanceIds=[storage])
    assert lifecycle.down(inventory.load("imagenet"), purge=True) is None
    verbs = [v for v in stack.verbs() if v != "stack history"]
    assert verbs[-2:] == ["state unprotect", "destroy"]
    assert ["state", "unprotect", "--yes", "--all", "--stack", STACK] in [c[:6] for c in stack.calls()]
    assert not (tmp_path / "home" / "clusters" / "imagenet").exists()


def test_a_stack_of_another_cluster_is_refused_before_anything_changes(ec2, stack):
    stack.set(config=stack_config(cluster="other"))
    with pytest.raises(TrainrigError, match=r"stack aws-16-gpu is cluster 'other' on aws, not 'imagenet' on aws"):
        lifecycle.down(inventory.load("imagenet"), purge=True)
    assert not {"config set", "up", "destroy", "state unprotect"} & set(stack.verbs())
    assert inventory.load("imagenet").gpu_nodes  # nothing forgotten either


def test_a_stack_other_than_the_one_that_made_the_cluster_is_refused(ec2, stack):
    with pytest.raises(TrainrigError, match=r"made by stack aws-16-gpu, not prod; run again with --stack aws-16-gpu"):
        lifecycle.down(inventory.load("imagenet"), purge=True, stack="prod")
    assert stack.calls() == []


def test_a_failing_update_is_one_line(ec2, stack):
    stack.failing("up")
    with pytest.raises(TrainrigError, match=r"^pulumi up of imagenet without GPU nodes failed: error: up refused"):
        lifecycle.down(inventory.load("imagenet"), purge=False)


def test_without_the_pulumi_cli_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINRIG_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    inv = inventory.parse(json.dumps({**OUTPUTS["inventory"], "stack": STACK}), "test")
    with pytest.raises(TrainrigError, match=r"runs the Pulumi CLI, which is not installed: install it"):
        lifecycle.down(inv, purge=False)


def test_ibm_listing_by_cluster_tag():
    transport = MockableTransport(SoftLayer.FixtureTransport())
    guests = transport.set_mock("SoftLayer_Account", "getVirtualGuests")
    guests.return_value = [
        {"id": 7, "hostname": "node0", "billingItem": {"id": 70}},
        {"id": 8, "hostname": "storage", "billingItem": {"id": 80}},
        {"id": 9, "hostname": "node1"},  # cancelled: listed while IBM reclaims it, but no longer billing
    ]
    assert Listing(transport).servers("nmt") == ["virtual server 7 (node0)", "virtual server 8 (storage)"]
    request = transport.calls[-1]
    assert "trainrig-cluster:nmt" in json.dumps(request.filter)


def fab_down(*flags: str) -> subprocess.CompletedProcess:
    """`fab down --name imagenet ...` as a user runs it, with no terminal on stdin (a script or CI)."""
    fab = Path(sys.executable).parent / "fab"
    return subprocess.run(
        [str(fab), "down", "--name", "imagenet", *flags],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_purge_of_a_cloud_cluster_without_a_terminal_needs_yes(stack, tmp_path):
    result = fab_down("--purge")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: --purge deletes the storage and data of aws cluster 'imagenet' for good; "
        "no terminal to confirm on: add --yes if that is what you mean"
    )
    assert stack.calls() == []
    assert inventory.load("imagenet").gpu_nodes  # nothing forgotten either


def test_purge_asks_for_the_cluster_name_and_a_wrong_answer_removes_nothing(stack):
    inv = inventory.load("imagenet")
    asked: list[str] = []
    with pytest.raises(TrainrigError, match=r"^'imagenet-old' is not 'imagenet': nothing was removed$"):
        lifecycle.confirm_purge(inv, yes=False, ask=lambda prompt: asked.append(prompt) or "imagenet-old")
    assert "Type the cluster's name to confirm" in asked[0]
    lifecycle.confirm_purge(inv, yes=False, ask=lambda prompt: " imagenet\n")
    lifecycle.confirm_purge(inv, yes=True, ask=None)
    assert stack.calls() == []


def test_a_local_purge_never_asks():
    lifecycle.confirm_purge(make_inventory(), yes=False, ask=None)
