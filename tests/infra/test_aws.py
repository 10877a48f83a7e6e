"""AWS calls trainrig makes itself (the billable listing teardown is checked against), on moto's server on loopback."""

from __future__ import annotations

from types import SimpleNamespace

import boto3
import pytest

from infra.clouds.aws import CLOUD as AWS
from infra.errors import TrainrigError

REGION = SimpleNamespace(region="us-east-1")  # the one field of the stack config that billable reads


def test_billable_lists_what_is_left_and_nothing_once_gone(aws):
    endpoint = aws
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=endpoint)
    tags = [{"Key": "trainrig:cluster", "Value": "imagenet"}]
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instance = ec2.run_instances(
        ImageId=ami,
        InstanceType="p2.16xlarge",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )["Instances"][0]
    volume = ec2.create_volume(
        AvailabilityZone="us-east-1a", Size=2000, TagSpecifications=[{"ResourceType": "volume", "Tags": tags}]
    )
    other = ec2.create_volume(
        AvailabilityZone="us-east-1a",
        Size=10,
        TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": "trainrig:cluster", "Value": "x"}]}],
    )
    efs = boto3.client("efs", region_name="us-east-1", endpoint_url=endpoint)
    shared = efs.create_file_system(CreationToken="trainrig-imagenet", Encrypted=True, Tags=tags)
    efs.create_file_system(CreationToken="trainrig-x", Tags=[{"Key": "trainrig:cluster", "Value": "x"}])
    left = AWS.billable("imagenet", REGION, endpoint_url=endpoint)
    assert f"instance {instance['InstanceId']} (p2.16xlarge, running, ?)" in left
    assert f"volume {volume['VolumeId']} (2000 GB)" in left
    assert not any(other["VolumeId"] in item for item in left)
    assert [item for item in left if item.startswith("efs")] == [f"efs {shared['FileSystemId']} (0.0 GB stored)"]

    ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])
    ec2.delete_volume(VolumeId=volume["VolumeId"])
    efs.delete_file_system(FileSystemId=shared["FileSystemId"])
    assert AWS.billable("imagenet", REGION, endpoint_url=endpoint) == []


def test_park_stops_the_gpu_instances_and_up_starts_them_with_their_disks(aws):
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=aws)
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]

    def instance(node, role, cluster="imagenet"):
        tags = [
            {"Key": "trainrig:cluster", "Value": cluster},
            {"Key": "trainrig:role", "Value": role},
            {"Key": "Name", "Value": f"{cluster}-{node}"},
        ]
        return ec2.run_instances(
            ImageId=ami,
            InstanceType="g5.12xlarge",
            MinCount=1,
            MaxCount=1,
            BlockDeviceMappings=[{"DeviceName": "/dev/sdf", "Ebs": {"VolumeSize": 100, "DeleteOnTermination": True}}],
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )["Instances"][0]["InstanceId"]

    gpu = [instance("node0", "gpu"), instance("node1", "gpu")]
    storage = instance("storage", "storage")
    other = instance("node0", "gpu", cluster="other")

    def states():
        found = ec2.describe_instances(InstanceIds=[*gpu, storage, other])["Reservations"]
        return {i["InstanceId"]: i["State"]["Name"] for r in found for i in r["Instances"]}

    volumes_before = {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}
    cfg = SimpleNamespace(region="us-east-1", spot=False)
    assert AWS.power(SimpleNamespace(cluster="imagenet"), cfg, False, endpoint_url=aws, timeout=60) == {}
    assert states() == {gpu[0]: "stopped", gpu[1]: "stopped", storage: "running", other: "running"}
    assert {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]} == volumes_before  # EBS kept

    started = AWS.power(SimpleNamespace(cluster="imagenet"), cfg, True, endpoint_url=aws, timeout=60)
    assert set(started) == {"node0", "node1"} and all(started.values())
    assert set(states().values()) == {"running"}


def test_spot_instances_cannot_be_parked(aws):
    with pytest.raises(TrainrigError, match="spot instances, which AWS cannot stop"):
        AWS.power(
            SimpleNamespace(cluster="imagenet"), SimpleNamespace(region="us-east-1", spot=True), False, endpoint_url=aws
        )


