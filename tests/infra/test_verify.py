"""`fab plan --verify`: the live questions to each cloud, against moto's server and the softlayer SDK's transport."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from types import SimpleNamespace

import boto3
import pytest
import SoftLayer
import yaml
from botocore.stub import Stubber
from SoftLayer.testing import MockableTransport

from infra import blueprint, config
from infra.clouds.aws import CLOUD as AWS
from infra.clouds.aws import images
from infra.clouds.ibm import CLOUD as IBM
from tests.infra.conftest import ROOT

MOTO_ACCOUNT = "123456789012"  # owner of the images a test registers in moto


def stack(name: str, tmp_path, **overrides):
    doc = yaml.safe_load(config.stack_file(name, ROOT).read_text())
    for key, value in overrides.items():
        if value is None:
            doc["config"].pop(f"trainrig:{key}", None)
        else:
            doc["config"][f"trainrig:{key}"] = value
    path = tmp_path / f"Pulumi.{name}-case.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, config.load_stack_file(path)


def register(ec2, name: str, arch: str = "x86_64", created: datetime | None = None) -> str:
    source = ec2.run_instances(
        ImageId=ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"],
        InstanceType="m5.large",
        MinCount=1,
        MaxCount=1,
    )["Instances"][0]["InstanceId"]
    image = ec2.create_image(InstanceId=source, Name=name)["ImageId"]
    ec2.terminate_instances(InstanceIds=[source])
    # moto keeps the source's architecture and stamps the current second: set what the test needs.
    from moto.ec2.models import ec2_backends

    for backend in ec2_backends[MOTO_ACCOUNT].values():
        if image in backend.amis:
            backend.amis[image].architecture = arch
            if created:
                backend.amis[image].creation_date = created
    return image


@pytest.fixture
def dlami(aws, monkeypatch):
    """The Deep Learning AMI as moto can hold it: owned by moto's account instead of 'amazon'."""
    choice = images.ImageChoice(**{**images.DLAMI.__dict__, "owner": MOTO_ACCOUNT})
    monkeypatch.setattr(images, "FAMILY_IMAGES", {**images.FAMILY_IMAGES, "g5": choice})
    ec2 = boto3.client("ec2", region_name="us-east-1")
    return ec2, register(ec2, "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) 20261101")


def verify_aws(cfg, session=None):
    return AWS.verify(cfg, blueprint.blueprint(cfg)) if session is None else _with_session(cfg, session)


def _with_session(cfg, session):
    from infra.clouds.aws import verify

    return verify.verify(cfg, blueprint.blueprint(cfg), session=session)


def test_aws_a_stack_ec2_would_launch_has_no_problems(dlami, tmp_path):
    _, cfg = stack("aws-4-gpu-efs", tmp_path)
    found = verify_aws(cfg)
    assert found.problems == []
    # moto has no EC2 quotas to read: said, not guessed.
    assert any("could not be read" in n for n in found.notes)


def test_aws_a_zone_that_offers_none_of_the_types_is_one_line(aws, tmp_path):
    ec2 = boto3.client("ec2", region_name="us-east-1")
    image = register(ec2, "my-ubuntu")
    _, cfg = stack("aws-4-gpu-efs", tmp_path, image=image, zone="us-east-1e")
    assert verify_aws(cfg).problems == [
        "zone us-east-1e does not offer g5.12xlarge; remove trainrig:zone or pick a zone that does"
    ]


def test_aws_missing_and_wrong_architecture_images(aws, tmp_path):
    ec2 = boto3.client("ec2", region_name="us-east-1")
    _, cfg = stack("aws-4-gpu-efs", tmp_path, image="ami-0123456789abcdef0")
    problems = verify_aws(cfg).problems
    assert len(problems) == 1 and problems[0].startswith("image for GPU nodes: ami-0123456789abcdef0 cannot be")
    arm = register(ec2, "my-arm-image", arch="arm64")
    _, cfg = stack("aws-4-gpu-efs", tmp_path, image=arm)
    assert verify_aws(cfg).problems == [f"image for GPU nodes: {arm} is arm64, the instance types are x86_64"]


