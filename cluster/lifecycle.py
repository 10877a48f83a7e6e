"""Up, status and down of a cluster: the backend picked by the inventory's cloud, nothing half-made."""

from __future__ import annotations

import shutil
from collections.abc import Callable

from pydantic import ValidationError
from rich import box
from rich.markup import escape
from rich.table import Table

from cluster import deadman
from infra import clouds, ssh, state, ui
from infra import inventory as inventory_mod
from infra.clouds import ClusterRequest
from infra.errors import TrainrigError
from infra.inventory import STORAGE_NODE, Inventory, OnIdle, gpu_node_names


def up(
    name: str,
    gpu_nodes: int,
    data_disk_gb: int,
    cloud: str = clouds.DEFAULT,
    image: str | None = None,
    on_idle: OnIdle | None = None,
    storage_image: str | None = None,
) -> Inventory:
    """Create a cluster (GPU nodes from `image` and the storage node from `storage_image` when given:
    baked nodes, fab bake), or bring an existing one back.

    `on_idle` is what its dead-man switch will do (down, the default, or park); given for a cluster
    that exists, it replaces the cluster's choice from the next arming on."""
    request = _request(
        name=name,
        cloud=cloud,
        gpu_nodes=gpu_nodes,
        data_disk_gb=data_disk_gb,
        image=image,
        storage_image=storage_image,
        on_idle=on_idle or "down",
    )
    with state.cluster_lock(name, "up"):
        earlier = inventory_mod.load(name) if inventory_mod.path_for(name).is_file() else None
        if earlier is not None and on_idle and earlier.on_idle != on_idle:
            if earlier.stack:  # its nodes were made for the stack's choice (AWS: terminate or stop)
                raise TrainrigError(
                    f"cluster {name!r} is made by stack {earlier.stack}: set trainrig:on_idle: {on_idle} there, "
                    f"then pulumi up --stack {earlier.stack}"
                )
            earlier = earlier.model_copy(update={"on_idle": on_idle})
            inventory_mod.save(earlier)
        if earlier is not None:
            earlier = deadman.settle(earlier)  # the switch may have parked it
        if earlier is not None and earlier.parked_at:
            return _resume_and_rearm(earlier)
        provider = clouds.get(cloud)
        clouds.require(provider, "create", "be created by fab up: make them with pulumi up --stack NAME")
        backend = provider.backend()
        if earlier is not None and earlier.running:
            return _bring_back(backend, earlier, gpu_nodes)
        fresh = not state.cluster_dir(name).exists()
        names = [*gpu_node_names(gpu_nodes), STORAGE_NODE]
        with ui.NodeBoard(f"creating cluster {name} ({cloud})", names) as board:
            inv = backend.create(request, board)
            try:
                backend.wait_ready(inv, board)
            except BaseException as exc:
                try:
                    backend.destroy(inv, purge=fresh)
                    if fresh:
                        # Its inventory listed nodes as running and its keys were made for them:
                        # left behind, they make the next `fab up` say the cluster is already up.
                        shutil.rmtree(state.cluster_dir(name), ignore_errors=True)
                except Exception as cleanup:
                    # The cause first (it is why up failed), then what may still bill and how to remove it.
                    again = f"fab down --name {name}" + (" --purge" if fresh else "")
                    cause = exc or type(exc).__name__
                    raise TrainrigError(
                        f"{cause}; removing the half-made cluster failed too ({cleanup}): run {again}"
                    ) from exc
                raise
    return inv


def _bring_back(backend, inv: Inventory, gpu_nodes: int) -> Inventory:
    """`fab up` of a cluster that is up already: its nodes restarted (new ports) or stopped come back as they were."""
    if len(inv.gpu_nodes) != gpu_nodes:
        raise TrainrigError(
            f"cluster {inv.cluster!r} is up with {len(inv.gpu_nodes)} GPU nodes, not {gpu_nodes}; "
            f"use it as it is, or remove it first: fab down --name {inv.cluster}"
        )
    with ui.NodeBoard(f"bringing back cluster {inv.cluster} ({inv.cloud})", [n.name for n in inv.nodes]) as board:
        inv, done = backend.reconcile(inv, board)  # which waits until every node is ready
    for line in done or [f"cluster {inv.cluster} was up: nothing to bring back"]:
        ui.console.print(ui.plain(line))
    return inv


def running_gpu_nodes(name: str) -> int | None:
    """How many GPU nodes a cluster that is up has (what `fab up` of it keeps by default); None if it is not up."""
    if not inventory_mod.path_for(name).is_file():
        return None
    inv = inventory_mod.load(name)
    return len(inv.gpu_nodes) if inv.running else None


FLAGS = {
    "name": "--name",
    "gpu_nodes": "--nodes",
    "data_disk_gb": "--disk-gb",
    "cloud": "cloud",
    "on_idle": "--on-idle",
}


