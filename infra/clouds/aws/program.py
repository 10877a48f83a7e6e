"""AWS for the Pulumi program (pulumi_aws): network, security group, placement group, key, GPU instances, NFS or EFS.

Reachable from outside: SSH (tcp/22) from admin_cidr, nothing else. Members of the cluster's
security group reach each other on everything (MPI, NCCL, NFS). The storage instance and its
EBS volume (or the EFS file system and its mount target, which sits in the same security group)
are protected and do not depend on the GPU nodes, so gpu_nodes=0 keeps them.
"""

from __future__ import annotations

from ipaddress import IPv4Network

import pulumi
import pulumi_aws as aws

from infra import program
from infra.blueprint import Blueprint
from infra.clouds.aws import AwsConfig, images
from infra.errors import TrainrigError
from infra.inventory import STORAGE_NODE

EBS_DEVICE_NAME = "/dev/sdf"
XEN_FAMILIES = ("p2", "p3", "i3", "g3")  # instance families that show an EBS volume as /dev/xvdX, not NVMe
ROOT_DISK_GB = 100
# IMDSv2 only, one hop: a process on the node gets a session token, a container behind Docker's
# bridge (one more hop) gets nothing, and nothing reads the user data (the host's private key)
# with a plain GET.
METADATA_OPTIONS = {"http_endpoint": "enabled", "http_tokens": "required", "http_put_response_hop_limit": 1}
# An instance keeps the image it was made from: the AMI is looked up (newest of its kind) when an
# instance is first created and never again changes it, so a new Deep Learning AMI or Ubuntu
# release neither replaces the protected storage instance nor the GPU nodes and their data disks.
# `fab plan --verify` says when a newer image exists.
KEEP_IMAGE = ["ami"]
# What a GPU instance does when the node powers itself off, by trainrig:on_idle.
SHUTDOWN_BEHAVIOR = {"down": "terminate", "park": "stop"}


def data_device(instance_type: str, volume_id) -> pulumi.Output[str]:
    """The data volume's device path on the node, one that names that volume and nothing else.

    Nitro instances number NVMe devices in discovery order, and GPU types with instance store
    (g5, p4d) have local NVMe disks too, so /dev/nvme1n1 may not be the EBS volume; udev's
    by-id link carries the volume id. Xen types (p2, p3) show it under the name it was given.
    """
    family = instance_type.split(".")[0]
    if family in XEN_FAMILIES:
        return pulumi.Output.from_input("/dev/xvdf")
    return pulumi.Output.from_input(volume_id).apply(
        lambda vid: f"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{vid.replace('-', '')}"
    )


