"""GpuCluster, the one Pulumi component: the cloud's package makes nodes and storage; it outputs inventory, $/hour."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pulumi

from infra import clouds
from infra.blueprint import blueprint
from infra.config import StackConfig
from infra.inventory import Inventory, parse


@dataclass(frozen=True)
class GpuClusterArgs:
    config: StackConfig


class GpuCluster(pulumi.ComponentResource):
    inventory: pulumi.Output[dict]
    hourly_cost_usd: pulumi.Output[dict]

    def __init__(self, name: str, args: GpuClusterArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("trainrig:index:GpuCluster", name, None, opts)
        cfg = args.config
        bp = blueprint(cfg)
        built = clouds.get(cfg.cloud).build(self, name, cfg, bp)
        stack = pulumi.get_stack()
        self.inventory = built.apply(lambda data: _validated({**data, "stack": stack, "on_idle": cfg.on_idle}))
        self.hourly_cost_usd = pulumi.Output.from_input(bp.hourly_cost())
        self.register_outputs({"inventory": self.inventory, "hourly_cost_usd": self.hourly_cost_usd})


def _validated(data: dict) -> dict:
    """The inventory as cluster/ will read it, naming the stack that made it (and what its dead-man switch
    does): validated before it is exported."""
    inv: Inventory = parse(json.dumps(data), "stack output 'inventory'")
    return json.loads(inv.model_dump_json(exclude={"updated_at"}))
