"""IBM Cloud classic for the Pulumi program: an SSH key and virtual servers (dynamic providers over the softlayer SDK).

Classic virtual servers have no security group here: each node's cloud-init turns on ufw with
SSH only from admin_cidr; provisioning (role common) then lets in the cluster's own nodes by
their private addresses, and no one else of IBM's private network (10.0.0.0/8, shared by the
whole account). The NFS server VM (with its SAN data disk) is protected and independent of the
GPU nodes.
"""

from __future__ import annotations

import re

import pulumi
from pulumi.dynamic import Resource

from infra import catalog, program
from infra.blueprint import Blueprint, PlannedNode
from infra.clouds.ibm import IbmConfig
from infra.clouds.ibm.softlayer import SshKeyProvider, VirtualServerProvider

PRIVATE_NETWORK = "10.0.0.0/8"
DATA_DEVICE = "/dev/xvdc"
OS_CODE = re.compile(r"^[A-Z][A-Z0-9_]+$")


class SshKey(Resource, module="ibm", name="SshKey"):
    key_id: pulumi.Output[int]

    def __init__(self, name: str, key: str, label: str, opts: pulumi.ResourceOptions | None = None):
        super().__init__(SshKeyProvider(), name, {"key": key, "label": label, "key_id": None}, opts)


class VirtualServer(Resource, module="ibm", name="VirtualServer"):
    public_ip: pulumi.Output[str]
    private_ip: pulumi.Output[str]
    guest_id: pulumi.Output[int]

    def __init__(self, name: str, props: dict, opts: pulumi.ResourceOptions | None = None):
        sizes = {k: (m.cpus, m.memory_gb) for k, m in catalog.load("ibm").machines.items()}
        super().__init__(
            VirtualServerProvider(flavor_sizes=sizes),
            name,
            {**props, "public_ip": None, "private_ip": None, "guest_id": None},
            opts,
        )


def build(parent: pulumi.ComponentResource, name: str, cfg: IbmConfig, blueprint: Blueprint) -> pulumi.Output:
    key = SshKey(f"{name}-key", cfg.ssh_public_key, f"trainrig-{cfg.cluster}", opts=program.child(parent, protect=True))
    records = []
    for planned in blueprint.nodes:  # GPU nodes, then the storage node
        storage = planned.role == "storage"
        host_key = program.HostKey(
            f"{name}-{planned.name}-hostkey", planned.name, opts=program.child(parent, protect=storage)
        )
        server = VirtualServer(
            f"{name}-{planned.name}",
            _server_props(cfg, planned, key, host_key),
            opts=program.child(parent, protect=storage, additional_secret_outputs=["user_data"]),
        )
        records.append(
            program.node_record(
                planned, server.public_ip, server.private_ip, host_key.public_key, DATA_DEVICE, server.guest_id
            )
        )
    return program.inventory(cfg, records, f"{cfg.cluster}-private", PRIVATE_NETWORK)


def _server_props(cfg: IbmConfig, planned: PlannedNode, key: SshKey, host_key: program.HostKey) -> dict:
    return {
        **order_props(cfg, planned),
        "ssh_key_ids": [key.key_id],
        "user_data": program.cloud_init(host_key, cfg, firewall=True),
    }


def order_props(cfg: IbmConfig, planned: PlannedNode) -> dict:
    """What a server is ordered with, but its SSH key and user data (made by Pulumi): `fab plan --verify` sends it."""
    chosen = cfg.image
    if planned.role == "storage":
        # A GPU node's baked image is not the storage node's; an OS code is the whole cluster's.
        same_os = cfg.image if cfg.image and OS_CODE.match(cfg.image) else None
        chosen = cfg.storage_image or same_os
    image = {"os_code": chosen or "UBUNTU_22_64", "image_id": None}
    if chosen and not OS_CODE.match(chosen):
        image = {"os_code": None, "image_id": chosen}
    return {
        "hostname": planned.name,
        "domain": f"{cfg.cluster}.{cfg.domain}",
        "datacenter": cfg.datacenter,
        "flavor": planned.flavor,
        **image,
        "hourly": cfg.hourly,
        "local_disk": False,
        "disks": [planned.data_disk_gb],  # data disks only: the flavor (or the image) brings the boot disk
        "nic_speed": cfg.nic_speed,
        "private_vlan": cfg.private_vlan,
        "tags": sorted(
            [
                f"trainrig-cluster:{cfg.cluster}",
                f"trainrig-role:{planned.role}",
                *(f"{k}:{v}" for k, v in cfg.tags.items()),
            ]
        ),
    }