def test_audit_finds_what_no_inventory_accounts_for_and_nothing_after_a_clean_teardown(aws):
    from infra.clouds import Billable
    from tests.helpers import make_inventory

    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=aws)
    efs = boto3.client("efs", region_name="us-east-1", endpoint_url=aws)
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]

    def tags(cluster, name=None):
        found = [{"Key": "trainrig:cluster", "Value": cluster}]
        return found + ([{"Key": "Name", "Value": f"{cluster}-{name}"}] if name else [])

    def instance(cluster, node):
        return ec2.run_instances(
            ImageId=ami,
            InstanceType="p3.2xlarge",
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags(cluster, node)}],
        )["Instances"][0]["InstanceId"]

    kept = instance("nmt", "storage")  # the inventory of nmt still has its storage node
    leftover = instance("nmt", "node0")  # torn down as far as the inventory knows, yet running
    lost = instance("lost", "node0")  # a cluster whose local state is gone
    volume = ec2.create_volume(
        AvailabilityZone="us-east-1a", Size=500, TagSpecifications=[{"ResourceType": "volume", "Tags": tags("lost")}]
    )["VolumeId"]
    shared = efs.create_file_system(CreationToken="lost", Tags=tags("lost"))["FileSystemId"]
    target = efs.create_mount_target(FileSystemId=shared, SubnetId=subnet)["MountTargetId"]
    address = ec2.allocate_address(Domain="vpc")
    ec2.associate_address(AllocationId=address["AllocationId"], InstanceId=leftover)
    storage_only = make_inventory(gpu_nodes=0, cluster="nmt")
    known = {"nmt": storage_only}

    found = AWS.audit(known, everything=False, endpoint_url=aws)
    by_id = {b.id: b for b in found}
    assert by_id[kept].accounted_for(known) and by_id[kept].node == "storage"
    assert by_id[leftover] == Billable(
        kind="instance", id=leftover, cluster="nmt", node="node0", detail="p3.2xlarge, running, us-east-1"
    )
    assert not by_id[leftover].accounted_for(known)
    assert by_id[address["AllocationId"]].kind == "elastic ip"
    roots = [b for b in found if b.kind == "volume"]  # untagged root volumes, found through their instance
    assert {b.node for b in roots} == {"storage", "node0"}
    assert lost not in by_id, "without --all only known clusters are looked at"

    everything = {b.id: b for b in AWS.audit(known, everything=True, endpoint_url=aws)}
    assert {everything[i].kind for i in (lost, volume, shared, target)} == {
        "instance",
        "volume",
        "efs",
        "efs mount target",
    }
    assert not any(everything[i].accounted_for(known) for i in (lost, volume, shared, target))

    # A clean teardown: nothing of either cluster is left, and the audit says so.
    ec2.disassociate_address(AssociationId=ec2.describe_addresses()["Addresses"][0]["AssociationId"])
    ec2.release_address(AllocationId=address["AllocationId"])
    ec2.terminate_instances(InstanceIds=[kept, leftover, lost])
    ec2.delete_volume(VolumeId=volume)
    efs.delete_mount_target(MountTargetId=target)
    efs.delete_file_system(FileSystemId=shared)
    assert AWS.audit(known, everything=True, endpoint_url=aws) == []


def test_bake_captures_the_nodes_instance_as_a_tagged_ami_and_waits_for_it(aws):
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=aws)
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    for cluster in ("imagenet", "other"):
        ec2.run_instances(
            ImageId=ami,
            InstanceType="g5.12xlarge",
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[
                {
                    "ResourceType": "instance",
                    "Tags": [
                        {"Key": "trainrig:cluster", "Value": cluster},
                        {"Key": "Name", "Value": f"{cluster}-node0"},
                    ],
                }
            ],
        )
    baked = AWS.capture("imagenet", REGION, "node0", "imagenet-node0-1", endpoint_url=aws, timeout=60)
    (image,) = ec2.describe_images(ImageIds=[baked])["Images"]
    assert image["Name"] == "trainrig-imagenet-node0-1" and image["State"] == "available"
    assert {"Key": "trainrig:baked-from", "Value": "imagenet/node0"} in image["Tags"]
    with pytest.raises(TrainrigError, match=r"^AWS lists no instance imagenet-node7 to bake$"):
        AWS.capture("imagenet", REGION, "node7", "x", endpoint_url=aws, timeout=60)


def test_the_storage_nodes_ami_leaves_its_data_volume_out(aws, monkeypatch):
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=aws)
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ec2.run_instances(
        ImageId=ami,
        InstanceType="m5.xlarge",
        MinCount=1,
        MaxCount=1,
        BlockDeviceMappings=[{"DeviceName": "/dev/sdf", "Ebs": {"VolumeSize": 500}}],
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "trainrig:cluster", "Value": "imagenet"},
                    {"Key": "Name", "Value": "imagenet-storage"},
                ],
            }
        ],
    )
    # moto's AMI lists no volumes either way: what is checked is what the capture asks AWS for.
    asked = []
    real_client = boto3.client

    def recording_client(*args, **kwargs):
        client = real_client(*args, **kwargs)
        client.meta.events.register("provide-client-params.ec2.CreateImage", lambda params, **_: asked.append(params))
        return client

    monkeypatch.setattr(boto3, "client", recording_client)
    baked = AWS.capture("imagenet", REGION, "storage", "imagenet-node0-1-storage", endpoint_url=aws, timeout=60)
    assert ec2.describe_images(ImageIds=[baked])["Images"][0]["State"] == "available"
    # The cluster's shared files (the NFS volume) never go into an image: only the root volume.
    assert asked[0]["BlockDeviceMappings"] == [{"DeviceName": "/dev/sdf", "NoDevice": ""}]
