"""The inventory: the one typed, versioned contract between infra/ (who creates) and cluster/ (who uses)."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from infra import state
from infra.errors import TrainrigError
from infra.models import Strict, first_error

SCHEMA_VERSION: Literal[1] = 1
HOSTNAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
STORAGE_NODE = "storage"
# What the dead-man switch does to the GPU nodes when it fires: end them (storage kept), or park them
# (stopped, their disks and set-up kept, as `fab park` does) on clouds that can.
OnIdle = Literal["down", "park"]


def gpu_node_names(count: int) -> list[str]:
    """The names every cloud gives its GPU nodes, in order: node0, node1, ..."""
    return [f"node{i}" for i in range(count)]


class DataDisk(Strict):
    # /dev/xvdc, or a udev link such as /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123...
    device: str = Field(pattern=r"^/dev/[A-Za-z0-9/_.:-]+$")
    size_gb: int = Field(gt=0)


class Node(Strict):
    name: str = Field(pattern=HOSTNAME)
    role: Literal["gpu", "storage"]
    public_address: str = Field(min_length=1, description="address the operator's SSH reaches")
    private_address: IPv4Address
    ssh_port: int = Field(ge=1, le=65535)
    host_key: str = Field(pattern=r"^(ssh-ed25519|ecdsa-sha2-nistp256|ssh-rsa) [A-Za-z0-9+/=]+$")
    gpu_count: int = Field(ge=0)
    gpu_model: str | None = None
    cpus: int = Field(ge=1)
    data_disks: list[DataDisk] = []
    hourly_price_usd: float = Field(ge=0)
    parked_hourly_price_usd: float | None = Field(
        default=None, ge=0, description="what the node bills while stopped (its disks); None: it cannot be parked"
    )
    spot: bool = Field(default=False, description="a spot instance: hourly_price_usd is the most it can cost")
    cloud_id: str | None = Field(
        default=None, description="the cloud's own id of the node's server (IBM: its virtual guest id)"
    )
    flavor: str | None = Field(
        default=None, description="the machine type it was ordered as: what `fab up` restores after `fab park`"
    )

    @field_validator("host_key")
    @classmethod
    def _key_blob(cls, host_key: str) -> str:
        """The key itself must decode and be of the type it says: SSH pins it, and a bad one fails every connection."""
        kind, blob = host_key.split(" ", 1)
        try:
            data = base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"the {kind} key is not valid base64; copy the node's public host key again") from None
        size = int.from_bytes(data[:4], "big") if len(data) >= 4 else -1
        inner = data[4 : 4 + size].decode("ascii", errors="replace") if 0 < size <= len(data) - 4 else ""
        if inner != kind:
            raise ValueError(
                f"the key says {kind} but holds {inner or 'no key type'}; copy the node's public host key again"
            )
        return host_key


class SharedStorage(Strict):
    kind: Literal["node", "efs"] = Field(default="node", description="served by a storage node, or by Amazon EFS")
    server: str = Field(
        description="name of the storage node that serves the share; for efs, its mount target's address"
    )
    export: str = Field(pattern=r"^/")
    mount_point: str = Field(pattern=r"^/")


class Network(Strict):
    name: str
    cidr: IPv4Network


class Retained(Strict):
    """Something kept on purpose after `down` (data outlives compute)."""

    kind: Literal["volume", "disk", "instance"]
    name: str
    hourly_price_usd: float = 0.0


class Inventory(Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    cluster: str = Field(pattern=state.CLUSTER_NAME.pattern)
    cloud: str = Field(description="a registered cloud: a package under infra/clouds/")
    stack: str | None = Field(default=None, description="the Pulumi stack that made the cluster, if one did")
    ssh_user: str = Field(min_length=1)
    ssh_private_key: Path
    nodes: list[Node] = []
    storage: SharedStorage | None = None
    network: Network | None = None
    retained: list[Retained] = []
    admin_cidr: IPv4Network | None = Field(
        default=None, description="where SSH is let in from, on clouds whose nodes run their own firewall"
    )
    on_idle: OnIdle = Field(
        default="down", description="what the dead-man switch does to the GPU nodes: down (ends them) or park"
    )
    parked_at: datetime | None = Field(
        default=None, description="when `fab park` stopped the GPU nodes (disks and set-up kept); `fab up` resumes"
    )
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("cloud")
    @classmethod
    def _registered(cls, cloud: str) -> str:
        from infra import clouds  # the registry imports this module

        if cloud not in clouds.names():
            raise ValueError(f"unknown cloud {cloud!r}; one of: {', '.join(clouds.names())}")
        return cloud

    @model_validator(mode="after")
    def _consistent(self) -> Inventory:
        names = [n.name for n in self.nodes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"node names must be unique, repeated: {', '.join(dupes)}")
        if self.storage and self.storage.kind == "node" and self.nodes:
            server = next((n for n in self.nodes if n.name == self.storage.server), None)
            if server is None or server.role != "storage":
                raise ValueError(f"storage.server {self.storage.server!r} is not a storage node")
        if self.network:
            outside = [n.name for n in self.nodes if n.private_address not in self.network.cidr]
            if outside:
                raise ValueError(f"nodes outside network {self.network.cidr}: {', '.join(outside)}")
        return self

    @property
    def running(self) -> bool:
        return bool(self.nodes)

    @property
    def gpu_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.role == "gpu"]

    @property
    def storage_node(self) -> Node | None:
        if self.storage is None or self.storage.kind != "node":
            return None
        return next((n for n in self.nodes if n.name == self.storage.server), None)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise TrainrigError(f"cluster {self.cluster!r} has no node {name!r}")

    def known_hosts_lines(self) -> list[str]:
        """Pinned host keys as the operator's ssh sees the nodes (public address and port)."""
        return [f"{_host_pattern(n.public_address, n.ssh_port)} {n.host_key}" for n in self.nodes]

    def hourly_cost_usd(self) -> float:
        return sum(n.hourly_price_usd for n in self.nodes) + sum(r.hourly_price_usd for r in self.retained)


