"""Clouds that live in a Pulumi stack (aws, ibm): teardown through the Pulumi CLI, checked against the cloud's listing.

Compute and storage have separate lifecycles. `down` sets trainrig:gpu_nodes to 0 and runs
`pulumi up`: the GPU nodes go, the protected NFS server and its disk stay. `down --purge`
lifts the protection and runs `pulumi destroy`. Either way the cloud's own listing then has
to agree, or the command fails naming what is left.
"""

from __future__ import annotations

import importlib
import shutil

from cluster import inventory as inventory_mod
from cluster import ui
from cluster.commands import run, stream
from cluster.errors import TrainrigError
from cluster.inventory import Inventory
from infra import config
from infra.stacks import ROOT

PULUMI_TIMEOUT = 3600


class PulumiStack:
    capabilities = frozenset({"data_disk", "shared_storage", "ssh_mesh", "gpu"})

    def __init__(self, cloud: str, stack: str | None = None):
        self.name = cloud
        self.stack = stack  # None: the stack `pulumi stack select` chose
        self.cloud_module = importlib.import_module(f"infra.backends.{cloud}")

    def create(self, request, board) -> Inventory:
        raise TrainrigError(f"{self.name} clusters are created from their stack: fab plan --stack NAME, then pulumi up")

    def wait_ready(self, inv: Inventory, board) -> None:
        """`pulumi up` returns once the cloud reports the servers ready; SSH is checked by provisioning."""

    def describe(self, cluster: str) -> Inventory:
        return inventory_mod.load(cluster)

    def destroy(self, inv: Inventory, purge: bool) -> Inventory | None:
        stack = self.stack
        scope = _pulumi(inv, stack)
        cfg = _stack_config(stack)
        if purge:
            _pulumi_step(["pulumi", "state", "unprotect", "--all", "--yes", *scope], "lifting storage protection")
            _pulumi_step(["pulumi", "destroy", "--yes", "--skip-preview", *scope], f"pulumi destroy of {inv.cluster}")
            leftovers = self.billable(inv.cluster, cfg)
            if leftovers:
                raise TrainrigError(f"{self.name} still lists for {inv.cluster!r}: {', '.join(leftovers)}")
            return None
        run(["pulumi", "config", "set", "trainrig:gpu_nodes", "0", *scope], what="setting trainrig:gpu_nodes to 0")
        _pulumi_step(["pulumi", "up", "--yes", "--skip-preview", *scope], f"pulumi up of {inv.cluster} without GPU nodes")
        # Listings end each server's line with its role or hostname: "(..., storage)" / "(storage)".
        compute = [item for item in self.billable(inv.cluster, cfg)
                   if item.startswith(("instance", "virtual server")) and not item.endswith("storage)")]
        if compute:
            raise TrainrigError(f"{self.name} still lists compute of {inv.cluster!r}: {', '.join(compute)}")
        remaining = inventory_mod.load_stack(stack)
        inventory_mod.save(remaining)
        return remaining

    def billable(self, cluster: str, cfg: config.StackConfig | None = None) -> list[str]:
        return self.cloud_module.billable(cluster, cfg)


def _pulumi(inv: Inventory, stack: str | None) -> list[str]:
    if shutil.which("pulumi") is None:
        raise TrainrigError(
            f"fab down of an {inv.cloud} cluster runs the Pulumi CLI, which is not installed: install it "
            "(https://www.pulumi.com/docs/install/), or run `pulumi config set trainrig:gpu_nodes 0 && pulumi up` yourself"
        )
    return ["--stack", stack] if stack else []


def _stack_config(stack: str | None) -> config.StackConfig:
    if not stack:
        stack = run(["pulumi", "stack", "--show-name"], what="finding the selected stack").stdout.strip()
    return config.load_stack_file(config.stack_file(stack, ROOT))


def _pulumi_step(argv: list[str], what: str) -> None:
    with ui.status(what) as show:
        stream(argv, show, timeout=PULUMI_TIMEOUT, what=what)
