"""Pieces the clouds' Pulumi programs share: pinned host keys, cloud-init, node records and the inventory they export.

What a cloud's build() must do is documented once, in infra/clouds/__init__.py.
"""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

import pulumi
import yaml
from pulumi.dynamic import CreateResult, DiffResult, Resource, ResourceProvider

from infra import keys
from infra.blueprint import NFS_EXPORT, PlannedNode
from infra.config import MachineStack
from infra.inventory import STORAGE_NODE


class HostKeyProvider(ResourceProvider):
    """A node's SSH host key, made once, so it is pinned before the node first boots."""

    def create(self, props: dict[str, Any]) -> CreateResult:
        pair = keys.generate(props.get("comment", ""))
        return CreateResult(
            props["node"], {**props, "public_key": keys.bare(pair.public_openssh), "private_key": pair.private_openssh}
        )

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        return DiffResult(
            changes=olds.get("node") != news.get("node"),
            replaces=["node"] if olds.get("node") != news.get("node") else [],
        )


class HostKey(Resource, module="trainrig", name="HostKey"):
    public_key: pulumi.Output[str]
    private_key: pulumi.Output[str]

    def __init__(self, name: str, node: str, opts: pulumi.ResourceOptions | None = None):
        opts = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(additional_secret_outputs=["private_key"]))
        super().__init__(
            HostKeyProvider(),
            name,
            {"node": node, "comment": f"root@{node}", "public_key": None, "private_key": None},
            opts,
        )


ADMIN_RULE = "trainrig-admin"  # ufw's comment on the SSH rule for admin_cidr (role common keeps it current)


def cloud_init(host_key: HostKey, cfg: MachineStack, firewall: bool) -> pulumi.Output[str]:
    """User data: the pinned host key, no password logins; with firewall, nothing in but SSH from admin_cidr.

    The cluster's own nodes are let in by provisioning (role common), which knows their private
    addresses; at first boot they are not known yet, and a whole private range would let in every
    server of the account.
    """

    def render(private_key: str, public_key: str) -> str:
        # disable_root off: the key pair logs in as root (key only, from admin_cidr), as on IBM and
        # local nodes. Runs are system units writing to the shared storage as root, and Ubuntu
        # images otherwise answer root with "Please login as the user ubuntu".
        doc: dict[str, Any] = {
            "ssh_keys": {"ed25519_private": private_key, "ed25519_public": public_key},
            "ssh_deletekeys": True,
            "ssh_genkeytypes": [],
            "disable_root": False,
            # Keys only, as on local nodes: sshd's PasswordAuthentication off.
            "ssh_pwauth": False,
        }
        if firewall:
            doc["runcmd"] = [
                ["ufw", "default", "deny", "incoming"],
                # Commented like provisioning's rule, which keeps it equal to admin_cidr afterwards.
                ["ufw", "allow", "from", str(cfg.admin_cidr), "to", "any", "port", "22", "proto", "tcp"]
                + ["comment", ADMIN_RULE],
                ["ufw", "--force", "enable"],
            ]
        return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=True)

    return pulumi.Output.secret(
        pulumi.Output.all(host_key.private_key, host_key.public_key).apply(lambda kv: render(*kv))
    )


def node_record(planned: PlannedNode, public_ip, private_ip, host_key, device, cloud_id=None) -> pulumi.Output[dict]:
    """One inventory node, once the cloud has given it addresses (and its data disk a device path)."""

    parked = planned.parked_usd_per_hour

    def record(values) -> dict:
        public, private, key, device, ident = values
        return {
            "name": planned.name,
            "role": planned.role,
            "public_address": public or private,
            "private_address": private,
            "ssh_port": 22,
            "host_key": key,
            "gpu_count": planned.gpus,
            "gpu_model": planned.gpu_model,
            "cpus": planned.cpus,
            "data_disks": [{"device": device, "size_gb": planned.data_disk_gb}],
            "hourly_price_usd": round(planned.usd_per_hour, 4),
            "parked_hourly_price_usd": None if parked is None else round(parked, 4),
            "spot": planned.spot,
            "cloud_id": None if ident is None else str(int(ident) if isinstance(ident, float) else ident),
            "flavor": planned.flavor,
        }

    return pulumi.Output.all(public_ip, private_ip, host_key, device, cloud_id).apply(record)


def inventory(
    cfg: MachineStack, nodes: list[pulumi.Output], network_name, network_cidr, efs_address=None
) -> pulumi.Output[dict]:
    """The whole inventory: storage node last, shared storage served from it over NFS (or from EFS)."""

    def assemble(values) -> dict:
        *records, net_name, cidr, efs = values
        storage = {"server": STORAGE_NODE, "export": NFS_EXPORT, "mount_point": NFS_EXPORT}
        if efs:
            storage = {"kind": "efs", "server": efs, "export": "/", "mount_point": NFS_EXPORT}
        return {
            "schema_version": 1,
            "cluster": cfg.cluster,
            "cloud": cfg.cloud,
            "ssh_user": cfg.login_user,
            "ssh_private_key": str(cfg.private_key_path),
            "nodes": records,
            "storage": storage,
            "network": {"name": net_name, "cidr": str(IPv4Network(cidr))},
            "admin_cidr": str(cfg.admin_cidr),
        }

    return pulumi.Output.all(*nodes, network_name, network_cidr, efs_address).apply(assemble)


def child(parent: pulumi.Resource, **extra) -> pulumi.ResourceOptions:
    return pulumi.ResourceOptions(parent=parent, **extra)