def build(parent: pulumi.ComponentResource, name: str, cfg: AwsConfig, blueprint: Blueprint) -> pulumi.Output:
    tags = {**cfg.tags, "trainrig:cluster": cfg.cluster}
    provider = aws.Provider(f"{name}-aws", region=cfg.region, default_tags={"tags": tags}, opts=program.child(parent))
    opts = program.child(parent, provider=provider)
    invoke = pulumi.InvokeOptions(provider=provider, parent=parent)

    zone = _zone(cfg, invoke)
    vpc_id, vpc_cidr, subnet_id = _network(name, cfg, zone, opts, invoke)
    group = aws.ec2.SecurityGroup(
        f"{name}-sg",
        vpc_id=vpc_id,
        description=f"trainrig cluster {cfg.cluster}",
        tags={"Name": f"{name}-sg"},
        opts=opts,
    )
    aws.vpc.SecurityGroupIngressRule(
        f"{name}-ssh-admin",
        security_group_id=group.id,
        ip_protocol="tcp",
        from_port=22,
        to_port=22,
        cidr_ipv4=str(cfg.admin_cidr),
        description="SSH from the operator",
        opts=opts,
    )
    aws.vpc.SecurityGroupIngressRule(
        f"{name}-members",
        security_group_id=group.id,
        ip_protocol="-1",
        referenced_security_group_id=group.id,
        description="everything between cluster members (MPI, NCCL, NFS)",
        opts=opts,
    )
    aws.vpc.SecurityGroupEgressRule(
        f"{name}-egress",
        security_group_id=group.id,
        ip_protocol="-1",
        cidr_ipv4="0.0.0.0/0",
        description="outbound",
        opts=opts,
    )
    key = aws.ec2.KeyPair(f"{name}-key", key_name=f"trainrig-{cfg.cluster}", public_key=cfg.ssh_public_key, opts=opts)

    # Storage first, on its own: protected, and nothing of it depends on the GPU nodes.
    if cfg.storage == "efs":
        storage_record, efs_address = None, _efs(name, cfg, subnet_id, group, parent, provider)
    else:
        storage_record, efs_address = (
            _nfs_server(name, cfg, blueprint, subnet_id, group, key, parent, provider, invoke),
            None,
        )

    # The group exists whenever there is a GPU node: were it made only from two nodes on, growing
    # from one node to two would add it to node0, which forces a new node0 and loses its data disk.
    placement = None
    if cfg.gpu_nodes >= 1:
        placement = aws.ec2.PlacementGroup(f"{name}-placement", strategy="cluster", opts=opts)
    ami = cfg.image or _ami(images.image_for(cfg.flavor, cfg.gpus), invoke)
    records = []
    for planned in blueprint.nodes:
        if planned.role != "gpu":
            continue
        host_key = program.HostKey(f"{name}-{planned.name}-hostkey", planned.name, opts=program.child(parent))
        market = (
            {"market_type": "spot", "spot_options": {"instance_interruption_behavior": "terminate"}}
            if cfg.spot
            else None
        )
        instance = aws.ec2.Instance(
            f"{name}-{planned.name}",
            instance_type=cfg.flavor,
            ami=ami,
            subnet_id=subnet_id,
            vpc_security_group_ids=[group.id],
            key_name=key.key_name,
            placement_group=placement.name if placement else None,
            instance_market_options=market,
            # A GPU node that powers itself off (the dead-man switch) ends its billing: terminated, its EBS
            # data goes and NFS stays; or, with trainrig:on_idle: park, stopped with its disks kept (fab up).
            instance_initiated_shutdown_behavior=SHUTDOWN_BEHAVIOR[cfg.on_idle],
            root_block_device={"volume_size": ROOT_DISK_GB, "volume_type": "gp3", "encrypted": True},
            ebs_block_devices=[
                {
                    "device_name": EBS_DEVICE_NAME,
                    "volume_size": planned.data_disk_gb,
                    "volume_type": "gp3",
                    "encrypted": True,
                    "delete_on_termination": True,
                }
            ],
            user_data=program.cloud_init(host_key, cfg, firewall=False),
            metadata_options=METADATA_OPTIONS,
            tags={"Name": f"{cfg.cluster}-{planned.name}", "trainrig:role": "gpu"},
            opts=pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(ignore_changes=KEEP_IMAGE)),
        )
        volume_id = instance.ebs_block_devices.apply(lambda devices: devices[0].volume_id)
        records.append(
            program.node_record(
                planned,
                instance.public_ip,
                instance.private_ip,
                host_key.public_key,
                data_device(cfg.flavor, volume_id),
            )
        )
    if storage_record is not None:
        records.append(storage_record)
    return program.inventory(cfg, records, pulumi.Output.from_input(vpc_id), vpc_cidr, efs_address)


def _nfs_server(name, cfg, blueprint, subnet_id, group, key, parent, provider, invoke) -> pulumi.Output[dict]:
    """The storage node: an instance that serves its protected EBS volume over NFS; its inventory record."""
    storage_key = program.HostKey(
        f"{name}-{STORAGE_NODE}-hostkey", STORAGE_NODE, opts=program.child(parent, protect=True)
    )
    storage = aws.ec2.Instance(
        f"{name}-{STORAGE_NODE}",
        instance_type=cfg.storage_flavor,
        ami=cfg.storage_image or _ami(images.UBUNTU, invoke),
        subnet_id=subnet_id,
        vpc_security_group_ids=[group.id],
        key_name=key.key_name,
        root_block_device={"volume_size": 30, "volume_type": "gp3", "encrypted": True},
        user_data=program.cloud_init(storage_key, cfg, firewall=False),
        user_data_replace_on_change=False,
        metadata_options=METADATA_OPTIONS,
        tags={"Name": f"{cfg.cluster}-{STORAGE_NODE}", "trainrig:role": "storage"},
        # Neither a newer image nor a zone choice that moved replaces the protected storage instance.
        opts=program.child(parent, provider=provider, protect=True, ignore_changes=[*KEEP_IMAGE, "subnet_id"]),
    )
    volume = aws.ebs.Volume(
        f"{name}-{STORAGE_NODE}-data",
        availability_zone=storage.availability_zone,
        size=cfg.storage_disk_gb,
        type="gp3",
        encrypted=True,
        tags={"Name": f"{cfg.cluster}-{STORAGE_NODE}-data", "trainrig:role": "storage"},
        opts=program.child(parent, provider=provider, protect=True),
    )
    aws.ec2.VolumeAttachment(
        f"{name}-{STORAGE_NODE}-data-attach",
        device_name=EBS_DEVICE_NAME,
        volume_id=volume.id,
        instance_id=storage.id,
        # The volume is mounted and exported by NFS: detached from a running server it sticks in
        # "busy" and the destroy times out with storage still billing (terraform-provider-aws
        # #4770, #1991). Stopping the server first lets it go.
        stop_instance_before_detaching=True,
        opts=program.child(parent, provider=provider, protect=True),
    )
    return program.node_record(
        blueprint.node(STORAGE_NODE),
        storage.public_ip,
        storage.private_ip,
        storage_key.public_key,
        data_device(cfg.storage_flavor, volume.id),
    )