def test_aws_quota_below_the_stacks_vcpus_is_one_line(dlami, tmp_path):
    _, cfg = stack("aws-4-gpu-efs", tmp_path)  # 4 spot g5.12xlarge: 192 vCPUs of G spot
    quotas = boto3.client("service-quotas", region_name="us-east-1")
    stub = Stubber(quotas)
    stub.add_response(
        "get_service_quota",
        {"Quota": {"QuotaCode": "L-3819A6DF", "Value": 64.0}},
        {"ServiceCode": "ec2", "QuotaCode": "L-3819A6DF"},
    )
    stub.activate()
    real = boto3.session.Session()
    session = SimpleNamespace(client=lambda name, **kw: quotas if name == "service-quotas" else real.client(name, **kw))
    found = verify_aws(cfg, session)
    assert found.problems == [
        "quota 'All G and VT Spot Instance Requests' is 64 vCPUs in us-east-1, the stack needs 192: "
        "ask for more in Service Quotas (ec2, L-3819A6DF) before pulumi up"
    ]
    stub.assert_no_pending_responses()


def test_aws_says_when_a_newer_image_exists_than_a_node_runs(dlami, tmp_path):
    ec2, newest = dlami
    _, cfg = stack("aws-4-gpu-efs", tmp_path)
    old = register(
        ec2,
        "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) 20250101",
        created=datetime(2025, 1, 1, tzinfo=UTC),
    )
    ec2.run_instances(
        ImageId=old,
        InstanceType="g5.12xlarge",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "trainrig:cluster", "Value": cfg.cluster},
                    {"Key": "trainrig:role", "Value": "gpu"},
                    {"Key": "Name", "Value": f"{cfg.cluster}-node0"},
                ],
            }
        ],
    )
    notes = [n for n in verify_aws(cfg).notes if "newer image" in n]
    assert notes and notes[0].startswith(f"{cfg.cluster}-node0 runs {old}; a newer image exists: {newest}")


# -- IBM Cloud classic on the softlayer SDK's transport --------------------------------------------


@pytest.fixture
def transport():
    t = MockableTransport(SoftLayer.FixtureTransport())
    t.set_mock("SoftLayer_Account", "getNetworkVlanSpan").return_value = {"enabledFlag": True}
    return t


def calls(transport, method):
    return [c for c in transport.calls if c.method == method]


def test_ibm_every_kind_of_server_is_verified_without_an_order(transport, tmp_path):
    _, cfg = stack("ibm-syd04-dual-v100", tmp_path)
    found = IBM.verify(cfg, blueprint.blueprint(cfg), transport=transport)
    assert found.problems == []
    templates = [c.args[0] for c in calls(transport, "generateOrderTemplate")]
    assert [t["supplementalCreateObjectOptions"]["flavorKeyName"] for t in templates] == [
        "AC2_16X120X100",
        "B1_2X8X100",
    ]
    assert all(t["blockDevices"][0]["device"] == "2" and len(t["blockDevices"]) == 1 for t in templates)
    assert len(calls(transport, "verifyOrder")) == 2 and not calls(transport, "createObject")
    assert not calls(transport, "placeOrder")


def test_ibm_a_park_flavor_the_package_does_not_offer_is_a_problem(transport, tmp_path):
    for method in ("getActivePresets", "getAccountRestrictedActivePresets"):
        transport.set_mock("SoftLayer_Product_Package", method).return_value = []
    _, cfg = stack("ibm-syd04-dual-v100", tmp_path)
    problems = IBM.verify(cfg, blueprint.blueprint(cfg), transport=transport).problems
    assert problems == [
        "park_flavor B1_2X4X100: IBM Cloud classic offers no such flavor, so fab park would be refused; "
        "set trainrig:park_flavor to a CPU flavor from: ibmcloud sl vs options"
    ]
    wanted = [c.filter for c in calls(transport, "getActivePresets")]
    assert wanted[0]["activePresets"]["keyName"]["operation"] == "_= B1_2X4X100"


