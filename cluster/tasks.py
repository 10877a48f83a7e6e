"""The `fab` tasks: each parses its flags, loads the inventory, calls one library function, prints."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit
from rich.markup import escape

from cluster import demo as demo_mod
from cluster import jobs, lifecycle, results, runs
from cluster import monitor as monitor_mod
from cluster import plot as plot_mod
from cluster import provision as provision_mod
from infra import inventory as inventory_mod
from infra import state, ui
from infra.errors import TrainrigError

NAME_HELP = "cluster name (default: trainrig.cluster in Fabric config, 'dev')"
INVENTORY_HELP = (
    "where the inventory comes from: 'stack:NAME' (a Pulumi stack's outputs; 'stack' alone: "
    "trainrig.stack), or a saved file "
    "(default: trainrig.inventory, else the cluster's own)"
)


def friendly(body):
    """User errors become one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(body)
    def wrapper(c, *args, **kwargs):
        try:
            return body(c, *args, **kwargs)
        except TrainrigError as exc:
            raise Exit(f"error: {exc}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130) from None

    return wrapper


def _name(c, name: str | None) -> str:
    """--name, else trainrig.cluster; an empty name is refused, never read as the default cluster."""
    chosen = c.config.trainrig.cluster if name is None else name
    if not chosen or not state.CLUSTER_NAME.match(chosen):
        flag = "--name" if name is not None else "trainrig.cluster"
        raise TrainrigError(
            f"{flag} {chosen!r}: give a cluster name of 1-31 lowercase letters, digits or '-', starting with a letter"
        )
    return chosen


def _whole(value, flag: str, default: int) -> int:
    """A count flag as an int, or one line naming the flag (the range is the library's to check)."""
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TrainrigError(f"{flag} {value!r}: give a whole number, e.g. {flag} {default}") from None


def _seconds(value, flag: str) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise TrainrigError(f"{flag} {value!r}: give a number of seconds above 0, e.g. {flag} 600")
    return seconds


def _ask(prompt: str) -> str:
    try:
        return ui.console.input(escape(prompt))
    except EOFError:
        return ""


def _inventory(c, name: str | None, inventory: str | None = None):
    cfg = c.config.trainrig
    if name is not None:
        _name(c, name)
    return inventory_mod.for_task(name, cfg.cluster, inventory or cfg.inventory, cfg.stack)


@task(
    help={"name": NAME_HELP, "nodes": "number of GPU-role nodes (default 2)", "disk_gb": "data disk size per node, GB"}
)
@friendly
def up(c, name=None, nodes=None, disk_gb=None):
    """Create a local cluster: N GPU-role nodes and one storage node as Docker 'VMs'; on one that is up, bring back
    stopped or restarted nodes."""
    cfg = c.config.trainrig
    cluster = _name(c, name)
    count = _whole(nodes, "--nodes", cfg.nodes)
    if nodes is None:  # a cluster that is up keeps its size; --nodes that differs is refused
        count = lifecycle.running_gpu_nodes(cluster) or count
    inv = lifecycle.up(cluster, count, _whole(disk_gb, "--disk-gb", cfg.data_disk_gb))
    ui.console.print(lifecycle.status_table(inv))
    ui.console.print(f"inventory: {inventory_mod.path_for(inv.cluster)}")


@task(help={"name": NAME_HELP, "inventory": INVENTORY_HELP})
@friendly
def status(c, name=None, inventory=None):
    """Show the cluster's nodes, addresses and whether each answers SSH."""
    inv = _inventory(c, name, inventory)
    ui.console.print(lifecycle.status_table(inv))
    if not inv.running:
        ui.console.print(f"no nodes running; start them with: fab up --name {inv.cluster}")


@task(
    help={
        "name": NAME_HELP,
        "tags": "run only these playbook tags (e.g. ssh_mesh)",
        "retry_failed": "re-run only the hosts that failed or were unreachable last time",
        "playbook": "playbook under playbooks/ (default site.yml)",
        "inventory": INVENTORY_HELP,
    }
)
@friendly
def provision(c, name=None, tags=None, retry_failed=False, playbook="site.yml", inventory=None):
    """Run the Ansible playbooks on every node in parallel, with a per-host recap."""
    provision_mod.provision(_inventory(c, name, inventory), playbook=playbook, tags=tags, retry_failed=retry_failed)


@task(
    help={
        "job": "job spec, e.g. training_jobs/dp-mlp.yaml",
        "name": NAME_HELP,
        "follow": "monitor the run until it ends (exit status = the run's)",
        "inventory": INVENTORY_HELP,
        "resume": "continue from the last checkpoint of this run (id or prefix), as a new run that records it",
    }
)
@friendly
def train(c, job, name=None, follow=False, inventory=None, resume=None):
    """Launch a training job across the cluster, detached; prints the run id."""
    spec = jobs.load(job)
    inv = inventory_mod.require_running(_inventory(c, name, inventory))
    record = runs.launch(inv, spec, resume=runs.find(inv.cluster, resume) if resume else None)
    ui.console.print(f"started run [bold]{record.id}[/] ({record.ranks} ranks) in {record.run_dir}")
    if follow:
        _follow(inv, record)
    else:
        ui.console.print(f"follow it with: fab monitor --run {record.id} --name {inv.cluster}")


@task(
    help={
        "run": "run id or prefix (default: the latest)",
        "name": NAME_HELP,
        "timeout": "give up watching after this many seconds (the run goes on)",
        "inventory": INVENTORY_HELP,
    }
)
@friendly
def monitor(c, run=None, name=None, timeout=None, inventory=None):
    """Follow a run live (step, loss, samples/s); exits with the run's success or failure."""
    seconds = _seconds(timeout, "--timeout")
    inv = _inventory(c, name, inventory)
    _follow(inv, runs.find(inv.cluster, run), seconds)


def _follow(inv, record, timeout=None):
    view = monitor_mod.monitor(inv, record, timeout=timeout)
    losses = view.losses()
    summary = f"run {record.id} {view.state} after {view.elapsed:.1f}s"
    if losses:
        summary += f", loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    if view.state != "succeeded":
        cause = f" ({view.reason})" if view.reason else ""
        raise Exit(f"{summary}{cause}; see: fab logs --run {record.id} --name {inv.cluster}", code=1)
    ui.console.print(summary)


@task(
    help={
        "run": "run id or prefix (default: the latest)",
        "name": NAME_HELP,
        "follow": "keep printing until the run ends",
        "inventory": INVENTORY_HELP,
    }
)
@friendly
def logs(c, run=None, name=None, follow=False, inventory=None):
    """Print a run's log, or follow it."""
    inv = _inventory(c, name, inventory)
    monitor_mod.logs(inv, runs.find(inv.cluster, run), follow=follow)


@task(help={"run": "run id or prefix (default: the latest)", "name": NAME_HELP, "inventory": INVENTORY_HELP})
@friendly
def cancel(c, run=None, name=None, inventory=None):
    """Stop a run on every node; its log, metrics and checkpoints stay on shared storage."""
    inv = inventory_mod.require_running(_inventory(c, name, inventory))
    record = runs.find(inv.cluster, run)
    status = runs.cancel(inv, record)
    ui.console.print(f"run {record.id} {status['state']}")


@task(
    help={
        "run": "run id or prefix (default: the latest)",
        "name": NAME_HELP,
        "dest": "local folder (default ./runs)",
        "inventory": INVENTORY_HELP,
    }
)
@friendly
def fetch(c, run=None, name=None, dest="runs", inventory=None):
    """Copy a run's checkpoints, log and metrics to ./runs/<cluster>/<run-id>/."""
    inv = inventory_mod.require_running(_inventory(c, name, inventory))
    path = results.fetch(inv, runs.find(inv.cluster, run), Path(dest))
    ui.console.print(f"results in {path}")


@task(
    help={
        "run": "run id or prefix (default: the latest)",
        "name": NAME_HELP,
        "dest": "local folder (default ./runs)",
        "inventory": INVENTORY_HELP,
    }
)
@friendly
def plot(c, run=None, name=None, dest="runs", inventory=None):
    """Draw a run's loss and samples/s curves to ./runs/<cluster>/<run-id>/curves.png."""
    inv = _inventory(c, name, inventory)
    record = runs.find(inv.cluster, run)
    local = results.destination(inv, record, Path(dest))
    if inv.running:  # fresh metrics, even mid-run; after `down` the fetched copy is what there is
        local = results.fetch_metrics(inv, record, Path(dest))
    title = f"{record.job}: {record.id} ({record.ranks} ranks)"
    ui.console.print(f"curves in {plot_mod.plot_run(local, title)}")
    telemetry = plot_mod.plot_telemetry(local, title)
    if telemetry:
        ui.console.print(f"GPU, CPU and network per host in {telemetry}")


@task(
    help={
        "name": NAME_HELP,
        "purge": "also delete storage: the shared volume or NFS server, data disks, keys and inventory",
        "stack": "Pulumi stack of a cluster that a stack made (default: the one its inventory names)",
        "yes": "purge a cloud cluster without typing its name (for scripts; a local one never asks)",
    }
)
@friendly
def down(c, name=None, purge=False, stack=None, yes=False):
    """Remove compute; storage is kept unless --purge. Checked against the cloud's listing; safe twice."""
    cluster = _name(c, name)
    if not inventory_mod.path_for(cluster).is_file():
        ui.console.print(f"cluster {cluster!r} does not exist: nothing to remove")
        return
    inv = inventory_mod.load(cluster)
    if purge:
        lifecycle.confirm_purge(inv, yes, _ask if sys.stdin.isatty() else None)
    remaining = lifecycle.down(inv, purge=purge, stack=stack or c.config.trainrig.stack)
    if remaining is None:
        ui.console.print(f"cluster {cluster!r} removed, storage included")
        return
    kept = [f"{n.name} ({n.role} node, ${n.hourly_price_usd:.2f}/h)" for n in remaining.nodes]
    kept += [r.name for r in remaining.retained]
    ui.console.print(f"compute of {cluster!r} removed; kept: {', '.join(kept) or 'nothing'}")
    ui.console.print(f"remove storage too with: fab down --name {cluster} --purge")


@task(help={"stack": "stack name (stacks/Pulumi.<stack>.yaml) or a stack file (default: trainrig.stack)"})
@friendly
def plan(c, stack=None):
    """Print the nodes, flavors, disks and $/hour a stack will create (no Pulumi CLI needed)."""
    from infra import blueprint, config

    ui.console.print(blueprint.table(blueprint.blueprint(config.load_named(stack or c.config.trainrig.stack))))


@task(
    help={
        "name": "cluster name for the demo (default 'demo')",
        "nodes": "GPU-role nodes (default 2)",
        "job": "job spec (default training_jobs/dp-mlp.yaml)",
        "keep": "leave the cluster up afterwards",
    }
)
@friendly
def demo(c, name="demo", nodes=None, job=None, keep=False):
    """Up, provision, train, monitor, fetch and down in one command, with a summary."""
    demo_mod.demo(_name(c, name), _whole(nodes, "--nodes", 2), Path(job) if job else demo_mod.DEFAULT_JOB, keep=keep)


namespace = Collection(up, status, provision, train, monitor, logs, cancel, fetch, plot, down, demo, plan)
namespace.configure({"trainrig": {"cluster": "dev", "nodes": 2, "data_disk_gb": 2, "stack": None, "inventory": None}})
