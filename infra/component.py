"""GpuCluster: the one Pulumi component. It asks the cloud's module for nodes and storage and outputs the inventory and $/hour."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from cluster.inventory import Inventory, parse
from infra import backends, plan as plan_mod
from infra.config import StackConfig


@dataclass(frozen=True)
class GpuClusterArgs:
    config: StackConfig


class GpuCluster(pulumi.ComponentResource):
    inventory: pulumi.Output[dict]
    hourly_cost_usd: pulumi.Output[dict]

    def __init__(self, name: str, args: GpuClusterArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("trainrig:index:GpuCluster", name, None, opts)
        cfg = args.config
        plan = plan_mod.plan(cfg)
        built = backends.program(cfg.cloud).build(self, name, cfg, plan)
        self.inventory = built.apply(_validated)
        self.hourly_cost_usd = pulumi.Output.from_input(plan.hourly_cost())
        self.register_outputs({"inventory": self.inventory, "hourly_cost_usd": self.hourly_cost_usd})


def _validated(data: dict) -> dict:
    """The inventory as cluster/ will read it: validated against the schema before it is exported."""
    import json

    inv: Inventory = parse(json.dumps(data), "stack output 'inventory'")
    return json.loads(inv.model_dump_json(exclude={"updated_at"}))