def _host_pattern(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


def parse(text: str, source: str) -> Inventory:
    try:
        return Inventory.model_validate_json(text)
    except ValidationError as exc:
        raise TrainrigError(f"invalid inventory {source}: {first_error(exc)}") from exc


def path_for(cluster: str) -> Path:
    return state.cluster_dir(cluster) / "inventory.json"


def load(cluster: str) -> Inventory:
    """The inventory of a named cluster, or a one-line error that says how to get one."""
    path = path_for(cluster)
    if not path.is_file():
        known = state.known_clusters()
        hint = f"known clusters: {', '.join(known)}" if known else "no clusters exist yet"
        raise TrainrigError(f"no cluster named {cluster!r} ({hint}); create it with: fab up --name {cluster}")
    return parse(path.read_text(), str(path))


def load_file(path: Path) -> Inventory:
    if not path.is_file():
        raise TrainrigError(f"inventory file {path} does not exist")
    return parse(path.read_text(), str(path))


STACK_SOURCE = "stack"


def from_stack_output(text: str, source: str) -> Inventory:
    """A saved `pulumi stack output --json` -> Inventory (the output named 'inventory'; the rest is ignored)."""
    try:
        outputs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrainrigError(f"invalid stack output {source}: not JSON ({exc.msg})") from None
    if not isinstance(outputs, dict) or not isinstance(outputs.get("inventory"), dict):
        raise TrainrigError(f"stack output {source} has no 'inventory'; run: pulumi up")
    return parse(json.dumps(outputs["inventory"]), source)


def for_task(name: str | None, default_name: str, source: str | None, stack: str | None = None) -> Inventory:
    """The inventory a fab task works on.

    With a source ('stack', 'stack:NAME' or a file) it comes from there. Without one: the saved
    inventory of the cluster (--name, else the default); when there is none and a stack is named
    (trainrig.stack), that stack's outputs, so `pulumi up` then `fab provision` needs no extra step.
    """
    if not source and not path_for(name or default_name).is_file() and stack:
        source = f"{STACK_SOURCE}:{stack}"
    if not source:
        return load(name or default_name)
    inv = resolve(source, stack)
    if name and inv.cluster != name:
        raise TrainrigError(f"the inventory from {source} is for cluster {inv.cluster!r}, not {name!r}")
    return inv


def resolve(source: str, default_stack: str | None = None) -> Inventory:
    """An inventory from 'stack:NAME' or 'stack' (a Pulumi stack's outputs; 'stack' alone needs trainrig.stack) or a
    saved file (stack output or inventory.json). It is saved under the cluster's state directory with its pinned host
    keys, so SSH and later tasks by name use it."""
    if source == STACK_SOURCE or source.startswith(STACK_SOURCE + ":"):
        from infra import automation  # the Pulumi SDK is loaded only when a stack is asked for

        inv = automation.stack_inventory(source.partition(":")[2] or default_stack)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise TrainrigError(f"inventory file {path} does not exist")
        text = path.read_text()
        inv = from_stack_output(text, str(path)) if '"inventory"' in text[:200] else parse(text, str(path))
    save(inv)
    return inv


def save(inv: Inventory) -> Path:
    path = path_for(inv.cluster)
    state.write_atomic(path, inv.model_dump_json(indent=2) + "\n")
    write_known_hosts(inv)
    return path


def write_known_hosts(inv: Inventory) -> Path:
    path = known_hosts_path(inv.cluster)
    state.write_atomic(path, "".join(line + "\n" for line in inv.known_hosts_lines()))
    return path


def known_hosts_path(cluster: str) -> Path:
    return state.cluster_dir(cluster) / "known_hosts"


def require_running(inv: Inventory) -> Inventory:
    if not inv.running:
        raise TrainrigError(f"cluster {inv.cluster!r} has no nodes running; start it with: {how_to_start(inv)}")
    if inv.parked_at:
        raise TrainrigError(f"cluster {inv.cluster!r} is parked; bring it back with: fab up --name {inv.cluster}")
    return inv


def how_to_start(inv: Inventory) -> str:
    """Clouds that `fab up` can create start that way; the others through their Pulumi stack."""
    from infra import clouds

    if "create" in clouds.get(inv.cloud).capabilities:
        return f"fab up --name {inv.cluster}"
    stack = inv.stack or "STACK"
    return f"pulumi config set trainrig:gpu_nodes N --stack {stack} && pulumi up --stack {stack}"


def dumps(inv: Inventory) -> str:
    return json.dumps(inv.model_dump(mode="json"), indent=2)
