"""AWS: GPU instances, an NFS server instance with an EBS disk or EFS, in the default or a new VPC (pulumi_aws)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from ipaddress import IPv4Network
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from infra.clouds import Billable
from infra.config import ConfigError, MachineStack
from infra.errors import TrainrigError
from infra.inventory import STORAGE_NODE


class AwsConfig(MachineStack):
    hints: ClassVar[dict[str, str]] = {
        **MachineStack.hints,
        "region": "set trainrig:region to an AWS region, e.g. us-east-1",
        "storage": "set trainrig:storage to nfs_server (an NFS server instance with an EBS disk) or efs",
    }
    machine_word: ClassVar[str] = "instance type"

    cloud: Literal["aws"]
    image: str | None = Field(
        default=None, description="AMI id (default: chosen by instance family, see infra/clouds/aws/images.py)"
    )
    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
    zone: str | None = Field(default=None, pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9][a-z]$")
    spot: bool = False
    vpc: Literal["default", "new"] = "default"
    vpc_cidr: IPv4Network = IPv4Network("10.42.0.0/16")
    storage: Literal["nfs_server", "efs"] = Field(
        default="nfs_server", description="an NFS server instance with an EBS disk, or EFS (no server to run)"
    )

    @model_validator(mode="before")
    @classmethod
    def _efs_has_no_server(cls, values):
        if isinstance(values, dict) and values.get("storage") == "efs" and values.get("storage_flavor") is not None:
            raise ConfigError(
                "storage_flavor",
                "does not apply with storage efs (EFS has no server)",
                "remove it, or set trainrig:storage to nfs_server",
            )
        return values

    @model_validator(mode="after")
    def _zone_in_region(self) -> AwsConfig:
        from infra.clouds.aws import images

        if self.zone and not self.zone.startswith(self.region):
            raise ConfigError("zone", f"{self.zone} is not in region {self.region}")
        refused = images.refusal(self.flavor, self.machine.gpus)
        if refused:
            raise ConfigError("flavor", refused)
        if self.on_idle == "park" and self.spot:
            raise ConfigError(
                "on_idle",
                "spot instances cannot be stopped, only terminated",
                "set trainrig:on_idle: down, or remove trainrig:spot",
            )
        return self

    @property
    def image_choice(self):
        """Where the GPU nodes' image comes from (None: trainrig:image names one)."""
        from infra.clouds.aws import images

        return None if self.image else images.image_for(self.flavor, self.machine.gpus)

    @property
    def shared_fs(self) -> bool:
        return self.storage == "efs"

    @property
    def where(self) -> str:
        return self.zone or self.region

    def notes(self) -> list[str]:
        notes = []
        if self.shared_fs:
            notes.append(
                f"EFS is billed per GB stored: priced here at {self.storage_disk_gb} GB (trainrig:storage_disk_gb)"
            )
        if self.spot:
            notes.append("spot instances: priced here at on-demand rates, the most they can cost")
        choice = self.image_choice
        notes.append(f"GPU node image: {choice.describe() if choice else self.image}")
        if self.storage_image and not self.shared_fs:
            notes.append(f"storage node image: {self.storage_image}")
        return notes

    def check_credentials(self, environ: Mapping[str, str] = os.environ) -> None:
        home = Path(environ.get("HOME", "~")).expanduser()
        in_env = (environ.get("AWS_ACCESS_KEY_ID") and environ.get("AWS_SECRET_ACCESS_KEY")) or environ.get(
            "AWS_PROFILE"
        )
        files = (home / ".aws" / "credentials", home / ".aws" / "config")
        if not (in_env or any(f.is_file() for f in files)):
            raise ConfigError(
                "AWS_ACCESS_KEY_ID",
                "AWS credentials are missing",
                "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run: aws configure",
                namespaced=False,
            )