def _efs(name, cfg, subnet_id, group, parent, provider) -> pulumi.Output[str]:
    """EFS instead of a server: an encrypted file system and a mount target in the cluster's subnet.

    The mount target sits in the cluster's security group, so only members reach NFS on it.
    Returns the target's address, which the GPU nodes mount (no dependence on VPC DNS).
    """
    protected = program.child(parent, provider=provider, protect=True)
    fs = aws.efs.FileSystem(
        f"{name}-efs",
        creation_token=f"trainrig-{cfg.cluster}",
        encrypted=True,
        performance_mode="generalPurpose",
        throughput_mode="elastic",
        tags={"Name": f"{cfg.cluster}-efs", "trainrig:role": "storage"},
        opts=protected,
    )
    target = aws.efs.MountTarget(
        f"{name}-efs-target", file_system_id=fs.id, subnet_id=subnet_id, security_groups=[group.id], opts=protected
    )
    return target.ip_address


def _zone(cfg: AwsConfig, invoke: pulumi.InvokeOptions) -> pulumi.Output[str]:
    """The availability zone: one that offers the GPU and storage instance types (trainrig:zone if set)."""
    types = sorted({cfg.flavor, *([cfg.storage_flavor] if cfg.storage_flavor and not cfg.shared_fs else [])})
    offerings = aws.ec2.get_instance_type_offerings_output(
        filters=[{"name": "instance-type", "values": types}], location_type="availability-zone", opts=invoke
    )

    def pick(result) -> str:
        offered: dict[str, set[str]] = {t: set() for t in types}
        for instance_type, zone in zip(result.instance_types, result.locations, strict=True):
            offered.setdefault(instance_type, set()).add(zone)
        zone = images.choose_zone(offered, set().union(*offered.values()), cfg.zone)
        if zone is None:
            raise TrainrigError(images.zone_problem(offered, cfg.zone, cfg.region))
        return zone

    return offerings.apply(pick)


def _network(
    name: str, cfg: AwsConfig, zone: pulumi.Output[str], opts: pulumi.ResourceOptions, invoke: pulumi.InvokeOptions
):
    """(vpc id, vpc cidr, subnet id): the region's default VPC, or a new VPC with one public subnet, in `zone`."""
    if cfg.vpc == "default":
        vpc = aws.ec2.get_vpc_output(default=True, opts=invoke)
        filters = [
            {"name": "vpc-id", "values": [vpc.id]},
            {"name": "default-for-az", "values": ["true"]},
            {"name": "availability-zone", "values": [zone]},
        ]
        subnets = aws.ec2.get_subnets_output(filters=filters, opts=invoke)

        def first(ids: list[str], chosen: str) -> str:
            if not ids:
                raise TrainrigError(images.zone_problem({}, chosen, cfg.region))
            return sorted(ids)[0]

        return vpc.id, vpc.cidr_block, pulumi.Output.all(subnets.ids, zone).apply(lambda v: first(*v))
    vpc = aws.ec2.Vpc(
        f"{name}-vpc",
        cidr_block=str(cfg.vpc_cidr),
        enable_dns_hostnames=True,
        tags={"Name": f"trainrig-{cfg.cluster}"},
        opts=opts,
    )
    gateway = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, opts=opts)
    subnet_cidr = next(IPv4Network(cfg.vpc_cidr).subnets(new_prefix=max(cfg.vpc_cidr.prefixlen, 20)))
    subnet = aws.ec2.Subnet(
        f"{name}-subnet",
        vpc_id=vpc.id,
        cidr_block=str(subnet_cidr),
        availability_zone=zone,
        map_public_ip_on_launch=True,
        # Made in the zone chosen then; a later change of offerings must not replace it (and all on it).
        opts=pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(ignore_changes=["availability_zone"])),
    )
    routes = aws.ec2.RouteTable(
        f"{name}-routes", vpc_id=vpc.id, routes=[{"cidr_block": "0.0.0.0/0", "gateway_id": gateway.id}], opts=opts
    )
    aws.ec2.RouteTableAssociation(f"{name}-routes-subnet", subnet_id=subnet.id, route_table_id=routes.id, opts=opts)
    return vpc.id, vpc.cidr_block, subnet.id


def _ami(choice: images.ImageChoice, invoke: pulumi.InvokeOptions) -> pulumi.Output[str]:
    """The newest image of its kind now; instances keep theirs afterwards (KEEP_IMAGE)."""
    return aws.ec2.get_ami_output(
        most_recent=True,
        owners=[choice.owner],
        filters=[{"name": "name", "values": [choice.name]}, {"name": "architecture", "values": [choice.arch]}],
        opts=invoke,
    ).id