def test_ibm_a_refused_order_is_one_line_naming_the_servers(transport, tmp_path):
    transport.set_mock("SoftLayer_Product_Order", "verifyOrder").side_effect = SoftLayer.SoftLayerAPIError(
        "SoftLayer_Exception_Public", "The item AC2_16X120X100 is not available in syd04."
    )
    _, cfg = stack("ibm-syd04-dual-v100", tmp_path)
    problems = IBM.verify(cfg, blueprint.blueprint(cfg), transport=transport).problems
    assert problems[0] == (
        "node0..node1 (AC2_16X120X100 in syd04): IBM Cloud classic would refuse the order: "
        "The item AC2_16X120X100 is not available in syd04. (SoftLayer_Exception_Public)"
    )


def test_ibm_vlans(transport, tmp_path):
    transport.set_mock("SoftLayer_Account", "getNetworkVlanSpan").return_value = {"enabledFlag": False}
    _, cfg = stack("ibm-syd04-dual-v100", tmp_path)
    problems = IBM.verify(cfg, blueprint.blueprint(cfg), transport=transport).problems
    assert problems == [
        "VLAN spanning is off for this account and trainrig:private_vlan is not set: the servers may land on "
        "different private VLANs and not reach each other (NFS, MPI); set trainrig:private_vlan "
        "(ibmcloud sl vlan list -d syd04), or turn on VLAN spanning or VRF"
    ]
    transport.set_mock("SoftLayer_Network_Vlan", "getObject").return_value = {
        "id": 42,
        "networkSpace": "PRIVATE",
        "primaryRouter": {"datacenter": {"name": "dal10"}},
    }
    _, cfg = stack("ibm-syd04-dual-v100", tmp_path, private_vlan=42)
    assert IBM.verify(cfg, blueprint.blueprint(cfg), transport=transport).problems == [
        "private_vlan 42 is in dal10, not syd04; pick one from: ibmcloud sl vlan list -d syd04"
    ]


# -- the command --------------------------------------------------------------------------------


def fab_plan(path, tmp_path, endpoint):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SL_", "AWS_"))}
    env = {
        **clean,
        "HOME": str(tmp_path),
        "TRAINRIG_HOME": str(tmp_path),
        "COLUMNS": "200",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": endpoint,
    }
    fab = os.path.join(os.path.dirname(sys.executable), "fab")
    return subprocess.run(
        [fab, "plan", "--stack", str(path), "--verify"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )


def test_fab_plan_verify_prints_one_line_per_problem_or_that_the_clouds_accept(aws, tmp_path):
    ec2 = boto3.client("ec2", region_name="us-east-1")
    image = register(ec2, "my-ubuntu")
    path, _ = stack("aws-4-gpu-efs", tmp_path, image=image)
    ok = fab_plan(path, tmp_path, aws)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1] == "the clouds accept this stack"
    # 16 p3.16xlarge and an i3.4xlarge storage node: moto's us-east-1 lists no zone offering
    # p3.16xlarge, and holds no Ubuntu 22.04 image for the storage node.
    path, _ = stack("aws-16-gpu", tmp_path, image=image)
    refused = fab_plan(path, tmp_path, aws)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    problems = [line for line in refused.stdout.splitlines() if line.startswith("problem: ")]
    assert problems == [
        "problem: image for the storage node: no image named 'ubuntu/images/hvm-ssd*/ubuntu-jammy-22.04-amd64-server-*'"
        " owned by 099720109477 does not exist in us-east-1",
        "problem: no availability zone of us-east-1 offers all of i3.4xlarge, p3.16xlarge; choose instance types "
        "offered in one zone",
    ]
    assert refused.stderr.strip() == "error: the clouds would refuse this stack: 2 problem(s) above"


def test_aws_a_baked_storage_image_that_is_gone_is_one_line(aws, tmp_path):
    ec2 = boto3.client("ec2", region_name="us-east-1")
    image = register(ec2, "my-ubuntu")
    _, cfg = stack("aws-16-gpu", tmp_path, image=image, storage_image="ami-0123456789abcdef0")
    problems = [p for p in verify_aws(cfg).problems if p.startswith("image for ")]
    assert len(problems) == 1 and problems[0].startswith("image for the storage node: ami-0123456789abcdef0 cannot be")