class AwsCloud:
    name = "aws"
    Config = AwsConfig
    capabilities = frozenset(
        {"pulumi_stack", "gpu", "memlock", "data_disk", "shared_storage", "ssh_mesh", "self_teardown", "park"}
    )

    def build(self, parent, name, cfg, blueprint):
        from infra.clouds.aws import program

        return program.build(parent, name, cfg, blueprint)

    def stand_in_image(self, reference: str) -> str | None:
        return None  # its nodes pull from public registries

    def backend(self, stack=None):
        from infra.automation import StackBackend

        return StackBackend(self, stack)

    def verify(self, cfg: AwsConfig, blueprint, endpoint_url: str | None = None):
        from botocore.exceptions import BotoCoreError, ClientError

        from infra.clouds.aws import verify
        from infra.errors import TrainrigError

        try:
            return verify.verify(cfg, blueprint, endpoint_url=endpoint_url)
        except (BotoCoreError, ClientError) as exc:
            raise TrainrigError(f"AWS could not be asked about the stack: {str(exc).splitlines()[0]}") from None

    def billable(self, cluster: str, cfg: AwsConfig, endpoint_url: str | None = None) -> list[str]:
        """What AWS's own listings still hold for a cluster (instances not terminated, volumes, EFS, VPCs, groups)."""
        import boto3

        ec2 = boto3.client("ec2", region_name=cfg.region, endpoint_url=endpoint_url)
        tag = [{"Name": "tag:trainrig:cluster", "Values": [cluster]}]
        found = []
        for reservation in ec2.describe_instances(Filters=tag)["Reservations"]:
            for inst in reservation["Instances"]:
                if inst["State"]["Name"] not in ("terminated", "shutting-down"):
                    role = next((t["Value"] for t in inst.get("Tags", []) if t["Key"] == "trainrig:role"), "?")
                    found.append(
                        f"instance {inst['InstanceId']} ({inst['InstanceType']}, {inst['State']['Name']}, {role})"
                    )
        found += [f"volume {v['VolumeId']} ({v['Size']} GB)" for v in ec2.describe_volumes(Filters=tag)["Volumes"]]
        found += [f"vpc {v['VpcId']}" for v in ec2.describe_vpcs(Filters=tag)["Vpcs"]]
        found += [f"security group {g['GroupId']}" for g in ec2.describe_security_groups(Filters=tag)["SecurityGroups"]]
        found += [f"key pair {k['KeyName']}" for k in ec2.describe_key_pairs(Filters=tag)["KeyPairs"]]
        return found + self._efs_billable(cluster, cfg, endpoint_url)

    def power(
        self, inv, cfg: AwsConfig, on: bool, endpoint_url: str | None = None, timeout: float = 600
    ) -> dict[str, str]:
        """Stop the cluster's GPU instances (EBS kept, compute billing ends) or start them; their public IPs."""
        import boto3

        from infra.commands import wait_until

        cluster = inv.cluster

        if on is False and cfg.spot:
            raise TrainrigError(
                f"{cluster!r} runs on spot instances, which AWS cannot stop: fab down removes them (storage kept)"
            )
        ec2 = boto3.client("ec2", region_name=cfg.region, endpoint_url=endpoint_url)
        filters = [
            {"Name": "tag:trainrig:cluster", "Values": [cluster]},
            {"Name": "tag:trainrig:role", "Values": ["gpu"]},
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
        ]

        def instances() -> list[dict]:
            return [i for r in ec2.describe_instances(Filters=filters)["Reservations"] for i in r["Instances"]]

        ids = [i["InstanceId"] for i in instances()]
        if not ids:
            raise TrainrigError(f"AWS lists no GPU instances of {cluster!r} to {'start' if on else 'stop'}")
        target = "running" if on else "stopped"
        if on:
            ec2.start_instances(InstanceIds=ids)
        else:
            ec2.stop_instances(InstanceIds=ids)
        done = wait_until(
            lambda: (found := instances()) and all(i["State"]["Name"] == target for i in found) and found,
            timeout=timeout,
            interval=2,
            what=f"the GPU instances of {cluster!r} to be {target}",
        )
        # Instances are named "<cluster>-<node>" by the program.
        names = {i["InstanceId"]: _tag(i, "Name").removeprefix(f"{cluster}-") for i in done}
        return {names[i["InstanceId"]]: i.get("PublicIpAddress", "") for i in done} if on else {}

    def capture(
        self, cluster: str, cfg: AwsConfig, node: str, name: str, endpoint_url: str | None = None, timeout: float = 3600
    ) -> str:
        """An AMI of the node's instance (its root and data volumes), tagged with the cluster; waits until available.

        The storage node's AMI holds its root volume only: the cluster's shared files on its data
        volume never go into an image. AWS reboots the instance for a consistent file system
        (NoReboot false): the node answers again a few minutes later, as it was.
        """
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        from infra.commands import wait_until

        ec2 = boto3.client("ec2", region_name=cfg.region, endpoint_url=endpoint_url)
        filters = [
            {"Name": "tag:trainrig:cluster", "Values": [cluster]},
            {"Name": "tag:Name", "Values": [f"{cluster}-{node}"]},
            {"Name": "instance-state-name", "Values": ["running", "stopped"]},
        ]
        try:
            found = [i for r in ec2.describe_instances(Filters=filters)["Reservations"] for i in r["Instances"]]
            if not found:
                raise TrainrigError(f"AWS lists no instance {cluster}-{node} to bake")
            instance = found[0]
            left_out = []
            if node == STORAGE_NODE:
                left_out = [
                    {"DeviceName": m["DeviceName"], "NoDevice": ""}
                    for m in instance.get("BlockDeviceMappings", [])
                    if m["DeviceName"] != instance.get("RootDeviceName")
                ]
            image = ec2.create_image(
                InstanceId=instance["InstanceId"],
                **({"BlockDeviceMappings": left_out} if left_out else {}),
                Name=f"trainrig-{name}",
                Description=f"trainrig node baked from {cluster}/{node}",
                NoReboot=False,
                TagSpecifications=[
                    {"ResourceType": "image", "Tags": [{"Key": "trainrig:baked-from", "Value": f"{cluster}/{node}"}]}
                ],
            )["ImageId"]
            wait_until(
                lambda: ec2.describe_images(ImageIds=[image])["Images"][0]["State"] == "available",
                timeout=timeout,
                interval=10,
                what=f"AMI {image} to be available",
            )
        except (BotoCoreError, ClientError) as exc:
            raise TrainrigError(f"cannot bake {cluster}-{node} into an AMI: {exc}") from None
        return image

    def audit(
        self, known: dict, everything: bool, regions: list[str] | None = None, endpoint_url: str | None = None
    ) -> list[Billable]:
        """Instances (spot requests too), EBS volumes, EFS and its mount targets, elastic IPs, by trainrig:cluster.

        Volumes and addresses without the tag count when they hang on one of the cluster's instances
        (root volumes carry no tag of their own). Regions: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        names = sorted(known)
        if not names and not everything:
            return []
        if regions is None:
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            regions = [region]
        try:
            return [b for region in regions for b in _audit_region(region, names, everything, endpoint_url)]
        except (BotoCoreError, ClientError) as exc:
            raise TrainrigError(f"cannot audit AWS: {exc}") from None

    @staticmethod
    def _efs_billable(cluster: str, cfg: AwsConfig, endpoint_url: str | None) -> list[str]:
        """EFS file systems, which the EFS API lists with their tags (it has no tag filter)."""
        import boto3

        efs = boto3.client("efs", region_name=cfg.region, endpoint_url=endpoint_url)
        ours = {"Key": "trainrig:cluster", "Value": cluster}
        return [
            f"efs {fs['FileSystemId']} ({fs['SizeInBytes']['Value'] / 2**30:.1f} GB stored)"
            for page in efs.get_paginator("describe_file_systems").paginate()
            for fs in page["FileSystems"]
            if ours in fs.get("Tags", [])
        ]


def _audit_region(region: str, names: list[str], everything: bool, endpoint_url: str | None) -> list[Billable]:
    import boto3

    ec2 = boto3.client("ec2", region_name=region, endpoint_url=endpoint_url)
    tagged = [{"Name": "tag-key", "Values": [TAG]}] if everything else [{"Name": f"tag:{TAG}", "Values": names}]

    def ours(resource: dict) -> str | None:
        cluster = _tag(resource, TAG)
        return cluster if cluster and (everything or cluster in names) else None

    found: list[Billable] = []
    owner: dict[str, tuple[str, str]] = {}  # instance id -> (cluster, node)
    for page in ec2.get_paginator("describe_instances").paginate(Filters=tagged):
        for reservation in page["Reservations"]:
            for inst in reservation["Instances"]:
                if inst["State"]["Name"] in ("terminated", "shutting-down"):
                    continue
                cluster = _tag(inst, TAG)
                node = _tag(inst, "Name").removeprefix(f"{cluster}-") or None
                owner[inst["InstanceId"]] = (cluster, node or "")
                spot = ", spot" if inst.get("InstanceLifecycle") == "spot" else ""
                detail = f"{inst['InstanceType']}, {inst['State']['Name']}{spot}, {region}"
                found.append(
                    Billable(kind="instance", id=inst["InstanceId"], cluster=cluster, node=node, detail=detail)
                )
    seen: set[str] = set()
    volume_pages = [ec2.describe_volumes(Filters=tagged)["Volumes"]]
    if owner:
        attached = [{"Name": "attachment.instance-id", "Values": sorted(owner)}]
        volume_pages.append(ec2.describe_volumes(Filters=attached)["Volumes"])
    for volume in (v for page in volume_pages for v in page):
        if volume["VolumeId"] in seen:
            continue
        seen.add(volume["VolumeId"])
        host = next((owner[a["InstanceId"]] for a in volume.get("Attachments", []) if a["InstanceId"] in owner), None)
        cluster = host[0] if host else ours(volume)
        node = host[1] if host else None
        detail = f"{volume['Size']} GB {volume.get('VolumeType', '')}, {volume['State']}, {region}"
        found.append(Billable(kind="volume", id=volume["VolumeId"], cluster=cluster, node=node, detail=detail))
    for request in ec2.describe_spot_instance_requests(Filters=[{"Name": "state", "Values": ["open", "active"]}])[
        "SpotInstanceRequests"
    ]:
        host = owner.get(request.get("InstanceId", ""))
        cluster = host[0] if host else ours(request)
        if cluster:
            found.append(
                Billable(
                    kind="spot request",
                    id=request["SpotInstanceRequestId"],
                    cluster=cluster,
                    node=host[1] if host else None,
                    detail=f"{request['State']}, {region}",
                )
            )
    for address in ec2.describe_addresses()["Addresses"]:
        host = owner.get(address.get("InstanceId", ""))
        cluster = host[0] if host else ours(address)
        if cluster:
            ident = address.get("AllocationId") or address["PublicIp"]
            detail = f"{address['PublicIp']}, {region}"
            found.append(Billable(kind="elastic ip", id=ident, cluster=cluster, node=None, detail=detail))
    efs = boto3.client("efs", region_name=region, endpoint_url=endpoint_url)
    for page in efs.get_paginator("describe_file_systems").paginate():
        for fs in page["FileSystems"]:
            cluster = ours(fs)
            if not cluster:
                continue
            stored = fs["SizeInBytes"]["Value"] / 2**30
            found.append(Billable(kind="efs", id=fs["FileSystemId"], cluster=cluster, detail=f"{stored:.1f} GB stored"))
            for target in efs.describe_mount_targets(FileSystemId=fs["FileSystemId"])["MountTargets"]:
                found.append(
                    Billable(kind="efs mount target", id=target["MountTargetId"], cluster=cluster, detail=region)
                )
    return found


TAG = "trainrig:cluster"


def _tag(resource: dict, key: str) -> str:
    return next((t["Value"] for t in resource.get("Tags", []) if t["Key"] == key), "")


CLOUD = AwsCloud()