def _request(**fields) -> ClusterRequest:
    try:
        return ClusterRequest(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0])
        raise TrainrigError(f"{FLAGS.get(field, field)} {fields.get(field)!r}: {first['msg']}") from exc


def park(inv: Inventory, stack: str | None = None) -> Inventory:
    """Stop the GPU nodes, disks and set-up kept: compute billing ends; `up` brings them back."""
    provider = clouds.get(inv.cloud)
    clouds.require(provider, "park", "park their GPU nodes (a stopped one keeps billing): fab down removes them")
    inventory_mod.require_running(inv)
    if not inv.gpu_nodes:
        raise TrainrigError(f"cluster {inv.cluster!r} has no GPU nodes to park")
    with state.cluster_lock(inv.cluster, "park"):
        return provider.backend(stack).park(inv)


def _resume_and_rearm(inv: Inventory) -> Inventory:
    """A parked cluster back; if the dead-man switch parked it, the switch is armed again with its limits."""
    resumed = resume(inv)
    if deadman.parked_by_switch(deadman.teardown_record(resumed)):
        try:
            ui.console.print(escape(deadman.summary(resumed, deadman.rearm_after_park(resumed))))
        except TrainrigError as exc:
            ui.console.print(escape(f"the dead-man switch is not armed again ({exc}); arm it with fab deadman"))
    return resumed


def resume(inv: Inventory, stack: str | None = None) -> Inventory:
    """A parked cluster back as it was: nodes started, addresses refreshed, ready to train (the backend waits)."""
    backend = clouds.get(inv.cloud).backend(stack)
    names = [n.name for n in inv.gpu_nodes]
    with ui.NodeBoard(f"resuming cluster {inv.cluster} ({inv.cloud})", names) as board:
        return backend.resume(inv, board)


def confirm_purge(inv: Inventory, yes: bool, ask: Callable[[str], str] | None) -> None:
    """A purge of a cluster someone pays for deletes its data for good: the operator types its name, or said --yes.

    `ask` prompts on a terminal; None means there is none (a script, CI), where only --yes will do.
    Local clusters hold nothing billed and are purged without asking.
    """
    if yes or inv.cloud == clouds.DEFAULT:
        return
    what = f"--purge deletes the storage and data of {inv.cloud} cluster {inv.cluster!r} for good"
    if ask is None:
        raise TrainrigError(f"{what}; no terminal to confirm on: add --yes if that is what you mean")
    typed = ask(f"{what}. Type the cluster's name to confirm: ").strip()
    if typed != inv.cluster:
        raise TrainrigError(f"{typed!r} is not {inv.cluster!r}: nothing was removed")


def down(inv: Inventory, purge: bool, stack: str | None = None) -> Inventory | None:
    """Remove compute (and storage with purge); verified against the backend's own listing.

    The bill up to now goes to the ledger once the compute is gone (the nodes' uptimes are read first).
    """
    from cluster import cost

    backend = clouds.get(inv.cloud).backend(stack)
    with state.cluster_lock(inv.cluster, "down --purge" if purge else "down"):
        entry = cost.bill(inv).entry() if inv.nodes else None
        remaining = backend.destroy(inv, purge)
        if entry:
            cost.record_bill({**entry, "purge": purge})
        if remaining is not None:
            from cluster import deadman

            deadman.forget_credential(remaining)
        if purge:
            shutil.rmtree(state.cluster_dir(inv.cluster), ignore_errors=True)
    return remaining


def status_table(inv: Inventory) -> Table:
    reachable = ssh.on_nodes(inv.nodes, lambda n: ssh.reachable(inv, n))
    table = Table(
        title=f"cluster {inv.cluster} ({inv.cloud})", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False
    )
    for column in ("node", "role", "private", "ssh", "gpus", "data disk", "$/h", "reachable"):
        table.add_column(column)
    for n in inv.nodes:
        gpus = f"{n.gpu_count} x {n.gpu_model}" if n.gpu_count else "-"
        disks = ", ".join(f"{d.device.removeprefix('/dev/')} {d.size_gb}G" for d in n.data_disks) or "-"
        ok = "[green]yes[/]" if reachable[n.name] else "[red]no[/]"
        table.add_row(
            n.name,
            n.role,
            str(n.private_address),
            f"{n.public_address}:{n.ssh_port}",
            gpus,
            disks,
            f"{n.hourly_price_usd:.2f}",
            ok,
        )
    for r in inv.retained:
        table.add_row(f"[dim]{r.name}[/]", f"kept {r.kind}", "", "", "", "", f"{r.hourly_price_usd:.2f}", "")
    if not all(reachable.values()) and "create" in clouds.get(inv.cloud).capabilities:
        table.caption = f"a node that stopped or restarted comes back with: fab up --name {inv.cluster}"
        table.caption_justify = "left"
    return table
