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
from infra.clouds.aws import AwsConfig
from infra.inventory import STORAGE_NODE

DLAMI_NAME = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"
UBUNTU_NAME = "ubuntu/images/hvm-ssd*/ubuntu-jammy-22.04-amd64-server-*"
CANONICAL = "099720109477"
EBS_DEVICE_NAME = "/dev/sdf"
XEN_FAMILIES = ("p2", "p3", "i3", "g3")  # instance families that show an EBS volume as /dev/xvdX, not NVMe
ROOT_DISK_GB = 100


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

    vpc_id, vpc_cidr, subnet_id = _network(name, cfg, opts, invoke)
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

    placement = None
    if cfg.gpu_nodes > 1:
        placement = aws.ec2.PlacementGroup(f"{name}-placement", strategy="cluster", opts=opts)
    ami = cfg.image or _deep_learning_ami(invoke)
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
            # A GPU node that powers itself off (the dead-man switch) ends its billing: EBS data goes, NFS stays.
            instance_initiated_shutdown_behavior="terminate",
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
            user_data=program.cloud_init(host_key, cfg, "", firewall=False),
            tags={"Name": f"{cfg.cluster}-{planned.name}", "trainrig:role": "gpu"},
            opts=opts,
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
        ami=_ubuntu_ami(invoke),
        subnet_id=subnet_id,
        vpc_security_group_ids=[group.id],
        key_name=key.key_name,
        root_block_device={"volume_size": 30, "volume_type": "gp3", "encrypted": True},
        user_data=program.cloud_init(storage_key, cfg, "", firewall=False),
        user_data_replace_on_change=False,
        tags={"Name": f"{cfg.cluster}-{STORAGE_NODE}", "trainrig:role": "storage"},
        opts=program.child(parent, provider=provider, protect=True),
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


def _network(name: str, cfg: AwsConfig, opts: pulumi.ResourceOptions, invoke: pulumi.InvokeOptions):
    """(vpc id, vpc cidr, subnet id): the region's default VPC, or a new VPC with one public subnet."""
    if cfg.vpc == "default":
        vpc = aws.ec2.get_vpc_output(default=True, opts=invoke)
        filters = [{"name": "vpc-id", "values": [vpc.id]}, {"name": "default-for-az", "values": ["true"]}]
        if cfg.zone:
            filters.append({"name": "availability-zone", "values": [cfg.zone]})
        subnets = aws.ec2.get_subnets_output(filters=filters, opts=invoke)
        return vpc.id, vpc.cidr_block, subnets.ids.apply(lambda ids: sorted(ids)[0])
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
        availability_zone=cfg.zone,
        map_public_ip_on_launch=True,
        opts=opts,
    )
    routes = aws.ec2.RouteTable(
        f"{name}-routes", vpc_id=vpc.id, routes=[{"cidr_block": "0.0.0.0/0", "gateway_id": gateway.id}], opts=opts
    )
    aws.ec2.RouteTableAssociation(f"{name}-routes-subnet", subnet_id=subnet.id, route_table_id=routes.id, opts=opts)
    return vpc.id, vpc.cidr_block, subnet.id


def _deep_learning_ami(invoke: pulumi.InvokeOptions) -> pulumi.Output[str]:
    return aws.ec2.get_ami_output(
        most_recent=True, owners=["amazon"], filters=[{"name": "name", "values": [DLAMI_NAME]}], opts=invoke
    ).id


def _ubuntu_ami(invoke: pulumi.InvokeOptions) -> pulumi.Output[str]:
    return aws.ec2.get_ami_output(
        most_recent=True, owners=[CANONICAL], filters=[{"name": "name", "values": [UBUNTU_NAME]}], opts=invoke
    ).id
