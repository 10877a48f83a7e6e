"""`fab demo`: up, provision, train, monitor, fetch, down in one go, with a closing summary."""

from __future__ import annotations

import time
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from cluster import deadman, jobs, lifecycle, monitor, plot, provision, results
from infra import clouds, ui
from infra import inventory as inventory_mod
from infra.commands import wait_until
from infra.errors import TrainrigError

DEFAULT_JOB = Path(__file__).resolve().parent.parent / "training_jobs" / "dp-mlp.yaml"
# After the grace: the switch's polling, the nodes' power-off and its own wait for them (remote/deadman.py).
TEARDOWN_TIMEOUT = 360


def demo(
    name: str, gpu_nodes: int, job_path: Path = DEFAULT_JOB, keep: bool = False, down_after: float | None = None
) -> Path:
    """The whole flow on a new local cluster, which is purged at the end unless `keep`. With `down_after`
    (a grace in seconds) the cluster's dead-man switch tears the compute down once the run ends, as
    `fab train --down-after` does, and the demo waits for that; the storage and the results on it stay."""
    job = jobs.load(job_path)
    timings: dict[str, float] = {}
    started = time.monotonic()
    if inventory_mod.path_for(name).is_file():
        earlier = inventory_mod.load(name)
        if earlier.cloud != clouds.DEFAULT:  # the demo is local: it never removes what someone pays for
            raise TrainrigError(
                f"cluster {name!r} is on {earlier.cloud}; the demo runs on a local cluster: "
                "pass another name with --name"
            )
        ui.console.print(f"removing the earlier {name!r} cluster first")
        lifecycle.down(earlier, purge=True)
    inv = None
    armed = None
    try:
        with ui.timed("up", timings):
            inv = lifecycle.up(name, gpu_nodes, data_disk_gb=2)
        with ui.timed("provision", timings):
            provision.provision(inv)
        with ui.timed("launch", timings):
            record, armed = deadman.launch_run(inv, job, down_after=down_after)
            ui.console.print(f"run {record.id}: {record.ranks} ranks on {job.spec.nodes} nodes")
            if armed:
                ui.console.print(escape(deadman.summary(inv, armed)))
        with ui.timed("train", timings):
            view = monitor.monitor(inv, record)
        if view.state != "succeeded":
            raise TrainrigError(f"run {record.id} {view.state}; see: fab logs --run {record.id} --name {name}")
        with ui.timed("fetch", timings):
            dest = results.fetch(inv, record)
            curves = plot.plot_run(dest, f"{job.spec.name}: {record.ranks} ranks on {job.spec.nodes} nodes")
            plot.plot_telemetry(dest, f"{job.spec.name}: load per node")
        if armed:
            with ui.timed("down (by the cluster)", timings):
                teardown = _torn_down(inv, down_after or 0.0)
    finally:
        # Once armed, the switch tears the compute down when the run ends, however the demo ends.
        if inv is not None and not keep and not armed:
            with ui.timed("down", timings):
                lifecycle.down(inv, purge=down_after is None)
    _summary(inv, job, view, dest, curves, timings, time.monotonic() - started)
    if armed:
        ui.console.print(escape(deadman.describe_record(teardown)))
        ui.console.print(f"storage and results kept; remove them with: fab down --name {name} --purge")
    return dest


def _torn_down(inv, grace: float) -> dict:
    """The switch's teardown record once every GPU node has gone (within the grace and the switch's own bound)."""

    def complete() -> dict | None:
        record = deadman.teardown_record(inv)
        return record if record and (record.get("compute_gone_at") or record.get("still_up")) else None

    record = wait_until(
        complete,
        timeout=grace + TEARDOWN_TIMEOUT,
        interval=deadman.CHECK_EVERY,
        what=f"the dead-man switch to tear down the compute of {inv.cluster} (then: fab down --name {inv.cluster})",
    )
    if record.get("still_up"):
        raise TrainrigError(f"{deadman.describe_record(record)}")
    return record


def _summary(inv, job, view, dest: Path, curves: Path, timings: dict[str, float], total: float) -> None:
    table = Table(title="demo summary", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("nodes", f"{len(inv.gpu_nodes)} GPU-role + 1 storage ({', '.join(n.name for n in inv.nodes)})")
    table.add_row("job", f"{job.spec.name}: {view.record.ranks} ranks, {view.last.get('step', 0)} steps")
    losses = view.losses()
    if losses:
        table.add_row("loss", f"{losses[0]:.4f} -> {losses[-1]:.4f}  {monitor.sparkline(losses)}")
    for phase, seconds in timings.items():
        table.add_row(f"{phase} time", f"{seconds:.1f}s")
    table.add_row("total", f"{total:.1f}s")
    table.add_row("results", str(dest))
    table.add_row("curves", str(curves))
    checkpoints = sorted(dest.glob("checkpoints/*.npz"))
    if checkpoints:
        table.add_row("checkpoint", str(checkpoints[-1]))
    ui.console.print(table)
