"""Clouds behind one small interface, and the registry that finds them.

A cloud is a package infra/clouds/<name>/ whose __init__ defines CLOUD, with:
    name            the value of trainrig:cloud and of the inventory's `cloud`
    Config          its stack config model (infra.config.StackBase or MachineStack, cloud: Literal[name])
    capabilities    what trainrig may ask of it (CAPABILITIES below); anything else fails early
    build(parent, name, cfg, blueprint) -> Output[dict]
                    its part of the Pulumi program: storage (protected) and compute, children of
                    `parent` named f"{name}-...", returning the inventory once the cloud has answered
    backend(stack)  the runtime verbs on its clusters (the Backend protocol below)
    power(inv, cfg, on) -> dict[str, str]
                    park (on=False) or resume its cluster's GPU nodes, disks and set-up kept: stop and
                    start them, or (IBM) change their flavor in place; returns each resumed node's public
                    address (clouds without "park" refuse in one line)
    billable(cluster, cfg) -> list[str]
                    what the cloud's own listing still holds for a cluster (teardown is checked with it)
    audit(known, everything) -> list[Billable]
                    what bills for the clusters named in `known` (name -> inventory), found by the
                    cloud's tags or labels; with everything, for any trainrig cluster, even one whose
                    local state was lost
    stand_in_image(reference) -> str | None
                    for clouds whose nodes reach no public registry: a local image to send in place
                    of a public one a Dockerfile starts from (None: the nodes pull it themselves)
and beside it prices.yaml, its dated price table (infra/catalog.py). Adding a cloud is that package,
its price rows and a sample stack in stacks/; nothing else lists the clouds.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import Field

from infra.errors import TrainrigError
from infra.inventory import Inventory, Node, OnIdle
from infra.models import Strict
from infra.state import CLUSTER_NAME

if TYPE_CHECKING:
    import pulumi

    from infra.blueprint import Blueprint
    from infra.config import StackBase

# The cloud with no account and no bill: clusters of Docker containers on the operator's machine,
# the demo's and the tests' (and where `fab up` creates clusters unless told otherwise).
DEFAULT = "local"

CAPABILITIES = frozenset(
    {
        "create",  # `fab up` makes its clusters (otherwise `pulumi up` of a stack does)
        "pulumi_stack",  # its clusters live in a Pulumi stack, which `fab down` changes
        "gpu",  # its nodes can have GPUs
        "memlock",  # its containers may lift the locked-memory limit (NCCL, RDMA)
        "data_disk",
        "shared_storage",
        "ssh_mesh",
        "park",  # its GPU nodes can be stopped with their disks kept, and billing for them stops
        "self_teardown",  # a GPU node that powers itself off stops billing (the dead-man switch relies on it)
        # A powered-off GPU node keeps billing, so the dead-man switch cancels the servers through the
        # cloud's API instead, with a credential of their own (Cloud.switch_cancel).
        "cancel_from_cluster",
    }
)


@dataclass
class Findings:
    """What `fab plan --verify` learnt: problems (the cloud would refuse) and notes (worth knowing)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CancelPlan:
    """How the dead-man switch cancels a cluster's GPU servers from the cluster: `config` goes into its
    config file (on the shared storage, readable by the nodes: no secret in it), `credential` into a
    root-only file on the switch's node, never onto the shared storage or a command line."""

    config: dict[str, Any]
    credential: str = field(repr=False)


class ClusterRequest(Strict):
    """What `fab up` asks a backend for."""

    name: str = Field(pattern=CLUSTER_NAME.pattern)
    cloud: str = DEFAULT
    gpu_nodes: int = Field(ge=1, le=16)
    data_disk_gb: int = Field(default=2, ge=1, le=64)
    image: str | None = Field(default=None, description="a baked node image for the GPU nodes (fab bake)")
    storage_image: str | None = Field(default=None, description="a baked image for the storage node (fab bake)")
    on_idle: OnIdle = Field(default="down", description="what the dead-man switch does to the GPU nodes")


class Billable(Strict):
    """One thing a cloud bills for, and which cluster and node it belongs to as far as its tags say."""

    kind: str  # instance, volume, efs, container, ...
    id: str
    cluster: str | None = Field(default=None, description="from its tag or label; None when it carries none")
    node: str | None = Field(default=None, description="the node it belongs to, when it belongs to one")
    detail: str = ""

    def accounted_for(self, known: dict[str, Inventory]) -> bool:
        """An inventory holds it: its cluster is known and, for a node's part, that node is in the inventory."""
        inv = known.get(self.cluster or "")
        if inv is None:
            return False
        return self.node is None or self.node in {n.name for n in inv.nodes}


class Progress(Protocol):
    """Where a backend reports what each node is doing (a live table, or Pulumi's log)."""

    def update(self, node: str, text: str) -> None: ...


class Backend(Protocol):
    """The verbs on a running cluster."""

    def create(self, request: ClusterRequest, board: Progress) -> Inventory: ...
    def reconcile(self, inv: Inventory, board: Progress) -> tuple[Inventory, list[str]]:
        """Bring an existing cluster's nodes back (start what stopped, refresh addresses and ports,
        keep the pinned host keys) and wait until they are ready; the inventory as it now is, and one
        line per thing done."""
        ...

    def wait_ready(self, inv: Inventory, board: Progress) -> None: ...
    def describe(self, cluster: str) -> Inventory: ...
    def destroy(self, inv: Inventory, purge: bool) -> Inventory | None: ...
    def billable(self, cluster: str) -> list[str]: ...
    def park(self, inv: Inventory) -> Inventory: ...
    def resume(self, inv: Inventory, board: Progress) -> Inventory: ...  # back as parked, ready to train
    def bake(self, inv: Inventory, node: Node, name: str, generalize: str) -> tuple[str, bool]:
        """Capture a provisioned node as an image a new cluster can start from; `generalize` is a shell
        script that removes what belongs to this node alone (its keys, credentials, machine id).
        Returns the image's id and whether the node itself was generalized (and needs provisioning again)."""
        ...


class Cloud(Protocol):
    name: str
    Config: type[StackBase]
    capabilities: frozenset[str]

    def build(self, parent: pulumi.ComponentResource, name: str, cfg: Any, blueprint: Blueprint) -> pulumi.Output: ...
    def backend(self, stack: str | None = None) -> Backend: ...
    def billable(self, cluster: str, cfg: Any) -> list[str]: ...
    def power(self, inv: Inventory, cfg: Any, on: bool) -> dict[str, str]: ...
    def audit(self, known: dict[str, Inventory], everything: bool) -> list[Billable]: ...
    # A node's disks as a machine image, for StackBackend.bake (a local backend bakes a container itself).
    def capture(self, cluster: str, cfg: Any, node: str, name: str) -> str: ...
    def verify(self, cfg: Any, blueprint: Blueprint) -> Findings: ...
    def stand_in_image(self, reference: str) -> str | None: ...


def names() -> list[str]:
    """Every registered cloud: the packages under infra/clouds/ (found without importing them)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)


def get(name: str) -> Cloud:
    if name not in names():
        raise TrainrigError(f"cloud {name!r} is not supported; choose one of: {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}").CLOUD


def all_clouds() -> list[Cloud]:
    return [get(n) for n in names()]


def require(cloud: Cloud, capability: str, why: str) -> None:
    """Refuse early, with a reason, what a cloud cannot do."""
    if capability not in cloud.capabilities:
        raise TrainrigError(f"{cloud.name} clusters cannot {why}")
