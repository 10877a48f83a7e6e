"""Clusters that live in a Pulumi stack, driven through pulumi.automation: a named stack, live progress, typed outputs.

Compute and storage have separate lifecycles. `down` sets trainrig:gpu_nodes to 0 and runs an
update: the GPU nodes go, the protected NFS server and its disk stay. `down --purge` lifts the
protection and destroys the stack. Either way the cloud's own listing then has to agree, or the
command fails naming what is left. A stack whose cluster or cloud is not the inventory's is
refused before anything changes.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING

from infra import config, inventory, ui
from infra.errors import TrainrigError
from infra.inventory import Inventory, Node

if TYPE_CHECKING:
    from pulumi import automation as auto

    from infra.clouds import Cloud, ClusterRequest, Progress

INSTALL_HINT = "install it (https://www.pulumi.com/docs/install/)"


def select(stack: str | None, what: str) -> auto.Stack:
    """The named stack of this project; never whichever stack happens to be selected."""
    if not stack:
        raise TrainrigError(
            f"{what} needs a Pulumi stack: pass --stack NAME or set trainrig.stack in your Fabric config"
        )
    if shutil.which("pulumi") is None:
        raise TrainrigError(f"{what} runs the Pulumi CLI, which is not installed: {INSTALL_HINT}")
    from pulumi import automation as auto

    try:
        return auto.select_stack(stack_name=stack, work_dir=str(config.ROOT))
    except auto.errors.CommandError as exc:
        raise TrainrigError(f"Pulumi stack {stack!r}: {_last_line(exc)}") from None


def inventory_of(stack: auto.Stack) -> Inventory:
    outputs = stack.outputs()
    if "inventory" not in outputs:
        raise TrainrigError(f"stack {stack.name} has no 'inventory' output; run: pulumi up --stack {stack.name}")
    return inventory.parse(json.dumps(outputs["inventory"].value), f"output 'inventory' of stack {stack.name}")


def stack_inventory(stack: str | None) -> Inventory:
    """The inventory a named stack exports."""
    return inventory_of(select(stack, "reading the stack's inventory"))


def stack_config(stack: auto.Stack) -> config.StackConfig:
    """The stack's trainrig:* config as the program reads it (secrets included, for the cloud's listing)."""
    values = {key: value.value for key, value in stack.get_all_config().items()}
    return config.from_pulumi_config(values)


class StackBackend:
    """The runtime verbs for a cloud whose clusters `pulumi up` makes: teardown through the stack."""

    def __init__(self, cloud: Cloud, stack: str | None = None):
        self.cloud = cloud
        self.stack = stack

    def create(self, request: ClusterRequest, board: Progress) -> Inventory:
        raise TrainrigError(
            f"{self.cloud.name} clusters are created from their stack: fab plan --stack NAME, "
            "then pulumi up --stack NAME"
        )

    def reconcile(self, inv: Inventory, board: Progress) -> tuple[Inventory, list[str]]:
        raise TrainrigError(
            f"{self.cloud.name} clusters are brought back from their stack: pulumi up --refresh --stack "
            f"{inv.stack or 'NAME'}, then fab status --name {inv.cluster} --inventory stack:{inv.stack or 'NAME'}"
        )

    def wait_ready(self, inv: Inventory, board: Progress) -> None:
        """`pulumi up` returns once the cloud reports the servers ready; SSH is checked by provisioning."""

    def describe(self, cluster: str) -> Inventory:
        return inventory.load(cluster)

    def destroy(self, inv: Inventory, purge: bool) -> Inventory | None:
        stack = self._stack_for(inv)
        cfg = stack_config(stack)
        if (cfg.cluster, cfg.cloud) != (inv.cluster, inv.cloud):
            raise TrainrigError(
                f"stack {stack.name} is cluster {cfg.cluster!r} on {cfg.cloud}, not {inv.cluster!r} "
                f"on {inv.cloud}; name the stack that made {inv.cluster!r} with --stack"
            )
        if purge:
            from pulumi.automation.interface import API

            _step(
                f"lifting storage protection of {inv.cluster}",
                lambda out: API(stack.workspace.pulumi_command).state_unprotect(
                    all=True, stack=stack.name, cwd=str(config.ROOT), on_output=out
                ),
            )
            _step(f"pulumi destroy of {inv.cluster}", lambda out: stack.destroy(on_output=out))
            leftovers = self.cloud.billable(inv.cluster, cfg)
            if leftovers:
                raise TrainrigError(f"{self.cloud.name} still lists for {inv.cluster!r}: {', '.join(leftovers)}")
            return None
        from pulumi import automation as auto

        stack.set_config(f"{config.NAMESPACE}:gpu_nodes", auto.ConfigValue(value="0"))
        # --refresh: GPU instances that ended themselves (the dead-man switch) are read as gone, not deleted again.
        _step(f"pulumi up of {inv.cluster} without GPU nodes", lambda out: stack.up(on_output=out, refresh=True))
        # Listings end each server's line with its role or hostname: "(..., storage)" / "(storage)".
        compute = [
            item
            for item in self.cloud.billable(inv.cluster, cfg)
            if item.startswith(("instance", "virtual server")) and not item.endswith("storage)")
        ]
        if compute:
            raise TrainrigError(f"{self.cloud.name} still lists compute of {inv.cluster!r}: {', '.join(compute)}")
        remaining = inventory_of(stack)
        inventory.save(remaining)
        return remaining

    def park(self, inv: Inventory) -> Inventory:
        from datetime import UTC, datetime

        from infra import clouds

        clouds.require(self.cloud, "park", "park their GPU nodes: fab down removes them, storage kept")
        self.cloud.power(inv, stack_config(self._stack_for(inv)), False)
        parked = inv.model_copy(update={"parked_at": datetime.now(UTC)})
        inventory.save(parked)
        return parked

    def bake(self, inv: Inventory, node: Node, name: str, generalize: str) -> tuple[str, bool]:
        """Generalize the VM in place over SSH, then have the cloud capture its disks as an image."""
        from infra import ssh

        with ssh.open_checked(inv, node) as conn:
            ssh.run(conn, ["sh", "-c", generalize], timeout=120, what=f"{node.name}: generalizing before the capture")
        return self.cloud.capture(inv.cluster, stack_config(self._stack_for(inv)), node.name, name), True

    def resume(self, inv: Inventory, board: Progress) -> Inventory:
        started = self.cloud.power(inv, stack_config(self._stack_for(inv)), True)
        # A stopped instance comes back with a new public address (unless it has an elastic IP); an IBM
        # server whose flavor changed keeps its own.
        nodes = [n.model_copy(update={"public_address": started.get(n.name, n.public_address)}) for n in inv.nodes]
        for name in started:
            board.update(name, "[green]running[/]")
        resumed = inv.model_copy(update={"nodes": nodes, "parked_at": None})
        inventory.save(resumed)
        from infra import ssh
        from infra.commands import wait_until

        # The instances boot as they were: fstab mounts the data disk and systemd starts Docker.
        for node in resumed.gpu_nodes:
            wait_until(
                functools.partial(ssh.reachable, resumed, node),
                timeout=600,
                interval=5,
                what=f"{node.name} to answer SSH with its pinned host key",
            )
        return resumed

    def billable(self, cluster: str) -> list[str]:
        inv = inventory.load(cluster)
        return self.cloud.billable(cluster, stack_config(self._stack_for(inv)))

    def _stack_for(self, inv: Inventory) -> auto.Stack:
        if self.stack and inv.stack and self.stack != inv.stack:
            raise TrainrigError(
                f"cluster {inv.cluster!r} was made by stack {inv.stack}, not {self.stack}; "
                f"run again with --stack {inv.stack}"
            )
        return select(self.stack or inv.stack, f"changing cluster {inv.cluster!r} on {self.cloud.name}")


def _step(what: str, work: Callable[[Callable[[str], None]], object]) -> None:
    """Run one Pulumi operation with its output as live progress; its failure as one line."""
    from pulumi import automation as auto

    with ui.status(what) as show:
        try:
            work(show)
        except auto.errors.CommandError as exc:
            raise TrainrigError(f"{what} failed: {_last_line(exc)}") from None


def _last_line(exc: Exception) -> str:
    """The CLI's own error line out of automation's multi-line report (cmd, code, stdout, stderr)."""
    lines = [line.strip().removeprefix("stderr:").strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line and not line.startswith(("code:", "cmd:", "stdout:"))]
    errors = [line for line in lines if line.lower().startswith("error")]
    return (errors or lines or [type(exc).__name__])[-1]
