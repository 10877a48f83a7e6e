"""Clouds behind one small interface, and the registry that picks one by name.

Every backend implements the same five verbs:
    create(request, board)   make the cluster's nodes, storage and network; return its inventory
    wait_ready(inv, board)   block until every node answers SSH with its pinned host key
    describe(cluster)        the inventory as the cloud sees it now
    destroy(inv, purge)      remove compute (and storage when purge); return what remains
    billable(cluster)        what the cloud's own listing still holds for the cluster
"""

from __future__ import annotations

import importlib
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from cluster.errors import TrainrigError
from cluster.inventory import Inventory
from cluster.state import CLUSTER_NAME


class ClusterRequest(BaseModel):
    """What `up` asks a backend for; clouds add their own settings in later versions."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=CLUSTER_NAME.pattern)
    cloud: str = "local"
    gpu_nodes: int = Field(ge=1, le=16)
    data_disk_gb: int = Field(default=2, ge=1, le=64)


class Backend(Protocol):
    name: str
    capabilities: frozenset[str]

    def create(self, request: ClusterRequest, board) -> Inventory: ...
    def wait_ready(self, inv: Inventory, board) -> None: ...
    def describe(self, cluster: str) -> Inventory: ...
    def destroy(self, inv: Inventory, purge: bool) -> Inventory | None: ...
    def billable(self, cluster: str) -> list[str]: ...


REGISTRY = {"local": "infra.backends.local"}

# The Pulumi program's module for each cloud (see infra/program.py for what one implements).
PROGRAMS = {"local": "infra.backends.local_program", "aws": "infra.backends.aws", "ibm": "infra.backends.ibm"}


# Clouds whose clusters live in a Pulumi stack: `pulumi up` makes them, `fab down` takes compute away.
STACK_CLOUDS = ("aws", "ibm")


def get(cloud: str, stack: str | None = None) -> Backend:
    """The backend for a cloud; stack names the Pulumi stack of a stack cloud (None: the selected one)."""
    if cloud in STACK_CLOUDS:
        from infra.backends.stack import PulumiStack

        return PulumiStack(cloud, stack)
    if cloud not in REGISTRY:
        raise TrainrigError(f"cloud {cloud!r} is not supported; choose one of: {', '.join([*REGISTRY, *STACK_CLOUDS])}")
    return importlib.import_module(REGISTRY[cloud]).BACKEND


def program(cloud: str):
    """The Pulumi program module that builds a cluster on this cloud."""
    if cloud not in PROGRAMS:
        raise TrainrigError(f"trainrig:cloud: {cloud!r} has no Pulumi program; set trainrig:cloud to one of: {', '.join(PROGRAMS)}")
    return importlib.import_module(PROGRAMS[cloud])
