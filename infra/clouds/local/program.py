"""The local cloud for the Pulumi program: one dynamic resource over the local backend (instance.py beside it).

`pulumi up` then does what `fab up` does, with the same code; `pulumi destroy` removes the
nodes and network and keeps storage (the shared volume and data disks), like `fab down`.
"""

from __future__ import annotations

import json
from typing import Any

import pulumi
from pulumi.dynamic import CreateResult, DiffResult, ReadResult, Resource, ResourceProvider

from infra.blueprint import Blueprint
from infra.clouds import ClusterRequest
from infra.clouds.local import LocalConfig
from infra.clouds.local.instance import BACKEND
from infra.errors import TrainrigError


class _QuietBoard:
    """The progress board the local backend reports to; Pulumi shows its own progress."""

    def update(self, node: str, text: str) -> None:
        pulumi.log.debug(f"{node}: {text}")


class LocalClusterProvider(ResourceProvider):
    def create(self, props: dict[str, Any]) -> CreateResult:
        request = ClusterRequest(
            name=props["cluster"],
            cloud="local",
            gpu_nodes=int(props["gpu_nodes"]),
            data_disk_gb=int(props["data_disk_gb"]),
            on_idle=props.get("on_idle", "down"),
        )
        board = _QuietBoard()
        inv = BACKEND.create(request, board)
        try:
            BACKEND.wait_ready(inv, board)
        except BaseException:
            BACKEND.destroy(inv, purge=False)
            raise
        return CreateResult(props["cluster"], {**props, "inventory": _plain(inv)})

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        return ReadResult(id_, {**props, "inventory": _plain(BACKEND.describe(id_))})

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        changed = [k for k in ("cluster", "gpu_nodes", "data_disk_gb") if olds.get(k) != news.get(k)]
        return DiffResult(changes=bool(changed), replaces=changed, delete_before_replace=True)

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        BACKEND.destroy(BACKEND.describe(id_), purge=False)


def _plain(inv) -> dict:
    data = json.loads(inv.model_dump_json(exclude={"updated_at"}))
    return data


class LocalCluster(Resource, module="local", name="Cluster"):
    inventory: pulumi.Output[dict]

    def __init__(self, name: str, props: dict, opts: pulumi.ResourceOptions | None = None):
        super().__init__(LocalClusterProvider(), name, {**props, "inventory": None}, opts)


def build(parent: pulumi.ComponentResource, name: str, cfg: LocalConfig, blueprint: Blueprint) -> pulumi.Output:
    if cfg.gpu_nodes == 0:
        raise TrainrigError(
            "trainrig:gpu_nodes: a local cluster needs at least 1 node; "
            "remove compute with: pulumi destroy (storage is kept)"
        )
    nodes = LocalCluster(
        f"{name}-nodes",
        {"cluster": cfg.cluster, "gpu_nodes": cfg.gpu_nodes, "data_disk_gb": cfg.data_disk_gb, "on_idle": cfg.on_idle},
        opts=pulumi.ResourceOptions(parent=parent),
    )
    return nodes.inventory
