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
    assert AWS.power("imagenet", cfg, False, endpoint_url=aws, timeout=60) == {}
    assert states() == {gpu[0]: "stopped", gpu[1]: "stopped", storage: "running", other: "running"}
    assert {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]} == volumes_before  # EBS kept

    started = AWS.power("imagenet", cfg, True, endpoint_url=aws, timeout=60)
    assert set(started) == {"node0", "node1"} and all(started.values())
    assert set(states().values()) == {"running"}


def test_spot_instances_cannot_be_parked(aws):
    with pytest.raises(TrainrigError, match="spot instances, which AWS cannot stop"):
        AWS.power("imagenet", SimpleNamespace(region="us-east-1", spot=True), False, endpoint_url=aws)
